"""File and replay sources in market time: the bar length from the data, the trading calendar,
session gaps and close-only records, through the real generator (`Generator.run`, in process).

The data files are written here with known spacings and prices; the expected numbers are
computed independently (numpy over the written closes, the annualisation factor from the
calendar's formula). The replay runs at 10^6 × real time on Trio's real clock.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import trio
from structlog.testing import capture_logs

from agentspoonsd.market.bar import Bar
from agentspoonsd.market.estimators import RANGE_ESTIMATORS
from agentspoonsd.market.generator import Generator
from agentspoonsd.protocol import update_data
from agentspoonsd.settings import GeneratorSettings

OPEN_NY = datetime(2025, 3, 3, 14, 31, tzinfo=UTC)  # Monday 09:31 in New York: the first bar
WINDOW = 5


def walk(n: int, seed: int, start: float = 100.0, vol: float = 1e-3) -> list[dict[str, float]]:
    """Contiguous OHLCV bars (each open the previous close) with wicks."""
    rng = np.random.default_rng(seed)
    bars, close = [], start
    for _ in range(n):
        open_ = close
        close = open_ * math.exp(vol * rng.standard_normal())
        high = max(open_, close) * math.exp(abs(vol * rng.standard_normal()) / 2)
        low = min(open_, close) * math.exp(-abs(vol * rng.standard_normal()) / 2)
        bars.append({"open": open_, "high": high, "low": low, "close": close, "volume": 1.0})
    return bars


def write_csv(
    path: Path, stamps: list[datetime], bars: list[dict[str, float]], symbol: str
) -> None:
    lines = ["timestamp,open,high,low,close,volume,symbol"]
    for stamp, bar in zip(stamps, bars, strict=True):
        values = [repr(bar[k]) for k in ("open", "high", "low", "close", "volume")]
        lines.append(",".join([stamp.isoformat(), *values, symbol]))
    path.write_text("\n".join(lines) + "\n")


async def published(settings: GeneratorSettings, count: int) -> tuple[list[Bar], list[dict]]:
    """The first `count` bars the generator publishes, and everything it logged meanwhile."""
    send, receive = trio.open_memory_channel[list[Bar]](count)
    generator = Generator(settings.spec(), send, structlog.get_logger())
    bars: list[Bar] = []
    with capture_logs() as logs, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(generator.run)
            while len(bars) < count:
                bars += await receive.receive()
            nursery.cancel_scope.cancel()
    return bars, logs


def replay_settings(path: Path, symbols: list[str], **fields: Any) -> GeneratorSettings:
    return GeneratorSettings(
        source="replay",
        symbols=symbols,
        volatility_window=WINDOW,
        garch_fit={"enabled": False},
        replay={"path": path, "speed": 1e6, "loop": False},
        **fields,
    )


def stdev_of_last(values: list[float], n: int) -> float:
    return float(np.std(values[-n:], ddof=1))


async def test_a_five_minute_csv_is_annualised_with_five_minute_bars(tmp_path: Path) -> None:
    csv_path = tmp_path / "five.csv"
    n = 40
    stamps = [OPEN_NY + timedelta(minutes=5 * k) for k in range(n)]
    bars = walk(n, seed=1)
    write_csv(csv_path, stamps, bars, "SPY")
    settings = replay_settings(csv_path, ["SPY"], bar_seconds=60)  # says one-minute bars
    out, logs = await published(settings, n)
    five_minute_factor = math.sqrt(365 * 86400 / 300)  # periods per year of 5-minute bars
    closes = [bar["close"] for bar in bars]
    returns = np.diff(np.log(closes)).tolist()
    for k, bar in enumerate(out):
        data = update_data(bar, k + 1)
        assert data["close"] == closes[k]
        if k < 2:  # fewer than two spacings known: the configured bar, for want of better
            assert data["bar_seconds"] == 60.0
            continue
        assert data["bar_seconds"] == 300.0
        per_bar = data["estimators"]["close_to_close"]
        assert per_bar == pytest.approx(stdev_of_last(returns[:k], min(WINDOW, k)), rel=1e-12)
        assert data["estimators_annualized"]["close_to_close"] == pytest.approx(
            per_bar * five_minute_factor, rel=1e-14
        )
        assert data["gap_seconds"] is None and data["estimators_quality"] == {"range": "ok"}
    warnings = [e for e in logs if e["event"] == "source_spacing_mismatch"]
    assert warnings == [
        {
            "event": "source_spacing_mismatch",
            "log_level": "warning",
            "symbol": "SPY",
            "inferred_seconds": 300.0,
            "bar_seconds": 60.0,
        }
    ]


async def test_an_unset_bar_seconds_is_not_contradicted_by_a_file(tmp_path: Path) -> None:
    # Unset, bar_seconds is the tick interval: a replay's own spacing is then no surprise.
    csv_path = tmp_path / "five.csv"
    n = 12
    stamps = [OPEN_NY + timedelta(minutes=5 * k) for k in range(n)]
    write_csv(csv_path, stamps, walk(n, seed=6), "SPY")
    settings = replay_settings(csv_path, ["SPY"])
    assert settings.bar_seconds == settings.interval
    out, logs = await published(settings, n)
    assert [b.analytics["bar_seconds"] for b in out][2:] == [300.0] * (n - 2)
    assert not [e for e in logs if e["event"] == "source_spacing_mismatch"]


async def test_each_symbol_has_its_own_spacing_and_a_matching_one_is_not_warned(
    tmp_path: Path,
) -> None:
    csv_path = tmp_path / "two.csv"
    rows = ["timestamp,open,high,low,close,volume,symbol"]
    minute, hourly = walk(30, seed=2), walk(30, seed=3)
    for k in range(30):
        for symbol, bars, step in (("A", minute, 60), ("B", hourly, 3600)):
            stamp = OPEN_NY + timedelta(seconds=step * k)
            values = [repr(bars[k][f]) for f in ("open", "high", "low", "close", "volume")]
            rows.append(",".join([stamp.isoformat(), *values, symbol]))
    # Rows in file order must be in time order per symbol only: A's and B's interleave.
    csv_path.write_text("\n".join(rows) + "\n")
    out, logs = await published(replay_settings(csv_path, ["A", "B"], bar_seconds=60), 60)
    by_symbol = {s: [b.analytics["bar_seconds"] for b in out if b.symbol == s] for s in "AB"}
    assert by_symbol["A"] == [60.0] * 30
    assert by_symbol["B"] == [60.0, 60.0] + [3600.0] * 28
    warnings = [e for e in logs if e["event"] == "source_spacing_mismatch"]
    assert [(w["symbol"], w["inferred_seconds"]) for w in warnings] == [("B", 3600.0)]


async def test_two_equity_sessions_mark_the_open_as_a_gap_and_keep_it_out_of_close_to_close(
    tmp_path: Path,
) -> None:
    # Two US equity sessions of one-minute bars, 09:31 .. 16:00; the second opens 3 % higher.
    per_day = 390
    stamps = [OPEN_NY + timedelta(minutes=k) for k in range(per_day)]
    stamps += [stamp + timedelta(days=1) for stamp in stamps]
    day_one, day_two = walk(per_day, seed=4), walk(per_day, seed=5)
    jump = day_one[-1]["close"] * 1.03 / day_two[0]["open"]
    day_two = [{k: (v * jump if k != "volume" else v) for k, v in bar.items()} for bar in day_two]
    bars = day_one + day_two
    csv_path = tmp_path / "sessions.csv"
    write_csv(csv_path, stamps, bars, "SPY")
    settings = replay_settings(
        csv_path, ["SPY"], bar_seconds=60, trading_days=252, session_hours=6.5
    )
    out, logs = await published(settings, 2 * per_day)
    data = [update_data(bar, k + 1) for k, bar in enumerate(out)]
    gaps = [(k, d["gap_seconds"]) for k, d in enumerate(data) if d["gap_seconds"] is not None]
    assert gaps == [(per_day, 17.5 * 3600 + 60)]  # 16:00 -> 09:31 the next day
    assert not [e for e in logs if e["event"] == "source_spacing_mismatch"]
    # The returns close_to_close reads: ln(C/C_prev), except ln(C/O) at the open after the gap.
    closes = np.array([bar["close"] for bar in bars])
    opens = np.array([bar["open"] for bar in bars])
    in_session = np.log(closes[1:] / closes[:-1])
    in_session[per_day - 1] = math.log(closes[per_day] / opens[per_day])
    factor = math.sqrt(252 * 6.5 * 60)  # one-minute bars of a 252-day, 6.5-hour year
    for k in range(per_day, per_day + WINDOW + 2):
        estimators = data[k]["estimators"]
        expected = stdev_of_last(in_session[:k].tolist(), WINDOW)
        assert estimators["close_to_close"] == pytest.approx(expected, rel=1e-12)
        assert estimators["close_to_close"] < 0.003  # the 3 % jump is not in it
        assert data[k]["estimators_annualized"]["close_to_close"] == pytest.approx(
            estimators["close_to_close"] * factor, rel=1e-14
        )
        assert data[k]["bar_seconds"] == 60.0
    # data.returns is the true close-to-close return, and Yang-Zhang's overnight term sees it.
    assert data[per_day]["returns"] == pytest.approx(
        math.log(closes[per_day] / closes[per_day - 1]), rel=1e-12
    )
    assert data[per_day]["returns"] > 0.02
    assert data[per_day]["estimators"]["yang_zhang"] > 0.01
    assert data[per_day - 1]["estimators"]["yang_zhang"] < 0.003


def jsonl_record(stamp: datetime, close: float, **fields: float) -> bytes:
    record = {"timestamp": stamp.isoformat(), "symbol": "X", "close": close, **fields}
    return json.dumps(record).encode() + b"\n"


async def test_close_only_records_give_null_range_estimators_with_the_reason(
    tmp_path: Path,
) -> None:
    # A followed JSON Lines feed: ten close-only records, then twelve with their range.
    path = tmp_path / "feed.jsonl"
    stamps = [OPEN_NY + timedelta(minutes=k) for k in range(22)]
    bars = walk(22, seed=6)
    lines = [jsonl_record(stamps[k], bars[k]["close"]) for k in range(10)]
    lines += [jsonl_record(stamps[k], **bars[k]) for k in range(10, 22)]  # type: ignore[arg-type]
    path.write_bytes(b"".join(lines))
    settings = GeneratorSettings(
        source="file",
        symbols=["X"],
        volatility_window=WINDOW,
        garch_fit={"enabled": False},
        file={"path": path, "poll_interval": 0.01},
    )
    out, _ = await published(settings, 22)
    for k, bar in enumerate(out):
        data = update_data(bar, k + 1)
        # Bars 1..9 have a close-only bar in their window; so do 10..14 (bar 9 is in it).
        close_only = 1 <= k <= 9 + WINDOW - 1
        assert data["estimators_quality"] == {"range": "close_only" if close_only else "ok"}, k
        for part in ("estimators", "estimators_annualized"):
            for name in RANGE_ESTIMATORS:
                value = data[part][name]
                assert (value is None) if close_only or k < 2 else (value > 0), (k, part, name)
            if k >= 2:
                assert data[part]["close_to_close"] is not None
