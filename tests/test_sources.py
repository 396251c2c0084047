"""Tests of the external data sources: record parsing, the file follower, CSV replay.

The pure parsing is checked value by value against expectations written out by hand. The file
follower runs on the real clock with a short poll interval against a real writer process
(`tests/writers/file_writer.py`) that the test drives one acknowledged command at a time, so
every intermediate state of the file (partial line, half-written array, truncation) is known to
be on disk when the test looks. Replay pacing runs on Trio's virtual clock (`autojump_clock`).
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from agentspoonsd.market.records import (
    JsonLinesDecoder,
    Record,
    RecordError,
    parse_csv_row,
    parse_json_array,
    parse_record,
    parse_replay_csv,
    parse_timestamp,
    replay_schedule,
    select_unpublished,
)
from agentspoonsd.market.sources import follow_file, replay_csv

WRITER = Path(__file__).parent / "writers" / "file_writer.py"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
EPOCH_T0 = 1704067200  # T0 in seconds since 1970-01-01T00:00:00Z


def bar(i: int, symbol: str = "BTC/USD") -> tuple[dict[str, Any], Record]:
    """Bar ``i`` (at T0 + i minutes) as the prototype writes it, and the record it must give."""
    timestamp = T0 + timedelta(minutes=i)
    close = 100.0 + i
    open_ = close - 0.5
    raw = {
        "timestamp": timestamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "symbol": symbol,
        "price": close,
        "volatility": 0.00113,
        "returns": 0.0000405,
        "open": open_,
        "high": close + 1.0,
        "low": open_ - 1.0,
        "volume": 2.0 + i,
    }
    return raw, Record(symbol, timestamp, open_, close + 1.0, open_ - 1.0, close, 2.0 + i)


def jsonl(*indices: int) -> str:
    return "".join(json.dumps(bar(i)[0]) + "\n" for i in indices)


def array(*elements: int | dict[str, Any]) -> str:
    return json.dumps([bar(e)[0] if isinstance(e, int) else e for e in elements])


def expected(*indices: int) -> list[Record]:
    return [bar(i)[1] for i in indices]


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(RecordError) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert str(info.value)  # always explained
    return info.value.reason


# --- parse_timestamp -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "offset"),
    [
        ("2024-01-01T00:00:00Z", timedelta(0)),
        ("2024-01-01T00:00:00.250000Z", timedelta(milliseconds=250)),
        ("2024-01-01T02:30:00+02:00", timedelta(minutes=30)),
        ("2023-12-31T19:00:00-05:00", timedelta(0)),
        ("2024-01-01T00:00:00", timedelta(0)),  # naive: UTC
        ("  2024-01-01 00:01:00  ", timedelta(minutes=1)),
        (EPOCH_T0, timedelta(0)),
        (EPOCH_T0 + 90, timedelta(seconds=90)),
        (EPOCH_T0 + 0.5, timedelta(milliseconds=500)),
    ],
)
def test_timestamps_are_iso_8601_or_epoch_seconds(value: object, offset: timedelta) -> None:
    parsed = parse_timestamp(value)
    assert parsed == T0 + offset
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "value",
    ["yesterday", "", "2024-13-01T00:00:00", True, False, [], {}, math.nan, math.inf, 1e20],
)
def test_bad_timestamps_are_refused(value: object) -> None:
    assert reason_of(lambda: parse_timestamp(value)) == "bad_timestamp"


# --- parse_record ----------------------------------------------------------------------------


def test_the_prototype_update_data_is_a_record() -> None:
    # The `data` object of the README's volatility_update, verbatim.
    data = {
        "timestamp": "2026-11-25T18:21:17.252614Z",
        "symbol": "BTC/USD",
        "seq": 13,
        "volatility": 0.00113,
        "price": 50189.72,
        "returns": 0.0000405,
        "open": 50187.69,
        "high": 50208.39,
        "low": 50125.51,
        "close": 50189.72,
        "volume": 1.07,
    }
    record = parse_record(data, default_symbol="ETH/USD", previous_close=None)
    assert record == Record(
        "BTC/USD",
        datetime(2026, 11, 25, 18, 21, 17, 252614, tzinfo=UTC),
        50187.69,
        50208.39,
        50125.51,
        50189.72,
        1.07,
    )
    assert not hasattr(record, "volatility")  # not trusted, not kept


def test_a_prototype_results_record_without_symbol_or_close_uses_price() -> None:
    data = {
        "timestamp": "2024-01-01T00:00:00Z",
        "price": 101.0,
        "volatility": 0.5,
        "returns": -0.01,
        "open": 100.0,
        "high": 102.0,
        "low": 99.0,
        "volume": 3,
    }
    record = parse_record(data, default_symbol="NEO/USDT", previous_close=None)
    assert record == Record("NEO/USDT", T0, 100.0, 102.0, 99.0, 101.0, 3.0)
    for name in ("open", "high", "low", "close", "volume"):
        assert type(getattr(record, name)) is float


def test_close_wins_over_price() -> None:
    record = parse_record(
        {"timestamp": EPOCH_T0, "close": 10.0, "price": 99.0},
        default_symbol="X",
        previous_close=None,
    )
    assert record.close == 10.0


def test_a_bare_close_is_a_flat_bar_with_zero_volume() -> None:
    record = parse_record(
        {"timestamp": EPOCH_T0, "price": 42.0}, default_symbol="X", previous_close=None
    )
    assert record == Record("X", T0, 42.0, 42.0, 42.0, 42.0, 0.0, has_range=False)


def test_a_missing_open_is_the_previous_close() -> None:
    record = parse_record(
        {"timestamp": EPOCH_T0, "close": 105.0}, default_symbol="X", previous_close=100.0
    )
    assert (record.open, record.high, record.low, record.close) == (100.0, 105.0, 100.0, 105.0)
    down = parse_record(
        {"timestamp": EPOCH_T0, "close": 95.0}, default_symbol="X", previous_close=100.0
    )
    assert (down.open, down.high, down.low, down.close) == (100.0, 100.0, 95.0, 95.0)


@pytest.mark.parametrize(
    ("fields", "has_range"),
    [
        ({"high": 112.0, "low": 109.0}, True),
        ({"high": 112.0, "low": 109.0, "open": 110.0}, True),
        ({}, False),
        ({"open": 110.0}, False),
        ({"high": 112.0}, False),  # half a range is made up too
        ({"low": 109.0, "open": 110.0}, False),
        ({"high": None, "low": 109.0}, False),
    ],
)
def test_a_record_remembers_whether_its_range_was_given(
    fields: dict[str, Any], has_range: bool
) -> None:
    obj = {"timestamp": EPOCH_T0, "close": 111.0, **fields}
    record = parse_record(obj, default_symbol="X", previous_close=100.0)
    assert record.has_range is has_range
    # A replay CSV always states high and low; a record built directly has a range by default.
    assert Record("X", T0, 1.0, 1.0, 1.0, 1.0, 0.0).has_range


def test_a_missing_open_gaps_into_the_stated_range() -> None:
    # The previous close (100) is outside this bar's own [low, high]: the bar gapped up.
    obj = {"timestamp": EPOCH_T0, "close": 111.0, "high": 112.0, "low": 109.0}
    record = parse_record(obj, default_symbol="X", previous_close=100.0)
    assert (record.open, record.high, record.low) == (109.0, 112.0, 109.0)
    gap_down = {"timestamp": EPOCH_T0, "close": 90.0, "high": 91.0}
    record = parse_record(gap_down, default_symbol="X", previous_close=100.0)
    assert (record.open, record.high, record.low) == (91.0, 91.0, 90.0)


def test_null_counts_as_missing_and_extras_are_ignored() -> None:
    obj = {
        "timestamp": "2024-01-01T00:00:00Z",
        "symbol": None,
        "close": None,
        "price": 50.0,
        "open": None,
        "high": None,
        "low": None,
        "volume": None,
        "volatility": "garbage",
        "whatever": [1, 2],
    }
    assert parse_record(obj, default_symbol="X", previous_close=None) == Record(
        "X", T0, 50.0, 50.0, 50.0, 50.0, 0.0, has_range=False
    )


def test_symbols_are_stripped() -> None:
    record = parse_record(
        {"timestamp": EPOCH_T0, "close": 1.0, "symbol": " ETH/USD "},
        default_symbol="X",
        previous_close=None,
    )
    assert record.symbol == "ETH/USD"


GOOD = {
    "timestamp": "2024-01-01T00:00:00Z",
    "open": 100.0,
    "high": 102.0,
    "low": 99.0,
    "close": 101.0,
}


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([GOOD], "not_an_object"),
        ("a string", "not_an_object"),
        (None, "not_an_object"),
        (3.5, "not_an_object"),
        ({k: v for k, v in GOOD.items() if k != "timestamp"}, "missing_field"),
        ({"timestamp": EPOCH_T0, "open": 1.0}, "missing_field"),
        (GOOD | {"timestamp": "soon"}, "bad_timestamp"),
        (GOOD | {"timestamp": True}, "bad_timestamp"),
        (GOOD | {"close": "101.0"}, "bad_number"),
        (GOOD | {"close": True}, "bad_number"),
        (GOOD | {"volume": False}, "bad_number"),
        (GOOD | {"high": math.nan}, "bad_number"),
        (GOOD | {"low": -math.inf}, "bad_number"),
        (GOOD | {"volume": 10**400}, "bad_number"),
        (GOOD | {"open": [1]}, "bad_number"),
        (GOOD | {"symbol": 7}, "bad_symbol"),
        (GOOD | {"symbol": "   "}, "bad_symbol"),
        (GOOD | {"low": 0.0}, "non_positive_price"),
        ({"timestamp": EPOCH_T0, "price": -1.0}, "non_positive_price"),
        (GOOD | {"high": 100.5}, "ohlc_inconsistent"),  # below the close
        (GOOD | {"low": 100.5}, "ohlc_inconsistent"),  # above the open
        (GOOD | {"high": 98.0, "low": 103.0}, "ohlc_inconsistent"),
        (GOOD | {"volume": -0.1}, "negative_volume"),
    ],
)
def test_every_rule_has_its_reason(obj: object, reason: str) -> None:
    assert reason_of(lambda: parse_record(obj, default_symbol="X", previous_close=None)) == reason


def test_a_bad_default_symbol_is_refused() -> None:
    assert (
        reason_of(lambda: parse_record(GOOD, default_symbol="", previous_close=None))
        == "bad_symbol"
    )


def test_record_construction_enforces_the_guarantees() -> None:
    paris = timezone(timedelta(hours=1))
    record = Record("X", datetime(2024, 1, 1, 1, 0, tzinfo=paris), 1, 2, 1, 2, 0)
    assert record.timestamp == T0 and record.timestamp.tzinfo is UTC
    assert type(record.open) is float and type(record.volume) is float
    assert reason_of(lambda: Record("X", datetime(2024, 1, 1), 1, 1, 1, 1, 0)) == "bad_timestamp"
    assert reason_of(lambda: Record("X", T0, 1, 1, 1, 1, -1)) == "negative_volume"
    assert reason_of(lambda: Record("X", T0, 2, 1, 1, 1, 0)) == "ohlc_inconsistent"


# --- CSV rows --------------------------------------------------------------------------------


def test_csv_headers_are_case_and_whitespace_insensitive() -> None:
    row = {
        " Timestamp ": "2024-01-01T00:00:00Z",
        "OPEN": " 100 ",
        "High": "102.5",
        "low ": "99",
        "Close": "101",
        "VOLUME": "1e3",
    }
    assert parse_csv_row(row, default_symbol="X") == Record(
        "X", T0, 100.0, 102.5, 99.0, 101.0, 1000.0
    )


def test_csv_timestamps_can_be_epoch_seconds_and_symbols_a_column() -> None:
    row = {
        "timestamp": str(EPOCH_T0 + 60),
        "open": "1",
        "high": "1",
        "low": "1",
        "close": "1",
        "volume": "0",
        "Symbol": "ETH/USD",
    }
    record = parse_csv_row(row, default_symbol="X")
    assert (record.symbol, record.timestamp) == ("ETH/USD", T0 + timedelta(minutes=1))
    assert parse_csv_row(row | {"Symbol": ""}, default_symbol="X").symbol == "X"


CSV_GOOD = {
    "timestamp": "2024-01-01",
    "open": "1",
    "high": "2",
    "low": "1",
    "close": "2",
    "volume": "5",
}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({k: v for k, v in CSV_GOOD.items() if k != "volume"}, "missing_field"),
        (CSV_GOOD | {"close": ""}, "missing_field"),
        (CSV_GOOD | {"close": None}, "missing_field"),  # DictReader's value for a short row
        (CSV_GOOD | {"open": "abc"}, "bad_number"),
        (CSV_GOOD | {"open": "nan"}, "bad_number"),
        (CSV_GOOD | {"volume": "inf"}, "bad_number"),
        (CSV_GOOD | {"timestamp": "noon"}, "bad_timestamp"),
        (CSV_GOOD | {"timestamp": "nan"}, "bad_timestamp"),
        (CSV_GOOD | {"low": "-1"}, "non_positive_price"),
        (CSV_GOOD | {"high": "1.5"}, "ohlc_inconsistent"),
        (CSV_GOOD | {"volume": "-5"}, "negative_volume"),
        (CSV_GOOD | {None: ["surplus"]}, "extra_fields"),
    ],
)
def test_bad_csv_rows_have_their_reason(row: dict[str | None, object], reason: str) -> None:
    assert reason_of(lambda: parse_csv_row(row, default_symbol="X")) == reason


def test_a_replay_csv_is_parsed_with_line_numbers_for_rejections() -> None:
    data = (
        b"\xef\xbb\xbfTimestamp, Open,High,Low,Close,Volume,Symbol\r\n"  # BOM, CRLF
        b"2024-01-01T00:00:00Z,1,2,1,2,5,\r\n"  # line 2
        b"2024-01-01T00:01:00Z,2,3,2,3,5,\r\n"  # line 3
        b"\r\n"  # line 4: blank, skipped
        b"2024-01-01T00:01:00Z,2,3,2,3,5,\r\n"  # line 5: not after line 3
        b"2024-01-01T00:00:30Z,2,3,2,3,5,ETH\r\n"  # line 6: another symbol, its own order
        b"2024-01-01T00:02:00Z,x,3,2,3,5,\r\n"  # line 7
        b"2024-01-01T00:03:00Z,2,3,2,3,5,\xff\r\n"  # line 8: not UTF-8
        b"2024-01-01T00:04:00Z,2,3,2,3,5,,surplus\r\n"  # line 9
        b"2024-01-01T00:05:00Z,2,3\r\n"  # line 10: short
        b"2024-01-01T00:06:00Z,3,4,3,4,6,BTC\r\n"  # line 11
    )
    parsed = parse_replay_csv(data, default_symbol="BTC")
    assert parsed.records == [
        Record("BTC", T0, 1.0, 2.0, 1.0, 2.0, 5.0),
        Record("BTC", T0 + timedelta(minutes=1), 2.0, 3.0, 2.0, 3.0, 5.0),
        Record("ETH", T0 + timedelta(seconds=30), 2.0, 3.0, 2.0, 3.0, 5.0),
        Record("BTC", T0 + timedelta(minutes=6), 3.0, 4.0, 3.0, 4.0, 6.0),
    ]
    assert [(r.position, r.error.reason) for r in parsed.rejected] == [
        (5, "out_of_order"),
        (7, "bad_number"),
        (8, "bad_utf8"),
        (9, "extra_fields"),
        (10, "missing_field"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"timestamp,open,high,low,close\n1,1,1,1,1\n",
        b"timestamp,open,high,low,close,volume,Close\n",
    ],
)
def test_a_replay_csv_needs_its_header(data: bytes) -> None:
    assert reason_of(lambda: parse_replay_csv(data, default_symbol="X")) == "bad_header"


# --- JSON documents --------------------------------------------------------------------------


def test_json_lines_decoder_reassembles_lines_split_anywhere() -> None:
    raw = (
        jsonl(1, 2)
        + "\n"  # line 3: blank
        + "{oops\n"  # line 4
        + '{"timestamp": 1704067200, "price": 0}\n'  # line 5
        + jsonl(3)  # line 6
    ).encode() + b'"\xff"\n'  # line 7
    whole = JsonLinesDecoder(default_symbol="X").feed(raw)
    decoder = JsonLinesDecoder(default_symbol="X")
    bytewise = []
    for i in range(len(raw)):
        bytewise += decoder.feed(raw[i : i + 1])
    for results in (whole, bytewise):
        assert [(line, r) for line, r in results if isinstance(r, Record)] == list(
            zip([1, 2, 6], expected(1, 2, 3), strict=True)
        )
        assert [(line, r.reason) for line, r in results if isinstance(r, RecordError)] == [
            (4, "bad_json"),
            (5, "non_positive_price"),
            (7, "bad_utf8"),
        ]
    assert decoder.line == 8 and decoder.pending == 0


def test_json_lines_decoder_holds_a_partial_line_and_defaults_open_per_symbol() -> None:
    decoder = JsonLinesDecoder(default_symbol="X")
    first = b'\xef\xbb\xbf{"timestamp": 1704067200, "close": 10, "symbol": "A"}\n'
    assert decoder.feed(first + b'{"timestamp": 1704067200, "close": 20, "symbol": "B"}\n{"times')
    assert decoder.pending == len(b'{"times') and decoder.line == 3
    results = decoder.feed(b'tamp": 1704067260, "close": 11, "symbol": "A"}\n')
    [(line, record)] = results
    assert line == 3 and isinstance(record, Record)
    assert (record.symbol, record.open, record.close) == ("A", 10.0, 11.0)


def test_json_lines_decoder_bounds_a_line_without_end() -> None:
    decoder = JsonLinesDecoder(default_symbol="X", max_line_bytes=64)
    assert decoder.feed(b"x" * 60) == []
    [(line, error)] = decoder.feed(b"x" * 10)  # now too long: reported at once, then dropped
    assert (line, getattr(error, "reason", None)) == (1, "line_too_long")
    assert decoder.feed(b"x" * 1000) == [] and decoder.pending == 0
    good = jsonl(1).encode()
    assert len(good) < 400
    decoder = JsonLinesDecoder(default_symbol="X", max_line_bytes=400)
    results = decoder.feed(b"y" * 500 + b"\n" + good + b"z" * 401 + b"\n" + good)
    assert [(line, getattr(r, "reason", r)) for line, r in results] == [
        (1, "line_too_long"),
        (2, bar(1)[1]),
        (3, "line_too_long"),
        (4, bar(1)[1]),
    ]


def test_json_array_elements_are_parsed_and_rejected_one_by_one() -> None:
    bad = {"timestamp": "2024-01-01T00:09:00Z", "close": -1}
    chained = {"timestamp": "2024-01-01T00:10:00Z", "close": 99.0, "symbol": "BTC/USD"}
    parsed = parse_json_array(
        b"\xef\xbb\xbf" + array(1, bad, 2, chained).encode(), default_symbol="BTC/USD"
    )
    assert parsed.records[:2] == expected(1, 2)
    assert parsed.records[2].open == bar(2)[1].close  # the previous valid close of the symbol
    [rejection] = parsed.rejected
    assert (rejection.position, rejection.error.reason, rejection.raw) == (
        1,
        "non_positive_price",
        bad,
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad_json"),
        (array(1, 2, 3)[:-20].encode(), "bad_json"),  # half-written
        (b'[{"timestamp": "\xff"}]', "bad_utf8"),
        (b'{"timestamp": 1704067200, "close": 1}', "not_an_array"),
        (b"[NaN]", "bad_json"),
    ],
)
def test_a_json_array_file_that_does_not_parse(data: bytes, reason: str) -> None:
    assert reason_of(lambda: parse_json_array(data, default_symbol="X")) == reason


# --- select_unpublished and replay_schedule ---------------------------------------------------


def test_only_records_newer_than_the_last_published_pass() -> None:
    def rec(symbol: str, minute: int) -> Record:
        return Record(symbol, T0 + timedelta(minutes=minute), 1, 1, 1, 1, 0)

    watermarks = {"A": T0 + timedelta(minutes=2)}
    records = [
        rec("A", 1),
        rec("A", 2),
        rec("B", 1),
        rec("A", 3),
        rec("B", 1),
        rec("A", 3),
        rec("B", 0),
        rec("A", 5),
        rec("A", 4),
        rec("B", 2),
    ]
    assert select_unpublished(records, watermarks) == [
        rec("B", 1),
        rec("A", 3),
        rec("A", 5),
        rec("B", 2),
    ]
    assert watermarks == {"A": T0 + timedelta(minutes=2)}  # not modified
    assert select_unpublished([], {}) == []


def test_replay_schedule_offsets_and_loop_period() -> None:
    stamps = [T0 + timedelta(seconds=s) for s in (0, 60, 60, 180, 30.5)]
    offsets, period = replay_schedule(stamps)
    assert offsets == [0, 60_000_000, 60_000_000, 180_000_000, 30_500_000]
    # Distinct times 0, 30.5, 60, 180: gaps 30.5, 29.5, 120, median 30.5; span 180.
    assert period == 210_500_000
    assert replay_schedule([T0 + timedelta(seconds=10), T0]) == ([0, -10_000_000], 20_000_000)
    assert replay_schedule([T0, T0]) == ([0, 0], 0)
    with pytest.raises(ValueError):
        replay_schedule([])


# --- follow_file against a real writer process ------------------------------------------------


class Writer:
    """Drives tests/writers/file_writer.py: each call returns once the writer has acknowledged
    that the operation is complete on disk."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._buffer = b""

    async def __call__(self, op: str, **fields: object) -> None:
        await self._stdin.send_all(json.dumps({"op": op, **fields}).encode() + b"\n")
        with trio.fail_after(20):
            while b"\n" not in self._buffer:
                chunk = await self._stdout.receive_some()
                assert chunk, "the writer exited"
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        assert line == b"ok", line

    async def close(self) -> None:
        await self._stdin.aclose()


@dataclass
class Following:
    write: Writer
    got: list[Record] = field(default_factory=list)


async def wait_for(predicate: Callable[[], object], what: str, within: float = 10.0) -> None:
    with trio.move_on_after(within):
        while True:
            if predicate():
                return
            await trio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def following(path: Path, **kwargs: Any) -> AsyncIterator[Following]:
    """A writer process for ``path`` and a `follow_file` on it (poll 20 ms) whose records are
    collected in ``got``."""
    send, receive = trio.open_memory_channel[Record](math.inf)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, str(WRITER), str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )
        harness = Following(Writer(process))

        async def collect() -> None:
            async for record in receive:
                harness.got.append(record)

        nursery.start_soon(collect)
        options = {"default_symbol": "BTC/USD", "poll_interval": 0.02} | kwargs
        await nursery.start(
            partial(follow_file, path, send=send, log=structlog.get_logger(), **options)
        )
        yield harness
        await harness.write.close()
        nursery.cancel_scope.cancel()


async def test_follow_json_lines_appended_partial_garbage_truncated_replaced(
    tmp_path: Path,
) -> None:
    path = tmp_path / "feed.jsonl"
    with capture_logs() as logs:
        async with following(path) as f:
            await wait_for(lambda: events(logs, "source_file_missing"), "the missing file")
            await trio.sleep(0.15)  # several polls: still logged once
            assert len(events(logs, "source_file_missing")) == 1
            assert events(logs, "source_file_missing")[0]["path"] == str(path)

            await f.write("append", data=jsonl(1, 2, 3))  # lines 1-3
            await wait_for(lambda: len(f.got) == 3, "records 1-3")
            assert events(logs, "source_file_appeared")

            # A partial line waits for its end (line 4).
            line4 = jsonl(4)
            await f.write("append", data=line4[:40])
            await trio.sleep(0.15)
            assert len(f.got) == 3
            await f.write("append", data=line4[40:])
            await wait_for(lambda: len(f.got) == 4, "record 4")

            garbage = (
                "this is not json\n"  # line 5
                + json.dumps({"timestamp": "2024-01-01T00:05:00Z", "price": -3})
                + "\n"  # 6
                + "\n"  # 7: blank, skipped silently
                + "[1, 2]\n"  # 8
            )
            await f.write("append", data=garbage)
            await f.write("append", b64=base64.b64encode(b'{"\xff\xfe": 1}\n').decode())  # 9
            await f.write("append", data=jsonl(5))  # 10
            await wait_for(lambda: len(f.got) == 5, "record 5")
            rejected = [(e["line"], e["reason"]) for e in events(logs, "source_record_rejected")]
            assert rejected == [
                (5, "bad_json"),
                (6, "non_positive_price"),
                (8, "not_an_object"),
                (9, "bad_utf8"),
            ]

            # Truncated, then rewritten with old and new lines: only the new ones pass.
            await f.write("truncate")
            await wait_for(lambda: events(logs, "source_file_truncated"), "the truncation")
            await f.write("rewrite", data=jsonl(3, 4, 5, 6))
            await wait_for(lambda: len(f.got) == 6, "record 6")

            # Replaced by a new file (new inode): read from its start.
            await f.write("replace", data=jsonl(1, 2, 3, 4, 5, 6, 7))
            await wait_for(lambda: len(f.got) == 7, "record 7")
            assert events(logs, "source_file_replaced")
            await f.write("append", data=jsonl(8))
            await wait_for(lambda: len(f.got) == 8, "record 8")
            await trio.sleep(0.1)  # and nothing else comes
    assert f.got == expected(1, 2, 3, 4, 5, 6, 7, 8)
    assert len(events(logs, "source_record_rejected")) == 4
    assert not events(logs, "source_read_failed")


async def test_follow_json_lines_written_in_random_pieces(tmp_path: Path) -> None:
    path = tmp_path / "feed.ndjson"
    path.touch()
    lines = "".join(jsonl(i) + jsonl(i).replace("BTC/USD", "ETH/USD") for i in range(150))
    want = [record for i in range(150) for record in (bar(i)[1], bar(i, "ETH/USD")[1])]
    with capture_logs() as logs:
        async with following(path, poll_interval=0.002) as f:
            await f.write("trickle", data=lines, seed=3, max_piece=300, max_pause=0.002)
            await wait_for(lambda: len(f.got) >= 300, "300 records")
            await trio.sleep(0.05)
    assert f.got == want
    assert not events(logs, "source_record_rejected")


async def test_follow_a_json_array_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    bad = bar(5)[0] | {"high": 50.0}  # below its own low
    with capture_logs() as logs:
        async with following(path) as f:
            await f.write("rewrite", data=array(1, 2))
            await wait_for(lambda: len(f.got) == 2, "records 1-2")

            # Half-written (not atomic): logged once, nothing published; then completed.
            text = array(1, 2, 3, 4)
            cut = len(text) // 2
            await f.write("rewrite", data=text[:cut])
            await wait_for(
                lambda: [e for e in events(logs, "source_parse_failed") if e["size"] == cut],
                "the parse failure",
            )
            failures = len(events(logs, "source_parse_failed"))
            await trio.sleep(0.15)  # several polls of the same broken version
            assert len(events(logs, "source_parse_failed")) == failures
            assert len(f.got) == 2
            await f.write("append", data=text[cut:])
            await wait_for(lambda: len(f.got) == 4, "records 3-4")

            # A sliding window (old records dropped) holding one invalid element.
            await f.write("rewrite", data=array(3, 4, bad, 6))
            await wait_for(lambda: len(f.got) == 5, "record 6")
            await f.write("rewrite", data=array(4, bad, 6, 7))
            await wait_for(lambda: len(f.got) == 6, "record 7")
            await f.write("replace", data=array(bad, 6, 7, 8))  # atomic, new inode
            await wait_for(lambda: len(f.got) == 7, "record 8")

            await f.write("rewrite", data='{"not": "an array"}')
            await wait_for(
                lambda: [
                    e for e in events(logs, "source_parse_failed") if e["reason"] == "not_an_array"
                ],
                "not_an_array",
            )
    assert f.got == expected(1, 2, 3, 4, 6, 7, 8)
    # The bad element is reported once, though it stayed in three versions of the file.
    rejected = events(logs, "source_record_rejected")
    assert [(e["index"], e["reason"]) for e in rejected] == [(2, "ohlc_inconsistent")]
    # Other failures can only be the empty instants of the in-place rewrites.
    reasons = [e["reason"] for e in events(logs, "source_parse_failed")]
    assert set(reasons) == {"bad_json", "not_an_array"}


async def test_follow_a_json_array_growing_under_racing_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    records = [bar(i)[0] for i in range(60)]
    async with following(path, poll_interval=0.002) as f:
        await f.write("grow_array", records=records, seed=5, max_pause=0.004)
        await wait_for(lambda: len(f.got) >= 60, "60 records")
        await trio.sleep(0.05)
    assert f.got == expected(*range(60))


async def test_read_errors_are_logged_once_and_retried(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.mkdir()  # stat works, reading fails
    send, receive = trio.open_memory_channel[Record](math.inf)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    follow_file,
                    path,
                    send=send,
                    log=structlog.get_logger(),
                    default_symbol="X",
                    poll_interval=0.01,
                )
            )
            await trio.sleep(0.2)
            failures = events(logs, "source_read_failed")
            assert len(failures) == 1 and "IsADirectoryError" in failures[0]["error"]
            path.rmdir()
            path.write_text(array(1))
            assert (await receive.receive()) == bar(1)[1]
            nursery.cancel_scope.cancel()


async def test_bad_arguments_are_refused_before_starting(tmp_path: Path) -> None:
    send, _receive = trio.open_memory_channel[Record](1)
    call = partial(follow_file, send=send, log=structlog.get_logger(), default_symbol="X")
    with pytest.raises(ValueError, match="suffix"):
        await call(tmp_path / "feed.log")
    with pytest.raises(ValueError, match="poll_interval"):
        await call(tmp_path / "feed.json", poll_interval=0.0)
    with pytest.raises(ValueError, match="default_symbol"):
        await call(tmp_path / "feed.json", default_symbol=" ")


async def test_explicit_format_and_a_restart_that_resumes_without_duplicates(
    tmp_path: Path,
) -> None:
    path = tmp_path / "feed.log"
    path.write_text(jsonl(1, 2, 3, 4, 5))
    published: dict[str, datetime] = {}
    send, receive = trio.open_memory_channel[Record](0)
    run = partial(
        follow_file,
        path,
        send=send,
        log=structlog.get_logger(),
        default_symbol="X",
        file_format="jsonl",
        poll_interval=0.01,
        published=published,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        got = [await receive.receive(), await receive.receive()]
        await trio.sleep(0.05)  # now blocked sending record 3
        before = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - before < 0.5
    assert published == {"BTC/USD": bar(2)[1].timestamp}  # record 3 was never delivered
    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        got += [await receive.receive() for _ in range(3)]
        await trio.sleep(0.05)
        with pytest.raises(trio.WouldBlock):
            receive.receive_nowait()
        nursery.cancel_scope.cancel()
    assert got == expected(1, 2, 3, 4, 5)


async def test_follow_file_is_cancelled_promptly_while_waiting(tmp_path: Path) -> None:
    send, _receive = trio.open_memory_channel[Record](math.inf)
    start = trio.current_time()
    with trio.move_on_after(0.1) as scope:
        await follow_file(
            tmp_path / "absent.json",
            send=send,
            log=structlog.get_logger(),
            default_symbol="X",
            poll_interval=30.0,
        )
    assert scope.cancelled_caught
    assert trio.current_time() - start < 0.5


# --- replay_csv on Trio's virtual clock --------------------------------------------------------


def write_csv(path: Path, *rows: str, header: str = "timestamp,open,high,low,close,volume") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def minute_rows(*minutes: float) -> list[str]:
    """One valid row per timestamp (minutes after T0); close = 100 + minute."""
    return [
        f"{(T0 + timedelta(minutes=m)).isoformat()},{100 + m},{101 + m},{99 + m},{100 + m},1"
        for m in minutes
    ]


@dataclass
class Received:
    times: list[float] = field(default_factory=list)  # seconds after the replay started
    records: list[Record] = field(default_factory=list)


async def run_replay(path: Path, stop_after: float | None = None, **kwargs: Any) -> Received:
    """Replay ``path`` into a rendezvous channel (a receive happens at its send), recording when
    each record arrives; until the replay returns, or for ``stop_after`` seconds."""
    send, receive = trio.open_memory_channel[Record](0)
    received = Received()
    options = {"default_symbol": "BTC/USD"} | kwargs

    async def replay(task_status: trio.TaskStatus[None]) -> None:
        async with send:
            await replay_csv(
                path, send=send, log=structlog.get_logger(), task_status=task_status, **options
            )

    async with trio.open_nursery() as nursery:
        # Started first, with no deadline pending: the file is read in a worker thread, during
        # which the autojump clock would otherwise leap to the next deadline.
        await nursery.start(replay)
        start = trio.current_time()
        if stop_after is not None:
            nursery.cancel_scope.deadline = start + stop_after
        async for record in receive:
            received.times.append(trio.current_time() - start)
            received.records.append(record)
    return received


@pytest.mark.parametrize(("speed", "scale"), [(1.0, 60.0), (60.0, 1.0), (2.5, 24.0)])
async def test_replay_publishes_each_bar_at_its_scaled_offset(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, speed: float, scale: float
) -> None:
    minutes = [0, 1, 2, 3, 5, 5.5, 9]
    path = write_csv(tmp_path / "bars.csv", *minute_rows(*minutes))
    with capture_logs() as logs:
        received = await run_replay(path, speed=speed)
    assert received.times == pytest.approx([m * scale for m in minutes], abs=1e-9)
    assert [r.timestamp for r in received.records] == [T0 + timedelta(minutes=m) for m in minutes]
    assert [r.close for r in received.records] == [100.0 + m for m in minutes]
    [finished] = events(logs, "replay_finished")
    assert finished["bars"] == 7


async def test_replay_catches_up_when_behind_without_dropping_bars(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "bars.csv", *minute_rows(*range(15)))
    send, receive = trio.open_memory_channel[Record](0)
    times = []
    records = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                replay_csv,
                path,
                send=send,
                log=structlog.get_logger(),
                default_symbol="X",
                speed=60.0,
            )
        )
        start = trio.current_time()
        for i in range(15):
            records.append(await receive.receive())
            times.append(trio.current_time() - start)
            if i == 0:
                await trio.sleep(10.5)  # a stalled consumer: bars 1..10 fall due meanwhile
    # Bar 1 waited in send; bars 2..10 were overdue and went out at once, in order; bar 11 is
    # back on schedule: absolute deadlines, no drift.
    assert times == pytest.approx([0.0] + [10.5] * 10 + [11.0, 12.0, 13.0, 14.0], abs=1e-9)
    assert [r.timestamp for r in records] == [T0 + timedelta(minutes=m) for m in range(15)]


async def test_replay_of_several_symbols_keeps_file_order(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    header = "Symbol,timestamp,open,high,low,close,volume"
    rows = [f"{symbol},{row}" for row in minute_rows(0, 1) for symbol in ("BTC", "ETH")]
    path = write_csv(tmp_path / "bars.csv", *rows, header=header)
    received = await run_replay(path, speed=60.0)
    assert received.times == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert [r.symbol for r in received.records] == ["BTC", "ETH", "BTC", "ETH"]


async def test_looped_replay_shifts_timestamps_by_span_plus_median_gap(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # Offsets 0, 1, 3 minutes: span 3, gaps 1 and 2, median 1.5: each pass shifts 4.5 minutes.
    path = write_csv(tmp_path / "bars.csv", *minute_rows(0, 1, 3))
    with capture_logs() as logs:
        received = await run_replay(path, stop_after=9 * 60 + 0.5, speed=1.0, loop=True)
    minutes = [0, 1, 3, 4.5, 5.5, 7.5, 9]
    assert received.times == pytest.approx([m * 60 for m in minutes], abs=1e-9)
    assert [r.timestamp for r in received.records] == [T0 + timedelta(minutes=m) for m in minutes]
    # Prices repeat: only the clock moves on.
    assert [r.close for r in received.records] == [100.0, 101.0, 103.0] * 2 + [100.0]
    assert [e["bars"] for e in events(logs, "replay_looped")] == [3, 6]
    assert not events(logs, "replay_finished")


async def test_replay_skips_and_logs_malformed_rows(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    good = minute_rows(0, 1, 2)
    path = write_csv(
        tmp_path / "bars.csv",
        good[0],
        "garbage",  # line 3
        good[1],
        good[1],  # line 5: a duplicate
        f"{T0.isoformat()},1,1,1,1,-1",  # line 6
        good[2],
    )
    with capture_logs() as logs:
        received = await run_replay(path, speed=60.0)
    assert [r.close for r in received.records] == [100.0, 101.0, 102.0]
    assert received.times == pytest.approx([0.0, 1.0, 2.0])
    rejected = [(e["line"], e["reason"]) for e in events(logs, "source_record_rejected")]
    assert rejected == [(3, "missing_field"), (5, "out_of_order"), (6, "negative_volume")]
    assert all(e["path"] == str(path) for e in events(logs, "source_record_rejected"))
    assert [e["bars"] for e in events(logs, "replay_finished")] == [3]


async def test_replay_is_cancelled_promptly(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "bars.csv", *minute_rows(*range(100)))
    send, receive = trio.open_memory_channel[Record](math.inf)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                replay_csv,
                path,
                send=send,
                log=structlog.get_logger(),
                default_symbol="X",
                speed=60.0,
            )
        )
        begin = trio.current_time()
        await trio.sleep(5.5)
        nursery.cancel_scope.cancel()
    # It was waiting for bar 6 (due at 6.0) and left at the cancel, not later.
    assert trio.current_time() == pytest.approx(begin + 5.5)
    got = []
    while True:
        try:
            got.append(receive.receive_nowait())
        except trio.WouldBlock:
            break
    assert [r.close for r in got] == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]


@pytest.mark.parametrize(
    ("content", "kwargs", "error", "match"),
    [
        (None, {}, FileNotFoundError, None),
        ("", {}, ValueError, "header"),
        ("timestamp,open,high,low,close,volume\nx,1,1,1,1,1\n", {}, ValueError, "no valid rows"),
        (
            "\n".join(["timestamp,open,high,low,close,volume", *minute_rows(0)]),
            {"loop": True},
            ValueError,
            "two distinct",
        ),
        (
            "\n".join(["timestamp,open,high,low,close,volume", *minute_rows(0)]),
            {"speed": 0.0},
            ValueError,
            "speed",
        ),
    ],
)
async def test_replay_refuses_what_it_cannot_replay(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    content: str | None,
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str | None,
) -> None:
    path = tmp_path / "bars.csv"
    if content is not None:
        path.write_text(content)
    send, _receive = trio.open_memory_channel[Record](math.inf)
    with pytest.raises(error, match=match):
        await replay_csv(path, send=send, log=structlog.get_logger(), default_symbol="X", **kwargs)
