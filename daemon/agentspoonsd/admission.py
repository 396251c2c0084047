"""Sans-IO: whether a WebSocket connection may be served, at accept and at its upgrade.

`Admission` holds one server's counts (connections by address, by token, handshakes by address,
the last minute's failed authentications by address) and decides from them and the limits in
force; a refusal is a `Refusal` that carries its own HTTP answer. No sockets, no clock (the time
is an argument), no logging: the caller counts and logs what is decided (see
`connection.ServerConnection`), and tells `Admission` when a connection is upgraded and gone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from .auth import AuthFailure, Grant, TokenStore, presented_token
from .httppolicy import client_key
from .upgrade import Headers, UpgradeRequest, reject_response

if TYPE_CHECKING:
    from .limits import Limits

__all__ = ["AUTH_WINDOW", "MAX_TRACKED_FAILING_ADDRESSES", "Admission", "Refusal"]

AUTH_WINDOW = 60.0  # seconds over which an address's failed authentications are counted
# Addresses (IPv6: /64 networks) whose failed authentications are remembered for a minute. Past
# it, a failing attempt from an address not yet tracked gets 429 at once: a guesser spread over
# many addresses costs bounded memory, and a valid token is let in all the same.
MAX_TRACKED_FAILING_ADDRESSES = 65536
_RETRY_SOON = ((b"Retry-After", b"5"),)
_CHALLENGE = b'Bearer realm="agentspoonsd"'


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upgrade answered with an HTTP error instead of 101; the connection closes after it.

    `reason` is the label of `rejected_upgrades{reason}` and of the log line; the JSON body says
    `error` (`reason` unless given: an expired token is answered as an invalid one) and
    `message`. `auth_failure`: a failed authentication (logged as `auth_failed`, counted in
    `auth_failures` too) rather than a refused upgrade (`upgrade_refused`, at `level`).
    """

    status: int
    reason: str
    message: str
    headers: Headers = ()
    error: str | None = None
    level: str = "warning"
    auth_failure: bool = False

    def response(self) -> bytes:
        """The complete HTTP answer."""
        body = orjson.dumps({"error": self.error or self.reason, "message": self.message})
        return reject_response(self.status, body, b"application/json", self.headers)


def _retry(after: int) -> Headers:
    return ((b"Retry-After", str(after).encode()),)


class Admission:
    """The admission counts of one server and the decisions made from them.

    Every connection counts against `max_connections` and its address's limits from accept on,
    not from its upgrade: a stranger holding handshakes open cannot push the server past its
    capacity or crowd out other addresses for longer than `handshake_timeout`. The caller keeps
    the counts true: `handshake_started`/`handshake_over` around the handshake,
    `connected`/`disconnected` around the established connection.
    """

    __slots__ = ("auth_failures", "established", "handshaking", "per_ip", "per_token")

    def __init__(self) -> None:
        self.established = 0  # connections past the upgrade
        self.per_ip: dict[str, int] = {}  # established connections by address
        self.per_token: dict[str, int] = {}  # established connections by token name
        self.handshaking: dict[str, int] = {}  # not yet upgraded, by `client_key` of the peer
        self.auth_failures: dict[str, deque[float]] = {}  # by client_key, the last minute's

    def at_accept(self, ip: str, open_connections: int, limits: Limits) -> Refusal | None:
        """Whether a connection just accepted from `ip` may start its handshake, while
        `open_connections` are open (handshaking, established or closing); else the refusal to
        send before anything is read or allocated for it (503 at capacity, 429 past the
        address's handshakes or connections), each with `Retry-After: 5`."""
        handshaking = self.handshaking.get(client_key(ip), 0)
        if open_connections >= limits.max_connections:
            return Refusal(503, "capacity", "server is at max_connections", _RETRY_SOON)
        per_address = limits.max_handshakes_per_ip
        if per_address is not None and handshaking >= per_address:
            return Refusal(
                429, "handshakes_per_ip", "too many handshakes from this address", _RETRY_SOON
            )
        per_ip = limits.max_connections_per_ip
        if per_ip is not None and self.per_ip.get(ip, 0) + handshaking >= per_ip:
            return Refusal(429, "per_ip", "too many connections from this address", _RETRY_SOON)
        return None

    def handshake_started(self, ip: str) -> str:
        """Count a connection from `ip` as handshaking; returns the key to end it with."""
        key = client_key(ip)
        self.handshaking[key] = self.handshaking.get(key, 0) + 1
        return key

    def handshake_over(self, key: str) -> None:
        _decrement(self.handshaking, key)

    def at_upgrade(
        self,
        ip: str,
        request: UpgradeRequest,
        auth: TokenStore,
        limits: Limits,
        now: float,
    ) -> Grant | Refusal:
        """The grant for this upgrade from `ip` (the client's address, a trusted proxy's
        forwarding applied), or the refusal to answer it with.

        In order: the browser's Origin (403: cross-site WebSocket hijacking), total capacity
        (503), the token (401; 429 instead once the address failed too often), then the
        address's and the token's connection limits (429).

        The failed-authentication limit only ever refuses failing attempts: a valid token is
        let in whatever its address did, so a stranger sharing an address (a NAT, a proxy)
        cannot lock its legitimate users out by guessing.
        """
        origin = _header(request.headers, b"origin")
        if (
            origin is not None
            and limits.allowed_origins is not None
            and origin.decode("latin-1").lower().rstrip("/") not in limits.allowed_origins
        ):
            return Refusal(403, "origin", "this Origin may not connect")
        if self.established >= limits.max_connections:
            return Refusal(503, "capacity", "server is at max_connections", _retry(5))
        verdict = auth.authenticate(presented_token(request.target, request.headers))
        if isinstance(verdict, AuthFailure):
            return self._failed_authentication(client_key(ip), verdict, limits, now)
        per_ip = limits.max_connections_per_ip
        if per_ip is not None and self.per_ip.get(ip, 0) >= per_ip:
            return Refusal(429, "per_ip", "too many connections from this address", _retry(5))
        per_token = verdict.max_connections
        if per_token is not None and self.per_token.get(verdict.name, 0) >= per_token:
            return Refusal(429, "per_token", "too many connections for this token", _retry(5))
        return verdict

    def _failed_authentication(
        self, key: str, failure: AuthFailure, limits: Limits, now: float
    ) -> Refusal:
        """401 for a missing or invalid token, or 429 once the address has failed
        `max_auth_failures_per_minute` times in the last minute (no guessing at full speed).

        An expired token gets the same answer as an unknown one: whether a token ever existed
        is for the log and the metrics, not for whoever presents it."""
        failures = self.auth_failures.get(key)
        if failures is None:
            if len(self.auth_failures) >= MAX_TRACKED_FAILING_ADDRESSES:
                return Refusal(429, "auth_rate_limited", "too many failed attempts", _retry(60))
            failures = self.auth_failures[key] = deque()
        while failures and failures[0] <= now - AUTH_WINDOW:
            failures.popleft()
        if len(failures) >= limits.max_auth_failures_per_minute:
            retry = max(1, int(failures[0] + AUTH_WINDOW - now) + 1)
            return Refusal(429, "auth_rate_limited", "too many failed attempts", _retry(retry))
        failures.append(now)
        missing = failure is AuthFailure.MISSING
        return Refusal(
            401,
            failure.value,
            "a valid bearer token is required",
            ((b"WWW-Authenticate", _CHALLENGE + (b"" if missing else b', error="invalid_token"')),),
            error=AuthFailure.MISSING.value if missing else AuthFailure.INVALID.value,
            auth_failure=True,
        )

    def forget_old_auth_failures(self, now: float) -> None:
        """Drop the addresses with no failed authentication in the last minute."""
        stale = now - AUTH_WINDOW
        for key in [k for k, f in self.auth_failures.items() if not f or f[-1] <= stale]:
            del self.auth_failures[key]

    def connected(self, ip: str, token: str) -> None:
        """Count a connection from `ip` with `token` as established."""
        self.established += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.per_token[token] = self.per_token.get(token, 0) + 1

    def disconnected(self, ip: str, token: str | None) -> None:
        """An established connection is gone: undo its `connected`."""
        self.established -= 1
        _decrement(self.per_ip, ip)
        if token is not None:
            _decrement(self.per_token, token)


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value.strip()
    return None


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
