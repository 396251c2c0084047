"""A fan-out worker process (``[server] workers`` > 1): serves the clients its master gives it.

Started by the master (`workerpool`) as ``agentspoonsd _worker`` with two inherited
descriptors: its channel and its handoff socket, on which the master passes each connection it
accepted for this worker (`channelio.hand_over`). Everything it knows comes over the channel,
in order:

1. `config` (`fleet.WorkerConfig`): tokens, limits (its share), TLS files, log settings;
2. `history`, one per symbol: the master's retained frames, so `history`, `resume` and `reset`
   answer exactly as the master's own hub would;
3. `start`: from here it accepts, and says `ready`;
4. then `update` (frames encoded and compressed once by the master, written to clients as they
   are: `Hub.publish_frames`), `config` again after a reload, `close_tokens`, and `drain`.

It reports its counters every REPORT_INTERVAL (`stats`), which is also how the master knows it
is alive. It ends, after closing every client with 1001, on `drain`, SIGTERM or SIGINT, or when
the master's end of the channel closes (the master is gone); SIGHUP is the master's (ignored).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from pathlib import Path

import orjson
import structlog
import trio

from . import channel, channelio
from .auth import TokenStore
from .closecodes import CLOSE_TOKEN_REVOKED
from .exits import EX_OK, EX_SOFTWARE
from .fleet import WorkerConfig, report_fields
from .frames import encode_text_frame, frame_payload
from .history import History
from .hub import Hub
from .logs import LevelGate, configure_logging, get_logger
from .market.bar import Bar
from .metrics import Stats
from .tls import server_context
from .ws import ACCEPT_ROUND_SECONDS, WebSocketServer

REPORT_INTERVAL = 1.0  # seconds between two `stats` reports (the master's liveness check too)
CHANNEL_MAX_BYTES = 1 << 20  # reports are small: a worker never lags behind its master
DEFAULT_DRAIN_TIMEOUT = 5.0


def _tls(config: WorkerConfig) -> ssl.SSLContext | None:
    if config.tls_files is None:
        return None
    cert, key = config.tls_files
    return server_context(Path(cert), Path(key))


class Worker:
    """One worker process's state; `run` serves until drained."""

    def __init__(self, index: int, link: socket.socket, handoff: socket.socket) -> None:
        self.index = index
        self._link_sock = link
        self._handoff = handoff
        self.stats = Stats()
        self.taken = 0  # connections taken from the handoff socket (the master's placement)
        self._gate: LevelGate | None = None
        self._log = get_logger("agentspoonsd.worker")

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            link = channelio.ChannelEnd(
                self._link_sock,
                nursery.start_soon,
                max_bytes=CHANNEL_MAX_BYTES,
                on_overflow=lambda: None,
                on_failure=lambda: None,
            )
            first = await link.receive()
            if first is None or first.kind != "config":
                return EX_SOFTWARE
            config = WorkerConfig.load(first.parts[0])
            self._gate = configure_logging(config.log_level, config.log_format)
            self._log = get_logger("agentspoonsd.worker")
            history = await self._receive_history(link, config)
            if history is None:
                return EX_SOFTWARE
            _, unused = trio.open_memory_channel[list[Bar]](0)
            hub = Hub(list(config.symbols), unused, self.stats, history=history)
            websocket = WebSocketServer(
                None,  # the master accepts, and hands each connection over
                hub,
                TokenStore(config.tokens, enabled=config.auth_enabled),
                config.limits,
                self.stats,
                get_logger("agentspoonsd.ws"),
                tls=_tls(config),
            )
            await nursery.start(websocket.run)
            link.send(channel.encode("ready", pid=os.getpid()))
            self._log.info("worker_serving", clients_share=config.limits.max_connections)
            nursery.start_soon(self._report_loop, link, hub, websocket)
            nursery.start_soon(self._handoff_loop, websocket)
            timeout = DEFAULT_DRAIN_TIMEOUT
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as waiting:
                    done = trio.Event()

                    async def until_signal() -> None:
                        async for _ in signals:
                            done.set()
                            return

                    async def until_drain() -> None:
                        nonlocal timeout
                        timeout = await self._follow(link, hub, websocket) or timeout
                        done.set()

                    waiting.start_soon(until_signal)
                    waiting.start_soon(until_drain)
                    await done.wait()
                    waiting.cancel_scope.cancel()
            self._log.info("worker_draining", clients=websocket.client_count)
            with trio.move_on_after(max(timeout - 0.5, timeout * 0.8)):
                await websocket.drain()
            self._send_report(link, hub, websocket)
            nursery.cancel_scope.cancel()
        return EX_OK

    async def _receive_history(
        self, link: channelio.ChannelEnd, config: WorkerConfig
    ) -> History | None:
        """The master's retained updates, symbol by symbol, until `start`; None at EOF."""
        history = History(
            config.symbols, config.history_size, decode_frame=encode_text_frame, start_seq=0
        )
        while True:
            message = await link.receive()
            if message is None:
                return None
            if message.kind == "start":
                return history
            if message.kind != "history":
                continue
            symbol = message.header["s"]
            seq = int(message.header["q"])
            history.restart(symbol, seq)
            for frame in message.parts:
                payload = frame_payload(frame)
                data = orjson.loads(payload)["data"]
                history.record(symbol, seq, payload, frame, data)
                seq += 1

    async def _follow(
        self, link: channelio.ChannelEnd, hub: Hub, websocket: WebSocketServer
    ) -> float | None:
        """Apply the master's messages until `drain` (its timeout) or EOF (None).

        Messages are taken in batches of what has arrived, and one symbol's consecutive updates
        of a batch are published together: a worker that fell behind catches up with several
        updates per client write, as the single process's hub does, and checkpoints between
        batches (never a whole backlog without one).
        """
        while True:
            batch = await link.receive_all()
            if batch is None:
                self._log.warning("worker_master_gone")
                return None
            pending: dict[str, Batch] = {}
            for message in batch:
                if message.kind == "update":
                    _gather(hub, pending, message)
                    continue
                _publish(hub, pending)  # what came before it, first
                if message.kind == "config":
                    self._apply(websocket, WorkerConfig.load(message.parts[0]))
                elif message.kind == "close_tokens":
                    self._close_tokens(websocket, message.header)
                elif message.kind == "drain":
                    return float(message.header.get("timeout", DEFAULT_DRAIN_TIMEOUT))
            _publish(hub, pending)

    def _apply(self, websocket: WebSocketServer, config: WorkerConfig) -> None:
        """A reload the master applied: the new store first (a revoked token can no longer
        reconnect here), then limits, TLS and level. Closing the connections of revoked tokens
        is the master's `close_tokens`, which follows."""
        websocket.auth = TokenStore(config.tokens, enabled=config.auth_enabled)
        websocket.limits = config.limits
        if config.tls_files is not None and websocket.tls is not None:
            try:
                websocket.tls = _tls(config)
            except Exception as exc:  # the master read them fine a moment ago: keep the old
                self._log.error("tls_reload_rejected", error=repr(exc))
        if self._gate is not None:
            self._gate.set(config.log_level)
        self._log.info("worker_config_applied", tokens=len(websocket.auth))

    def _close_tokens(self, websocket: WebSocketServer, header: dict[str, object]) -> None:
        listed = header.get("names", [])
        names = {str(n) for n in listed} if isinstance(listed, list) else set()
        code_value = header.get("code", CLOSE_TOKEN_REVOKED)
        code = code_value if isinstance(code_value, int) else CLOSE_TOKEN_REVOKED
        reason = str(header.get("reason", "token revoked"))
        closed = websocket.close_token_connections(names, code=code, reason=reason)
        for name in sorted(names):
            self._log.info("token_connections_closed", name=name, connections=closed.get(name, 0))

    async def _report_loop(
        self, link: channelio.ChannelEnd, hub: Hub, websocket: WebSocketServer
    ) -> None:
        while True:
            self._send_report(link, hub, websocket)
            await trio.sleep(REPORT_INTERVAL)

    def _send_report(
        self, link: channelio.ChannelEnd, hub: Hub, websocket: WebSocketServer
    ) -> None:
        self.stats.clients_connected = websocket.client_count
        link.send(
            channel.encode(
                "stats",
                stats=report_fields(self.stats),
                subscribers=hub.subscriber_count(),
                taken=self.taken,
            )
        )

    async def _handoff_loop(self, websocket: WebSocketServer) -> None:
        """Serve the connections the master hands over: accepted on the WebSocket port, or
        read from its HTTP port's `/ws`.

        In rounds, as a single process accepts (`ws.ACCEPT_ROUND_SECONDS` of handshakes, then a
        checkpoint): one connection per turn of the event loop would take a storm of 10,000 in
        at the pace of the broadcasts.
        """
        while True:
            await trio.lowlevel.wait_readable(self._handoff)
            round_ends = time.perf_counter() + ACCEPT_ROUND_SECONDS
            while time.perf_counter() < round_ends:
                taken = channelio.take_now(self._handoff)
                if taken is False:
                    return
                if taken is True:
                    break
                sock, kind, received = taken
                self.taken += 1
                if kind == channelio.UPGRADE:
                    websocket.adopt_upgrade(sock, received)
                else:
                    websocket.adopt_accepted(sock)
            await trio.lowlevel.checkpoint()


Batch = tuple[int, list[bytes], list[bytes | None]]  # first seq, frames, compressed frames


def _gather(hub: Hub, pending: dict[str, Batch], message: channel.Message) -> None:
    """Add an `update` message to its symbol's batch, or publish that batch first when the
    update does not follow it (a discontinuity: `Hub.publish_frames` restarts the ring)."""
    symbol, seq = message.header["s"], int(message.header["q"])
    frames, deflated = channel.update_parts(message)
    batch = pending.get(symbol)
    if batch is not None and batch[0] + len(batch[1]) == seq:
        batch[1].extend(frames)
        batch[2].extend(deflated)
        return
    if batch is not None:
        hub.publish_frames(symbol, *batch)
    pending[symbol] = (seq, list(frames), list(deflated))


def _publish(hub: Hub, pending: dict[str, Batch]) -> None:
    for symbol, batch in pending.items():
        hub.publish_frames(symbol, *batch)
    pending.clear()


def run_worker(index: int, channel_fd: int, handoff_fd: int) -> int:
    """The `_worker` command: serve as worker `index` on the inherited descriptors."""
    link = socket.socket(fileno=channel_fd)
    handoff = socket.socket(fileno=handoff_fd)
    handoff.setblocking(False)
    # SIGHUP is the master's (a reload it passes on); `pkill -HUP agentspoonsd` must not end a
    # worker, at any point of its life (before its event loop runs too).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    structlog.contextvars.bind_contextvars(worker=index)
    worker = Worker(index, link, handoff)
    return trio.run(worker.run)
