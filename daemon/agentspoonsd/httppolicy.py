"""What the HTTP port admits and answers, as pure functions: no sockets, no clocks.

`httpserver` drives these from its Trio loop:
- `ConnectionTable` decides, at accept, whether a connection is served, refused (429 past the
  per-address cap, 503 past the total cap) or closed at once, and never evicts anyone.
- `parse_target` turns a request target into the origin-form the handler sees, or refuses it with
  the status to answer (400, 414); `check_host` enforces the Host allow-list (400, 421);
  `bearer_matches` checks a bearer token against a stored SHA-256 digest in constant time.
- `PublicUrl` is where clients reach the HTTP port through a reverse proxy (`[server] public_url`):
  its origin (the browser's `Origin`) and the WebSocket URL under it.
- `client_key` is the address a per-address limit counts: the IP for IPv4, the /64 for IPv6
  (one host is routinely given a whole /64, so a single address would be no limit at all).
- `format_address` writes a socket address as every log line of the daemon shows it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit

__all__ = [
    "MAX_TARGET_BYTES",
    "WEBSOCKET_PATH",
    "Admission",
    "ConnectionTable",
    "PublicUrl",
    "RequestRefused",
    "Target",
    "bearer_matches",
    "check_host",
    "client_key",
    "format_address",
    "normalise_host",
    "parse_target",
]

MAX_TARGET_BYTES = 8 * 1024
"""The longest request target accepted; past it the answer is 414 (RFC 9112 §3)."""

_PCT_OK = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a "%" not followed by two hex digits
# RFC 3986 reg-name, IPv4 or bracketed IPv6, then an optional port.
_AUTHORITY = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::(?P<port>[0-9]{0,5}))?"
)
_ABSOLUTE = re.compile(r"(?i:https?)://(?P<authority>[^/?#]*)(?P<rest>.*)", re.DOTALL)


class RequestRefused(Exception):
    """A request that is answered `status` (and its connection closed) instead of served."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed request target: its origin-form (path and query) and, for the absolute-form,
    the host it names (which replaces the Host header, RFC 9112 §3.2.2)."""

    origin: str
    host: str | None = None


def parse_target(target: str) -> Target:
    """The request target of a GET or HEAD, checked; raises `RequestRefused` when it cannot be.

    Accepted: the origin-form (`/path?query`) and the absolute-form with an http or https scheme
    (`http://host:port/path?query`), printable ASCII only, every `%` followed by two hex digits,
    no fragment. A target over MAX_TARGET_BYTES is refused 414; any other is refused 400
    (`*`, the authority-form, other schemes, user info, a bad port or IPv6 literal).
    """
    if len(target) > MAX_TARGET_BYTES:
        raise RequestRefused(414, "target_too_long")
    if not target or any(not "\x21" <= ch <= "\x7e" for ch in target):
        raise RequestRefused(400, "target_not_printable_ascii")
    if "#" in target:
        raise RequestRefused(400, "target_has_fragment")
    if _PCT_OK.search(target):
        raise RequestRefused(400, "target_bad_percent_encoding")
    if target.startswith("/"):
        return Target(target)
    absolute = _ABSOLUTE.fullmatch(target)
    if absolute is None:
        raise RequestRefused(400, "target_form")
    host = _authority_host(absolute["authority"])
    rest = absolute["rest"]
    if rest and rest[0] not in "/?":
        raise RequestRefused(400, "target_form")
    origin = rest if rest.startswith("/") else "/" + rest
    return Target(origin, host)


def _authority_host(authority: str) -> str:
    """The host of an absolute-form's authority, lower-cased and without brackets."""
    if "@" in authority:  # RFC 9110 §4.2.4: user info in an http(s) URI is an error
        raise RequestRefused(400, "target_has_userinfo")
    host = normalise_host(authority)
    if host is None:
        raise RequestRefused(400, "target_bad_authority")
    return host


def normalise_host(value: str) -> str | None:
    """The host of a Host header or an authority (`name`, `name:port`, `[v6]:port`): lower-cased,
    without a trailing dot, brackets or port. None when it is malformed."""
    match = _AUTHORITY.fullmatch(value.strip())
    if match is None:
        return None
    port = match["port"]
    if port is not None and port and int(port) > 65535:
        return None
    host = match["host"].lower()
    if host.startswith("["):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            return None
    host = host.removesuffix(".")
    return host or None


def check_host(values: Iterable[str], target: Target, allowed: frozenset[str] | None) -> None:
    """Raise `RequestRefused` unless the request names an allowed host (DNS rebinding defence).

    `values`: the request's Host header values. `allowed`: normalised host names and addresses
    (see `normalise_host`); None allows any host. The absolute-form's host, when present, is the
    one checked (RFC 9112 §3.2.2). Missing, repeated or malformed Host: 400. A well-formed host
    that is not allowed: 421 Misdirected Request, the status for "this server does not serve
    that authority" (RFC 9110 §15.5.20), kept apart from malformed requests in logs.
    """
    if allowed is None:
        return
    host = target.host
    if host is None:
        hosts = list(values)
        if len(hosts) != 1:
            raise RequestRefused(400, "host_missing_or_repeated")
        host = normalise_host(hosts[0])
        if host is None:
            raise RequestRefused(400, "host_malformed")
    if host not in allowed:
        raise RequestRefused(421, "host_not_allowed")


def bearer_matches(values: Iterable[str], sha256_digest: bytes) -> bool:
    """True when exactly one Authorization header holds `Bearer <token>` whose SHA-256 digest is
    `sha256_digest`. The comparison takes the same time wherever the digests differ."""
    headers = list(values)
    if len(headers) != 1:
        return False
    scheme, _, token = headers[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(presented, sha256_digest)


WEBSOCKET_PATH = "ws"
"""Where the HTTP port serves the WebSocket, relative to its root (`/ws`, `<public_url>ws`)."""
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class PublicUrl:
    """The URL of the HTTP port's root as clients reach it, e.g. through a reverse proxy that
    serves it at `https://example.com/market/`. Build it with `parse`."""

    url: str  # normalised: scheme and host lower-case, the path ending with "/"

    @classmethod
    def parse(cls, text: str) -> PublicUrl:
        """Check and normalise `text`; raise ValueError saying what is wrong with it.

        Accepted: an absolute http or https URL with a host (a port if needed) and an optional
        path; no user info, query or fragment. The scheme's default port is dropped, as in the
        Origin a browser sends; the path gets a trailing "/": the dashboard's relative URLs
        resolve under it.
        """
        parts = urlsplit(text.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError("must start with https:// or http:// (e.g. https://example.com/)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not contain user info (user@)")
        if parts.query or parts.fragment or text.strip().endswith(("?", "#")):
            raise ValueError("must not have a query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("has an invalid port") from None
        host = normalise_host(parts.netloc)
        if not parts.hostname or host is None:
            raise ValueError("must name a host (e.g. https://example.com/)")
        if any(not "\x21" <= ch <= "\x7e" for ch in parts.path) or _PCT_OK.search(parts.path):
            raise ValueError("has a path that is not printable ASCII with valid %-escapes")
        authority = f"[{host}]" if ":" in host else host
        if port is not None and port != _DEFAULT_PORTS[scheme]:  # as browsers write an origin
            authority += f":{port}"
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return cls(f"{scheme}://{authority}{path}")

    @property
    def origin(self) -> str:
        """The Origin a browser sends from a page under this URL (scheme, host, port if any)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def websocket_url(self) -> str:
        """The WebSocket URL under this one: ws:// for http, wss:// for https, path + `ws`."""
        scheme, rest = self.url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{WEBSOCKET_PATH}"


def client_key(ip: str) -> str:
    """The key a per-address limit counts under: the IPv4 address (an IPv4-mapped IPv6 address
    counts as its IPv4 address), or the /64 network of an IPv6 address. A string that is not an
    address is its own key."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def format_address(sockaddr: object) -> str:
    """A socket address as logs show it: ``host:port``, ``[host]:port`` for IPv6 (RFC 3986
    §3.2.2); anything but a (host, port, ...) tuple, such as a Unix socket's path, as `str`."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = str(sockaddr[0]), sockaddr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(sockaddr)


class Admission(Enum):
    """What happens to a newly accepted connection."""

    SERVE = "serve"
    OVER_IP = "over_ip"  # its address holds max_per_ip connections: refused 429
    OVER_TOTAL = "over_total"  # max_connections are open: refused 503
    DROP = "drop"  # max_refusing refusals are already in progress: closed without an answer

    @property
    def status(self) -> int | None:
        """The status a refused connection is answered with; None when it is served."""
        return {Admission.OVER_IP: 429, Admission.OVER_TOTAL: 503}.get(self)


@dataclass(slots=True)
class ConnectionTable:
    """Open connections, in total and per `client_key`; only the caller's thread touches it.

    Guarantees: at most `max_connections` are served at once, at most `max_per_ip` of them from
    one key (None: no per-key cap), and at most `max_refusing` refused connections are being
    answered at once. A new connection never evicts an open one. Every `admit` must be matched
    by one `release` with the same key and admission (a DROP's release does nothing).
    """

    max_connections: int
    max_per_ip: int | None
    max_refusing: int = 64
    active: int = 0
    refusing: int = 0
    _by_key: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        per_ip = 1 if self.max_per_ip is None else self.max_per_ip
        if self.max_connections < 1 or per_ip < 1 or self.max_refusing < 0:
            raise ValueError("limits must be >= 1 (max_refusing >= 0)")

    def admit(self, key: str) -> Admission:
        """Decide for a new connection from `key`, and count it."""
        if self.max_per_ip is not None and self._by_key.get(key, 0) >= self.max_per_ip:
            admission = Admission.OVER_IP
        elif self.active >= self.max_connections:
            admission = Admission.OVER_TOTAL
        else:
            self.active += 1
            self._by_key[key] = self._by_key.get(key, 0) + 1
            return Admission.SERVE
        if self.refusing >= self.max_refusing:
            return Admission.DROP
        self.refusing += 1
        return admission

    def release(self, key: str, admission: Admission) -> None:
        """Forget a connection `admit` counted."""
        if admission is Admission.SERVE:
            self.active -= 1
            left = self._by_key[key] - 1
            if left:
                self._by_key[key] = left
            else:
                del self._by_key[key]  # the table holds only keys with open connections
        elif admission is not Admission.DROP:
            self.refusing -= 1

    def open_from(self, key: str) -> int:
        """Connections served now for `key`."""
        return self._by_key.get(key, 0)

    @property
    def keys(self) -> int:
        """Keys with at least one served connection."""
        return len(self._by_key)
