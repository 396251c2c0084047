"""The generator's parts, each on its own: the tick schedule (pure), the record feed of the
file and replay sources (no I/O), fit scheduling (an injected fit), and the synthetic producer
stepped by hand. test_market.py and test_sources*.py run the `Generator` that assembles them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import structlog
import trio
from structlog.testing import capture_logs

from agentspoonsd.market.clock import MarketClock
from agentspoonsd.market.external import RecordFeed
from agentspoonsd.market.fitting import FitScheduler
from agentspoonsd.market.garch_fit import GarchFit
from agentspoonsd.market.generator import pipeline_config
from agentspoonsd.market.pipeline import SymbolPipeline
from agentspoonsd.market.records import Record
from agentspoonsd.market.spec import GeneratorSpec
from agentspoonsd.market.synthetic import SyntheticProducer
from agentspoonsd.market.ticks import Due, TickSchedule, latest_due_tick
from agentspoonsd.settings import GeneratorSettings

BTC, ETH = "BTC/USD", "ETH/USD"
T0 = datetime(2026, 1, 5, 14, 30, tzinfo=UTC)


def spec(**overrides: Any) -> GeneratorSpec:
    fields: dict[str, Any] = {
        "interval": 1.0,
        "symbols": [BTC, ETH],
        "seed": 5,
        "volatility_window": 5,
        "warmup_bars": 20,
        "garch_fit": {"enabled": False},
    } | overrides
    return GeneratorSettings(**fields).spec()


def pipelines(s: GeneratorSpec) -> dict[str, SymbolPipeline]:
    return {symbol: SymbolPipeline(symbol, pipeline_config(s)) for symbol in s.symbols}


# --- TickSchedule -----------------------------------------------------------------------------


def test_ticks_on_time_emit_one_round_each_at_absolute_deadlines() -> None:
    schedule = TickSchedule(start=100.0, interval=0.5)
    for k in range(4):
        assert schedule.deadline() == 100.0 + k * 0.5
        assert schedule.take(schedule.deadline() + 0.01) == Due(bars_per_symbol=1, skipped=0)
    assert schedule.skipped == 0


def test_a_late_loop_makes_up_two_ticks_and_skips_the_rest() -> None:
    schedule = TickSchedule(start=0.0, interval=1.0)
    schedule.take(0.0)
    assert schedule.take(2.5) == Due(bars_per_symbol=2, skipped=0)  # ticks 1 and 2
    assert schedule.take(13.0) == Due(bars_per_symbol=3, skipped=8)  # 3..10 skipped, 11..13
    assert (schedule.tick, schedule.skipped) == (14, 8)
    assert TickSchedule(0.0, 1.0, max_catch_up=0).take(5.0) == Due(1, 5)


def test_the_due_tick_uses_the_deadlines_own_arithmetic() -> None:
    start, interval = 0.1, 0.1  # 0.1 + 2 * 0.1 != 0.3 in floats
    for k in range(1, 50):
        at = start + k * interval
        assert latest_due_tick(start, interval, at) == k
        assert latest_due_tick(start, interval, np.nextafter(at, -1.0)) == k - 1
    with pytest.raises(ValueError):
        TickSchedule(0.0, 0.0)


# --- RecordFeed -------------------------------------------------------------------------------


def record(symbol: str, minutes: float, close: float = 100.0) -> Record:
    at = T0 + timedelta(minutes=minutes)
    return Record(symbol, at, close, close + 1, close - 1, close, 10.0)


def test_records_of_unknown_symbols_are_rejected_with_one_warning() -> None:
    s = spec(bar_seconds=60)
    feed = RecordFeed(s, pipelines(s), structlog.get_logger())
    with capture_logs() as logs:
        assert feed.feed(record("XYZ", 0)) is None
        assert feed.feed(record("XYZ", 1)) is None
    assert [(e["event"], e["symbol"]) for e in logs] == [("source_record_rejected", "XYZ")]


def test_records_advance_their_symbol_and_a_contradicting_spacing_is_warned_once() -> None:
    s = spec(bar_seconds=60)
    lines = pipelines(s)
    feed = RecordFeed(s, lines, structlog.get_logger())
    with capture_logs() as logs:
        for i in range(6):  # five-minute bars against a configured one minute
            fed = feed.feed(record(BTC, 5 * i, 100.0 + i))
            assert fed is not None and fed.symbol == BTC and fed.window is None  # fits off
    assert lines[BTC].bar(T0).close == 105.0
    mismatches = [e for e in logs if e["event"] == "source_spacing_mismatch"]
    assert len(mismatches) == 1 and mismatches[0]["inferred_seconds"] == 300


# --- FitScheduler -----------------------------------------------------------------------------


def made_fit(status: Any) -> GarchFit:
    return GarchFit(status, 1e-8, 0.1, 0.85, 0.0, 500, 9, "", 1e-6, 1e-6)


async def test_fits_start_from_the_last_one_and_are_installed_and_logged() -> None:
    s = spec()
    lines = pipelines(s)
    calls: list[tuple[int, GarchFit | None]] = []
    results = [made_fit("ok"), made_fit("nonstationary")]

    def fit(window: Any, *, previous: GarchFit | None) -> GarchFit:
        calls.append((len(window), previous))
        return results[len(calls) - 1]

    fits = FitScheduler(lines, structlog.get_logger(), fit=fit)
    with capture_logs() as logs:
        first = fits.fit_now(BTC, np.zeros(7))
        await fits.fit_in_thread(BTC, np.zeros(9))
    assert calls == [(7, None), (9, first)]  # the second starts from the first
    assert lines[BTC].last_fit == first and lines[ETH].last_fit is None  # "ok" fits only
    assert [(e["event"], e["symbol"]) for e in logs] == [
        ("garch_fitted", BTC),
        ("garch_fit_nonstationary", BTC),
    ]


# --- SyntheticProducer ------------------------------------------------------------------------


def producer(s: GeneratorSpec) -> tuple[SyntheticProducer, dict[str, SymbolPipeline]]:
    lines = pipelines(s)
    log = structlog.get_logger()
    made = SyntheticProducer(s, lines, FitScheduler(lines, log), MarketClock(s.bar_seconds), log)
    return made, lines


def closes(s: GeneratorSpec, bars: int) -> list[float]:
    made, lines = producer(s)
    made.warm_up(3)
    result = []
    for _ in range(bars):
        made.step(BTC)
        result.append(lines[BTC].bar(T0).close)
    return result


def test_a_fixed_seed_gives_the_same_series_and_another_seed_another() -> None:
    assert closes(spec(seed=5), 5) == closes(spec(seed=5), 5)
    assert closes(spec(seed=5), 5) != closes(spec(seed=6), 5)


def test_a_continued_symbol_starts_at_the_last_close_and_skips_the_warm_up() -> None:
    s = spec()
    made, lines = producer(s)
    published = [
        {"open": 200.0, "high": 201.0, "low": 199.0, "close": 200.0 + i, "volume": 1.0, "seq": i}
        for i in range(1, 8)
    ]
    made.unsent = []
    made.continue_symbol(BTC, published)
    assert made.continued == {BTC} and made.unsent is None
    made.warm_up(10)
    assert lines[BTC].bar(T0).close == 207.0  # warm-up left the continued series alone
    made.step(BTC)
    assert 150.0 < lines[BTC].bar(T0).close < 270.0  # from 207, not the configured start


async def test_an_interrupted_send_is_sent_first_on_the_next_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    s = spec()
    made, _ = producer(s)
    made.warm_up(s.warmup_bars)  # here, not in run()'s worker thread (the clock autojumps)
    made.warmed_up = True
    send, receive = trio.open_memory_channel[list[Any]](0)
    with trio.move_on_after(5):  # nobody receives: the first batch's send is cancelled
        await made.run(send, lambda: T0, trio.TASK_STATUS_IGNORED)
    assert made.unsent is not None and [b.symbol for b in made.unsent] == [BTC, ETH]
    kept = [b.close for b in made.unsent]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(made.run, send, lambda: T0, trio.TASK_STATUS_IGNORED)
        batch = await receive.receive()
        nursery.cancel_scope.cancel()
    assert [b.close for b in batch] == kept and made.unsent is None
