"""The WebSocket server's limits, and the config keys each one is built from.

`Limits` has no defaults: those live in the settings models (`settings.ServerSettings`), and
`reloading.limits_from` is the one place that builds a `Limits` from a config. The server and
the connection core read `policy.limits` at each decision (an accept, an upgrade, a message, a
heartbeat tick, a deadline check) and a reload replaces it whole, so every key a field is built
from is applied live; decisions made once per connection (permessage-deflate, the socket's send
buffer) apply to the connections that arrive after the reload. `LIMITS_KEYS` names those keys:
`reloading` derives from it which changed keys a reload applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .proxies import TrustedProxies

__all__ = ["LIMITS_KEYS", "Limits", "config_keys"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The reloadable limits of the WebSocket server (from [server], and one key of [auth]).

    A field is built from ``server.<its name>`` unless its metadata names its `keys`."""

    max_connections: int
    max_backlog_bytes: int
    max_message_size: int
    handshake_timeout: float
    ping_interval: float
    idle_timeout: float
    max_client_messages_per_second: int
    max_client_errors: int  # within routing.ERROR_WINDOW seconds, then close 1008
    permessage_deflate: bool  # accept RFC 7692 compression when a client offers it
    # None: any Origin (and requests without one). Unset in the config: the daemon's own
    # dashboard, on the HTTP port or under public_url.
    allowed_origins: frozenset[str] | None = field(
        metadata={
            "keys": ("server.allowed_origins", "server.public_url", "health.host", "health.port")
        }
    )
    send_buffer_bytes: int | None  # SO_SNDBUF of each client socket; None: the kernel's
    max_connections_per_ip: int | None  # established and handshaking alike
    # Connections from one address (IPv6: one /64) that have not completed their upgrade yet.
    max_handshakes_per_ip: int | None
    # Per IP; past it upgrades get 429 for a while.
    max_auth_failures_per_minute: int = field(metadata={"keys": ("auth.max_failures_per_minute",)})
    # Who forwards for clients.
    proxies: TrustedProxies = field(
        metadata={"keys": ("server.trusted_proxies", "server.forwarded_header")}
    )
    # Everything a peer sends, counted per whole second: frames (pings, pongs, fragments and
    # empty ones alike) and bytes as received. Past either, the peer is closed 1008.
    max_client_frames_per_second: int
    max_client_bytes_per_second: int


def config_keys(name: str) -> tuple[str, ...]:
    """The dotted config keys the `Limits` field `name` is built from."""
    for f in fields(Limits):
        if f.name == name:
            return tuple(f.metadata.get("keys", (f"server.{name}",)))
    raise KeyError(name)


LIMITS_KEYS: frozenset[str] = frozenset(k for f in fields(Limits) for k in config_keys(f.name))
"""Every config key some `Limits` field is built from."""
