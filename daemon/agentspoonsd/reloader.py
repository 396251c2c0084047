"""SIGHUP reloads: the config, the tokens file and the TLS files re-read off the event loop and
applied to the running services, or rejected whole.

`reloading` says what a change means (pure); this module reads the files and applies it.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import trio
from structlog.typing import FilteringBoundLogger

from . import sdnotify
from .auth import ANONYMOUS
from .descriptors import connection_capacity
from .fleet import worker_count
from .limits import Limits
from .logs import LevelGate
from .metrics import Stats
from .reloading import RELOADABLE, changes_applied, changes_needing_restart, limits_from
from .settings import ConfigError, Settings, load_settings
from .tls import TlsConfigError, server_context
from .tokenkeeper import Serving, TokenKeeper

# Seconds a reload may spend reading its files (a hung NFS mount) before it is rejected.
RELOAD_TIMEOUT = 10.0
AUTH_DISABLED_DETAIL = "every client is served without a token"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The wss:// context of [server] tls_cert/tls_key, None for ws://. Raises TlsConfigError."""
    s = settings.server
    if s.tls_cert is None or s.tls_key is None:
        return None
    return server_context(s.tls_cert, s.tls_key)


class Reloader:
    """Holds the running settings and replaces them, and the services' tokens, limits, TLS
    context and log level, at each reload that is accepted."""

    def __init__(
        self,
        settings: Settings,
        config_path: Path | None,
        tokens: TokenKeeper,
        stats: Stats,
        level_gate: LevelGate,
        log: FilteringBoundLogger,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.http_port: int | None = None  # the HTTP listener's bound port, once bound
        # Per process, set at start (`descriptors.raise_soft_limit`); None: unlimited.
        self.descriptor_limit: int | None = None
        self.notifier = sdnotify.Notifier(None)  # replaced by the daemon from $NOTIFY_SOCKET
        self._tokens = tokens
        self._stats = stats
        self._level_gate = level_gate
        self._log = log

    def limits(self, settings: Settings) -> Limits:
        """The WebSocket server's limits under `settings` (`limits_from`), ``max_connections``
        capped at what this process's descriptor limit lets the running workers hold
        (`descriptors.connection_capacity`; logged as `max_connections_capped` when it does)."""
        workers = worker_count(self.settings.server.workers)  # a change needs a restart
        capacity = connection_capacity(
            self.descriptor_limit, workers, settings.health.max_connections
        )
        limits = limits_from(settings, self.http_port, capacity)
        configured = settings.server.max_connections
        if limits.max_connections < configured:
            self._log.warning(
                "max_connections_capped",
                key="server.max_connections",
                configured=configured,
                capped=limits.max_connections,
                descriptor_limit=self.descriptor_limit,
                workers=workers,
            )
        return limits

    async def serve(self, requests: trio.MemoryReceiveChannel[None], websocket: Serving) -> None:
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
        self.notifier.reloading()
        try:
            new = None
            with trio.move_on_after(RELOAD_TIMEOUT):
                new = await trio.to_thread.run_sync(load, self.config_path, abandon_on_cancel=True)
            if new is None:
                raise ConfigError(f"reading the files took over {RELOAD_TIMEOUT:g} s; not applied")
            self._apply(websocket, new)
        except ConfigError as exc:
            self._stats.config_reloads["rejected"] += 1
            self._log.error("config_reload_rejected", path=str(self.config_path), error=str(exc))
        except Exception as exc:  # a defect: logged whole, never let out to the root nursery
            self._stats.config_reloads["rejected"] += 1
            self._log.error(
                "reload_failed", path=str(self.config_path), error=repr(exc), exc_info=True
            )
        finally:
            self.notifier.ready()

    def _apply(self, websocket: Serving, new: Settings) -> None:
        """Apply re-read settings: tokens, limits, TLS files and log level.

        Everything is built before anything is changed, so a failure while building leaves the
        running settings whole. Only the connections of revoked tokens are closed (4001): a token
        removed from the config or the tokens file, given another digest, or now past its
        `expires`; and, when the reload switches auth on, the anonymous connections let in while
        it was off.
        """
        store = self._tokens.store(new)
        limits = self.limits(new)
        tls, tls_needs_restart = self.reloaded_tls(websocket, new)
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
        self._stats.config_reloads["applied"] += 1
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
        close = self._tokens.close_connections
        if revoked.pop(ANONYMOUS.name, None) is not None:  # auth switched on
            close(websocket, {ANONYMOUS.name: "auth_enabled"}, "token_revoked", "token required")
        close(websocket, revoked, "token_revoked", "token revoked")

    def reloaded_tls(
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
