"""The master's fan-out workers (``[server] workers`` > 1): start, feed, supervise, drain them.

`WorkerPool` stands where the `ws.WebSocketServer` stands in a single-process daemon, with the
same surface for the daemon (`auth`, `limits`, `tls`, `listening`, `client_count`, `drain`,
`close_token_connections`, `adopt_upgrade`): the daemon's reload, expiry, shutdown and HTTP
code is the same for both. Behind it:

- N worker slots (`workerslot`), each running a worker process (`worker`): the same executable
  re-executed, started again when it ends;
- the accept loop: the master accepts on the WebSocket listener it bound or systemd passed and
  hands each connection to the ready worker with the fewest clients (`fleet.Placement`, SCM_RIGHTS
  on the worker's handoff socket). Measured, a listener shared by the workers was uneven (the
  idle one took most of a storm); and while no worker is ready, connections wait in the
  kernel's queue;
- one channel per worker (`channel`): at start the worker's config and the master's history,
  then every update as the master's hub encoded it (`Hub.tap`): one message per symbol's batch,
  built once and written to every worker;
- the workers' counters summed into the daemon's `Stats` (`fleet.StatsBook`), and the reloads
  passed on: one `config` message, then the closes of revoked tokens.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import channel
from .auth import TokenStore
from .channelio import ACCEPTED, UPGRADE, hand_over
from .closecodes import CLOSE_GOING_AWAY, CLOSE_TOKEN_REVOKED
from .connection import Limits, Log
from .fleet import Placement, StatsBook, WorkerConfig, share, worker_config
from .history import Entry
from .hub import Hub, deflated_frame
from .metrics import Stats
from .settings import Settings
from .workerslot import WorkerSlot
from .ws import _UNAVAILABLE, ACCEPT_ROUND_SECONDS, AcceptFailures, _send_and_close


class WorkerPool:
    """N fan-out worker processes behind the daemon's WebSocket listener (see the module)."""

    def __init__(
        self,
        listener: socket.socket,
        hub: Hub,
        auth: TokenStore,
        limits: Limits,
        stats: Stats,
        log: Log,
        *,
        count: int,
        settings: Callable[[], Settings],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._listener = listener
        self._hub = hub
        self._auth = auth
        self._limits = limits
        self._tls = tls
        self.stats = stats
        self.log = log
        self._settings = settings
        self.count = count
        self.slots = [WorkerSlot(i) for i in range(count)]
        # The slots whose worker has the history: updates go to them.
        self._live: list[WorkerSlot] = []
        self._book = StatsBook()
        self._placement = Placement()
        self._accept_failures = AcceptFailures(log)
        self.draining = False
        self._nursery: trio.Nursery | None = None
        self._accepting: trio.CancelScope | None = None
        self._pending_closes: list[tuple[frozenset[str], int, str]] = []
        self._config_dirty = False
        self._flush_scheduled = False
        s = settings().server
        self._tls_files = _tls_files(s.tls_cert, s.tls_key) if tls is not None else None
        hub.tap = self._forward

    # The daemon's view, as of a WebSocketServer.

    @property
    def auth(self) -> TokenStore:
        return self._auth

    @auth.setter
    def auth(self, auth: TokenStore) -> None:
        self._auth = auth
        self._changed()

    @property
    def limits(self) -> Limits:
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self._limits = limits
        self._changed()

    @property
    def tls(self) -> ssl.SSLContext | None:
        return self._tls

    @tls.setter
    def tls(self, tls: ssl.SSLContext | None) -> None:
        self._tls = tls
        self._changed()

    @property
    def listening(self) -> bool:
        """True while every worker is up and accepting (what /readyz and READY=1 wait for)."""
        return not self.draining and all(slot.ready for slot in self.slots)

    def problem(self) -> str | None:
        """Why not every worker serves (a /readyz reason), or None."""
        down = [slot.index for slot in self.slots if not slot.ready]
        if not down or self.draining:
            return None
        listed = ", ".join(map(str, down))
        return f"{len(down)} of {self.count} workers not serving (worker {listed})"

    @property
    def client_count(self) -> int:
        return sum(self._book.clients.values())

    def subscriber_count(self) -> int:
        return self._book.subscriber_count()

    def close_token_connections(
        self,
        names: set[str] | frozenset[str],
        code: int = CLOSE_TOKEN_REVOKED,
        reason: str = "token revoked",
    ) -> None:
        """Have every worker close the connections of the tokens in `names`, after any config
        change made just before (the same order as a single process). Returns None: each worker
        logs its own count (`token_connections_closed`)."""
        if names:
            self._pending_closes.append((frozenset(names), code, reason))
            self._schedule_flush()

    def adopt_upgrade(self, sock: socket.socket, received: bytes) -> None:
        """Pass a connection the HTTP port read a `/ws` request from to a worker, as an accepted
        one (`_hand`; 503 when none can take it now); the worker serves it as its own. Takes
        `sock`."""
        if self._hand(sock, UPGRADE, received) is not None:
            self._refuse(sock)

    async def drain(self, code: int = CLOSE_GOING_AWAY) -> None:
        """Stop accepting (the master's copy of the listener closes) and have every worker close
        its clients (1001) and exit; return once all have. The caller bounds the wait."""
        self.draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        trio.lowlevel.notify_closing(self._listener)
        self._listener.close()
        timeout = self._settings().server.shutdown_timeout
        # The workers' deadline ends before the master's, which then still has time to exit.
        message = channel.encode("drain", timeout=max(timeout - 1.0, timeout * 0.6), code=code)
        for slot in self._live:
            assert slot.link is not None
            slot.link.send(message)
        for slot in self.slots:  # no restart while draining: each slot's last process
            if slot.process is not None:
                await slot.process.wait()

    def collector(self) -> Collector:
        """Per-worker series for /metrics."""
        return _WorkerCollector(self)

    # The workers.

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker and keep each running until cancelled or drained. Reports started
        at once: readiness (`listening`) follows the workers."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for slot in self.slots:
                    nursery.start_soon(slot.keep_running, self)
                self._accepting = trio.CancelScope()
                nursery.start_soon(self._accept_loop, self._accepting)
                task_status.started()
                # Drained, every worker gone: stay (not a service that exited) until cancelled.
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def _accept_loop(self, scope: trio.CancelScope) -> None:
        """Accept on the WebSocket port and hand each connection to a worker, until drained.

        In rounds, as the single process accepts, each ended by a checkpoint. While no worker
        is ready nothing is accepted: connections wait in the kernel's queue (`listen_backlog`)
        for one, rather than being refused.
        """
        with scope:
            listener = self._listener
            while True:
                await trio.lowlevel.wait_readable(listener)
                if not any(slot.ready for slot in self._live):
                    await trio.sleep(0.05)
                    continue
                round_ends = time.perf_counter() + ACCEPT_ROUND_SECONDS
                while time.perf_counter() < round_ends:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:  # EMFILE and friends: back off, keep serving
                        self._accept_failures.failed(exc, trio.current_time())
                        await trio.sleep(0.1)
                        break
                    await self._place(sock)
                await trio.lowlevel.checkpoint()

    async def _place(self, sock: socket.socket) -> None:
        """Hand an accepted connection to a worker, waiting while the workers with room have
        their handoff queue full (a storm: the rest wait in the kernel's accept queue
        meanwhile). Refused (503) only when no worker is ready."""
        while True:
            chosen = self._hand(sock, ACCEPTED)
            if chosen is None:
                return
            if chosen < 0 or self.draining:
                self._refuse(sock)
                return
            handoff = self.slots[chosen].handoff
            assert handoff is not None
            try:
                with trio.move_on_after(0.1):  # then placed afresh: the loads may have changed
                    await trio.lowlevel.wait_writable(handoff)
            except (trio.ClosedResourceError, OSError):
                continue  # that worker ended meanwhile: placed afresh
            except BaseException:  # cancelled (drained): the connection is not served
                sock.close()
                raise

    def _hand(self, sock: socket.socket, kind: bytes, received: bytes = b"") -> int | None:
        """Hand `sock` to the ready worker with the fewest clients (`fleet.Placement`) and close
        the master's copy: None once handed. When that worker's queue is full, the next with
        fewer clients than its share of `max_connections` (`fleet.share`) takes it; when none
        can, `sock` is left as it is and the first choice is returned (-1: no worker ready)."""
        ready = [s.index for s in self._live if s.ready and not self.draining]
        first = self._placement.pick(ready)
        if first is None:
            return -1
        room = share(self._limits.max_connections, self.count) or 0
        candidates = [first, *(i for i in ready if i != first and self._placement.load(i) < room)]
        for chosen in candidates:
            handoff = self.slots[chosen].handoff
            if handoff is not None and hand_over(handoff, sock, kind, received):
                self._placement.handed(chosen)
                sock.close()  # the worker has its own copy
                return None
        return first

    def _refuse(self, sock: socket.socket) -> None:
        self._book.count_own("rejected_upgrades", _UNAVAILABLE.reason)
        self._book.merge_into(self.stats)
        _send_and_close(sock, _UNAVAILABLE.response())

    # The slots' view (`workerslot.Master`).

    def start_messages(self) -> list[bytes]:
        return [
            channel.encode("config", [self._config().dump()]),
            *history_messages(self._hub),
            channel.encode("start"),
        ]

    def joined(self, slot: WorkerSlot) -> None:
        self._live.append(slot)

    def left(self, slot: WorkerSlot) -> None:
        self._live.remove(slot)
        self._book.retire(slot.index)
        self._placement.forget(slot.index)
        self._book.merge_into(self.stats)

    def reported(self, slot: WorkerSlot, header: dict[str, Any]) -> None:
        self._book.report(slot.index, header["stats"], int(header["subscribers"]))
        taken = int(header.get("taken", 0))
        self._placement.reported(slot.index, self._book.clients[slot.index], taken)
        self._book.merge_into(self.stats)

    def _forward(self, symbol: str, updates: list[tuple[bytes, Entry]]) -> None:
        """`Hub.tap`: one message for the batch, encoded once, written to every worker."""
        if self._live:
            message = update_message(symbol, updates, deflate=self._limits.permessage_deflate)
            for slot in self._live:
                slot.link.send(message)  # type: ignore[union-attr]

    def _config(self) -> WorkerConfig:
        s = self._settings()
        if self._tls is not None and s.server.tls_cert is not None:
            self._tls_files = _tls_files(s.server.tls_cert, s.server.tls_key)
        return worker_config(
            self._auth.specs(),
            self._auth.enabled,
            self._limits,
            self._tls_files if self._tls is not None else None,
            s.log.level,
            self.count,
            log_format=s.log.format,
            symbols=self._hub.symbols,
            history_size=s.history.size,
        )

    def _changed(self) -> None:
        self._config_dirty = True
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Send what changed once the current step is over: a reload sets the store, the limits
        and TLS one after another (and the daemon its settings after them), then closes the
        revoked tokens; the workers get one `config` and then the closes, in that order."""
        if self._flush_scheduled or self._nursery is None:
            return
        self._flush_scheduled = True
        self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        self._flush_scheduled = False
        messages = []
        if self._config_dirty:
            self._config_dirty = False
            messages.append(channel.encode("config", [self._config().dump()]))
        for names, code, reason in self._pending_closes:
            messages.append(
                channel.encode("close_tokens", names=sorted(names), code=code, reason=reason)
            )
        self._pending_closes.clear()
        for slot in self._live:
            for message in messages:
                slot.link.send(message)  # type: ignore[union-attr]


def history_messages(hub: Hub) -> list[bytes]:
    """One `history` message per symbol: the hub's retained frames, oldest first."""
    messages = []
    for symbol in hub.symbols:
        ring = hub.history[symbol]
        entries = ring.last(len(ring))
        first = entries[0].seq if entries else ring.next_seq
        messages.append(channel.encode("history", [e.frame for e in entries], s=symbol, q=first))
    return messages


def update_message(symbol: str, updates: list[tuple[bytes, Entry]], *, deflate: bool) -> bytes:
    """The `update` message of one symbol's batch as the hub recorded it, with the compressed
    frames (made once, kept with the entries) when clients may negotiate permessage-deflate."""
    entries = [entry for _, entry in updates]
    deflated = [deflated_frame(e) for e in entries] if deflate else []
    return channel.encode_update(symbol, entries[0].seq, [e.frame for e in entries], deflated)


def _tls_files(cert: Any, key: Any) -> tuple[str, str] | None:
    return None if cert is None or key is None else (str(cert), str(key))


class _WorkerCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        yield GaugeMetricFamily(
            "agentspoonsd_workers", "Fan-out worker processes configured.", value=pool.count
        )
        yield GaugeMetricFamily(
            "agentspoonsd_workers_ready",
            "Fan-out workers up and accepting (below agentspoonsd_workers: /readyz is 503).",
            value=sum(1 for slot in pool.slots if slot.ready),
        )
        clients = GaugeMetricFamily(
            "agentspoonsd_worker_clients",
            "WebSocket clients connected, per worker.",
            labels=["worker"],
        )
        for slot in pool.slots:
            clients.add_metric([str(slot.index)], pool._book.clients.get(slot.index, 0))
        yield clients
