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
        ├── _expire_tokens         closes the connections of a token past its `expires`
        └── _serve_reloads         applies one SIGHUP reload at a time, off the signal task

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
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import trio

from . import __version__, activation, sdnotify
from .auth import ANONYMOUS, TokenSpec, TokenStore, hash_token, new_token
from .banner import PROGRAM, start_banner
from .closecodes import CLOSE_TOKEN_REVOKED
from .dashboard import PageConfig, load_dashboard
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
from .reloading import (
    RELOADABLE,
    allowed_origins,
    changes_applied,
    changes_needing_restart,
    limits_from,
)
from .settings import ConfigError, Settings, load_settings
from .supervisor import RestartPolicy, Service, supervise
from .tls import TlsConfigError, server_context
from .workerpool import WorkerPool
from .ws import WebSocketServer

# What serves the clients: this process's WebSocketServer, or (workers > 1) the pool of worker
# processes, which offers the daemon the same surface.
Serving = WebSocketServer | WorkerPool
TOKEN_EXPIRY_CHECK_INTERVAL = 1.0  # seconds: how late past `expires` a connection may live
# Seconds a reload may spend reading its files (a hung NFS mount) before it is rejected.
RELOAD_TIMEOUT = 10.0
AUTH_DISABLED_DETAIL = "every client is served without a token"


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


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The wss:// context of [server] tls_cert/tls_key, None for ws://. Raises TlsConfigError."""
    s = settings.server
    if s.tls_cert is None or s.tls_key is None:
        return None
    return server_context(s.tls_cert, s.tls_key)


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


class Daemon:
    """One running agentspoonsd. Build it with validated settings, then `await run()`."""

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
        self.settings = settings
        self.config_path = config_path
        self.stats = Stats()
        self._level_gate = level_gate
        self._restart_policy = restart_policy
        self._log = get_logger("agentspoonsd.daemon")
        self._notifier = sdnotify.Notifier(None)  # replaced in run() from $NOTIFY_SOCKET
        self._ephemeral: TokenSpec | None = None
        self._ephemeral_token: str | None = None  # in plain text, for the start banner only
        self._program = tuple(program)
        # (name, expires) of the tokens whose expiry was already acted on.
        self._expiries_handled: set[tuple[str, datetime]] = set()
        self._http_port: int | None = None  # the HTTP listener's bound port, once bound

    def token_store(self, settings: Settings) -> TokenStore:
        """The auth store for `settings`, with the ephemeral token when none is configured (and
        no tokens file: an empty one refuses everyone).

        Warns about a tokens file others may read, and about configured tokens already expired
        (their connections, if any, are closed by `_reload`; `_expire_tokens` skips them).
        """
        auth = settings.auth
        tokens = [token.spec() for token in auth.all_tokens]
        if auth.enabled and not tokens and auth.tokens_file is not None:
            # Tokens are managed in a file: its last one revoked means no one, not a new token.
            self._log.warning("auth_no_tokens", tokens_file=str(auth.tokens_file))
        elif auth.enabled and not tokens:
            if self._ephemeral is None:
                token = new_token()
                self._ephemeral = TokenSpec(name="ephemeral", sha256=hash_token(token))
                # The one deliberate exception to "no secret in a log": without it a fresh
                # daemon could not be used. Shown once, by the start banner (daemon_started).
                self._ephemeral_token = token
                self._log.warning(
                    "auth_ephemeral_token",
                    token="ephemeral",
                    hint="valid until the daemon stops; daemon_started shows it in dashboard_url"
                    " and watch; for a lasting token: agentspoonsd token new NAME",
                )
            tokens = [self._ephemeral]
        mode = auth.tokens_file_mode
        if auth.tokens_file is not None and mode is not None and mode & 0o077:
            self._log.warning(
                "tokens_file_permissions",
                path=str(auth.tokens_file),
                mode=f"{mode:04o}",
                hint=f"group or others have access: chmod 600 {auth.tokens_file}",
            )
        store = TokenStore(tokens, enabled=auth.enabled)
        expired = store.expired(datetime.now(UTC))
        if expired and auth.enabled:
            self._log.warning("tokens_expired", names=sorted(expired))
        self._expiries_handled.update(expired.items())
        return store

    def _close_token_connections(
        self, websocket: Serving, causes: dict[str, str], event: str, reason: str
    ) -> None:
        """Close the live connections of each token in `causes` (4001) and log `event` per name,
        with how many it had: one pass over the connections, however many names."""
        closed = websocket.close_token_connections(
            set(causes), code=CLOSE_TOKEN_REVOKED, reason=reason
        )
        for name in sorted(causes):
            # With workers, each counts (and logs) its own: token_connections_closed.
            count = None if closed is None else closed.get(name, 0)
            self._log.info(event, name=name, cause=causes[name], connections=count)

    async def _expire_tokens(self, websocket: Serving) -> None:
        """Close a token's live connections once it expires (within the check interval).

        An expired token is refused at the upgrade by the store; this task is for connections
        opened before. One pass a second over the few tokens costs nothing.
        """
        while True:
            await trio.sleep(TOKEN_EXPIRY_CHECK_INTERVAL)
            try:
                due = {
                    name: expires
                    for name, expires in websocket.auth.expired(datetime.now(UTC)).items()
                    if (name, expires) not in self._expiries_handled
                }
                if websocket.auth.enabled and due:
                    self._expiries_handled.update(due.items())
                    causes = dict.fromkeys(due, "expired")
                    self._close_token_connections(
                        websocket, causes, "token_expired", "token expired"
                    )
            except Exception as exc:  # an unsupervised task: never take the daemon down
                self._log.error("token_expiry_check_failed", error=repr(exc))

    def _bind(self, service: str, host: str, port: int, backlog: int) -> socket.socket | None:
        """`bind_listener`, or None after logging which address could not be bound and why (a
        port clash must say which of the two ports clashed)."""
        try:
            return bind_listener(host, port, backlog)
        except OSError as exc:
            self._log.error(
                "listener_bind_failed",
                service=service,
                address=format_address((host, port)),
                error=exc.strerror or str(exc),
            )
            return None

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (returns EX_OK). Returns EX_OSERR, EX_CANTCREAT or EX_CONFIG
        when a listener, the history or the TLS files cannot be set up; a service past its crash
        budget raises CrashBudgetExceeded out of the nursery (`cli` exits EX_SOFTWARE)."""
        s = self.settings
        log = self._log
        notifier = self._notifier = sdnotify.Notifier.from_environ()
        # Socket activation: listeners systemd passed us (agentspoonsd.socket) are adopted, so a
        # restart refuses no connection; anything not passed is bound here.
        inherited = activation.inherited_sockets()
        ws_sock = inherited.take("websocket") or self._bind(
            "websocket", s.server.host, s.server.port, s.server.listen_backlog
        )
        http_sock = inherited.take("health") or self._bind(
            "http", s.health.host, s.health.port, 128
        )
        if ws_sock is None or http_sock is None:
            for bound in (ws_sock, http_sock):
                if bound is not None:
                    bound.close()
            return EX_OSERR
        self._http_port = http_sock.getsockname()[1]
        for name in inherited.close_unused():
            log.warning("inherited_socket_unused", fd_name=name)
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
        websocket: Serving
        workers = worker_count(s.server.workers)
        if workers > 1:  # a master: the pool's worker processes serve the clients
            websocket = WorkerPool(
                ws_sock,
                hub,
                self.token_store(s),
                limits_from(s, self._http_port),
                self.stats,
                get_logger("agentspoonsd.workers"),
                count=workers,
                settings=lambda: self.settings,
                tls=tls,
            )
        else:
            websocket = WebSocketServer(
                ws_sock,
                hub,
                self.token_store(s),
                limits_from(s, self._http_port),
                self.stats,
                get_logger("agentspoonsd.ws"),
                tls=tls,
            )
        http_listener = trio.SocketListener(trio.socket.from_stdlib_socket(http_sock))
        probes = Probes(
            ws_listening=lambda: websocket.listening,
            last_update_age=lambda: self._age(hub),
            interval=lambda: self.settings.generator.interval,
            broker_problem=lambda: broker.problem if broker is not None else None,
            workers_problem=lambda: (
                websocket.problem() if isinstance(websocket, WorkerPool) else None
            ),
        )
        registry = make_registry(
            self.stats,
            lambda: self._age(hub),
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
            ws_sock.getsockname()[1],
            allowed_origins(s, self._http_port),
            WEBSOCKET_PATH
            if s.server.public_url is None
            else PublicUrl.parse(s.server.public_url).websocket_url,
        )
        dashboard = load_dashboard(page, log)
        http = HttpService(
            http_listener,
            make_handler(probes, registry, dashboard),
            get_logger("agentspoonsd.http"),
            s.health,
            # One origin: the HTTP port's /ws is the WebSocket server's, not a copy of it.
            upgrades={"/" + WEBSOCKET_PATH: websocket.adopt_upgrade},
        )
        services: list[tuple[str, Service]] = [("hub", hub), ("generator", generator)]
        if broker is not None:  # it fills the hub from Redis, and generates while elected
            services = [("broker", broker)]
        services += [("websocket", websocket), ("http", http)]
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as root:
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
                root.start_soon(self._expire_tokens, websocket)
                log.info(
                    "listener_bound",
                    service="websocket",
                    address=format_address(ws_sock.getsockname()),
                    scheme="wss" if tls is not None else "ws",
                )
                log.info(
                    "listener_bound",
                    service="http",
                    address=format_address(http_sock.getsockname()),
                )
                banner = start_banner(
                    s,
                    self.config_path,
                    websocket_port=ws_sock.getsockname()[1],
                    http_port=self._http_port,
                    tls=tls is not None,
                    ephemeral_token=self._ephemeral_token,  # None when tokens are configured
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
                reload_requests, reload_queue = trio.open_memory_channel[None](1)
                root.start_soon(self._serve_reloads, reload_queue, websocket)
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

        SIGHUP only asks `_serve_reloads` for a reload and goes back to waiting: a reload that
        waits on a slow disk must not delay a SIGTERM. A SIGHUP while one reload is queued is
        part of that one (it reads the files afresh anyway)."""
        async for signum in signals:
            if signum == signal.SIGHUP:
                with contextlib.suppress(trio.WouldBlock):
                    reload_requests.send_nowait(None)
                continue
            self._notifier.stopping()
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

    async def _serve_reloads(
        self, requests: trio.MemoryReceiveChannel[None], websocket: Serving
    ) -> None:
        """Run the requested reloads one at a time, until cancelled (at shutdown)."""
        async for _ in requests:
            await self.reload(websocket)

    async def reload(
        self,
        websocket: Serving,
        load: Callable[[Path | None], Settings] = load_settings,
    ) -> None:
        """Re-read the config, the tokens file and the TLS files, then apply them.

        The files are read and parsed in a worker thread (`load`, load_settings unless a test
        gives another), never on the event loop. Never raises but trio.Cancelled, and in every
        failure the running settings stay: a file refused logs `config_reload_rejected`; a read
        still going after RELOAD_TIMEOUT is abandoned to its thread and rejected alike; any
        other exception logs `reload_failed` with its traceback.
        """
        self._notifier.reloading()
        try:
            new = None
            with trio.move_on_after(RELOAD_TIMEOUT):
                new = await trio.to_thread.run_sync(load, self.config_path, abandon_on_cancel=True)
            if new is None:
                raise ConfigError(f"reading the files took over {RELOAD_TIMEOUT:g} s; not applied")
            self._apply(websocket, new)
        except ConfigError as exc:
            self.stats.config_reloads["rejected"] += 1
            self._log.error("config_reload_rejected", path=str(self.config_path), error=str(exc))
        except Exception as exc:  # a defect: logged whole, never let out to the root nursery
            self.stats.config_reloads["rejected"] += 1
            self._log.error(
                "reload_failed", path=str(self.config_path), error=repr(exc), exc_info=True
            )
        finally:
            self._notifier.ready()

    def _apply(self, websocket: Serving, new: Settings) -> None:
        """Apply re-read settings: tokens, limits, TLS files and log level.

        Everything is built before anything is changed, so a failure while building leaves the
        running settings whole. Only the connections of revoked tokens are closed (4001): a token
        removed from the config or the tokens file, given another digest, or now past its
        `expires`; and, when the reload switches auth on, the anonymous connections let in while
        it was off.
        """
        store = self.token_store(new)
        limits = limits_from(new, self._http_port)
        tls, tls_needs_restart = self._reloaded_tls(websocket, new)
        needs_restart = changes_needing_restart(self.settings, new) + tls_needs_restart
        applied = [k for k in changes_applied(self.settings, new) if k not in tls_needs_restart]
        was_enabled = self.settings.auth.enabled

        old_auth = websocket.auth
        websocket.auth = store  # first: a revoked token can no longer reconnect
        websocket.limits = limits
        websocket.tls = tls
        self._level_gate.set(new.log.level)
        self.settings = new.model_copy(
            update={
                section: getattr(self.settings, section)
                for section in Settings.model_fields
                if section not in RELOADABLE | {"server"}
            }
        )
        self.stats.config_reloads["applied"] += 1
        self._log.info(
            "config_reloaded",
            path=str(self.config_path),
            tokens=len(websocket.auth),
            log_level=new.log.level,
            applied=applied,
        )
        if was_enabled and not new.auth.enabled:
            self._log.warning("auth_disabled", detail=AUTH_DISABLED_DETAIL, by="reload")
        if needs_restart:
            self._log.warning("config_reload_needs_restart", keys=needs_restart)
        revoked = websocket.auth.revoked_since(old_auth, datetime.now(UTC))
        if revoked.pop(ANONYMOUS.name, None) is not None:  # auth switched on
            self._close_token_connections(
                websocket, {ANONYMOUS.name: "auth_enabled"}, "token_revoked", "token required"
            )
        self._close_token_connections(websocket, revoked, "token_revoked", "token revoked")

    def _reloaded_tls(
        self, websocket: Serving, new: Settings
    ) -> tuple[ssl.SSLContext | None, list[str]]:
        """The context new connections get after the reload, and the keys needing a restart.

        The certificate and key are re-read: new connections get them, established ones keep
        theirs. A context that cannot be built is logged and the old one stays. Switching TLS
        on or off is not applied (the keys are returned as needing a restart)."""
        if (websocket.tls is None) != (new.server.tls_cert is None):
            return websocket.tls, ["server.tls_cert", "server.tls_key"]
        if websocket.tls is None:
            return None, []
        try:
            context = tls_context(new)
        except TlsConfigError as exc:
            self._log.error("tls_reload_rejected", key=f"server.{exc.key}", error=exc.message)
            return websocket.tls, []
        self._log.info("tls_reloaded", cert=str(new.server.tls_cert))
        return context, []

    @staticmethod
    def _age(hub: Hub) -> float | None:
        if hub.last_publish is None:
            return None
        return max(0.0, trio.current_time() - hub.last_publish)
