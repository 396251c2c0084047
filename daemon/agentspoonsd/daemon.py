"""The daemon: binds the listeners, builds the services, supervises them, handles signals.

Task tree (one root nursery)::

    root
    ├── signals            SIGTERM/SIGINT → drain and exit 0; SIGHUP → reload
    ├── supervise(hub)     receives bars, numbers, encodes and fans them out
    ├── supervise(generator)   one bar per symbol per interval
    ├── supervise(websocket)   accepts, authenticates and serves clients
    └── supervise(http)        /healthz /readyz /metrics

The daemon owns everything the services share (channel, stats, listeners, auth store) and passes
each service what it needs; services hold no global state.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import trio

from . import __version__, activation, sdnotify
from .auth import TokenStore, hash_token, new_token
from .health import HttpService, Probes, make_handler
from .history import History, HistoryStore
from .hub import Hub, encode_text_frame
from .logs import LevelGate, get_logger
from .market.bar import Bar
from .market.generator import Generator
from .metrics import Stats, make_registry
from .settings import ConfigError, Settings, TokenSettings, load_settings
from .supervisor import RestartPolicy, supervise
from .ws import Limits, WebSocketServer

EXIT_OK = 0
EXIT_SOFTWARE = 70  # a service exhausted its crash budget
EXIT_OSERR = 71  # a listener could not be bound
EXIT_CANTCREAT = 73  # the persisted history cannot be read or created

# Settings a SIGHUP applies live; any other change is reported as needing a restart.
RELOADABLE = {"auth", "log"}
RELOADABLE_SERVER_KEYS = {
    "max_connections",
    "max_backlog_bytes",
    "max_message_size",
    "handshake_timeout",
    "shutdown_timeout",
}


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


def limits_from(settings: Settings) -> Limits:
    s = settings.server
    return Limits(
        max_connections=s.max_connections,
        max_backlog_bytes=s.max_backlog_bytes,
        max_message_size=s.max_message_size,
        handshake_timeout=s.handshake_timeout,
        ping_interval=s.ping_interval,
        idle_timeout=s.idle_timeout,
        max_client_messages_per_second=s.max_client_messages_per_second,
        max_client_errors=s.max_client_errors,
        permessage_deflate=s.permessage_deflate,
        allowed_origins=allowed_origins(settings),
        max_connections_per_ip=s.max_connections_per_ip,
        max_auth_failures_per_minute=settings.auth.max_failures_per_minute,
    )


def allowed_origins(settings: Settings) -> frozenset[str] | None:
    """The Origins a browser may connect from: the configured ones ("*": any, None returned), or
    by default only the daemon's own dashboard (the HTTP port, by its usual local names)."""
    configured = settings.server.allowed_origins
    if configured is not None:
        if "*" in configured:
            return None
        return frozenset(o.lower().rstrip("/") for o in configured)
    port = settings.health.port
    hosts = {settings.health.host, "localhost", "127.0.0.1", "[::1]"} - {"0.0.0.0", "::"}
    return frozenset(f"{scheme}://{host}:{port}" for host in hosts for scheme in ("http", "https"))


def open_history(settings: Settings) -> History:
    """The hub's history, loaded from `[history] dir` when persisted. Raises OSError."""
    h = settings.history
    store = HistoryStore(h.dir, h.size) if h.persist else None
    return History(settings.generator.symbols, h.size, store=store, decode_frame=encode_text_frame)


def changes_needing_restart(old: Settings, new: Settings) -> list[str]:
    """Dotted keys that differ between `old` and `new` but are not applied by a reload."""
    changed = []
    for section in Settings.model_fields:
        if section in RELOADABLE:
            continue
        before = getattr(old, section).model_dump()
        after = getattr(new, section).model_dump()
        for key in before:
            if before[key] != after[key] and not (
                section == "server" and key in RELOADABLE_SERVER_KEYS
            ):
                changed.append(f"{section}.{key}")
    return changed


class Daemon:
    """One running agentspoonsd. Build it with validated settings, then `await run()`."""

    def __init__(
        self,
        settings: Settings,
        config_path: Path | None,
        level_gate: LevelGate,
        *,
        restart_policy: type[RestartPolicy] = RestartPolicy,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.stats = Stats()
        self._level_gate = level_gate
        self._restart_policy = restart_policy
        self._log = get_logger("agentspoonsd.daemon")
        self._notifier = sdnotify.Notifier(None)  # replaced in run() from $NOTIFY_SOCKET
        self._ephemeral: TokenSettings | None = None

    def token_store(self, settings: Settings) -> TokenStore:
        """The auth store for `settings`, with the ephemeral token when none is configured."""
        tokens = list(settings.auth.tokens)
        if settings.auth.enabled and not tokens:
            if self._ephemeral is None:
                token = new_token()
                self._ephemeral = TokenSettings(name="ephemeral", sha256=hash_token(token))
                # The one deliberate exception to "no secret in a log": without it a fresh
                # `make run` could not be used. Logged once, at start.
                self._log.warning(
                    "auth_ephemeral_token",
                    ephemeral_token=token,
                    token="ephemeral",
                    hint="add [[auth.tokens]] (agentspoonsd token new NAME)",
                )
            tokens = [self._ephemeral]
        return TokenStore(tokens, enabled=settings.auth.enabled)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (returns 0) or a crash budget is exhausted (returns 70)."""
        s = self.settings
        log = self._log
        notifier = self._notifier = sdnotify.Notifier.from_environ()
        # Socket activation: listeners systemd passed us (agentspoonsd.socket) are adopted, so a
        # restart refuses no connection; anything not passed is bound here.
        inherited = activation.inherited_sockets()
        try:
            ws_sock = inherited.take("websocket") or bind_listener(
                s.server.host, s.server.port, s.server.listen_backlog
            )
            http_sock = inherited.take("health") or bind_listener(s.health.host, s.health.port, 128)
        except OSError as exc:
            log.error("listener_bind_failed", error=str(exc))
            return EXIT_OSERR
        for name in inherited.close_unused():
            log.warning("inherited_socket_unused", fd_name=name)
        if not s.auth.enabled:
            log.warning("auth_disabled", detail="every client is served without a token")

        send, receive = trio.open_memory_channel[list[Bar]](16)
        try:
            history = open_history(s)
        except OSError as exc:
            log.error("history_unavailable", dir=str(s.history.dir), error=str(exc))
            return EXIT_CANTCREAT
        hub = Hub(s.generator.symbols, receive, self.stats, history=history)
        generator = Generator(s.generator, send, get_logger("agentspoonsd.generator"))
        websocket = WebSocketServer(
            ws_sock,
            hub,
            self.token_store(s),
            limits_from(s),
            self.stats,
            get_logger("agentspoonsd.ws"),
        )
        http_listener = trio.SocketListener(trio.socket.from_stdlib_socket(http_sock))
        probes = Probes(
            ws_listening=lambda: websocket.listening,
            last_update_age=lambda: self._age(hub),
            interval=lambda: self.settings.generator.interval,
        )
        registry = make_registry(self.stats, lambda: self._age(hub))
        http = HttpService(
            http_listener, make_handler(probes, registry), get_logger("agentspoonsd.http")
        )
        services = [
            ("hub", hub),
            ("generator", generator),
            ("websocket", websocket),
            ("http", http),
        ]
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
                root.start_soon(sdnotify.watchdog_loop, notifier)
                root.start_soon(sdnotify.status_loop, notifier, self.stats)
                root.start_soon(sdnotify.ready_when, notifier, lambda: hub.last_publish is not None)
                log.info("listener_bound", service="websocket", address=_address(ws_sock))
                log.info("listener_bound", service="http", address=_address(http_sock))
                log.info(
                    "daemon_started",
                    version=__version__,
                    symbols=s.generator.symbols,
                    interval_s=s.generator.interval,
                    auth=s.auth.enabled,
                )
                await self._handle_signals(signals, websocket)
                root.cancel_scope.cancel()
        ws_sock.close()
        history.close()
        http_sock.close()
        log.info("daemon_stopped", exit_status=EXIT_OK)
        return EXIT_OK

    async def _handle_signals(self, signals: Any, websocket: WebSocketServer) -> None:
        """Return when asked to stop, after closing every client (bounded by shutdown_timeout)."""
        async for signum in signals:
            if signum == signal.SIGHUP:
                self._notifier.reloading()
                self._reload(websocket)
                self._notifier.ready()
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

    def _reload(self, websocket: WebSocketServer) -> None:
        """Apply a re-read config: tokens, limits and log level. Never drops a connection."""
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            self.stats.config_reloads["rejected"] += 1
            self._log.error("config_reload_rejected", path=str(self.config_path), error=str(exc))
            return
        websocket.auth = self.token_store(new)
        websocket.limits = limits_from(new)
        self._level_gate.set(new.log.level)
        needs_restart = changes_needing_restart(self.settings, new)
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
        )
        if needs_restart:
            self._log.warning("config_reload_needs_restart", keys=needs_restart)

    @staticmethod
    def _age(hub: Hub) -> float | None:
        if hub.last_publish is None:
            return None
        return max(0.0, trio.current_time() - hub.last_publish)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
