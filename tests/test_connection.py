"""connection.ServerConnection and routing.Router in memory, the way wsproto's tests go: bytes in,
bytes out, the time an argument; no sockets and no event loop. The peer is wsproto's client side;
the outbox is a list of what was written; the hub is the real one.

The same behaviour through real sockets: tests/test_ws.py, test_ws_hardening.py, test_fuzz*.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from agentspoonsd import protocol
from agentspoonsd.auth import TokenStore, hash_token
from agentspoonsd.connection import (
    CLOSE_GRACE,
    PING_FRAME,
    RECV_SIZE,
    End,
    Policy,
    ServerConnection,
)
from agentspoonsd.frames import encode_text_frame
from agentspoonsd.history import History
from agentspoonsd.hub import Hub
from agentspoonsd.market.bar import Bar
from agentspoonsd.metrics import Stats
from agentspoonsd.settings import TokenSettings
from server_limits import make_limits

SYMBOLS = ["BTC/USD", "ETH/USD"]


def fixed_token(name: str) -> str:
    """A token shaped like `new_token()`'s (43 URL-safe characters), the same on every run."""
    digest = hashlib.sha256(f"agentspoonsd-test-{name}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


# Fixed tokens: parameter ids show them, and pytest-xdist's workers must collect the same ids.
TOKEN, ETH_ONLY, NOTHING = (fixed_token(name) for name in ("TOKEN", "ETH_ONLY", "NOTHING"))
STORE = TokenStore(
    [
        TokenSettings(name="main", sha256=hash_token(TOKEN)),
        TokenSettings(name="eth", sha256=hash_token(ETH_ONLY), symbols=["ETH/USD"]),
        TokenSettings(name="none", sha256=hash_token(NOTHING), symbols=["XRP/USD"]),
    ]
)
NOW = 1000.0
WALL = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ADDRESS = "192.0.2.7:40000"


class Outbox:
    """The connection's transport: what was written, in order, and whether it was sealed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.replies = 0
        self.sealed = False
        self.queued_bytes = 0

    def write(self, data: bytes) -> None:
        if not self.sealed:  # as outbox.Outbox: ignored once sealed
            self.writes.append(data)

    def write_reply(self, parts: list[bytes]) -> None:
        if not self.sealed:
            self.writes.append(b"".join(parts))
            self.replies += 1

    def seal(self, final: bytes, *, discard_unsent: bool = False) -> None:
        self.writes.append(final)
        self.sealed = True


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def debug(self, event: str, **fields: Any) -> None:
        self.lines.append(("debug", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.lines if event == name]


def server(**overrides: Any) -> Policy:
    limits = make_limits(
        **{
            "max_connections": 100,
            "max_backlog_bytes": 65536,
            "max_message_size": 4096,
            "handshake_timeout": 1.0,
            "max_client_messages_per_second": 1000,
            **overrides,
        }
    )
    stats = Stats()
    history = History(SYMBOLS, 100, decode_frame=encode_text_frame, start_seq=1)
    hub = Hub(SYMBOLS, None, stats, history=history)  # type: ignore[arg-type]  # never run
    return Policy(hub, STORE, limits, stats, Log(), lambda: WALL)


def log_of(policy: Policy) -> Log:
    assert isinstance(policy.log, Log)
    return policy.log


class Peer:
    """A client (wsproto's client side) and the server's connection for it."""

    def __init__(self, policy: Policy, address: str = ADDRESS, now: float = NOW) -> None:
        self.policy = policy
        self.outbox = Outbox()
        self.conn = ServerConnection(address, policy, self.outbox, now)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._read = 0

    def upgrade(self, target: str = f"/?access_token={TOKEN}", now: float = NOW) -> End | None:
        return self.conn.receive(self.ws.send(Request(host="example", target=target)), now)

    def send(self, *events: Event, now: float = NOW) -> End | None:
        return self.conn.receive(b"".join(self.ws.send(event) for event in events), now)

    def received(self) -> list[Event]:
        """What the server wrote since the last call, as the client reads it."""
        new, self._read = self.outbox.writes[self._read :], len(self.outbox.writes)
        self.ws.receive_data(b"".join(new))
        return list(self.ws.events())

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(e.data) for e in self.received() if isinstance(e, TextMessage)]

    def close_code(self) -> int | None:
        codes = [e.code for e in self.received() if isinstance(e, CloseConnection)]
        return codes[-1] if codes else None


def connected(policy: Policy, target: str = f"/?access_token={TOKEN}", **kw: Any) -> Peer:
    peer = Peer(policy, **kw)
    assert peer.upgrade(target) is None
    assert peer.messages()[0]["type"] == "connected"
    return peer


def record(policy: Policy, count: int, symbol: str = "BTC/USD") -> None:
    """Put `count` updates of `symbol` in the hub's history, as a publication would (without
    broadcasting them: `Hub.publish` reads Trio's clock)."""
    history = policy.hub.history
    for i in range(count):
        seq = history.next_seq(symbol)
        price = 100.0 + i
        bar = Bar(symbol, WALL, price, price + 1, price - 1, price, 1.0, 0.0, 0.01)
        message = protocol.update_message(bar, seq, WALL)
        payload = protocol.encode(message)
        history.record(symbol, seq, payload, encode_text_frame(payload), message["data"])


# ---------------------------------------------------------------- the upgrade


def test_an_admitted_upgrade_is_101_a_ping_and_connected_in_one_write() -> None:
    policy = server()
    peer = Peer(policy)
    assert policy.admission.handshaking == {"192.0.2.7": 1}
    assert policy.deadlines == {peer.conn: NOW + 1.0}
    assert peer.upgrade(now=NOW + 0.5) is None
    assert len(peer.outbox.writes) == 1 and peer.outbox.writes[0].startswith(b"HTTP/1.1 101 ")
    events = peer.received()
    assert [type(e) for e in events] == [AcceptConnection, Ping, TextMessage]
    greeting = json.loads(events[2].data)  # type: ignore[attr-defined]
    assert greeting["type"] == "connected" and greeting["token"] == "main"
    assert greeting["symbols"] == SYMBOLS == greeting["available"]
    assert greeting["timestamp"].startswith("2026-01-02T03:04:05")
    conn = peer.conn
    assert (conn.connected_at, conn.ping_outstanding, conn.grant and conn.grant.name) == (
        NOW + 0.5,
        True,
        "main",
    )
    admission = policy.admission
    assert (admission.handshaking, admission.established) == ({}, 1)
    assert (admission.per_ip, admission.per_token) == ({"192.0.2.7": 1}, {"main": 1})
    assert policy.deadlines == {}
    assert (policy.stats.connections_accepted, policy.stats.clients_connected) == (1, 1)
    assert log_of(policy).events("client_connected") == [
        {"peer": ADDRESS, "token": "main", "symbols": 2}
    ]
    assert policy.hub.subscriptions(conn) == SYMBOLS


def test_the_request_may_arrive_in_any_pieces() -> None:
    policy = server(max_connections=1000)
    data = WSConnection(ConnectionType.CLIENT).send(
        Request(host="example", target=f"/?access_token={TOKEN}")
    )
    for cut in range(1, len(data)):
        peer = Peer(policy)
        assert peer.conn.receive(data[:cut], NOW) is None
        assert peer.outbox.writes == []
        assert peer.conn.receive(data[cut:], NOW) is None
        assert peer.outbox.writes[0].startswith(b"HTTP/1.1 101 "), cut
    assert policy.stats.connections_accepted == len(data) - 1


REFUSED = [
    # (the request's bytes, limits, status, reason, log event, level)
    (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", {}, 405, "bad_request", "upgrade_refused", "info"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {}, 426, "bad_request", "upgrade_refused", "info"),
    (b"GET / HTTP/1.1\r\n\xff\r\n\r\n", {}, 400, "bad_request", "upgrade_refused", "info"),
    ("/", {}, 401, "missing_token", "auth_failed", "warning"),
    ("/?access_token=x", {}, 401, "invalid_token", "auth_failed", "warning"),
    ("", {"max_connections_per_ip": 0}, 429, "per_ip", "upgrade_refused", "warning"),
    ("", {"allowed_origins": frozenset()}, 403, "origin", "upgrade_refused", "warning"),
]


@pytest.mark.parametrize(("request_", "overrides", "status", "reason", "event", "level"), REFUSED)
def test_a_refused_upgrade_is_answered_counted_logged_and_ended(
    request_: bytes | str,
    overrides: dict,
    status: int,
    reason: str,
    event: str,
    level: str,
) -> None:
    policy = server(**overrides)
    peer = Peer(policy)
    if isinstance(request_, bytes):
        data = request_
    else:
        headers = (
            [(b"Origin", b"https://elsewhere.example")] if "allowed_origins" in overrides else []
        )
        target = request_ or f"/?access_token={TOKEN}"
        data = peer.ws.send(Request(host="example", target=target, extra_headers=headers))
    assert peer.conn.receive(data, NOW) == End("refused")
    (answer,) = peer.outbox.writes
    assert answer.startswith(b"HTTP/1.1 %d " % status) and peer.outbox.sealed
    assert peer.conn.handshake is None and peer.conn.connected_at is None
    assert policy.stats.rejected_upgrades == {reason: 1}
    assert policy.stats.auth_failures == ({reason: 1} if event == "auth_failed" else {})
    assert [(lv, ev) for lv, ev, _ in log_of(policy).lines] == [(level, event)]
    assert policy.deadlines == {peer.conn: NOW + 1.0}  # the refusal's delivery is bounded too
    assert policy.stats.connections_accepted == 0


def test_end_of_stream_before_a_request_closes_at_once() -> None:
    peer = Peer(server())
    assert peer.conn.receive(b"GET / HT", NOW) is None
    assert peer.conn.receive(b"", NOW) == End("closed", flush=False)


def test_forgetting_a_connection_that_timed_out_in_its_handshake() -> None:
    policy = server()
    peer = Peer(policy)
    policy.forget(peer.conn, "handshake_timeout", NOW + 1)
    assert policy.admission.handshaking == {}
    assert policy.stats.rejected_upgrades == {"handshake_timeout": 1}
    assert log_of(policy).events("handshake_timeout") == [{"peer": ADDRESS}]


def test_forgetting_an_established_connection() -> None:
    policy = server()
    peer = connected(policy)
    policy.forget(peer.conn, "close_1000", NOW + 12.3456)
    admission = policy.admission
    assert (admission.established, admission.per_ip, admission.per_token) == (0, {}, {})
    assert policy.stats.clients_connected == 0 and policy.stats.disconnects == {"close_1000": 1}
    assert policy.hub.subscriber_count() == 0
    assert log_of(policy).events("client_disconnected") == [
        {"peer": ADDRESS, "token": "main", "reason": "close_1000", "duration_s": 12.346}
    ]


GREETINGS = [
    # (URL query, the greeting's symbols, the errors that follow it)
    ("", SYMBOLS, []),
    ("&symbols=ETH/USD", ["ETH/USD"], []),
    ("&symbols=ETH/USD,XRP/USD", ["ETH/USD"], ["unknown_symbol"]),
    ("&resume=BTC/USD:0", ["BTC/USD"], []),  # resuming: only what is resumed
    ("&resume=BTC/USD:0&symbols=ETH/USD", SYMBOLS, []),
    ("&resume=XRP/USD:3", [], ["unknown_symbol"]),
    ("&resume=BTC/USD:x", SYMBOLS, ["invalid_message"]),  # a bad resume: as if none was given
]


@pytest.mark.parametrize(("query", "symbols", "errors"), GREETINGS)
def test_the_url_chooses_the_first_subscriptions(query: str, symbols: list, errors: list) -> None:
    policy = server()
    peer = Peer(policy)
    assert peer.upgrade(f"/?access_token={TOKEN}{query}") is None
    greeting, *rest = peer.messages()
    assert greeting["symbols"] == symbols
    assert [m["code"] for m in rest] == errors
    assert policy.hub.subscriptions(peer.conn) == symbols


def test_a_token_scoped_to_nothing_published_is_told_so() -> None:
    peer = Peer(server())
    assert peer.upgrade(f"/?access_token={NOTHING}") is None
    greeting, error = peer.messages()
    assert (greeting["symbols"], greeting["available"]) == ([], [])
    assert error["code"] == "no_symbols"


def test_a_resume_in_the_url_replays_what_was_missed_after_the_greeting() -> None:
    policy = server()
    record(policy, 3)
    peer = Peer(policy)
    assert peer.upgrade(f"/?access_token={TOKEN}&resume=BTC/USD:1") is None
    messages = peer.messages()
    assert [m["type"] for m in messages] == ["connected", "volatility_update", "volatility_update"]
    assert [m["data"]["seq"] for m in messages[1:]] == [2, 3]
    assert peer.outbox.replies == 1  # one reply, exempt from the backlog cap


# ---------------------------------------------------------------- requests

REQUESTS = [
    # (token, request, the reply's type, its code or symbols)
    (TOKEN, {"type": "ping"}, "pong", None),
    (TOKEN, {"type": "subscribe", "symbols": ["BTC/USD"]}, "subscribed", SYMBOLS),
    (TOKEN, {"type": "subscribe", "symbols": ["*"]}, "subscribed", SYMBOLS),
    (TOKEN, {"type": "subscribe", "symbols": ["XRP/USD"]}, "error", "unknown_symbol"),
    (TOKEN, {"type": "unsubscribe", "symbols": ["ETH/USD"]}, "unsubscribed", ["BTC/USD"]),
    (TOKEN, {"type": "unsubscribe", "symbols": ["*"]}, "unsubscribed", []),
    (TOKEN, {"type": "unsubscribe", "symbols": ["XRP/USD"]}, "error", "unknown_symbol"),
    (TOKEN, {"type": "history", "symbol": "BTC/USD"}, "history", None),
    (TOKEN, {"type": "history", "symbol": "XRP/USD"}, "error", "unknown_symbol"),
    (TOKEN, {"type": "resume", "from": {"BTC/USD": 0}}, "error", "already_subscribed"),
    (TOKEN, {"type": "resume", "from": {"XRP/USD": 0}}, "error", "unknown_symbol"),
    (TOKEN, {"type": "nope"}, "error", "unknown_type"),
    (TOKEN, [1], "error", "invalid_message"),
    (ETH_ONLY, {"type": "subscribe", "symbols": ["BTC/USD"]}, "error", "forbidden_symbol"),
    (ETH_ONLY, {"type": "subscribe", "symbols": ["*"]}, "subscribed", ["ETH/USD"]),
    (ETH_ONLY, {"type": "history", "symbol": "BTC/USD"}, "error", "forbidden_symbol"),
    (ETH_ONLY, {"type": "resume", "from": {"BTC/USD": 0}}, "error", "forbidden_symbol"),
    (ETH_ONLY, {"type": "unsubscribe", "symbols": ["BTC/USD"]}, "unsubscribed", ["ETH/USD"]),
]


@pytest.mark.parametrize(("token", "request_", "kind", "detail"), REQUESTS)
def test_each_request_gets_its_reply(token: str, request_: Any, kind: str, detail: Any) -> None:
    policy = server()
    peer = connected(policy, f"/?access_token={token}")
    assert peer.send(TextMessage(json.dumps(request_))) is None
    (reply,) = peer.messages()
    assert reply["type"] == kind
    if kind == "error":
        assert reply["code"] == detail
        assert policy.stats.client_errors == 1
        assert log_of(policy).events("client_message_rejected")[0]["code"] == detail
    elif detail is not None:
        assert reply["symbols"] == detail == policy.hub.subscriptions(peer.conn)


def test_a_resume_request_replays_then_subscribes() -> None:
    policy = server()
    peer = connected(policy, f"/?access_token={TOKEN}&symbols=ETH/USD")
    record(policy, 2)
    peer.send(TextMessage(json.dumps({"type": "resume", "from": {"BTC/USD": 1}})))
    messages = peer.messages()
    assert [m["type"] for m in messages] == ["subscribed", "volatility_update"]
    assert messages[0]["symbols"] == SYMBOLS and messages[1]["data"]["seq"] == 2


def test_text_fragments_are_joined_and_binary_is_refused() -> None:
    peer = connected(server())
    peer.send(TextMessage('{"type":', message_finished=False))
    assert peer.messages() == []
    peer.send(TextMessage('"ping"}', message_finished=True))
    assert [m["type"] for m in peer.messages()] == ["pong"]
    peer.send(BytesMessage(b"\x00", message_finished=False))
    assert peer.messages() == []
    peer.send(BytesMessage(b"\x01"))
    assert [m["code"] for m in peer.messages()] == ["binary_unsupported"]


@pytest.mark.parametrize("pieces", [1, 2, 5])
def test_a_message_over_the_limit_is_answered_and_closed_1009(pieces: int) -> None:
    policy = server(max_message_size=1000)
    peer = connected(policy)
    text = "x" * 1001
    size = -(-len(text) // pieces)
    for i in range(0, len(text), size):
        peer.send(TextMessage(text[i : i + size], message_finished=i + size >= len(text)))
    events = peer.received()
    assert json.loads(events[0].data)["code"] == "message_too_large"  # type: ignore[attr-defined]
    assert isinstance(events[1], CloseConnection) and events[1].code == 1009
    assert peer.conn.drop_reason == "message_too_large"
    assert policy.deadlines == {peer.conn: NOW + CLOSE_GRACE}


# ---------------------------------------------------------------- budgets


def test_requests_past_the_rate_are_refused_and_the_excess_is_owed() -> None:
    policy = server(max_client_messages_per_second=3)
    peer = connected(policy)
    ping = TextMessage('{"type":"ping"}')
    peer.send(*[ping] * 4, now=NOW)
    assert [m.get("code", m["type"]) for m in peer.messages()] == ["pong"] * 3 + ["rate_limited"]
    peer.send(ping, now=NOW + 1)
    assert [m["type"] for m in peer.messages()] == ["pong"]
    record(policy, 100)  # a page of 100 updates costs 1 + 100 // 50
    peer.send(TextMessage('{"type":"history","symbol":"BTC/USD"}'), now=NOW + 2)
    assert [m["type"] for m in peer.messages()] == ["history"]
    peer.send(ping, now=NOW + 2)  # 3 spent this second
    assert [m.get("code") for m in peer.messages()] == ["rate_limited"]


ERRORS = [
    # (max_client_errors, seconds between errors, errors sent, closed with 1008)
    (2, 0.0, 2, False),
    (2, 0.0, 3, True),
    (2, 4.0, 3, True),  # all three within ERROR_WINDOW (10 s)
    (2, 5.0, 3, False),  # the first has left the window when the third comes
    (0, 0.0, 1, True),
]


@pytest.mark.parametrize(("allowed", "gap", "count", "closed"), ERRORS)
def test_too_many_errors_in_the_window_close_1008(
    allowed: int, gap: float, count: int, closed: bool
) -> None:
    policy = server(max_client_errors=allowed)
    peer = connected(policy)
    for i in range(count):
        peer.send(TextMessage("not json"), now=NOW + i * gap)
    events = peer.received()
    codes = [json.loads(e.data)["code"] for e in events if isinstance(e, TextMessage)]
    assert codes == ["invalid_json"] * count
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert [(e.code, e.reason) for e in closes] == ([(1008, "too many errors")] if closed else [])
    assert (peer.conn.drop_reason == "too_many_errors") is closed
    assert bool(log_of(policy).events("client_too_many_errors")) is closed


FLOODS = [
    # (limits, what is sent in one second, the kind counted)
    ({"max_client_frames_per_second": 5}, [Ping()] * 6, "frames"),
    ({"max_client_frames_per_second": 5}, [Pong()] * 6, "frames"),
    ({"max_client_frames_per_second": 5}, [TextMessage("", message_finished=False)] * 6, "frames"),
    ({"max_client_bytes_per_second": 100}, [TextMessage("x" * 100)], "bytes"),
]


@pytest.mark.parametrize(("overrides", "events", "kind"), FLOODS)
def test_a_flood_is_closed_1008_then_drained_then_cut(
    overrides: dict, events: list[Event], kind: str
) -> None:
    policy = server(**overrides, max_message_size=1000)
    peer = connected(policy)
    assert peer.send(*events) is None
    assert peer.close_code() == 1008
    assert policy.stats.floods == {kind: 1}
    (flood,) = log_of(policy).events("client_flood")
    assert (flood["kind"], flood["token"]) == (kind, "main")
    assert policy.deadlines == {peer.conn: NOW + CLOSE_GRACE}
    # Whatever follows this second is read and dropped, unparsed, up to a closing peer's
    # allowance; past it the connection ends.
    chunk = b"\x81\x80" + bytes(4)  # a masked empty text frame
    allowance = 1000 + RECV_SIZE
    sent = 0
    while (end := peer.conn.receive(chunk * 1000, NOW + 0.5)) is None:
        sent += len(chunk) * 1000
        assert sent <= allowance
    assert end == End("flood") and sent + len(chunk) * 1000 > allowance - 6000
    assert policy.stats.floods == {kind: 1}  # counted once


def test_a_flooder_answering_the_close_next_second_ends_politely() -> None:
    policy = server(max_client_frames_per_second=2)
    peer = connected(policy)
    peer.send(Ping(), Ping(), Ping())
    events = peer.received()
    assert [type(e) for e in events] == [Pong, Pong, CloseConnection]
    assert peer.send(events[-1].response(), now=NOW + 1) == End("close_1008")  # type: ignore[attr-defined]


def test_a_close_the_peer_never_answers_is_cut_past_its_allowance() -> None:
    policy = server(max_message_size=1000)
    peer = connected(policy)
    peer.conn.close(1001, "bye")
    ping = TextMessage('{"type":"ping"}')
    sent = 0
    while (end := peer.send(*[ping] * 100, now=NOW + sent)) is None:  # within every budget
        sent += 1
    assert end == End("close_unanswered") and sent > 0
    assert [m["type"] for m in peer.messages()] == []  # nothing more is answered


# ---------------------------------------------------------------- control frames and closing


def test_pings_are_answered_and_the_peers_close_is_returned() -> None:
    peer = connected(server())
    assert peer.send(Ping(b"abc")) is None
    (pong,) = peer.received()
    assert isinstance(pong, Pong) and pong.payload == b"abc"
    assert peer.send(CloseConnection(1000, "done")) == End("close_1000")
    assert peer.close_code() == 1000


def test_a_protocol_error_closes_with_its_code() -> None:
    peer = connected(server())
    unmasked = b"\x81\x02hi"  # a client frame must be masked
    assert peer.conn.receive(unmasked, NOW) == End("close_1002")
    assert peer.close_code() == 1002


def test_only_the_pong_to_our_ping_moves_a_client_to_the_front() -> None:
    policy = server()
    first, second = connected(policy), connected(policy, address="192.0.2.8:1")
    assert policy.hub.broadcast_order("BTC/USD") == [second.conn, first.conn]  # newest first
    first.send(Pong())  # the answer to the ping sent with the 101
    assert policy.hub.broadcast_order("BTC/USD") == [first.conn, second.conn]
    second.conn.ping_outstanding = False  # as if it had answered long ago
    second.send(Pong())  # unsolicited: allowed, changes nothing
    assert policy.hub.broadcast_order("BTC/USD") == [first.conn, second.conn]


HEARTBEATS = [
    # (seconds since the peer last sent anything, what the heartbeat writes)
    (0.0, "ping"),
    (60.0, "ping"),  # idle_timeout is not yet passed
    (60.5, "close"),
]


@pytest.mark.parametrize(("silent", "expected"), HEARTBEATS)
def test_a_heartbeat_pings_or_closes_the_silent(silent: float, expected: str) -> None:
    policy = server(idle_timeout=60.0)
    peer = connected(policy)
    peer.received()
    peer.conn.ping_outstanding = False
    peer.conn.heartbeat(NOW + silent)
    if expected == "ping":
        assert peer.outbox.writes[-1] == PING_FRAME and peer.conn.ping_outstanding
        assert policy.deadlines == {}
    else:
        assert peer.close_code() == 1001 and peer.conn.drop_reason == "idle_timeout"
        assert policy.deadlines == {peer.conn: NOW + silent + CLOSE_GRACE}


def test_a_heartbeat_leaves_handshakes_and_closing_connections_alone() -> None:
    policy = server()
    handshaking = Peer(policy)
    handshaking.conn.heartbeat(NOW + 100)
    closing = connected(policy)
    closing.conn.close(1000)
    writes = len(closing.outbox.writes)
    closing.conn.heartbeat(NOW + 100)
    assert handshaking.outbox.writes == [] and len(closing.outbox.writes) == writes


def test_a_second_linger_close_keeps_the_earlier_deadline() -> None:
    policy = server()
    peer = connected(policy)
    peer.conn.linger_close(1008, "one", "first", NOW)
    peer.conn.linger_close(1001, "two", "second", NOW + 1)
    assert policy.deadlines == {peer.conn: NOW + CLOSE_GRACE}
    assert peer.conn.drop_reason == "first" and peer.close_code() == 1008


# ---------------------------------------------------------------- logs


def test_refusals_from_one_address_are_logged_five_per_window_then_summed_up() -> None:
    policy = server()
    for _ in range(7):
        assert Peer(policy).upgrade("/") == End("refused")
    log = log_of(policy)
    assert len(log.events("auth_failed")) == 5 and log.events("log_suppressed") == []
    policy.summarise_suppressed_logs(NOW + 3600)
    assert log.events("log_suppressed") == [{"client": "192.0.2.7", "count": 2, "interval_s": 10.0}]
    assert policy.stats.rejected_upgrades == {"missing_token": 7}


def test_a_forwarded_client_is_named_beside_its_socket() -> None:
    from agentspoonsd.proxies import TrustedProxies

    policy = server(proxies=TrustedProxies.parse(["192.0.2.7"], "x-forwarded-for"))
    peer = Peer(policy)
    data = peer.ws.send(
        Request(
            host="example",
            target=f"/?access_token={TOKEN}",
            extra_headers=[(b"X-Forwarded-For", b"203.0.113.9")],
        )
    )
    assert peer.conn.receive(data, NOW) is None
    assert peer.conn.peer_fields() == {"peer": ADDRESS, "client": "203.0.113.9"}
    assert policy.admission.per_ip == {"203.0.113.9": 1}
