"""admission.Admission in memory: who may connect, at accept and at the upgrade (no sockets, no
event loop, the time an argument). The same rules end to end: tests/test_ws_hardening.py."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from agentspoonsd import admission
from agentspoonsd.admission import Admission, Refusal
from agentspoonsd.auth import Grant, TokenStore, hash_token
from agentspoonsd.connection import Limits
from agentspoonsd.settings import TokenSettings
from agentspoonsd.upgrade import UpgradeParser, UpgradeRequest
from server_limits import make_limits


def fixed_token(name: str) -> str:
    """A token shaped like `new_token()`'s (43 URL-safe characters), the same on every run."""
    digest = hashlib.sha256(f"agentspoonsd-test-{name}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


# Fixed tokens: parameter ids show them, and pytest-xdist's workers must collect the same ids.
TOKEN, LIMITED, EXPIRED = (fixed_token(name) for name in ("TOKEN", "LIMITED", "EXPIRED"))
NOW = 1000.0
STORE = TokenStore(
    [
        TokenSettings(name="main", sha256=hash_token(TOKEN)),
        TokenSettings(name="limited", sha256=hash_token(LIMITED), max_connections=1),
        TokenSettings(
            name="old", sha256=hash_token(EXPIRED), expires=datetime.now(UTC) - timedelta(days=1)
        ),
    ]
)
IP = "192.0.2.7"


def limits(**overrides: Any) -> Limits:
    return make_limits(
        **{
            "max_connections": 10,
            "max_backlog_bytes": 65536,
            "max_message_size": 4096,
            "handshake_timeout": 1.0,
            **overrides,
        }
    )


def upgrade_request(target: str = f"/?access_token={TOKEN}", **headers: str) -> UpgradeRequest:
    extra = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    data = WSConnection(ConnectionType.CLIENT).send(
        Request(host="example", target=target, extra_headers=extra)
    )
    request = UpgradeParser().feed(data)
    assert request is not None
    return request


def status(verdict: Grant | Refusal | None) -> tuple[int, str] | str | None:
    """A refusal as (status, reason), a grant as its token's name."""
    if isinstance(verdict, Refusal):
        return verdict.status, verdict.reason
    return None if verdict is None else verdict.name


# ---------------------------------------------------------------- at accept

AT_ACCEPT = [
    # (limits, connections open, this address's established, its handshakes) → verdict
    ({}, 0, 0, 0, None),
    ({}, 9, 0, 0, None),
    ({}, 10, 0, 0, (503, "capacity")),
    ({"max_handshakes_per_ip": 2}, 0, 0, 1, None),
    ({"max_handshakes_per_ip": 2}, 0, 0, 2, (429, "handshakes_per_ip")),
    ({"max_handshakes_per_ip": None}, 0, 0, 5000, None),
    ({"max_connections_per_ip": 3}, 0, 2, 0, None),
    ({"max_connections_per_ip": 3}, 0, 3, 0, (429, "per_ip")),
    ({"max_connections_per_ip": 3}, 0, 1, 2, (429, "per_ip")),  # handshakes count too
    (
        {"max_connections_per_ip": 3, "max_handshakes_per_ip": 2},
        0,
        0,
        2,
        (429, "handshakes_per_ip"),
    ),
    ({"max_connections_per_ip": 3}, 10, 3, 0, (503, "capacity")),  # capacity is asked first
]


@pytest.mark.parametrize(("overrides", "open_", "established", "handshakes", "expected"), AT_ACCEPT)
def test_at_accept(
    overrides: dict, open_: int, established: int, handshakes: int, expected: object
) -> None:
    gate = Admission()
    for _ in range(established):
        gate.connected(IP, "main")
    for _ in range(handshakes):
        gate.handshake_started(IP)
    refusal = gate.at_accept(IP, open_, limits(**overrides))
    assert status(refusal) == expected
    if refusal is not None:  # every refusal at accept says when to come back
        assert refusal.headers == ((b"Retry-After", b"5"),)


def test_handshakes_count_per_ipv6_network_and_are_given_back() -> None:
    gate = Admission()
    keys = [gate.handshake_started(f"2001:db8:0:1::{i}") for i in range(2)]
    assert keys[0] == keys[1]  # one /64
    rules = limits(max_handshakes_per_ip=2)
    assert status(gate.at_accept("2001:db8:0:1::99", 0, rules)) == (429, "handshakes_per_ip")
    assert gate.at_accept("2001:db8:0:2::1", 0, rules) is None  # the next /64
    for key in keys:
        gate.handshake_over(key)
    assert gate.handshaking == {}
    assert gate.at_accept("2001:db8:0:1::99", 0, rules) is None


# ---------------------------------------------------------------- at the upgrade

AT_UPGRADE = [
    # (request, limits, established from IP with "main") → verdict
    (upgrade_request(), {}, 0, "main"),
    (upgrade_request(f"/?access_token={TOKEN}&symbols=BTC/USD"), {}, 0, "main"),
    (upgrade_request(f"/?access_token={LIMITED}"), {}, 0, "limited"),
    (upgrade_request("/"), {}, 0, (401, "missing_token")),
    (upgrade_request("/?access_token=wrong"), {}, 0, (401, "invalid_token")),
    (upgrade_request(f"/?access_token={EXPIRED}"), {}, 0, (401, "expired")),
    (upgrade_request("/", authorization=f"Bearer {TOKEN}"), {}, 0, "main"),
    (upgrade_request(origin="https://a.example"), {}, 0, "main"),  # any Origin by default
    (
        upgrade_request(origin="https://A.example/"),
        {"allowed_origins": frozenset({"https://a.example"})},
        0,
        "main",
    ),
    (
        upgrade_request(origin="https://b.example"),
        {"allowed_origins": frozenset({"https://a.example"})},
        0,
        (403, "origin"),
    ),
    (upgrade_request(), {"allowed_origins": frozenset({"https://a.example"})}, 0, "main"),
    (upgrade_request(), {"max_connections": 2}, 2, (503, "capacity")),
    (upgrade_request("/"), {"max_connections": 2}, 2, (503, "capacity")),  # before the token
    (upgrade_request(), {"max_connections_per_ip": 2}, 2, (429, "per_ip")),
    (upgrade_request("/"), {"max_connections_per_ip": 2}, 2, (401, "missing_token")),
    (
        upgrade_request(origin="https://b.example"),
        {"allowed_origins": frozenset(), "max_connections": 1},
        1,
        (403, "origin"),  # the Origin first of all
    ),
]


@pytest.mark.parametrize(("request_", "overrides", "established", "expected"), AT_UPGRADE)
def test_at_upgrade(
    request_: UpgradeRequest, overrides: dict, established: int, expected: object
) -> None:
    gate = Admission()
    for _ in range(established):
        gate.connected(IP, "main")
    assert status(gate.at_upgrade(IP, request_, STORE, limits(**overrides), NOW)) == expected


def test_a_token_is_held_to_its_own_connection_limit() -> None:
    gate = Admission()
    request = upgrade_request(f"/?access_token={LIMITED}")
    assert status(gate.at_upgrade(IP, request, STORE, limits(), NOW)) == "limited"
    gate.connected(IP, "limited")
    assert status(gate.at_upgrade("198.51.100.1", request, STORE, limits(), NOW)) == (
        429,
        "per_token",
    )
    gate.disconnected(IP, "limited")
    assert (gate.established, gate.per_ip, gate.per_token) == (0, {}, {})
    assert status(gate.at_upgrade(IP, request, STORE, limits(), NOW)) == "limited"


REFUSAL_ANSWERS = [
    # (target, error in the body, WWW-Authenticate)
    ("/", "missing_token", b'Bearer realm="agentspoonsd"'),
    (
        "/?access_token=wrong",
        "invalid_token",
        b'Bearer realm="agentspoonsd", error="invalid_token"',
    ),
    # An expired token is answered as an unknown one: only the log and metrics say "expired".
    (
        f"/?access_token={EXPIRED}",
        "invalid_token",
        b'Bearer realm="agentspoonsd", error="invalid_token"',
    ),
]


@pytest.mark.parametrize(("target", "error", "challenge"), REFUSAL_ANSWERS)
def test_a_failed_authentication_carries_its_answer(
    target: str, error: str, challenge: bytes
) -> None:
    refusal = Admission().at_upgrade(IP, upgrade_request(target), STORE, limits(), NOW)
    assert isinstance(refusal, Refusal) and refusal.auth_failure
    head, _, body = refusal.response().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"WWW-Authenticate: " + challenge + b"\r\n" in head + b"\r\n"
    assert orjson.loads(body) == {"error": error, "message": "a valid bearer token is required"}


def test_failed_authentications_are_limited_per_address_for_a_minute() -> None:
    gate = Admission()
    rules = limits(max_auth_failures_per_minute=3)
    bad, good = upgrade_request("/?access_token=wrong"), upgrade_request()
    times = [NOW, NOW + 10, NOW + 20]
    assert [status(gate.at_upgrade(IP, bad, STORE, rules, t)) for t in times] == [
        (401, "invalid_token")
    ] * 3
    refusal = gate.at_upgrade(IP, bad, STORE, rules, NOW + 30)
    assert status(refusal) == (429, "auth_rate_limited")
    assert isinstance(refusal, Refusal) and not refusal.auth_failure
    assert refusal.headers == ((b"Retry-After", b"31"),)  # when the first failure leaves
    assert status(gate.at_upgrade(IP, good, STORE, rules, NOW + 30)) == "main"  # never locked out
    assert status(gate.at_upgrade("198.51.100.1", bad, STORE, rules, NOW + 30)) == (
        401,
        "invalid_token",
    )
    # A minute after the first failure it no longer counts: one more attempt is let through.
    assert status(gate.at_upgrade(IP, bad, STORE, rules, NOW + 60)) == (401, "invalid_token")
    assert status(gate.at_upgrade(IP, bad, STORE, rules, NOW + 61)) == (429, "auth_rate_limited")


def test_failing_addresses_are_forgotten_after_a_minute() -> None:
    gate = Admission()
    gate.at_upgrade(IP, upgrade_request("/"), STORE, limits(), NOW)
    gate.forget_old_auth_failures(NOW + 59)
    assert list(gate.auth_failures) == [IP]
    gate.forget_old_auth_failures(NOW + 60)
    assert gate.auth_failures == {}


def test_past_the_tracked_addresses_a_new_failing_address_gets_429(monkeypatch) -> None:
    monkeypatch.setattr(admission, "MAX_TRACKED_FAILING_ADDRESSES", 2)
    gate = Admission()
    bad = upgrade_request("/?access_token=wrong")
    for ip in ("192.0.2.1", "192.0.2.2"):
        assert status(gate.at_upgrade(ip, bad, STORE, limits(), NOW)) == (401, "invalid_token")
    refusal = gate.at_upgrade("192.0.2.3", bad, STORE, limits(), NOW)
    assert status(refusal) == (429, "auth_rate_limited")
    assert isinstance(refusal, Refusal) and refusal.headers == ((b"Retry-After", b"60"),)
    assert status(gate.at_upgrade("192.0.2.3", upgrade_request(), STORE, limits(), NOW)) == "main"
    assert status(gate.at_upgrade("192.0.2.1", bad, STORE, limits(), NOW)) == (
        401,
        "invalid_token",
    )  # an address already tracked is counted as before


def test_a_refusal_is_a_complete_json_answer() -> None:
    refusal = Refusal(429, "per_ip", "too many connections", ((b"Retry-After", b"5"),))
    head, _, body = refusal.response().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 429 Too Many Requests"
    assert b"Retry-After: 5" in lines and b"Connection: close" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert orjson.loads(body) == {"error": "per_ip", "message": "too many connections"}
