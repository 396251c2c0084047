"""A fan-out worker process (``[server] workers`` > 1): serves clients on the shared listener.

Started by the master (`workerpool`) as ``agentspoonsd _worker`` with three inherited
descriptors: the WebSocket listener (shared by every worker: the kernel hands each accepted
connection to one of them), its channel and its handoff socket. Everything it knows comes over
the channel, in order:

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
from .ws import WebSocketServer

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

    def __init__(
        self, index: int, listener: socket.socket, link: socket.socket, handoff: socket.socket
    ) -> None:
        self.index = index
        self._listener = listener
        self._link_sock = link
        self._handoff = handoff
        self.stats = Stats()
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
                self._listener,
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
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as waiting:
                    done = trio.Event()

                    async def until_signal() -> None:
                        async for signum in signals:
                            if signum != signal.SIGHUP:  # the master's to handle
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
        """Apply the master's messages until `drain` (its timeout) or EOF (None)."""
        while True:
            message = await link.receive()
            if message is None:
                self._log.warning("worker_master_gone")
                return None
            kind = message.kind
            if kind == "update":
                frames, deflated = channel.update_parts(message)
                hub.publish_frames(message.header["s"], int(message.header["q"]), frames, deflated)
            elif kind == "config":
                self._apply(websocket, WorkerConfig.load(message.parts[0]))
            elif kind == "close_tokens":
                self._close_tokens(websocket, message.header)
            elif kind == "drain":
                return float(message.header.get("timeout", DEFAULT_DRAIN_TIMEOUT))

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
        names = {str(n) for n in header.get("names", [])}  # type: ignore[attr-defined]
        code = int(header.get("code", CLOSE_TOKEN_REVOKED))  # type: ignore[call-overload]
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
            )
        )

    async def _handoff_loop(self, websocket: WebSocketServer) -> None:
        """Serve the connections the master hands over (its HTTP port's `/ws`)."""
        while True:
            taken = await channelio.take_over(self._handoff)
            if taken is None:
                return
            websocket.adopt_upgrade(*taken)


def run_worker(index: int, listen_fd: int, channel_fd: int, handoff_fd: int) -> int:
    """The `_worker` command: serve as worker `index` on the inherited descriptors."""
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    link = socket.socket(fileno=channel_fd)
    handoff = socket.socket(fileno=handoff_fd)
    handoff.setblocking(False)
    structlog.contextvars.bind_contextvars(worker=index)
    worker = Worker(index, listener, link, handoff)
    return trio.run(worker.run)
