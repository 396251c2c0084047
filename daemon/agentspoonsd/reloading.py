"""What a SIGHUP applies: the limits built from the config, and which changed keys need a restart.

A reload re-reads the config and applies, without dropping a connection: the whole `[auth]` and
`[log]` sections (a new token store, the level), every key a `limits.Limits` field is built from
(the server reads its limits at each decision; `limits.LIMITS_KEYS`), the keys the daemon reads
from its running settings when it uses them (`shutdown_timeout`) and the TLS files (re-read;
switching TLS on or off is the daemon's to report). Anything else changed is logged under
`config_reload_needs_restart`. Nothing here is maintained beside `Limits`: the set of live keys
is derived from its fields, less the keys that something built once at start also reads.

Pure: settings in, values out.
"""

from __future__ import annotations

from .httppolicy import PublicUrl
from .limits import LIMITS_KEYS, Limits
from .proxies import TrustedProxies
from .settings import Settings

__all__ = [
    "LIVE_KEYS",
    "RELOADABLE",
    "RELOADABLE_SERVER_KEYS",
    "allowed_origins",
    "changes_applied",
    "changes_needing_restart",
    "limits_from",
]

RELOADABLE = frozenset({"auth", "log"})  # sections applied whole
# Read from the running settings at the moment they are used (the reload replaces those).
READ_WHEN_USED = frozenset({"server.shutdown_timeout"})
# Re-read on every reload, for new connections; switching TLS on or off needs a restart.
TLS_KEYS = frozenset({"server.tls_cert", "server.tls_key"})
# Also read once at start: by the dashboard's page (the origins of its CSP, the URL it connects
# to), so a change would reach the WebSocket server's checks but not the page; and by the HTTP
# listener, bound at start (the default origins follow the port it bound, not the config).
READ_AT_START = frozenset(
    {"server.allowed_origins", "server.public_url", "health.host", "health.port"}
)

LIVE_KEYS: frozenset[str] = (LIMITS_KEYS | READ_WHEN_USED | TLS_KEYS) - READ_AT_START
"""Dotted keys outside the `RELOADABLE` sections that a reload applies."""
RELOADABLE_SERVER_KEYS: frozenset[str] = frozenset(
    key.removeprefix("server.") for key in LIVE_KEYS if key.startswith("server.")
)
"""The `[server]` keys a reload applies (the others need a restart)."""


def limits_from(
    settings: Settings, http_port: int | None = None, capacity: int | None = None
) -> Limits:
    """The WebSocket server's limits under `settings`: the one place a `Limits` is built, and
    the only source of its values (`Limits` has no defaults; the settings models do).

    `capacity`: the most clients the descriptor limit lets the daemon hold
    (`descriptors.connection_capacity`); ``max_connections`` is the configured value or that,
    whichever is lower. None: no cap."""
    s = settings.server
    return Limits(
        max_connections=(
            s.max_connections if capacity is None else min(s.max_connections, capacity)
        ),
        max_backlog_bytes=s.max_backlog_bytes,
        send_buffer_bytes=s.send_buffer_bytes or None,
        max_message_size=s.max_message_size,
        handshake_timeout=s.handshake_timeout,
        ping_interval=s.ping_interval,
        idle_timeout=s.idle_timeout,
        max_client_messages_per_second=s.max_client_messages_per_second,
        max_client_errors=s.max_client_errors,
        max_client_frames_per_second=s.max_client_frames_per_second,
        max_client_bytes_per_second=s.max_client_bytes_per_second,
        permessage_deflate=s.permessage_deflate,
        allowed_origins=allowed_origins(settings, http_port),
        max_connections_per_ip=s.max_connections_per_ip,
        max_handshakes_per_ip=s.max_handshakes_per_ip,
        max_auth_failures_per_minute=settings.auth.max_failures_per_minute,
        proxies=TrustedProxies.parse(s.trusted_proxies, s.forwarded_header),
    )


def allowed_origins(settings: Settings, http_port: int | None = None) -> frozenset[str] | None:
    """The Origins a browser may connect from: the configured ones ("*": any, None returned), or
    by default only the daemon's own dashboard (the HTTP port, by its usual local names, and
    the origin of `[server] public_url`, where a reverse proxy serves it).

    `http_port`: the port the HTTP listener actually bound (`[health] port = 0`, or a socket
    systemd passed); the configured one when not given."""
    configured = settings.server.allowed_origins
    if configured is not None:
        if "*" in configured:
            return None
        return frozenset(o.lower().rstrip("/") for o in configured)
    port = settings.health.port if http_port is None else http_port
    hosts = {settings.health.host, "localhost", "127.0.0.1", "[::1]"} - {"0.0.0.0", "::"}
    origins = {f"{scheme}://{host}:{port}" for host in hosts for scheme in ("http", "https")}
    public = settings.server.public_url
    if public is not None:
        origins.add(PublicUrl.parse(public).origin)
    return frozenset(origins)


def _changed(old: Settings, new: Settings) -> list[str]:
    """Dotted keys (`section.key`) whose value differs between `old` and `new`."""
    changed = []
    for section in Settings.model_fields:
        before = getattr(old, section).model_dump()
        after = getattr(new, section).model_dump()
        changed += [f"{section}.{key}" for key in before if before[key] != after[key]]
    return changed


def _applied(key: str) -> bool:
    return key.partition(".")[0] in RELOADABLE or key in LIVE_KEYS


def changes_needing_restart(old: Settings, new: Settings) -> list[str]:
    """Dotted keys that differ between `old` and `new` but are not applied by a reload."""
    return [key for key in _changed(old, new) if not _applied(key)]


def changes_applied(old: Settings, new: Settings) -> list[str]:
    """Dotted keys that differ between `old` and `new` and that a reload applies."""
    return [key for key in _changed(old, new) if _applied(key)]
