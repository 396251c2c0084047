"""Tests of the market package: the GARCH simulator, the rolling volatility and the generator.

The pure parts run on real numpy with fixed seeds. The generator runs on real Trio with its
virtual clock (`autojump_clock`: time jumps straight to the next deadline), so schedules spanning
thousands of seconds are checked exactly and in milliseconds.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from agentspoonsd.market.bar import Bar
from agentspoonsd.market.garch import BarArrays, GarchParams, GarchSimulator
from agentspoonsd.market.generator import Generator
from agentspoonsd.market.volatility import RollingVolatility
from agentspoonsd.settings import GeneratorSettings

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def simulate(n_bars: int, n_symbols: int, seed: int | None, **kwargs: object) -> BarArrays:
    """`n_bars` steps stacked: each field has shape (n_bars, n_symbols)."""
    sim = GarchSimulator(n_symbols, np.random.default_rng(seed), **kwargs)  # type: ignore[arg-type]
    steps = [sim.step() for _ in range(n_bars)]
    return BarArrays(*(np.stack(field) for field in zip(*steps, strict=True)))


@pytest.fixture(scope="module")
def long_run() -> BarArrays:
    # Shared by the statistical tests: 4,000 bars x 50 independent symbols = 200,000 returns.
    return simulate(4000, 50, seed=7)


# --- GarchParams ---------------------------------------------------------------------------


def test_default_params_give_a_per_bar_vol_of_about_0_2_percent() -> None:
    params = GarchParams()
    assert params.unconditional_volatility == pytest.approx(0.002)
    assert params.alpha + params.beta < 1
    # Finite fourth moment of returns with unit-variance t(nu) innovations (E z^4 = 3(nu-2)/(nu-4)).
    kurt_z = 3 * (params.nu - 2) / (params.nu - 4)
    assert params.beta**2 + 2 * params.alpha * params.beta + kurt_z * params.alpha**2 < 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"omega": 0.0},
        {"omega": -1e-7},
        {"alpha": -0.1},
        {"beta": -0.1},
        {"alpha": 0.1, "beta": 0.9},
        {"alpha": 0.5, "beta": 0.6},
        {"nu": 2.0},
        {"volume_scale": 0.0},
        {"volume_dispersion": -1.0},
        {"omega": math.nan},
    ],
)
def test_params_reject_invalid_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GarchParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"n_symbols": 0}, {"initial_price": 0.0}, {"initial_price": math.inf}, {"substeps": 0}],
)
def test_simulator_rejects_invalid_arguments(kwargs: dict[str, float]) -> None:
    args: dict[str, object] = {"n_symbols": 1, "rng": np.random.default_rng(0)} | kwargs
    with pytest.raises(ValueError):
        GarchSimulator(**args)  # type: ignore[arg-type]


# --- GarchSimulator --------------------------------------------------------------------------


def test_ohlc_invariants_hold_on_every_bar() -> None:
    bars = simulate(10_000, 5, seed=1)
    for field in bars:
        assert field.shape == (10_000, 5)
        assert field.dtype == np.float64
        assert np.isfinite(field).all()
    assert (bars.high >= np.maximum(bars.open, bars.close)).all()
    assert (bars.low <= np.minimum(bars.open, bars.close)).all()
    assert (bars.low > 0).all()
    assert (bars.volume > 0).all()
    # The intrabar path matters: most bars have a wick beyond the body.
    assert (bars.high > np.maximum(bars.open, bars.close)).mean() > 0.5
    assert (bars.low < np.minimum(bars.open, bars.close)).mean() > 0.5


def test_each_open_is_exactly_the_previous_close() -> None:
    bars = simulate(1000, 3, seed=2, initial_price=123.0)
    assert (bars.open[0] == 123.0).all()
    assert np.array_equal(bars.open[1:], bars.close[:-1])


def test_returns_are_log_close_over_previous_close() -> None:
    bars = simulate(1000, 3, seed=3)
    previous_close = np.vstack([bars.open[:1], bars.close[:-1]])
    np.testing.assert_allclose(bars.returns, np.log(bars.close / previous_close), atol=1e-15)


def test_same_seed_gives_identical_series() -> None:
    a = simulate(500, 4, seed=42)
    b = simulate(500, 4, seed=42)
    for field_a, field_b in zip(a, b, strict=True):
        assert np.array_equal(field_a, field_b)


@pytest.mark.parametrize(("seed_a", "seed_b"), [(42, 43), (None, None)])
def test_different_or_no_seed_gives_different_series(
    seed_a: int | None, seed_b: int | None
) -> None:
    a = simulate(50, 2, seed=seed_a)
    b = simulate(50, 2, seed=seed_b)
    assert not np.array_equal(a.close, b.close)


def test_symbols_are_independent_series() -> None:
    bars = simulate(2000, 2, seed=4)
    assert abs(np.corrcoef(bars.returns.T)[0, 1]) < 0.1


def test_per_bar_volatility_matches_the_parameters(long_run: BarArrays) -> None:
    assert long_run.returns.std() == pytest.approx(GarchParams().unconditional_volatility, rel=0.1)
    assert abs(long_run.returns.mean()) < 1e-4


def test_squared_returns_cluster(long_run: BarArrays) -> None:
    squares = long_run.returns**2
    squares = squares - squares.mean(axis=0)
    lag1 = (squares[1:] * squares[:-1]).sum(axis=0) / (squares**2).sum(axis=0)
    assert lag1.mean() > 0.05


def test_returns_have_fat_tails(long_run: BarArrays) -> None:
    centred = long_run.returns - long_run.returns.mean(axis=0)
    excess_kurtosis = (centred**4).mean(axis=0) / (centred**2).mean(axis=0) ** 2 - 3
    assert np.median(excess_kurtosis) > 1


def test_volume_rises_with_the_size_of_the_move(long_run: BarArrays) -> None:
    moves = np.abs(long_run.returns).ravel()
    volume = long_run.volume.ravel()
    assert np.corrcoef(moves, volume)[0, 1] > 0.2
    # And so it clusters like volatility does.
    log_volume = np.log(long_run.volume) - np.log(long_run.volume).mean(axis=0)
    lag1 = (log_volume[1:] * log_volume[:-1]).sum(axis=0) / (log_volume**2).sum(axis=0)
    assert lag1.mean() > 0.02
    assert volume.mean() == pytest.approx(GarchParams().volume_scale, rel=0.2)


def test_callers_cannot_corrupt_the_simulator_state() -> None:
    sim = GarchSimulator(2, np.random.default_rng(5))
    first = sim.step()
    expected = first.close.copy()
    assert np.array_equal(sim.last_close, expected)
    first.close[:] = -1.0  # scribbling on a returned bar or on a property...
    sim.last_close[:] = -1.0
    sim.next_variance[:] = -1.0
    second = sim.step()  # ...does not change the series
    assert np.array_equal(second.open, expected)
    assert (second.close > 0).all()


# --- RollingVolatility -----------------------------------------------------------------------


@pytest.mark.parametrize("window", [2, 3, 20, 150])
def test_rolling_volatility_matches_naive_std(window: int) -> None:
    returns = np.random.default_rng(window).standard_normal((120, 4)) * 0.002
    rolling = RollingVolatility(4, window)
    for t in range(len(returns)):
        got = rolling.push(returns[t])
        assert got.shape == (4,)
        if t == 0:
            assert np.array_equal(got, np.zeros(4))
        else:
            expected = np.std(returns[max(0, t - window + 1) : t + 1], axis=0, ddof=1)
            np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert len(rolling) == min(t + 1, window)


def test_rolling_volatility_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        RollingVolatility(2, 1)
    with pytest.raises(ValueError):
        RollingVolatility(0, 5)
    rolling = RollingVolatility(2, 5)
    with pytest.raises(ValueError):
        rolling.push(np.zeros(3))
    assert len(rolling) == 0  # a rejected push changes nothing


# --- Generator -------------------------------------------------------------------------------


class Stamps:
    """A wall clock for the generator that reads Trio's (virtual) clock and records each call."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self) -> datetime:
        now = trio.current_time()
        self.times.append(now)
        return EPOCH + timedelta(seconds=now)


def make_generator(
    send: trio.MemorySendChannel[list[Bar]],
    stamps: Stamps | None = None,
    **overrides: object,
) -> Generator:
    fields: dict[str, object] = {
        "interval": 2.0,
        "symbols": ["BTC/USD", "ETH/USD", "SOL/USD"],
        "seed": 11,
        "volatility_window": 5,
    } | overrides
    return Generator(
        GeneratorSettings(**fields),  # type: ignore[arg-type]
        send,
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


def prices(batches: list[list[Bar]]) -> list[tuple[float, ...]]:
    """Everything in a batch except the timestamps."""
    return [
        (b.open, b.high, b.low, b.close, b.volume, b.returns, b.volatility)
        for batch in batches
        for b in batch
    ]


async def test_first_batch_is_immediate_and_well_formed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](10)
    stamps = Stamps()
    generator = make_generator(send, stamps, initial_price=100.0)
    with trio.move_on_after(2.5):  # ticks at 0 and 2.0
        start = trio.current_time()
        await generator.run()
    first, second = drain(receive)
    assert stamps.times == [start, start + 2.0]
    assert [bar.symbol for bar in first] == ["BTC/USD", "ETH/USD", "SOL/USD"]
    for bar in first + second:
        assert bar.timestamp.tzinfo is UTC
        for value in (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.returns):
            assert type(value) is float
        assert bar.low <= min(bar.open, bar.close) <= max(bar.open, bar.close) <= bar.high
        assert bar.volume > 0
    assert all(bar.open == 100.0 for bar in first)
    assert all(bar.volatility == 0.0 for bar in first)  # one return: no sample std yet
    for a, b in zip(first, second, strict=True):
        assert b.open == a.close
        assert b.volatility == pytest.approx(abs(a.returns - b.returns) / math.sqrt(2))


async def test_volatility_is_the_rolling_std_of_the_sent_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send, volatility_window=5)
    with trio.move_on_after(2.0 * 30 - 1):
        await generator.run()
    batches = drain(receive)
    assert len(batches) == 30
    returns = np.array([[bar.returns for bar in batch] for batch in batches])
    for t in range(1, 30):
        expected = np.std(returns[max(0, t - 4) : t + 1], axis=0, ddof=1)
        got = [bar.volatility for bar in batches[t]]
        np.testing.assert_allclose(got, expected, rtol=1e-12)


async def test_ticks_follow_absolute_deadlines_with_a_slow_consumer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The consumer alternates 1.5 and 0.2 intervals of work: every other send blocks for half
    # an interval. A loop that slept `interval` after each send would drift by 0.5 s per two
    # ticks; absolute deadlines keep every tick on the grid.
    interval = 2.0
    send, receive = trio.open_memory_channel[list[Bar]](0)
    stamps = Stamps()
    generator = make_generator(send, stamps, interval=interval)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(generator.run)
            for i in range(1000):
                await receive.receive()
                await trio.sleep((1.5 if i % 2 == 0 else 0.2) * interval)
            nursery.cancel_scope.cancel()
    start = stamps.times[0]
    assert len(stamps.times) >= 1000
    for k, t in enumerate(stamps.times[:1000]):
        assert t == pytest.approx(start + k * interval, abs=1e-9)
    assert not [e for e in logs if e["event"] == "generator_ticks_skipped"]


@pytest.mark.parametrize(("stall", "skipped"), [(3.5, 1), (10.25, 8)])
async def test_missed_ticks_are_skipped_not_burst(
    autojump_clock: trio.testing.MockClock, stall: float, skipped: int
) -> None:
    interval = 1.0
    send, receive = trio.open_memory_channel[list[Bar]](0)
    stamps = Stamps()
    generator = make_generator(send, stamps, interval=interval)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(generator.run)
            start = trio.current_time()
            await receive.receive()  # tick 0
            await trio.sleep(stall * interval)  # tick 1 is stamped at 1.0 and waits in send
            received_at = []
            for _ in range(4):
                await receive.receive()
                received_at.append(trio.current_time() - start)
            nursery.cancel_scope.cancel()
    # Tick 1 (stamped on time, delivered late), then one batch for the latest due tick, sent at
    # once, then back on the grid.
    resume = math.floor(stall) + 1
    assert received_at == pytest.approx([stall, stall, resume, resume + 1.0])
    assert [t - start for t in stamps.times[:4]] == pytest.approx(
        [0.0, 1.0, stall, resume], abs=1e-9
    )
    skips = [e for e in logs if e["event"] == "generator_ticks_skipped"]
    assert [e["count"] for e in skips] == [skipped]
    assert skips[0]["log_level"] == "warning"


async def test_run_is_cancellable_and_never_closes_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send, interval=2.0)
    start = trio.current_time()
    with trio.move_on_after(9.0) as scope:
        await generator.run()
    assert scope.cancelled_caught
    assert trio.current_time() == pytest.approx(start + 9.0)  # left at the cancel, not later
    assert len(drain(receive)) == 5  # ticks 0, 2, 4, 6, 8
    with pytest.raises(trio.WouldBlock):  # not EndOfChannel: the channel is still open
        receive.receive_nowait()
    send.send_nowait([])  # and still usable by a restarted run()


async def test_restarted_run_continues_the_same_series(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send)
    with trio.move_on_after(9.0):
        await generator.run()
    before = drain(receive)
    await trio.sleep(7.3)  # the supervisor's backoff: off the old grid on purpose
    with trio.move_on_after(9.0):
        await generator.run()
    after = drain(receive)
    assert len(before) == len(after) == 5
    for a, b in zip(before[-1], after[0], strict=True):
        assert b.open == a.close
    # Identical to an uninterrupted run with the same seed.
    reference_send, reference_receive = trio.open_memory_channel[list[Bar]](100)
    with trio.move_on_after(19.0):
        await make_generator(reference_send).run()
    assert prices(before + after) == prices(drain(reference_receive))


async def test_a_batch_whose_send_was_cancelled_is_sent_by_the_next_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send, receive = trio.open_memory_channel[list[Bar]](0)
    generator = make_generator(send, initial_price=100.0)
    with trio.move_on_after(1.0) as scope:
        await generator.run()  # nobody receives: stuck in the first send
    assert scope.cancelled_caught
    batches = []
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        for _ in range(3):
            batches.append(await receive.receive())
        nursery.cancel_scope.cancel()
    assert all(bar.open == 100.0 for bar in batches[0])
    reference_send, reference_receive = trio.open_memory_channel[list[Bar]](100)
    with trio.move_on_after(5.0):
        await make_generator(reference_send, initial_price=100.0).run()
    assert prices(batches) == prices(drain(reference_receive))


async def test_run_refuses_to_run_twice_at_once(autojump_clock: trio.testing.MockClock) -> None:
    send, _receive = trio.open_memory_channel[list[Bar]](100)
    generator = make_generator(send)
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        with pytest.raises(RuntimeError):
            await generator.run()
        nursery.cancel_scope.cancel()


async def test_a_naive_wall_clock_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    send, _receive = trio.open_memory_channel[list[Bar]](100)
    generator = Generator(
        GeneratorSettings(seed=1),
        send,
        structlog.get_logger(),
        wall_clock=lambda: datetime(2024, 1, 1),
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        await generator.run()
