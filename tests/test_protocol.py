"""protocol: the documented server messages, and replies to whatever a client sends."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from agentspoonsd import __version__, protocol
from agentspoonsd.market.bar import Bar
from agentspoonsd.protocol import (
    SERVER_BANNER,
    ConnectOptions,
    ErrorCode,
    HistoryRequest,
    Ping,
    RequestError,
    Resume,
    Subscribe,
    Unsubscribe,
    connected_message,
    encode,
    error_message,
    iso_utc,
    parse_connect_target,
    parse_request,
    pong_message,
    update_message,
)

ISO_UTC_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
NOW = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)

BAR = Bar(
    symbol="BTC/USD",
    timestamp=datetime(2024, 5, 6, 7, 8, 8, tzinfo=UTC),
    open=50000.0,
    high=50100.5,
    low=49900.25,
    close=50050.75,
    volume=12.5,
    returns=0.001014,
    volatility=0.0023,
)


def parse_iso(text: str) -> datetime:
    assert ISO_UTC_MICROS.match(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- iso_utc --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05.000000Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 7, tzinfo=UTC), "2024-01-02T03:04:05.000007Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 999999, tzinfo=UTC), "2024-01-02T03:04:05.999999Z"),
        # other zones are converted to UTC, across a date boundary
        (
            datetime(2024, 1, 1, 1, 30, 0, 500000, tzinfo=timezone(timedelta(hours=2))),
            "2023-12-31T23:30:00.500000Z",
        ),
        (
            datetime(2024, 6, 30, 20, 0, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
            "2024-07-01T01:30:00.000000Z",
        ),
    ],
)
def test_iso_utc(moment: datetime, expected: str) -> None:
    assert iso_utc(moment) == expected
    assert parse_iso(iso_utc(moment)) == moment


def test_iso_utc_now_always_has_microseconds() -> None:
    for micro in (0, 1, 10, 100000):
        assert ISO_UTC_MICROS.match(iso_utc(NOW.replace(microsecond=micro)))


# --- server messages ------------------------------------------------------------------------------


def test_connected_message() -> None:
    message = connected_message(NOW, token="dashboard", symbols=["BTC/USD", "ETH/USD"])
    assert message["type"] == "connected"
    assert message["message"] == SERVER_BANNER == "AgentSpoons WebSocket Server"
    assert message["timestamp"] == "2024-05-06T07:08:09.123456Z"
    assert parse_iso(message["timestamp"]) == NOW
    # additive fields
    assert message["version"] == __version__
    assert message["token"] == "dashboard"
    assert message["symbols"] == ["BTC/USD", "ETH/USD"]
    assert list(message)[:3] == ["type", "message", "timestamp"]


def test_update_message_shape() -> None:
    message = update_message(BAR, 7, NOW)
    assert set(message) == {"type", "data", "timestamp"}
    assert message["type"] == "volatility_update"
    assert message["timestamp"] == "2024-05-06T07:08:09.123456Z"
    data = message["data"]
    documented = {"timestamp", "volatility", "price", "returns", "open", "high", "low", "volume"}
    assert documented <= set(data)
    assert {"symbol", "seq"} <= set(data)
    assert data["timestamp"] == "2024-05-06T07:08:08.000000Z"  # the bar's time, not publication
    assert data["symbol"] == "BTC/USD"
    assert data["seq"] == 7
    assert data["price"] == BAR.close == data["close"]
    assert data["volatility"] == BAR.volatility
    assert data["returns"] == BAR.returns
    assert (data["open"], data["high"], data["low"]) == (BAR.open, BAR.high, BAR.low)
    assert data["volume"] == BAR.volume
    for key in documented - {"timestamp"}:
        assert isinstance(data[key], float), key


def test_update_message_encodes_as_documented_json() -> None:
    raw = encode(update_message(BAR, 1, NOW))
    assert isinstance(raw, bytes)
    decoded = orjson.loads(raw)
    assert decoded == update_message(BAR, 1, NOW)
    assert raw.startswith(b'{"type":"volatility_update","data":{')
    parse_iso(decoded["timestamp"])
    parse_iso(decoded["data"]["timestamp"])


def test_connected_message_encodes() -> None:
    decoded = orjson.loads(encode(connected_message(NOW, token="t", symbols=[])))
    assert decoded["type"] == "connected" and decoded["symbols"] == []


def test_error_message() -> None:
    assert error_message("c", "m") == {"type": "error", "code": "c", "message": "m"}


# --- parse_request -------------------------------------------------------------------------------


def reply_to(text: str, now: datetime) -> dict:
    """What the server answers a request that needs no state: pong, or the error."""
    try:
        request = parse_request(text, history_size=1000)
    except RequestError as exc:
        return exc.reply
    if isinstance(request, Ping):
        return pong_message(now)
    return {"type": type(request).__name__.lower()}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type": "subscribe", "symbols": ["A", "B", "A"]}', Subscribe(("A", "B"))),
        ('{"type": "subscribe", "symbols": ["*"]}', Subscribe(("*",))),
        ('{"type": "unsubscribe", "symbols": ["B"]}', Unsubscribe(("B",))),
        ('{"type": "history", "symbol": "A", "limit": 5}', HistoryRequest("A", 5)),
        ('{"type": "history", "symbol": "A"}', HistoryRequest("A", 100)),
        ('{"type": "history", "symbol": "A", "limit": 1000}', HistoryRequest("A", 1000)),
        ('{"type": "resume", "from": {"A": 41, "B": 0}}', Resume((("A", 41), ("B", 0)))),
    ],
)
def test_requests_parse(text: str, expected: object) -> None:
    assert parse_request(text, history_size=1000) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "subscribe"}',
        '{"type": "subscribe", "symbols": []}',
        '{"type": "subscribe", "symbols": "A"}',
        '{"type": "subscribe", "symbols": ["A", 1]}',
        '{"type": "subscribe", "symbols": [""]}',
        '{"type": "unsubscribe", "symbols": null}',
        '{"type": "history"}',
        '{"type": "history", "symbol": 3}',
        '{"type": "history", "symbol": "A", "limit": 0}',
        '{"type": "history", "symbol": "A", "limit": 1001}',
        '{"type": "history", "symbol": "A", "limit": 2.5}',
        '{"type": "history", "symbol": "A", "limit": true}',
        '{"type": "resume"}',
        '{"type": "resume", "from": {}}',
        '{"type": "resume", "from": ["A", 1]}',
        '{"type": "resume", "from": {"A": -1}}',
        '{"type": "resume", "from": {"A": "41"}}',
        '{"type": "resume", "from": {"A": false}}',
    ],
)
def test_malformed_requests_are_invalid_message(text: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(text, history_size=1000)
    assert info.value.reply["type"] == "error"
    assert info.value.reply["code"] == ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/", ConnectOptions(None, ())),
        ("/?access_token=x", ConnectOptions(None, ())),
        ("/?symbols=", ConnectOptions((), ())),
        ("/?symbols=BTC%2FUSD,ETH/USD,BTC/USD", ConnectOptions(("BTC/USD", "ETH/USD"), ())),
        (
            "/?resume=BTC/USD:41,ETH%2FUSD:17",
            ConnectOptions(None, (("BTC/USD", 41), ("ETH/USD", 17))),
        ),
        ("/?symbols=&resume=A:1:2", ConnectOptions((), (("A:1", 2),))),
    ],
)
def test_connect_target(target: str, expected: ConnectOptions) -> None:
    assert parse_connect_target(target) == expected


@pytest.mark.parametrize("target", ["/?resume=A", "/?resume=A:", "/?resume=:3", "/?resume=A:-1"])
def test_bad_resume_parameter(target: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_connect_target(target)
    assert info.value.reply["code"] == ErrorCode.INVALID_MESSAGE


def test_ping_gets_pong() -> None:
    assert reply_to('{"type": "ping"}', NOW) == {
        "type": "pong",
        "timestamp": "2024-05-06T07:08:09.123456Z",
    }
    # extra fields are tolerated
    assert reply_to('{"type":"ping","id":42,"x":[1,2]}', NOW)["type"] == "pong"


@pytest.mark.parametrize("text", ["", "{", "ping", "{'type': 'ping'}", '{"type": "ping"', "NaN"])
def test_invalid_json(text: str) -> None:
    reply = reply_to(text, NOW)
    assert reply["type"] == "error"
    assert reply["code"] == ErrorCode.INVALID_JSON == "invalid_json"
    assert reply["message"]


@pytest.mark.parametrize(
    "text",
    ["[]", '["ping"]', "null", "1", '"ping"', "true", "{}", '{"Type":"ping"}'],
)
def test_not_an_object_with_type(text: str) -> None:
    reply = reply_to(text, NOW)
    assert reply["type"] == "error"
    assert reply["code"] == ErrorCode.INVALID_MESSAGE == "invalid_message"
    assert '"type"' in reply["message"]


@pytest.mark.parametrize("value", ["null", "1", "true", '["ping"]', '{"t":"ping"}'])
def test_type_not_a_string(value: str) -> None:
    reply = reply_to(f'{{"type": {value}}}', NOW)
    assert reply["code"] == ErrorCode.INVALID_MESSAGE


def test_unknown_type() -> None:
    reply = reply_to('{"type": "subscribe-all-the-things"}', NOW)
    assert reply["type"] == "error"
    assert reply["code"] == ErrorCode.UNKNOWN_TYPE == "unknown_type"
    assert "subscribe-all-the-things" in reply["message"]


@pytest.mark.parametrize("kind", ["PING", "ping ", "", "pong"])
def test_near_misses_are_unknown_types(kind: str) -> None:
    assert reply_to(orjson.dumps({"type": kind}).decode(), NOW)["code"] == ErrorCode.UNKNOWN_TYPE


def test_long_unknown_type_is_truncated() -> None:
    kind = "x" * 100_000
    reply = reply_to(orjson.dumps({"type": kind}).decode(), NOW)
    assert reply["code"] == ErrorCode.UNKNOWN_TYPE
    assert len(reply["message"]) < 200
    assert "x" * 64 in reply["message"] and "x" * 65 not in reply["message"]
    assert "…" in reply["message"]


def test_type_of_exactly_64_chars_is_not_truncated() -> None:
    reply = reply_to(orjson.dumps({"type": "y" * 64}).decode(), NOW)
    assert "y" * 64 in reply["message"] and "…" not in reply["message"]


NASTY = [
    "9" * 5000,
    "-" + "9" * 400,
    '{"type": 1e999999}',
    '{"type": "ping", "n": ' + "9" * 400 + "}",
    '{"type": NaN}',
    '{"type": Infinity}',
    "-Infinity",
    "[" * 100_000,
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 5000 + "1" + "}" * 5000,
    "\x00",
    '{"type": "ping"}\x00',
    '{"type": "ping"} {"type": "ping"}',
    "\ud800",
    '{"type": "\\ud800"}',
    '{"type": "\x00\x1b[31m"}',
    '{"type": "ping", "type": "pong"}',
    "\ufeff" + '{"type": "ping"}',
    " " * 100_000,
    '"' + "\\" * 10_001,
    "{" + '"k":1,' * 50_000 + '"type":"x"}',
]


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_never_raises_and_reply_is_encodable(text: str) -> None:
    reply = reply_to(text, NOW)
    assert reply["type"] in {"pong", "error"}
    if reply["type"] == "error":
        assert reply["code"] in {
            ErrorCode.INVALID_JSON,
            ErrorCode.INVALID_MESSAGE,
            ErrorCode.UNKNOWN_TYPE,
        }
        assert isinstance(reply["message"], str)
    assert orjson.loads(encode(reply)) == reply


def test_control_characters_in_type_are_escaped_in_the_reply() -> None:
    reply = reply_to('{"type": "a\\u0000b\\u001b[31m"}', NOW)
    assert "\x00" not in reply["message"] and "\x1b" not in reply["message"]


# --- history pages and request costs ----------------------------------------------------------


def test_history_before_seq_is_an_optional_cursor() -> None:
    parsed = parse_request('{"type":"history","symbol":"BTC/USD","limit":5}', history_size=10)
    assert parsed == protocol.HistoryRequest("BTC/USD", 5, None)
    text = '{"type":"history","symbol":"BTC/USD","limit":5,"before_seq":42}'
    assert parse_request(text, history_size=10) == protocol.HistoryRequest("BTC/USD", 5, 42)
    for bad in ('"42"', "-1", "true", "1.5", "null"):
        text = f'{{"type":"history","symbol":"BTC/USD","before_seq":{bad}}}'
        if bad == "null":
            assert parse_request(text, history_size=10).before_seq is None
            continue
        with pytest.raises(protocol.RequestError) as caught:
            parse_request(text, history_size=10)
        assert caught.value.reply["code"] == "invalid_message"


def test_history_message_keeps_the_old_shape_and_adds_more_and_the_cursor() -> None:
    old = protocol.history_message("BTC/USD", [{"seq": 1}])
    assert old == {"type": "history", "symbol": "BTC/USD", "updates": [{"seq": 1}], "more": False}
    paged = protocol.history_message("BTC/USD", [{"seq": 9}], more=True, before_seq=9)
    assert paged["more"] is True and paged["before_seq"] == 9


def test_history_page_size_fits_the_reply_budget() -> None:
    budget = protocol.MAX_HISTORY_REPLY_BYTES
    sizes = [1000] * 1000
    count = protocol.history_page_size(sizes)
    assert count * 1001 + protocol.HISTORY_ENVELOPE_BYTES <= budget
    assert (count + 1) * 1001 + protocol.HISTORY_ENVELOPE_BYTES > budget
    assert protocol.history_page_size([10] * 5) == 5  # all fit
    assert protocol.history_page_size([]) == 0
    assert protocol.history_page_size([budget * 2]) == 1  # one oversized update still goes
    assert protocol.history_page_size([5, budget * 2]) == 1  # the newest first


def test_request_cost_grows_with_the_updates_a_reply_carries() -> None:
    unit = protocol.UPDATES_PER_COST_UNIT
    assert protocol.request_cost(protocol.Ping()) == 1
    assert protocol.request_cost(protocol.Subscribe(("*",)), 10_000) == 1
    history = protocol.HistoryRequest("BTC/USD", 1000)
    assert protocol.request_cost(history, 0) == 1
    assert protocol.request_cost(history, unit - 1) == 1
    assert protocol.request_cost(history, 1000) == 1 + 1000 // unit
    resume = protocol.Resume((("BTC/USD", 1),))
    assert protocol.request_cost(resume, 5) == 1  # a reconnect that missed a few: cheap
    assert protocol.request_cost(resume, 1_000_000) == 1 + 1_000_000 // unit


def test_no_symbols_error_names_the_token_and_at_most_five_published_symbols() -> None:
    few = protocol.no_symbols_error("doge", ["BTC/USD", "ETH/USD"])
    assert few["type"] == "error" and few["code"] == "no_symbols"
    assert "'doge'" in few["message"] and "(BTC/USD, ETH/USD)" in few["message"]
    assert "symbol" not in few  # about the connection, not one symbol
    many = protocol.no_symbols_error("x", [f"S{i}/USD" for i in range(8)])
    assert "S4/USD and 3 more" in many["message"] and "S5/USD" not in many["message"]
