"""The daemon: binds the listeners, builds the services, supervises them, handles signals.

Task tree (`Daemon.run`: one root nursery; the signals are handled in `run`'s own task)::

    run                        SIGTERM/SIGINT → drain, cancel root, exit 0; SIGHUP → a reload
    └── root
        ├── supervise(hub)         receives bars, numbers, encodes and fans them out
        ├── supervise(generator)   one bar per symbol per interval
        │   (with [broker] kind = "redis": supervise(broker) in place of both, filling the hub
        │   from Redis and generating while this node holds the lease)
        ├── supervise(websocket)   accepts, authenticates and serves clients
        ├── supervise(http)        /healthz /readyz /metrics, the dashboard; /ws → websocket
        ├── collect_garbage_loop   a full cyclic collection every GC_INTERVAL
        ├── sdnotify loops         watchdog_loop, status_loop, ready_when (systemd; no-ops
        │                          without NOTIFY_SOCKET)
        ├── tokens.expire_loop     closes the connections of a token past its `expires`
        │                          (tokenkeeper.TokenKeeper)
        └── reloader.serve         applies one SIGHUP reload at a time, off the signal task
                                   (reloader.Reloader)

The daemon owns everything the services share (channel, stats, listeners, auth store) and passes
each service what it needs; services hold no global state.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from structlog.typing import FilteringBoundLogger

from . import __version__, activation, sdnotify
from .banner import PROGRAM, start_banner
from .dashboard import PageConfig, load_dashboard
from .descriptors import raise_soft_limit
from .exits import EX_CANTCREAT, EX_CONFIG, EX_OK, EX_OSERR
from .fleet import worker_count
from .frames import encode_text_frame
from .health import HttpService, Probes, make_handler, readiness
from .history import History, HistoryStore
from .httppolicy import WEBSOCKET_PATH, PublicUrl, format_address
from .hub import Hub
from .logs import LevelGate, get_logger
from .market.bar import Bar
from .market.generator import Generator
from .metrics import Stats, make_registry
from .reloader import AUTH_DISABLED_DETAIL, Reloader, tls_context
from .reloading import allowed_origins
from .settings import Settings
from .supervisor import RestartPolicy, Service, supervise
from .tls import TlsConfigError
from .tokenkeeper import Serving, TokenKeeper
from .workerpool import WorkerPool
from .ws import WebSocketServer

if TYPE_CHECKING:
    from .broker.service import RedisBroker


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket; raises OSError when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


GC_INTERVAL = 600.0  # seconds between full collections of the cyclic garbage collector


async def collect_garbage_loop(interval: float) -> None:
    """Run a full cyclic collection every `interval` seconds, forever (cancel to stop).

    `cli.tune_gc` raises the collector's thresholds so collections stay off the broadcast path,
    which makes full collections rare. Nothing the daemon makes per connection or per update
    is left in a reference cycle (tests keep it so: see `frames.release_frame_parser`), so this is
    a safety net for what might still be, not a cleaner the daemon depends on. Each one pauses
    every client (bench/RESULTS.md, the soak's notes: what a collection costs and why the
    interval is long); `garbage_collected` (debug) logs how long and what it found.
    """
    while True:
        await trio.sleep(interval)
        started = time.perf_counter()
        found = gc.collect()
        # The pause every client saw: worth watching at debug level on a busy node.
        get_logger("agentspoonsd.gc").debug(
            "garbage_collected", found=found, ms=round((time.perf_counter() - started) * 1e3, 1)
        )


def open_history(settings: Settings) -> History:
    """The hub's history, loaded from `[history] dir` when persisted. Raises OSError."""
    h = settings.history
    store = HistoryStore(h.dir, h.size) if h.persist else None
    return History(settings.generator.symbols, h.size, store=store, decode_frame=encode_text_frame)


def bind_or_log(
    log: FilteringBoundLogger, service: str, host: str, port: int, backlog: int
) -> socket.socket | None:
    """`bind_listener`, or None after logging which address could not be bound and why (a
    port clash must say which of the two ports clashed)."""
    try:
        return bind_listener(host, port, backlog)
    except OSError as exc:
        log.error(
            "listener_bind_failed",
            service=service,
            address=format_address((host, port)),
            error=exc.strerror or str(exc),
        )
        return None


def age_of(hub: Hub) -> float | None:
    """Seconds since the hub last published (on trio's clock), None before its first update."""
    if hub.last_publish is None:
        return None
    return max(0.0, trio.current_time() - hub.last_publish)


class Daemon:
    """One running agentspoonsd. Build it with validated settings, then `await run()`.

    The tokens are kept by `tokens` (a TokenKeeper), the running settings and their reloads by
    `reloader` (a Reloader); the daemon builds the task tree and handles the signals."""

    def __init__(
        self,
        settings: Settings,
        config_path: Path | None,
        level_gate: LevelGate,
        *,
        restart_policy: type[RestartPolicy] = RestartPolicy,
        program: Sequence[str] = (PROGRAM,),
    ) -> None:
        """`program`: the command that started this daemon (`banner.program_command`), for the
        ``watch`` command of the start banner."""
        self.stats = Stats()
        self._restart_policy = restart_policy
        self._log = get_logger("agentspoonsd.daemon")
        self._program = tuple(program)
        self.tokens = TokenKeeper(self._log)
        self.reloader = Reloader(
            settings, config_path, self.tokens, self.stats, level_gate, self._log
        )

    @property
    def settings(self) -> Settings:
        """The running settings: those started with, as the accepted reloads changed them."""
        return self.reloader.settings

    def _listeners(self) -> tuple[socket.socket, socket.socket] | None:
        """The WebSocket and HTTP listeners, or None (with neither left open) when either cannot
        be bound. Records the HTTP port for the reloader; closes the inherited sockets unused.

        Socket activation: listeners systemd passed us (agentspoonsd.socket) are adopted, so a
        restart refuses no connection; anything not passed is bound here."""
        s = self.settings
        inherited = activation.inherited_sockets()
        ws_sock = inherited.take("websocket") or bind_or_log(
            self._log, "websocket", s.server.host, s.server.port, s.server.listen_backlog
        )
        http_sock = inherited.take("health") or bind_or_log(
            self._log, "http", s.health.host, s.health.port, 128
        )
        if ws_sock is None or http_sock is None:
            for bound in (ws_sock, http_sock):
                if bound is not None:
                    bound.close()
            return None
        self.reloader.http_port = http_sock.getsockname()[1]
        for name in inherited.close_unused():
            self._log.warning("inherited_socket_unused", fd_name=name)
        return ws_sock, http_sock

    def _serving(self, ws_sock: socket.socket, hub: Hub, tls: ssl.SSLContext | None) -> Serving:
        """What serves the clients on `ws_sock`: this process (workers = 1), or a pool of worker
        processes; either has the first token store and the limits of the running settings."""
        s = self.settings
        workers = worker_count(s.server.workers)
        if workers > 1:  # a master: the pool's worker processes serve the clients
            return WorkerPool(
                ws_sock,
                hub,
                self.tokens.store(s),
                self.reloader.limits(s),
                self.stats,
                get_logger("agentspoonsd.workers"),
                count=workers,
                settings=lambda: self.settings,
                tls=tls,
            )
        return WebSocketServer(
            ws_sock,
            hub,
            self.tokens.store(s),
            self.reloader.limits(s),
            self.stats,
            get_logger("agentspoonsd.ws"),
            tls=tls,
        )

    def _http(
        self,
        http_sock: socket.socket,
        ws_port: int,
        hub: Hub,
        broker: RedisBroker | None,
        websocket: Serving,
        tls: ssl.SSLContext | None,
        notifier: sdnotify.Notifier,
    ) -> HttpService:
        """The HTTP service on `http_sock`: the probes, /metrics, the dashboard, and /ws handed to
        `websocket` (one origin). Its probes and metrics read the running settings at each
        request, so a reloaded interval counts at once."""
        s = self.settings
        http_port = self.reloader.http_port
        probes = Probes(
            ws_listening=lambda: websocket.listening,
            last_update_age=lambda: age_of(hub),
            interval=lambda: self.settings.generator.interval,
            broker_problem=lambda: broker.problem if broker is not None else None,
            workers_problem=lambda: (
                websocket.problem() if isinstance(websocket, WorkerPool) else None
            ),
        )
        registry = make_registry(
            self.stats,
            lambda: age_of(hub),
            (
                websocket.subscriber_count
                if isinstance(websocket, WorkerPool)
                else hub.subscriber_count
            ),
            ready=lambda: readiness(probes)[0],
            interval=probes.interval,
            watchdog=notifier.pets,
        )
        if isinstance(websocket, WorkerPool):
            registry.register(websocket.collector())
        if broker is not None:
            from .broker.metrics import BrokerCollector

            registry.register(BrokerCollector(broker))
        # The page connects to /ws of its own origin, or under public_url; the config also gives
        # the WebSocket port actually bound (socket activation may differ from config).
        page = PageConfig(
            "wss" if tls else "ws",
            ws_port,
            allowed_origins(s, http_port),
            WEBSOCKET_PATH
            if s.server.public_url is None
            else PublicUrl.parse(s.server.public_url).websocket_url,
        )
        return HttpService(
            trio.SocketListener(trio.socket.from_stdlib_socket(http_sock)),
            make_handler(probes, registry, load_dashboard(page, self._log)),
            get_logger("agentspoonsd.http"),
            s.health,
            # One origin: the HTTP port's /ws is the WebSocket server's, not a copy of it.
            upgrades={"/" + WEBSOCKET_PATH: websocket.adopt_upgrade},
        )

    async def _start_tree(
        self,
        root: trio.Nursery,
        services: list[tuple[str, Service]],
        hub: Hub,
        websocket: Serving,
        notifier: sdnotify.Notifier,
    ) -> None:
        """Start each service under its supervisor, in order (each is serving when the next
        starts), then the background loops: garbage collection, systemd's, token expiry."""
        for name, service in services:
            await root.start(
                supervise,
                name,
                service,
                self._restart_policy(),
                self.stats,
                get_logger("agentspoonsd.supervisor"),
            )
        # systemd: READY=1 once the first update exists, WATCHDOG=1 from this loop (a
        # wedged event loop stops petting), STATUS= with clients and update rate.
        root.start_soon(collect_garbage_loop, GC_INTERVAL)
        root.start_soon(sdnotify.watchdog_loop, notifier)
        root.start_soon(sdnotify.status_loop, notifier, self.stats)
        # With workers: once every worker listens too (a WebSocketServer already does).
        root.start_soon(
            sdnotify.ready_when,
            notifier,
            lambda: hub.last_publish is not None and websocket.listening,
        )
        root.start_soon(self.tokens.expire_loop, websocket)

    def _log_started(
        self, ws_sock: socket.socket, http_sock: socket.socket, tls: ssl.SSLContext | None
    ) -> None:
        """Log `listener_bound` for each listener, then `daemon_started` with the start banner."""
        s = self.settings
        log = self._log
        log.info(
            "listener_bound",
            service="websocket",
            address=format_address(ws_sock.getsockname()),
            scheme="wss" if tls is not None else "ws",
        )
        log.info("listener_bound", service="http", address=format_address(http_sock.getsockname()))
        banner = start_banner(
            s,
            self.reloader.config_path,
            websocket_port=ws_sock.getsockname()[1],
            http_port=http_sock.getsockname()[1],
            tls=tls is not None,
            ephemeral_token=self.tokens.ephemeral_token,  # None when tokens are configured
            program=self._program,
        )
        log.info(
            "daemon_started",
            version=__version__,
            symbols=s.generator.symbols,
            interval_s=s.generator.interval,
            auth=s.auth.enabled,
            broker=s.broker.kind,
            **banner.fields(),
        )

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (returns EX_OK). Returns EX_OSERR, EX_CANTCREAT or EX_CONFIG
        when a listener, the history or the TLS files cannot be set up; a service past its crash
        budget raises CrashBudgetExceeded out of the nursery (`cli` exits EX_SOFTWARE)."""
        s = self.settings
        log = self._log
        notifier = self.reloader.notifier = sdnotify.Notifier.from_environ()
        # Before any socket: the workers started later inherit it too.
        self.reloader.descriptor_limit = raise_soft_limit()
        log.info("descriptor_limit", limit=self.reloader.descriptor_limit)
        listeners = self._listeners()
        if listeners is None:
            return EX_OSERR
        ws_sock, http_sock = listeners
        if not s.auth.enabled:
            log.warning("auth_disabled", detail=AUTH_DISABLED_DETAIL)
        send, receive = trio.open_memory_channel[list[Bar]](16)
        try:
            history = open_history(s)
        except OSError as exc:
            log.error("history_unavailable", dir=str(s.history.dir), error=str(exc))
            return EX_CANTCREAT
        try:
            tls = tls_context(s)
        except TlsConfigError as exc:  # the files changed since the config was checked
            log.error("tls_unavailable", key=f"server.{exc.key}", error=exc.message)
            return EX_CONFIG
        hub = Hub(s.generator.symbols, receive, self.stats, history=history)
        broker = None
        if s.broker.kind == "redis":  # imported only then: coredis is not loaded by a single node
            from .broker.service import RedisBroker

            broker = RedisBroker(
                s,
                hub,
                get_logger("agentspoonsd.broker"),
                generator_log=get_logger("agentspoonsd.generator"),
            )
        generator = Generator(s.generator.spec(), send, get_logger("agentspoonsd.generator"))
        # A persisted history's newest bars: the market clock goes on after them, never back.
        generator.continue_clock({symbol: hub.recent(symbol, 1) for symbol in hub.symbols})
        websocket = self._serving(ws_sock, hub, tls)
        ws_port = ws_sock.getsockname()[1]
        http = self._http(http_sock, ws_port, hub, broker, websocket, tls, notifier)
        services: list[tuple[str, Service]] = [("hub", hub), ("generator", generator)]
        if broker is not None:  # it fills the hub from Redis, and generates while elected
            services = [("broker", broker)]
        services += [("websocket", websocket), ("http", http)]
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as root:
                await self._start_tree(root, services, hub, websocket, notifier)
                self._log_started(ws_sock, http_sock, tls)
                reload_requests, reload_queue = trio.open_memory_channel[None](1)
                root.start_soon(self.reloader.serve, reload_queue, websocket)
                await self._handle_signals(signals, websocket, reload_requests)
                root.cancel_scope.cancel()
        ws_sock.close()
        history.close()
        http_sock.close()
        log.info("daemon_stopped", exit_status=EX_OK)
        return EX_OK

    async def _handle_signals(
        self,
        signals: AsyncIterator[int],
        websocket: Serving,
        reload_requests: trio.MemorySendChannel[None],
    ) -> None:
        """Return when asked to stop, after closing every client (bounded by shutdown_timeout).

        SIGHUP only asks the reloader for a reload and goes back to waiting: a reload that
        waits on a slow disk must not delay a SIGTERM. A SIGHUP while one reload is queued is
        part of that one (it reads the files afresh anyway)."""
        async for signum in signals:
            if signum == signal.SIGHUP:
                with contextlib.suppress(trio.WouldBlock):
                    reload_requests.send_nowait(None)
                continue
            self.reloader.notifier.stopping()
            timeout = self.settings.server.shutdown_timeout
            self._log.info(
                "shutdown_started",
                signal=signal.Signals(signum).name,
                clients=websocket.client_count,
                timeout_s=timeout,
            )
            # Leave a margin inside the deadline for cancelling the tree and exiting.
            with trio.move_on_after(max(timeout - 0.5, timeout * 0.8)) as drain:
                await websocket.drain()
            if drain.cancelled_caught:
                self._log.warning("shutdown_deadline_reached", clients_left=websocket.client_count)
            return
