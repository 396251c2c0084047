"""End to end: the real daemon with `source = "file"` and `source = "replay"`, a real WebSocket
client, and the data files written by the test while the daemon runs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from daemon_process import DaemonProcess, new_token, token_block
from helpers import bearer

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def config(source_table: str, symbols: list[str], token: str) -> str:
    listed = ", ".join(json.dumps(s) for s in symbols)
    return (
        '[server]\nhost = "127.0.0.1"\nport = 0\nshutdown_timeout = 3.0\n\n'
        f"[generator]\nsymbols = [{listed}]\nvolatility_window = 3\n{source_table}\n"
        '[health]\nhost = "127.0.0.1"\nport = 0\n\n'
        "[auth]\nenabled = true\n" + token_block("reader", token)
    )


# daemon_factory: conftest.py


def bar(symbol: str, minute: int, close: float) -> dict[str, Any]:
    """A record as an external producer writes it: full OHLCV, ISO timestamp."""
    open_ = close * (1 - 0.0007 * math.sin(minute))
    return {
        "timestamp": (START + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"),
        "symbol": symbol,
        "open": open_,
        "high": max(open_, close) * 1.0004,
        "low": min(open_, close) * 0.9993,
        "close": close,
        "volume": 0.5 + minute,
    }


async def updates(ws: Any, count: int, within: float = 20.0) -> list[dict[str, Any]]:
    """The `data` of the next `count` volatility_update messages."""
    out = []
    with trio.fail_after(within):
        while len(out) < count:
            message = json.loads(await ws.get_message())
            if message["type"] == "volatility_update":
                out.append(message["data"])
    return out


def same_bar(data: dict[str, Any], record: dict[str, Any]) -> None:
    assert data["symbol"] == record["symbol"]
    stamp = datetime.fromisoformat(data["timestamp"].replace("Z", "+00:00"))
    assert stamp == datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    assert data["price"] == data["close"] == record["close"]
    for key in ("open", "high", "low", "volume"):
        assert data[key] == record[key], key


async def append(path: Path, lines: list[bytes]) -> None:
    def write() -> None:
        with path.open("ab") as f:
            f.write(b"".join(lines))

    await trio.to_thread.run_sync(write)


def line(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode() + b"\n"


async def test_file_source_publishes_appended_records_and_never_garbage(
    daemon_factory: Callable[[str], DaemonProcess], tmp_path: Path
) -> None:
    feed = tmp_path / "feed.jsonl"
    feed.write_bytes(b"")
    token = new_token()
    table = f'source = "file"\n\n[generator.file]\npath = "{feed}"\npoll_interval = 0.05\n'
    daemon = daemon_factory(config(table, ["BTC/USD", "ETH/USD"], token))
    ws_port, _ = await daemon.ports()
    await daemon.wait_for("source_started")
    url = f"ws://127.0.0.1:{ws_port}/"
    headers = bearer(token)
    async with open_websocket_url(url, extra_headers=headers) as ws:
        assert json.loads(await ws.get_message())["type"] == "connected"
        closes = {"BTC/USD": 60000.0, "ETH/USD": 3000.0}
        first = []
        for minute in range(6):
            for symbol in ("BTC/USD", "ETH/USD"):
                closes[symbol] *= 1 + 0.001 * math.cos(minute + len(symbol))
                first.append(bar(symbol, minute, closes[symbol]))
        # Two appends, the garbage line in the middle of the second.
        await append(feed, [line(r) for r in first[:5]])
        received = await updates(ws, 5)
        await append(
            feed,
            [line(r) for r in first[5:8]] + [b'{"timestamp": "2025-03-01T12:09:00Z", "close": \n']
            + [line(r) for r in first[8:]],
        )  # fmt: skip
        received += await updates(ws, len(first) - 5)
        for data, record in zip(received, first, strict=True):
            same_bar(data, record)
        rejected = await daemon.wait_for("source_record_rejected", reason="bad_json")
        assert rejected["line"] == 9
        # Per symbol: seq + 1 each time, and the returns of these very closes.
        for symbol in ("BTC/USD", "ETH/USD"):
            mine = [d for d in received if d["symbol"] == symbol]
            assert [d["seq"] for d in mine] == list(range(mine[0]["seq"], mine[0]["seq"] + 6))
            assert mine[0]["returns"] is None
            for previous, data in pairwise(mine):
                expected = math.log(data["close"] / previous["close"])
                assert data["returns"] == pytest.approx(expected, rel=1e-12)
            assert mine[-1]["estimators"]["window"] == 3
        # Nothing else was published for the garbage: the next update is the next record's.
        sentinel = bar("ETH/USD", 30, closes["ETH/USD"] * 1.01)
        await append(feed, [line(sentinel)])
        (data,) = await updates(ws, 1)
        same_bar(data, sentinel)
    assert not [e for e in daemon.events if e.get("event") == "service_restarting"]


async def test_replay_source_sends_the_csv_bars_in_order(
    daemon_factory: Callable[[str], DaemonProcess], tmp_path: Path
) -> None:
    records = []
    close = 100.0
    for minute in range(8):
        close *= 1 + 0.002 * math.sin(3 * minute + 1)
        records.append(bar("SOL/USD", minute, close))
    csv_path = tmp_path / "bars.csv"
    rows = ["timestamp,open,high,low,close,volume"] + [
        ",".join(
            [r["timestamp"]] + [repr(r[k]) for k in ("open", "high", "low", "close", "volume")]
        )
        for r in records
    ]
    csv_path.write_text("\n".join(rows) + "\n")
    token = new_token()
    # 3000 × real time: one 60 s bar every 20 ms; looping, so a client that connects late still
    # sees whole passes (each shifted by span + one bar = 8 minutes).
    table = f'source = "replay"\n\n[generator.replay]\npath = "{csv_path}"\nspeed = 3000\n'
    daemon = daemon_factory(config(table, ["SOL/USD"], token))
    ws_port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{ws_port}/?access_token={token}"
    async with open_websocket_url(url) as ws:
        assert json.loads(await ws.get_message())["type"] == "connected"
        received = await updates(ws, 20)
    by_close = {r["close"]: i for i, r in enumerate(records)}
    index = by_close[received[0]["close"]]
    first_stamp = datetime.fromisoformat(received[0]["timestamp"].replace("Z", "+00:00"))
    shift = first_stamp - datetime.fromisoformat(records[index]["timestamp"].replace("Z", "+00:00"))
    assert shift % timedelta(minutes=8) == timedelta(0)
    for k, data in enumerate(received):
        i = (index + k) % len(records)
        passes = (index + k) // len(records)
        record = dict(records[i])
        moved = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
        moved += shift + passes * timedelta(minutes=8)
        record["timestamp"] = moved.isoformat()
        same_bar(data, record)
    seqs = [d["seq"] for d in received]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    await daemon.wait_for("replay_looped")


async def test_a_five_minute_replay_is_annualised_with_five_minute_bars_and_warned_once(
    daemon_factory: Callable[[str], DaemonProcess], tmp_path: Path
) -> None:
    # The config says one-minute bars; the CSV's bars are five minutes apart.
    records = []
    close = 250.0
    for k in range(12):
        close *= 1 + 0.003 * math.sin(2 * k + 1)
        record = bar("SPY", 5 * k, close)
        records.append(record)
    csv_path = tmp_path / "five.csv"
    rows = ["timestamp,open,high,low,close,volume"] + [
        ",".join(
            [r["timestamp"]] + [repr(r[k]) for k in ("open", "high", "low", "close", "volume")]
        )
        for r in records
    ]
    csv_path.write_text("\n".join(rows) + "\n")
    token = new_token()
    # 15000 × real time: one 300 s bar every 20 ms, looping.
    table = (
        'bar_seconds = 60.0\nsource = "replay"\n\n'
        f'[generator.replay]\npath = "{csv_path}"\nspeed = 15000\n'
    )
    daemon = daemon_factory(config(table, ["SPY"], token))
    ws_port, _ = await daemon.ports()
    warning = await daemon.wait_for("source_spacing_mismatch")
    assert (warning["symbol"], warning["inferred_seconds"], warning["bar_seconds"]) == (
        "SPY",
        300.0,
        60.0,
    )
    url = f"ws://127.0.0.1:{ws_port}/?access_token={token}"
    async with open_websocket_url(url) as ws:
        assert json.loads(await ws.get_message())["type"] == "connected"
        received = await updates(ws, 6)
    factor = math.sqrt(365 * 86400 / 300)  # periods per year of 5-minute bars
    for data in received:
        assert data["bar_seconds"] == 300.0
        per_bar = data["estimators"]["close_to_close"]
        annual = data["estimators_annualized"]["close_to_close"]
        assert annual == pytest.approx(per_bar * factor, rel=1e-14)
        assert data["estimators_quality"] == {"range": "ok"}
    # One warning for the symbol, however many bars and passes followed.
    await daemon.wait_for("replay_looped")
    assert len([e for e in daemon.events if e.get("event") == "source_spacing_mismatch"]) == 1
