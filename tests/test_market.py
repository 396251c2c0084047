"""The generator service (`market/generator.py`) with the synthetic source.

The generator runs on real Trio with its virtual clock (`autojump_clock`: time jumps straight to
the next deadline), so schedules spanning thousands of seconds are checked exactly and in
milliseconds. The models, estimators and GARCH fit are tested on their own elsewhere; here the
references are built independently: the models directly from their parameter dataclasses, the
rolling standard deviation with numpy, the annualisation factor from the formula.

One thing to know about the virtual clock: the warm-up and the GARCH refits run in worker
threads, and while a task waits on a thread the autojump clock sees everything blocked and jumps
to the next deadline. So the generator is started with ``nursery.start`` (its warm-up finishes
before ``started()``, when no deadline is pending) and the tests about the schedule run with the
GARCH fit disabled.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs
from trio_websocket import open_websocket_url

from agentspoonsd.market import annual, models
from agentspoonsd.market.bar import Bar
from agentspoonsd.market.clock import MarketClock, bar_step
from agentspoonsd.market.estimators import ESTIMATOR_NAMES
from agentspoonsd.market.generator import MAX_CATCH_UP_TICKS, Generator, symbol_seed
from agentspoonsd.protocol import iso_utc
from agentspoonsd.settings import GeneratorSettings
from daemon_process import config_text, new_token

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
SYMBOLS = ["BTC/USD", "ETH/USD", "SOL/USD"]


class Stamps:
    """A wall clock for the generator that reads Trio's (virtual) clock and records each call."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self) -> datetime:
        now = trio.current_time()
        self.times.append(now)
        return EPOCH + timedelta(seconds=now)


class RecordingSend:
    """The generator's send channel, recording the (virtual) time at which each batch is handed
    over: the tick's emission, whatever the bars' market-clock close times say."""

    def __init__(self, inner: trio.MemorySendChannel[list[Bar]]) -> None:
        self.inner = inner
        self.times: list[float] = []

    async def send(self, batch: list[Bar]) -> None:
        self.times.append(trio.current_time())
        await self.inner.send(batch)


def generator_settings(**overrides: object) -> GeneratorSettings:
    fields: dict[str, object] = {
        "interval": 2.0,
        "symbols": SYMBOLS,
        "seed": 11,
        "volatility_window": 5,
        "warmup_bars": 10,
        "garch_fit": {"enabled": False},
    } | overrides
    return GeneratorSettings(**fields)  # type: ignore[arg-type]


def make_generator(
    send: trio.MemorySendChannel[list[Bar]] | RecordingSend,
    stamps: Callable[[], datetime] | None = None,
    **overrides: object,
) -> Generator:
    return Generator(
        generator_settings(**overrides).spec(),
        send,  # type: ignore[arg-type]
        structlog.get_logger(),
        wall_clock=stamps if stamps is not None else Stamps(),
    )


def drain(receive: trio.MemoryReceiveChannel[list[Bar]]) -> list[list[Bar]]:
    batches = []
    while True:
        try:
            batches.append(receive.receive_nowait())
        except trio.WouldBlock:
            return batches


def without_time(batches: list[list[Bar]]) -> list[tuple[object, ...]]:
    """Every field of every bar except the timestamp (analytics included)."""
    return [(bar.symbol, *bar[2:]) for batch in batches for bar in batch]


async def run_for(generator: Generator, seconds: float) -> float:
    """Start `generator.run` (warm-up included), let it run `seconds`, cancel it; returns the
    time it started (after the warm-up)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        start = trio.current_time()
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return start


async def collect(
    generator: Generator,
    receive: trio.MemoryReceiveChannel[list[Bar]],
    count: int,
    *,
    linger: float = 0.0,
) -> list[list[Bar]]:
    """Start `generator.run`, receive `count` batches, wait `linger` seconds, cancel it."""
    batches = []
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        for _ in range(count):
            batches.append(await receive.receive())
        await trio.sleep(linger)
        nursery.cancel_scope.cancel()
    return batches


def reference_model(
    kind: models.ModelKind, params: object, seed: int, symbol: str, initial_price: float
) -> models.Model:
    """The model a symbol should get, built directly from the parameter dataclasses."""
    return models.make_model(
        kind,
        params,  # type: ignore[arg-type]
        seed=symbol_seed(seed, symbol),
        initial_price=initial_price,
        volume=models.VolumeParams(),
        substeps=16,
    )


# --- the first updates ---------------------------------------------------------------------------


async def test_first_batch_is_immediate_and_well_formed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](10)
    stamps = Stamps()
    generator = make_generator(send, stamps, initial_price=100.0, warmup_bars=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        start = trio.current_time()
        batches = [await receive.receive() for _ in range(3)]
        nursery.cancel_scope.cancel()
    assert stamps.times == [start]  # read once: the origin of the run's market clock
    first, second, third = batches
    assert [bar.symbol for bar in first] == SYMBOLS == list(generator.symbols)
    for k, batch in enumerate(batches):
        for bar in batch:
            # Real time (bar_seconds = interval): bar k closes at tick k's scheduled time.
            assert bar.timestamp == EPOCH + timedelta(seconds=start + 2.0 * k)
            assert bar.timestamp.tzinfo is UTC
            for value in (bar.open, bar.high, bar.low, bar.close, bar.volume):
                assert type(value) is float
            assert bar.low <= min(bar.open, bar.close) <= max(bar.open, bar.close) <= bar.high
            assert bar.volume > 0
            assert list(bar.analytics) == [
                "bar_seconds",
                "gap_seconds",
                "estimators",
                "estimators_annualized",
                "estimators_quality",
                "garch_forecast",
            ]
            assert bar.analytics["garch_forecast"]["status"] == "disabled"
    # No warm-up: the very first bar of each series, with no return and no estimate yet.
    for bar in first:
        assert bar.open == 100.0
        assert bar.returns is None and bar.volatility is None
        estimators = bar.analytics["estimators"]
        assert estimators == dict.fromkeys(ESTIMATOR_NAMES) | {"window": 0}
    for a, b, c in zip(first, second, third, strict=True):
        assert b.open == a.close and c.open == b.close
        assert b.returns == pytest.approx(math.log(b.close / a.close), rel=1e-12)
        assert b.volatility is None  # one return: no sample standard deviation yet
        assert b.analytics["estimators"]["window"] == 1
        assert b.analytics["estimators"]["ewma"] == pytest.approx(abs(b.returns), rel=1e-12)
        assert c.volatility == pytest.approx(abs(b.returns - c.returns) / math.sqrt(2), rel=1e-12)


async def test_after_the_warm_up_the_first_update_has_full_windows_and_a_fit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](10)
    generator = make_generator(
        send,
        warmup_bars=150,
        volatility_window=20,
        initial_price=100.0,
        garch_fit={"window": 100, "refit_every": 10, "horizon": 5},
    )
    (first,) = await collect(generator, receive, 1)
    for bar in first:
        assert bar.open != 100.0  # the warm-up bars were simulated, not published
        estimators = bar.analytics["estimators"]
        assert estimators["window"] == 20
        assert all(type(estimators[name]) is float for name in ESTIMATOR_NAMES)
        forecast = bar.analytics["garch_forecast"]
        assert forecast["status"] != "pending"  # fitted during the warm-up
        assert forecast["horizon"] == 5


async def test_volatility_is_close_to_close_and_annualised_by_the_bar_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(
        send, volatility_window=5, trading_days=252, bar_seconds=300, warmup_bars=10
    )
    batches = await collect(generator, receive, 30)
    factor = math.sqrt(252 * 86400 / 300)
    for batch in batches:
        for bar in batch:
            estimators = bar.analytics["estimators"]
            annualized = bar.analytics["estimators_annualized"]
            assert bar.volatility == estimators["close_to_close"]
            assert annualized["window"] == estimators["window"] == 5
            for name in ESTIMATOR_NAMES:
                assert annualized[name] == pytest.approx(estimators[name] * factor, rel=1e-14)
    # And close_to_close is the sample standard deviation of the last 5 published returns.
    closes = np.array([[bar.close for bar in batch] for batch in batches])
    returns = np.log(closes[1:] / closes[:-1])
    for t in range(5, len(batches)):
        expected = np.std(returns[t - 5 : t], axis=0, ddof=1)
        got = [bar.volatility for bar in batches[t]]
        np.testing.assert_allclose(got, expected, rtol=1e-10)


# --- the schedule ------------------------------------------------------------------------------


async def test_ticks_follow_absolute_deadlines_with_a_slow_consumer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The consumer alternates 1.5 and 0.2 intervals of work: every other send blocks for half
    # an interval. A loop that slept `interval` after each send would drift by 0.5 s per two
    # ticks; absolute deadlines keep every tick on the grid.
    interval = 2.0
    inner, receive = trio.open_memory_channel[list[Bar]](0)
    send = RecordingSend(inner)
    stamps = Stamps()
    generator = make_generator(send, stamps, interval=interval)
    closes = []
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(generator.run)
            for i in range(1000):
                closes.append((await receive.receive())[0].timestamp)
                await trio.sleep((1.5 if i % 2 == 0 else 0.2) * interval)
            nursery.cancel_scope.cancel()
    start = send.times[0]
    assert stamps.times == [start]
    assert len(send.times) >= 1000
    for k, t in enumerate(send.times[:1000]):
        assert t == pytest.approx(start + k * interval, abs=1e-9)
    assert closes == [EPOCH + timedelta(seconds=start + k * interval) for k in range(1000)]
    assert not [e for e in logs if e["event"] == "generator_ticks_skipped"]


@pytest.mark.parametrize(
    ("stall", "caught_up", "skipped"),
    [(3.5, 1, 0), (10.25, MAX_CATCH_UP_TICKS, 8 - MAX_CATCH_UP_TICKS)],
)
async def test_missed_ticks_are_made_up_then_skipped_never_burst(
    autojump_clock: trio.testing.MockClock, stall: float, caught_up: int, skipped: int
) -> None:
    interval = 1.0
    inner, receive = trio.open_memory_channel[list[Bar]](0)
    send = RecordingSend(inner)
    generator = make_generator(send, interval=interval)
    symbols = len(generator._symbols)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(generator.run)
            start = trio.current_time()
            first = await receive.receive()  # tick 0
            await trio.sleep(stall * interval)  # tick 1 is emitted at 1.0 and waits in send
            received_at, batches = [], [first]
            for _ in range(4):
                batches.append(await receive.receive())
                received_at.append(trio.current_time() - start)
            nursery.cancel_scope.cancel()
    # Tick 1 (emitted on time, delivered late), then one batch for the latest due tick that
    # carries the bars of up to MAX_CATCH_UP_TICKS missed ticks too, sent at once, then back on
    # the grid.
    resume = math.floor(stall) + 1
    assert received_at == pytest.approx([stall, stall, resume, resume + 1.0])
    assert [t - start for t in send.times[:4]] == pytest.approx([0.0, 1.0, stall, resume], abs=1e-9)
    assert [len(b) for b in batches] == [symbols, symbols, symbols * (1 + caught_up)] + [
        symbols
    ] * 2
    skips = [e for e in logs if e["event"] == "generator_ticks_skipped"]
    assert [e["count"] for e in skips] == ([skipped] if skipped else [])
    assert [e["clock_lag_s"] for e in skips] == ([skipped * interval] if skipped else [])
    assert all(e["log_level"] == "warning" for e in skips)
    # Neither a made-up nor a skipped tick breaks the series: each symbol's bars, in batch
    # order, go on from the last bar sent, and close exactly one bar apart on the market clock
    # (a skipped tick is not simulated, so it takes no market time).
    origin = EPOCH + timedelta(seconds=start)
    for symbol in generator._symbols:
        series = [bar for batch in batches for bar in batch if bar.symbol == symbol]
        assert len(series) == 4 + 1 + caught_up
        for before, after in pairwise(series):
            assert after.open == before.close
        assert [bar.timestamp for bar in series] == [
            origin + timedelta(seconds=interval * n) for n in range(len(series))
        ]


def test_market_clock_spaces_rounds_exactly_and_never_goes_back() -> None:
    """The pure clock: rounds bar_seconds apart to the microsecond, counted across calls; a run
    starts at the wall clock unless a published close makes that go backwards."""
    clock = MarketClock(1 / 3)  # not a whole number of microseconds: rounded once, not drifting
    with pytest.raises(RuntimeError):
        clock.next_rounds(1)
    assert clock.start_run(EPOCH) == EPOCH
    closes = clock.next_rounds(2) + clock.next_rounds(0) + clock.next_rounds(3)
    step = timedelta(microseconds=333_333)
    assert closes == [EPOCH + n * step for n in range(5)]
    clock.mark_published(closes[-1])
    clock.mark_published(closes[0])  # an older close changes nothing
    assert clock.published == closes[-1]
    # The wall clock is behind the last close (the clock ran ahead): one bar after it.
    assert clock.start_run(EPOCH) == closes[-1] + step
    assert clock.next_rounds(1) == [closes[-1] + step]
    # The wall clock is ahead: it wins, and the gap is the time the generator was away.
    later = EPOCH + timedelta(hours=1)
    assert clock.start_run(later) == later
    assert bar_step(60.0) == timedelta(minutes=1) and bar_step(1e-9) == timedelta(microseconds=1)


async def test_an_accelerated_market_closes_bars_bar_seconds_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One-minute bars every 2 s: data.timestamp is market time (60 s apart from the start),
    # the emissions are wall time (2 s apart); the warm-up bars took no market time.
    inner, receive = trio.open_memory_channel[list[Bar]](100)
    send = RecordingSend(inner)
    stamps = Stamps()
    generator = make_generator(send, stamps, interval=2.0, bar_seconds=60.0, warmup_bars=30)
    batches = await collect(generator, receive, 50)
    start = send.times[0]
    assert stamps.times == [start]
    assert send.times[:50] == pytest.approx([start + 2.0 * k for k in range(50)], abs=1e-9)
    origin = EPOCH + timedelta(seconds=start)
    for batch, n in zip(batches, range(50), strict=True):
        assert {bar.timestamp for bar in batch} == {origin + timedelta(minutes=n)}


@pytest.mark.parametrize(
    ("bar_seconds", "down", "gap"),
    [
        # Accelerated: the market clock is ahead of the wall clock, so the next run continues
        # one bar after the last published close, with no gap.
        (60.0, 7.3, 0.0),
        # Real time: the wall clock is later than one bar after the last close: the time the
        # generator was down is a gap (the only place one can appear).
        (2.0, 7.3, 9.0 + 7.3 - 10.0),
    ],
)
async def test_a_restarted_run_never_moves_the_clock_backwards(
    autojump_clock: trio.testing.MockClock, bar_seconds: float, down: float, gap: float
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send, interval=2.0, bar_seconds=bar_seconds)
    await run_for(generator, 9.0)
    before = drain(receive)
    await trio.sleep(down)
    await run_for(generator, 9.0)
    after = drain(receive)
    bar = timedelta(seconds=bar_seconds)
    for run in (before, after):  # exact spacing within a run
        closes = [batch[0].timestamp for batch in run]
        assert [b - a for a, b in pairwise(closes)] == [bar] * (len(closes) - 1)
    assert after[0][0].timestamp - before[-1][0].timestamp == bar + timedelta(seconds=gap)


async def test_the_clock_continues_after_a_persisted_history(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A previous run of an accelerated market published bars up to a close far ahead of the
    # wall clock: the new run's first bar closes one bar after it, not at the wall clock.
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send, interval=2.0, bar_seconds=300.0)
    ahead = EPOCH + timedelta(days=3)
    generator.continue_clock(
        {
            "BTC/USD": [{"timestamp": "2024-01-01T00:00:00Z"}, {"timestamp": iso_utc(ahead)}],
            "ETH/USD": [{"timestamp": "2024-01-02T00:00:00.000000Z"}],
            "SOL/USD": [],
        }
    )
    batches = await collect(generator, receive, 3)
    assert [batch[0].timestamp for batch in batches] == [
        ahead + timedelta(seconds=300.0 * n) for n in (1, 2, 3)
    ]


# --- cancellation and restarts -------------------------------------------------------------------


async def test_run_is_cancellable_and_never_closes_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send, interval=2.0)
    start = await run_for(generator, 9.0)
    assert trio.current_time() == pytest.approx(start + 9.0)  # left at the cancel, not later
    assert len(drain(receive)) == 5  # ticks 0, 2, 4, 6, 8
    with pytest.raises(trio.WouldBlock):  # not EndOfChannel: the channel is still open
        receive.receive_nowait()
    send.send_nowait([])  # and still usable by a restarted run()


async def test_a_run_cancelled_during_its_warm_up_does_not_warm_up_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](0)
    generator = make_generator(send, warmup_bars=40)
    with trio.move_on_after(0.5) as scope:
        await generator.run()  # the clock jumps to the deadline while the warm-up thread runs
    assert scope.cancelled_caught
    batches = await collect(generator, receive, 3)
    reference_send, reference_receive = trio.open_memory_channel[list[Bar]](0)
    reference = make_generator(reference_send, warmup_bars=40)
    assert without_time(batches) == without_time(await collect(reference, reference_receive, 3))


async def test_restarted_run_continues_the_same_series(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send)
    await run_for(generator, 9.0)
    before = drain(receive)
    await trio.sleep(7.3)  # the supervisor's backoff: off the old grid on purpose
    await run_for(generator, 9.0)
    after = drain(receive)
    assert len(before) == len(after) == 5
    for a, b in zip(before[-1], after[0], strict=True):
        assert b.open == a.close
    # Identical to an uninterrupted run with the same seed.
    reference_send, reference_receive = trio.open_memory_channel[list[Bar]](100)
    await run_for(make_generator(reference_send), 19.0)
    assert without_time(before + after) == without_time(drain(reference_receive))


async def test_restarts_keep_the_estimators_and_garch_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Refits every 3 bars (in worker threads), several restarts with a batch in flight each time
    # (the channel has no buffer): every field of every update, the GARCH forecast included, is
    # the uninterrupted run's.
    fields: dict[str, object] = {
        "warmup_bars": 120,
        "garch_fit": {"window": 100, "refit_every": 3, "horizon": 4},
    }
    send, receive = trio.open_memory_channel[list[Bar]](0)
    generator = make_generator(send, **fields)
    batches = []
    for _ in range(3):
        batches += await collect(generator, receive, 4)
        await trio.sleep(1.7)
    reference_send, reference_receive = trio.open_memory_channel[list[Bar]](0)
    reference = await collect(make_generator(reference_send, **fields), reference_receive, 12)
    assert without_time(batches) == without_time(reference)
    statuses = {bar.analytics["garch_forecast"]["status"] for batch in batches for bar in batch}
    assert statuses <= {"ok", "nonstationary", "failed"} and "ok" in statuses
    since = [batch[0].analytics["garch_forecast"]["bars_since_fit"] for batch in batches]
    assert 0 in since  # refits did happen across the restarts


async def test_a_batch_whose_send_was_cancelled_is_sent_by_the_next_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](0)
    stamps = Stamps()
    generator = make_generator(send, stamps, initial_price=100.0, warmup_bars=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)  # nobody receives: stuck in the first send
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert len(stamps.times) == 1
    await trio.sleep(0.25)
    batches = []
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        restarted = trio.current_time()
        for _ in range(3):
            batches.append(await receive.receive())
        nursery.cancel_scope.cancel()
    assert all(bar.open == 100.0 for bar in batches[0])  # the first bar, not lost
    assert batches[0][0].timestamp == EPOCH + timedelta(seconds=restarted)  # stamped anew
    reference_send, reference_receive = trio.open_memory_channel[list[Bar]](100)
    reference = make_generator(reference_send, initial_price=100.0, warmup_bars=0)
    await run_for(reference, 5.0)
    assert without_time(batches) == without_time(drain(reference_receive))


async def test_run_refuses_to_run_twice_at_once(autojump_clock: trio.testing.MockClock) -> None:
    send, _receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send)
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        with pytest.raises(RuntimeError, match="already running"):
            await generator.run()
        nursery.cancel_scope.cancel()


async def test_a_naive_wall_clock_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send, lambda: datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        await generator.run()
    assert drain(receive) == []


# --- what each symbol gets -----------------------------------------------------------------------


async def test_per_symbol_overrides_take_effect(autojump_clock: trio.testing.MockClock) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(
        send,
        warmup_bars=0,
        seed=3,
        overrides={
            "ETH/USD": {"model": "gbm", "initial_price": 3000.0, "gbm": {"annual_volatility": 0.7}},
            "SOL/USD": {"model": "heston", "heston": {"rho": -0.8}},
        },
    )
    batches = await collect(generator, receive, 60)
    # The yearly tables scaled to 2 s bars (interval 2, bar_seconds unset) in a 365-day year.
    bar = annual.BarTime(bar_seconds=2.0, seconds_per_year=365 * 86400.0)
    garch = annual.garch_params(
        bar, annual_volatility=0.65, half_life=2058.6, reaction=0.3518, nu=8.0
    )
    gbm = models.GbmParams(mu=0.0, sigma=0.7 / math.sqrt(365 * 86400 / 2))
    heston = annual.heston_params(
        bar, annual_volatility=0.65, half_life=2079.4, vol_of_vol=78.84, rho=-0.8
    )
    expected = {
        "BTC/USD": reference_model("garch", garch, 3, "BTC/USD", 50000.0),
        "ETH/USD": reference_model("gbm", gbm, 3, "ETH/USD", 3000.0),
        "SOL/USD": reference_model("heston", heston, 3, "SOL/USD", 50000.0),
    }
    for i, symbol in enumerate(SYMBOLS):
        block = expected[symbol].simulate(60)
        got = np.array([[b[i].open, b[i].high, b[i].low, b[i].close, b[i].volume] for b in batches])
        want = np.column_stack([block.open, block.high, block.low, block.close, block.volume])
        assert np.array_equal(got, want), symbol


async def test_a_symbols_stream_does_not_depend_on_the_other_symbols(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def eth_bars(symbols: list[str], seed: int = 11) -> list[tuple[object, ...]]:
        send, receive = trio.open_memory_channel[list[Bar]](100)
        batches = await collect(make_generator(send, symbols=symbols, seed=seed), receive, 25)
        index = symbols.index("ETH/USD")
        return without_time([[batch[index]] for batch in batches])

    alone = await eth_bars(["ETH/USD"])
    assert await eth_bars(["BTC/USD", "ETH/USD"]) == alone
    assert await eth_bars(["XRP/USD", "DOGE/USD", "ETH/USD", "BTC/USD"]) == alone
    assert await eth_bars(["ETH/USD"], seed=12) != alone


async def test_different_symbols_never_share_a_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # "plumless" and "buckeroo" have the same CRC-32: a seed derived from a 32-bit hash of the
    # name would give them the very same prices.
    symbols = ["plumless", "buckeroo", "BTC/USD"]
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")
    send, receive = trio.open_memory_channel[list[Bar]](100)
    batches = await collect(make_generator(send, symbols=symbols, warmup_bars=0), receive, 5)
    closes = np.array([[bar.close for bar in batch] for batch in batches]).T
    for i in range(3):
        for j in range(i):
            assert not np.any(closes[i] == closes[j]), (symbols[i], symbols[j])


# --- file and replay sources through the service -------------------------------------------------


def ohlcv_records(count: int, symbol: str = "BTC/USD") -> list[dict[str, object]]:
    records = []
    close = 100.0
    for i in range(count):
        open_ = close
        close = open_ * (1.001 if i % 3 else 0.998)
        records.append(
            {
                "timestamp": f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}Z",
                "symbol": symbol,
                "open": open_,
                "high": max(open_, close) * 1.0005,
                "low": min(open_, close) * 0.9995,
                "close": close,
                "volume": 1.0 + i,
            }
        )
    return records


def bar_fields(bar: Bar) -> tuple[object, ...]:
    return (bar.symbol, bar.timestamp, bar.open, bar.high, bar.low, bar.close, bar.volume)


def record_fields(record: dict[str, object]) -> tuple[object, ...]:
    stamp = datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00"))
    keys = ("open", "high", "low", "close", "volume")
    return (record["symbol"], stamp, *(record[k] for k in keys))


async def test_file_source_bars_go_through_the_pipeline(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = tmp_path / "feed.jsonl"
    records = ohlcv_records(12) + ohlcv_records(3, symbol="ETH/USD")
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(
        send,
        symbols=["BTC/USD", "ETH/USD"],
        source="file",
        file={"path": str(path), "poll_interval": 0.05},
    )
    batches = await collect(generator, receive, 15)
    assert [len(batch) for batch in batches] == [1] * 15
    bars = [batch[0] for batch in batches]
    assert [bar_fields(bar) for bar in bars] == [record_fields(r) for r in records]
    btc = bars[:12]
    for previous, bar in pairwise(btc):
        assert bar.returns == pytest.approx(math.log(bar.close / previous.close), rel=1e-12)
    assert btc[0].returns is None and bars[12].returns is None  # each symbol's own series
    returns = np.array([bar.returns for bar in btc[1:]])
    assert btc[-1].volatility == pytest.approx(np.std(returns[-5:], ddof=1), rel=1e-10)


async def test_file_source_restart_neither_repeats_nor_loses_a_record(tmp_path: Path) -> None:
    # Real time, not the autojump clock: the follower reads in worker threads, and the virtual
    # clock would jump to the fail_after deadline while a read is still running.
    # The consumer stops after 2 bars and the generator is cancelled while it holds more: the
    # restarted run must publish exactly the rest.
    path = tmp_path / "feed.jsonl"
    records = ohlcv_records(10)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    send, receive = trio.open_memory_channel[list[Bar]](0)
    generator = make_generator(
        send, symbols=["BTC/USD"], source="file", file={"path": str(path), "poll_interval": 0.05}
    )
    first = await collect(generator, receive, 2, linger=0.5)  # the 3rd bar waits in send
    got = [batch[0] for batch in first]
    with trio.move_on_after(0.5):  # nobody receives: cancelled again with bars in hand
        await generator.run()
    async with trio.open_nursery() as nursery:
        # start_soon: this run first re-sends the bar it holds, before reporting started().
        nursery.start_soon(generator.run)
        with trio.fail_after(30):
            got += [(await receive.receive())[0] for _ in range(8)]
        await trio.sleep(0.3)  # six polls of the file: nothing more comes
        assert drain(receive) == []
        nursery.cancel_scope.cancel()
    assert [bar_fields(bar) for bar in got] == [record_fields(r) for r in records]


# --- the market clock through the real daemon ----------------------------------------------------


async def test_daemon_publishes_market_time_and_continues_it_after_a_restart(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """One-minute bars every 0.02 s, history persisted: each update's data.timestamp is exactly
    60 s after the previous one while the outer timestamp (publication) advances by about the
    interval; after kill -9 and a restart the market clock, hours ahead of the wall clock by
    then, goes on one bar after the last persisted close, never back to the wall clock."""
    token = new_token()
    extra = f'[history]\npersist = true\ndir = "{tmp_path / "history"}"\n'
    text = config_text(tokens={"t": token}, interval=0.02, symbols=("BTC/USD",), extra=extra)
    text = text.replace("seed = 7\n", "seed = 7\nbar_seconds = 60.0\nwarmup_bars = 0\n")

    async def updates(daemon: Any, count: int) -> list[dict[str, Any]]:
        ws_port, _ = await daemon.ports()
        url = f"ws://127.0.0.1:{ws_port}/?access_token={token}"
        got = []
        async with open_websocket_url(url) as ws:
            while len(got) < count:
                message = orjson.loads(await ws.get_message())
                if message["type"] == "volatility_update":
                    got.append(message)
        return got

    def stamp(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    first = daemon_factory(text)
    before = await updates(first, 8)
    first.kill()
    second = daemon_factory(text)
    after = await updates(second, 3)

    minute = timedelta(minutes=1)
    for run in (before, after):
        closes = [stamp(u["data"]["timestamp"]) for u in run]
        assert [b - a for a, b in pairwise(closes)] == [minute] * (len(closes) - 1)
        seqs = [u["data"]["seq"] for u in run]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    published = [stamp(u["timestamp"]) for u in before]
    wall = (published[-1] - published[0]) / (len(published) - 1)
    assert timedelta(seconds=0.005) < wall < timedelta(seconds=0.5)  # ~interval, not a minute
    # The restarted daemon's first update is either the one after the last persisted (a client
    # connected at once) or a later one; its close is a whole number of minutes after it.
    persisted = stamp(before[-1]["data"]["timestamp"])
    gap = stamp(after[0]["data"]["timestamp"]) - persisted
    assert gap >= minute and gap % minute == timedelta(0)
    assert after[0]["data"]["seq"] - before[-1]["data"]["seq"] == gap // minute
