"""market/pipeline.py: from bars to the `data` of an update, for one symbol.

References are written here from the formulas, independently of the code under test: the GARCH
recursion as a plain loop, the rolling estimators as textbook window computations over bars built
by hand (with gaps, so every term of every estimator matters), the annualisation as a product.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pytest

from agentspoonsd.market.bar import Bar
from agentspoonsd.market.block import BarBlock
from agentspoonsd.market.estimators import ESTIMATOR_NAMES, RANGE_ESTIMATORS
from agentspoonsd.market.garch_fit import GarchFit, fit_garch11, variance_forecast
from agentspoonsd.market.generator import pipeline_config
from agentspoonsd.market.pipeline import (
    _RECORD_CHUNK,
    GarchTracker,
    PipelineConfig,
    SymbolPipeline,
    fit_phase,
)
from agentspoonsd.protocol import iso_utc, update_data
from agentspoonsd.settings import GeneratorSettings

EPOCH = datetime(2024, 3, 1, tzinfo=UTC)
FORECAST_KEYS = [
    "status",
    "message",
    "horizon",
    "omega",
    "alpha",
    "beta",
    "persistence",
    "variance_1",
    "variance_h",
    "volatility_1",
    "volatility_h",
    "variance_cum_h",
    "volatility_cum_h",
    "fit_bars",
    "bars_since_fit",
]
VALUE_KEYS = FORECAST_KEYS[3:]


def garch_returns(n: int, seed: int, omega: float = 2e-8, alpha: float = 0.08, beta: float = 0.9):
    """A plain-loop GARCH(1,1) series with normal innovations."""
    rng = np.random.default_rng(seed)
    variance = omega / (1 - alpha - beta)
    out = np.empty(n)
    for t in range(n):
        out[t] = math.sqrt(variance) * rng.standard_normal()
        variance = omega + alpha * out[t] ** 2 + beta * variance
    return out


def roll(fit_or_params: Any, v: float, r: float) -> float:
    return fit_or_params.omega + fit_or_params.alpha * r * r + fit_or_params.beta * v


def h_step(omega: float, alpha: float, beta: float, v1: float, h: int) -> float:
    """sigma²_{t+h} from sigma²_{t+1} by iterating the expected recursion h - 1 times."""
    v = v1
    for _ in range(h - 1):
        v = omega + (alpha + beta) * v
    return v


# --- GarchTracker ------------------------------------------------------------------------------


def test_refits_come_on_the_phase_with_the_latest_window() -> None:
    config = PipelineConfig(fit_window=200, refit_every=50, horizon=10)
    tracker = GarchTracker(config, phase=7)
    returns = garch_returns(400, seed=1)
    assert tracker.observe(math.nan) is None  # the first bar has no return: not counted
    due = []
    for count, r in enumerate(returns, start=1):
        window = tracker.observe(float(r))
        if window is not None:
            due.append(count)
            assert np.array_equal(window, returns[:count][-200:])
    # (count - phase) % refit_every == 0, once there are 100 returns to fit.
    assert due == [107, 157, 207, 257, 307, 357]


def test_forecast_follows_the_fit_and_rolls_forward_between_refits() -> None:
    horizon = 10
    tracker = GarchTracker(PipelineConfig(fit_window=300, refit_every=60, horizon=horizon), 0)
    returns = garch_returns(700, seed=2)
    fit: GarchFit | None = None
    v1 = math.nan  # the reference one-step variance, by the plain recursion
    since = 0
    refits = []
    for count, r in enumerate(returns.tolist(), start=1):
        window = tracker.observe(r)
        if fit is not None:
            v1 = roll(fit, v1, r)
            since += 1
        if window is not None:
            new = fit_garch11(window, previous=tracker.last_fit)
            assert new.status == "ok"
            tracker.install(new)
            fit, v1, since = new, new.next_variance, 0
            refits.append(count)
            assert new.n_obs == min(count, 300)
            forecast = tracker.forecast()
            # Right after a fit: the forecasts are garch_fit's own.
            expected = variance_forecast(fit, horizon)
            assert forecast["variance_1"] == expected[0]
            assert forecast["variance_h"] == pytest.approx(expected[-1], rel=1e-12)
        forecast = tracker.forecast()
        assert list(forecast) == FORECAST_KEYS
        if fit is None:
            assert forecast["status"] == "pending"
            assert all(forecast[key] is None for key in VALUE_KEYS)
            continue
        assert forecast["status"] == "ok" and forecast["message"] is None
        assert forecast["horizon"] == horizon
        assert (forecast["omega"], forecast["alpha"], forecast["beta"]) == (
            fit.omega,
            fit.alpha,
            fit.beta,
        )
        assert forecast["persistence"] == pytest.approx(fit.alpha + fit.beta, rel=1e-15)
        assert forecast["variance_1"] == pytest.approx(v1, rel=1e-13)
        vh = h_step(fit.omega, fit.alpha, fit.beta, v1, horizon)
        assert forecast["variance_h"] == pytest.approx(vh, rel=1e-11)
        assert forecast["volatility_1"] == pytest.approx(math.sqrt(v1), rel=1e-13)
        assert forecast["volatility_h"] == pytest.approx(math.sqrt(vh), rel=1e-11)
        # The h-bar variance: the sum of the k-step forecasts, k = 1..h.
        cum = sum(h_step(fit.omega, fit.alpha, fit.beta, v1, k) for k in range(1, horizon + 1))
        assert forecast["variance_cum_h"] == pytest.approx(cum, rel=1e-11)
        assert forecast["volatility_cum_h"] == pytest.approx(math.sqrt(cum), rel=1e-11)
        assert forecast["fit_bars"] == fit.n_obs
        assert forecast["bars_since_fit"] == since
    assert refits == list(range(120, 700, 60))  # 60 returns are too few to fit


def test_status_values_and_the_last_good_fit() -> None:
    config = PipelineConfig(fit_window=100, refit_every=1, horizon=5)
    tracker = GarchTracker(config, phase=0)
    returns = garch_returns(150, seed=3).tolist()
    for r in returns[:99]:
        assert tracker.observe(r) is None
    pending = tracker.forecast()
    assert pending == dict.fromkeys(FORECAST_KEYS) | {"status": "pending", "horizon": 5}

    # A failed fit before any good one: reported, and still no values.
    tracker.observe(returns[99])
    failed = fit_garch11(np.zeros(100))
    assert failed.status == "failed"
    tracker.install(failed)
    forecast = tracker.forecast()
    assert list(forecast) == FORECAST_KEYS
    assert forecast["status"] == "failed" and forecast["message"] == failed.message != ""
    assert all(forecast[key] is None for key in VALUE_KEYS)

    # A good fit.
    window = tracker.observe(returns[100])
    assert window is not None
    good = fit_garch11(window)
    assert good.status == "ok"
    tracker.install(good)
    ok = tracker.forecast()
    assert ok["status"] == "ok" and ok["message"] is None
    assert ok["variance_1"] == good.next_variance and ok["bars_since_fit"] == 0
    v1 = good.next_variance

    # Nonstationary, then failed: reported with their message, while the values (rolled forward
    # every bar) keep coming from the last good fit.
    boundary = dataclasses.replace(
        good, status="nonstationary", alpha=0.3, beta=0.7, omega=5e-9, message="on the boundary"
    )
    for step, (attempt, status) in enumerate(
        [(boundary, "nonstationary"), (failed, "failed"), (boundary, "nonstationary")], start=1
    ):
        r = returns[100 + step]
        assert tracker.observe(r) is not None
        v1 = roll(good, v1, r)
        tracker.install(attempt)
        forecast = tracker.forecast()
        assert list(forecast) == FORECAST_KEYS
        assert forecast["status"] == status
        assert forecast["message"] == attempt.message
        assert (forecast["omega"], forecast["alpha"], forecast["beta"]) == (
            good.omega,
            good.alpha,
            good.beta,
        )
        assert forecast["variance_1"] == pytest.approx(v1, rel=1e-13)
        assert forecast["bars_since_fit"] == step
        assert forecast["fit_bars"] == good.n_obs
    assert tracker.last_fit is good

    # The next good fit replaces it and clears the message.
    window = tracker.observe(returns[104])
    better = fit_garch11(window, previous=tracker.last_fit)
    tracker.install(better)
    forecast = tracker.forecast()
    assert forecast["status"] == "ok" and forecast["message"] is None
    assert forecast["alpha"] == better.alpha and forecast["bars_since_fit"] == 0


def test_disabled_never_asks_for_a_fit() -> None:
    tracker = GarchTracker(PipelineConfig(fit_enabled=False, fit_window=100, refit_every=1), 0)
    for r in garch_returns(300, seed=4).tolist():
        assert tracker.observe(r) is None
    forecast = tracker.forecast()
    assert list(forecast) == FORECAST_KEYS
    assert forecast == dict.fromkeys(FORECAST_KEYS) | {"status": "disabled", "horizon": 10}


def test_pipeline_config_is_validated() -> None:
    for kwargs in ({"fit_window": 99}, {"refit_every": 0}, {"horizon": 0}, {"bars_per_year": 0}):
        with pytest.raises(ValueError):
            PipelineConfig(**kwargs)  # type: ignore[arg-type]


# --- fit phases ----------------------------------------------------------------------------------


def test_fit_phase_is_the_crc_of_the_name_and_spreads_symbols() -> None:
    names = [f"SYM{i}/USD" for i in range(1000)]
    phases = [fit_phase(name, 100) for name in names]
    assert phases == [zlib.crc32(name.encode()) % 100 for name in names]
    counts = Counter(phases)
    assert len(counts) == 100  # every phase is used...
    assert max(counts.values()) <= 25  # ...about evenly (10 each on average)


def test_symbols_with_different_phases_refit_on_different_bars() -> None:
    config = PipelineConfig(window=5, fit_window=100, refit_every=10)
    a, b = "BTC/USD", "ETH/USD"
    assert fit_phase(a, 10) != fit_phase(b, 10)
    block = hand_made_block(260, seed=5)
    refits: dict[str, list[int]] = {}
    for symbol in (a, b):
        pipeline = SymbolPipeline(symbol, config)
        pipeline.feed(block)
        refits[symbol] = [i for i in range(260) if pipeline.advance() is not None]
    for symbol in (a, b):
        # Bar i carries return number i (bar 0 has none).
        expected = [i for i in range(100, 260) if (i - fit_phase(symbol, 10)) % 10 == 0]
        assert refits[symbol] == expected
    assert not set(refits[a]) & set(refits[b])


# --- SymbolPipeline ------------------------------------------------------------------------------


def hand_made_block(n: int, seed: int, start: float = 100.0) -> BarBlock:
    """Bars with gaps (open != previous close) and wicks, not from the models."""
    rng = np.random.default_rng(seed)
    gap = rng.normal(0, 0.0005, n)
    body = rng.normal(0, 0.002, n)
    up, down = np.abs(rng.normal(0, 0.001, n)), np.abs(rng.normal(0, 0.001, n))
    open_, close = np.empty(n), np.empty(n)
    previous = start
    for i in range(n):
        open_[i] = previous * math.exp(gap[i])
        close[i] = open_[i] * math.exp(body[i])
        previous = close[i]
    high = np.maximum(open_, close) * np.exp(up)
    low = np.minimum(open_, close) * np.exp(-down)
    volume = rng.lognormal(0, 0.5, n)
    return BarBlock(open_, high, low, close, volume)


def textbook(bars: list[tuple[float, ...]], window: int, lam: float) -> list[dict[str, Any]]:
    """The six estimators of every bar, from the formulas (None where undefined)."""
    out: list[dict[str, Any]] = []
    ewma_var = None
    for t in range(len(bars)):
        if t == 0:
            out.append(dict.fromkeys(ESTIMATOR_NAMES) | {"window": 0})
            continue
        r_t = math.log(bars[t][3] / bars[t - 1][3])
        ewma_var = r_t * r_t if ewma_var is None else lam * ewma_var + (1 - lam) * r_t * r_t
        n = min(window, t)
        row: dict[str, Any] = dict.fromkeys(ESTIMATOR_NAMES) | {"window": n}
        row["ewma"] = math.sqrt(ewma_var)
        if n >= 2:
            r, o, c, hl, u, d = [], [], [], [], [], []
            for i in range(t - n + 1, t + 1):
                op, hi, lo, cl, _ = bars[i]
                prev = bars[i - 1][3]
                r.append(math.log(cl / prev))
                o.append(math.log(op / prev))
                c.append(math.log(cl / op))
                hl.append(math.log(hi / lo))
                u.append(math.log(hi / op))
                d.append(math.log(lo / op))
            rs = [ui * (ui - ci) + di * (di - ci) for ui, di, ci in zip(u, d, c, strict=True)]
            gk = [
                0.5 * x * x - (2 * math.log(2) - 1) * ci * ci for x, ci in zip(hl, c, strict=True)
            ]
            k = 0.34 / (1.34 + (n + 1) / (n - 1))
            row["close_to_close"] = float(np.std(r, ddof=1))
            row["parkinson"] = math.sqrt(sum(x * x for x in hl) / (4 * math.log(2) * n))
            row["garman_klass"] = math.sqrt(sum(gk) / n)
            row["rogers_satchell"] = math.sqrt(sum(rs) / n)
            row["yang_zhang"] = math.sqrt(
                np.var(o, ddof=1) + k * np.var(c, ddof=1) + (1 - k) * sum(rs) / n
            )
        out.append(row)
    return out


def floats_in(value: object) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in floats_in(v)]
    return []


def test_data_is_update_data_of_bar_for_every_bar_warm_up_included() -> None:
    window, bars_per_year = 5, 1000.0
    config = PipelineConfig(
        window=window, bars_per_year=bars_per_year, fit_window=100, refit_every=20, horizon=3
    )
    pipeline = SymbolPipeline("ETH/USD", config)
    block = hand_made_block(400, seed=6)
    bars = list(zip(*(field.tolist() for field in block), strict=True))
    expected = textbook(bars, window, 0.94)
    sizes = [1, 1, 3, 50, 200, 7, 138]
    assert sum(sizes) == 400
    seq, fits, begin = 0, 0, 0
    for size in sizes:
        pipeline.feed(BarBlock(*(field[begin : begin + size] for field in block)))
        begin += size
        while pipeline.pending:
            window_to_fit = pipeline.advance()
            if window_to_fit is not None:
                pipeline.install(fit_garch11(window_to_fit, previous=pipeline.last_fit))
                fits += 1
            seq += 1
            moment = EPOCH + timedelta(seconds=seq, microseconds=seq * 7)
            bar = pipeline.bar(moment)
            assert isinstance(bar, Bar) and bar.timestamp == moment
            data = pipeline.data(iso_utc(moment), seq)
            reference = update_data(bar, seq)
            assert data == reference
            assert orjson.dumps(data) == orjson.dumps(reference)  # same order, same floats
            assert not [f for f in floats_in(data) if math.isnan(f)]  # NaN is None, never NaN

            i = seq - 1
            o, h, lo, c, v = bars[i]
            assert (data["open"], data["high"], data["low"], data["close"]) == (o, h, lo, c)
            assert data["price"] == c and data["volume"] == v and data["symbol"] == "ETH/USD"
            if i == 0:
                assert data["returns"] is None
            else:
                assert data["returns"] == pytest.approx(math.log(c / bars[i - 1][3]), rel=1e-12)
            estimators = data["estimators"]
            assert list(estimators) == [*ESTIMATOR_NAMES, "window"]
            assert estimators["window"] == expected[i]["window"]
            for name in ESTIMATOR_NAMES:
                want = expected[i][name]
                if want is None:
                    assert estimators[name] is None, (i, name)
                    assert data["estimators_annualized"][name] is None
                else:
                    assert estimators[name] == pytest.approx(want, rel=1e-9), (i, name)
                    assert data["estimators_annualized"][name] == pytest.approx(
                        estimators[name] * math.sqrt(bars_per_year), rel=1e-15
                    )
            assert data["volatility"] == estimators["close_to_close"]
            assert data["estimators_annualized"]["window"] == estimators["window"]
            assert list(data["garch_forecast"]) == FORECAST_KEYS
            # The configured time base, no session gap, real ranges: the defaults of a block.
            assert data["bar_seconds"] == config.bar_seconds and data["gap_seconds"] is None
            assert data["estimators_quality"] == {"range": "ok"}
    assert seq == 400 and fits >= 14


def test_feeding_while_bars_are_pending_raises() -> None:
    pipeline = SymbolPipeline("BTC/USD", PipelineConfig())
    with pytest.raises(RuntimeError):
        pipeline.advance()  # nothing fed
    block = hand_made_block(3, seed=7)
    pipeline.feed(block)
    with pytest.raises(RuntimeError):
        pipeline.bar(EPOCH)  # fed but not advanced
    pipeline.advance()
    assert pipeline.pending == 2
    with pytest.raises(RuntimeError, match="pending"):
        pipeline.feed(hand_made_block(3, seed=8))
    assert pipeline.pending == 2  # the refused block changed nothing
    pipeline.advance()
    pipeline.advance()
    assert pipeline.bar(EPOCH).close == block.close[2]
    with pytest.raises(RuntimeError):
        pipeline.advance()
    pipeline.feed(hand_made_block(2, seed=9))  # now it is accepted
    assert pipeline.pending == 2


# --- time base, session gaps, close-only bars ------------------------------------------------


def one_by_one(
    pipeline: SymbolPipeline,
    block: BarBlock,
    *,
    bar_seconds: float | None = None,
    gaps: dict[int, float] | None = None,
    close_only: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """Feed `block` one bar at a time, as a file source does; the `data` of every bar."""
    out = []
    for i in range(block.n_bars):
        gap = (gaps or {}).get(i)
        pipeline.feed(
            BarBlock(*(field[i : i + 1] for field in block)),
            bar_seconds=bar_seconds,
            gap_seconds=None if gap is None else [gap],
            close_only=np.array([True]) if i in close_only else None,
        )
        pipeline.advance()
        data = pipeline.data(iso_utc(EPOCH), i + 1)
        assert data == update_data(pipeline.bar(EPOCH), i + 1)
        out.append(data)
    return out


def test_bars_of_another_length_are_annualised_with_it() -> None:
    # A 5-minute series in a pipeline configured for 1-minute bars of a 365-day, 24-hour year.
    config = PipelineConfig(window=5, bars_per_year=525_600.0, bar_seconds=60.0)
    block = hand_made_block(30, seed=10)
    five = one_by_one(SymbolPipeline("X", config), block, bar_seconds=300.0)
    one = one_by_one(SymbolPipeline("X", config), block)
    factor = math.sqrt(365 * 86400 / 300)
    for a, b in zip(five, one, strict=True):
        assert a["bar_seconds"] == 300.0 and b["bar_seconds"] == 60.0
        assert a["estimators"] == b["estimators"]  # per bar: the same numbers
        for name in ESTIMATOR_NAMES:
            if a["estimators"][name] is None:
                continue
            assert a["estimators_annualized"][name] == pytest.approx(
                a["estimators"][name] * factor, rel=1e-14
            )
            assert b["estimators_annualized"][name] == pytest.approx(
                b["estimators"][name] * math.sqrt(525_600), rel=1e-14
            )
    assert five[-1]["estimators_annualized"]["close_to_close"] is not None


def test_the_configured_length_given_explicitly_is_the_default() -> None:
    config = PipelineConfig(window=5, bars_per_year=1000.0, bar_seconds=30.0)
    block = hand_made_block(12, seed=11)
    explicit = one_by_one(SymbolPipeline("X", config), block, bar_seconds=30.0)
    assert explicit == one_by_one(SymbolPipeline("X", config), block)
    pipeline = SymbolPipeline("X", config)
    for bad in (0.0, -30.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="bar_seconds"):
            pipeline.feed(block, bar_seconds=bad)
    with pytest.raises(ValueError, match="gap_seconds"):
        pipeline.feed(block, gap_seconds=[None])
    with pytest.raises(ValueError, match="shape"):
        pipeline.feed(block, close_only=np.zeros(3, dtype=bool))
    assert one_by_one(pipeline, block) == explicit  # the refused feeds changed nothing
    with pytest.raises(ValueError, match="bar_seconds"):
        PipelineConfig(bar_seconds=0.0)


def test_an_equities_calendar_annualises_with_its_trading_hours() -> None:
    settings = GeneratorSettings(trading_days=252, session_hours=6.5, bar_seconds=60)
    config = pipeline_config(settings.spec())
    assert settings.seconds_per_year == 252 * 6.5 * 3600
    assert config.bars_per_year == pytest.approx(252 * 6.5 * 60, rel=1e-15)  # 98,280
    block = hand_made_block(20, seed=12)
    minute = one_by_one(SymbolPipeline("SPY", config), block)
    five = one_by_one(SymbolPipeline("SPY", config), block, bar_seconds=300.0)
    for a, b in zip(minute, five, strict=True):
        if a["estimators"]["close_to_close"] is None:
            continue
        per_bar = a["estimators"]["close_to_close"]
        assert a["estimators_annualized"]["close_to_close"] == pytest.approx(
            per_bar * math.sqrt(252 * 6.5 * 60), rel=1e-14
        )
        assert b["estimators_annualized"]["close_to_close"] == pytest.approx(
            per_bar * math.sqrt(252 * 6.5 * 12), rel=1e-14
        )
    # Crypto's default calendar is unchanged: 365 days of 24 hours, in bars of `interval` (2 s).
    assert pipeline_config(GeneratorSettings().spec()).bars_per_year == 15_768_000.0
    assert pipeline_config(GeneratorSettings(bar_seconds=60).spec()).bars_per_year == 525_600.0


def test_close_only_bars_null_the_range_estimators_of_their_windows_and_say_why() -> None:
    window = 4
    config = PipelineConfig(window=window, bars_per_year=1000.0)
    block = hand_made_block(20, seed=13)
    marked = one_by_one(SymbolPipeline("X", config), block, close_only={8})
    plain = one_by_one(SymbolPipeline("X", config), block)
    for i, (a, b) in enumerate(zip(marked, plain, strict=True)):
        inside = 8 <= i < 8 + window
        assert a["estimators_quality"] == {"range": "close_only" if inside else "ok"}, i
        for part in ("estimators", "estimators_annualized"):
            for name in ESTIMATOR_NAMES:
                if inside and name in RANGE_ESTIMATORS:
                    assert a[part][name] is None, (i, part, name)
                else:
                    assert a[part][name] == b[part][name], (i, part, name)
            assert a[part]["window"] == b[part]["window"]
        assert a["volatility"] == b["volatility"]


def test_data_of_long_blocks_with_marks_is_update_data_of_bar() -> None:
    """`data` builds the dicts of a chunk of bars at once (`_RECORD_CHUNK`, 64): blocks of many
    chunks, whose first bars are the series' first (NaN estimators), with close-only bars and
    session gaps on both sides of chunk boundaries, give the same updates as `bar`, and the same
    as bar-by-bar feeding."""
    assert 256 % _RECORD_CHUNK == 0 and 4 * _RECORD_CHUNK < 600
    config = PipelineConfig(window=5, bars_per_year=1000.0, fit_window=100, refit_every=37)
    block = hand_made_block(700, seed=21)
    close_only = np.zeros(700, dtype=np.bool_)
    close_only[[0, 255, 256, 300, 699]] = True
    gaps: list[float | None] = [None] * 700
    for i in (1, 256, 511, 512):
        gaps[i] = 63_060.0
    pipeline = SymbolPipeline("X", config)
    chunked = []
    for begin, size in ((0, 600), (600, 100)):
        part = slice(begin, begin + size)
        pipeline.feed(
            BarBlock(*(field[part] for field in block)),
            gap_seconds=gaps[part],
            close_only=close_only[part],
        )
        while pipeline.pending:
            window = pipeline.advance()
            if window is not None:
                pipeline.install(fit_garch11(window, previous=pipeline.last_fit))
            seq = len(chunked) + 1
            data = pipeline.data(iso_utc(EPOCH), seq)
            assert orjson.dumps(data) == orjson.dumps(update_data(pipeline.bar(EPOCH), seq))
            chunked.append(orjson.dumps(data))
    reference = SymbolPipeline("X", config)
    for i in range(700):
        reference.feed(
            BarBlock(*(field[i : i + 1] for field in block)),
            gap_seconds=[gaps[i]],
            close_only=close_only[i : i + 1],
        )
        window = reference.advance()
        if window is not None:
            reference.install(fit_garch11(window, previous=reference.last_fit))
        assert orjson.dumps(reference.data(iso_utc(EPOCH), i + 1)) == chunked[i], i
    first = orjson.loads(chunked[0])
    assert first["returns"] is None and first["estimators"]["ewma"] is None
    assert orjson.loads(chunked[256])["estimators_quality"] == {"range": "close_only"}
    assert orjson.loads(chunked[512])["gap_seconds"] == 63_060.0


def test_a_session_gap_is_marked_and_read_in_session_by_close_to_close_and_the_fit() -> None:
    config = PipelineConfig(window=5, bars_per_year=1000.0, fit_window=100, refit_every=1)
    block = hand_made_block(150, seed=14)
    gap_bar = 120
    pipeline = SymbolPipeline("X", config)
    fitted: dict[int, np.ndarray] = {}
    for i in range(block.n_bars):
        pipeline.feed(
            BarBlock(*(field[i : i + 1] for field in block)),
            gap_seconds=[63_060.0] if i == gap_bar else None,
        )
        window = pipeline.advance()
        if window is not None:
            fitted[i] = window
        data = pipeline.data(iso_utc(EPOCH), i + 1)
        assert data["gap_seconds"] == (63_060.0 if i == gap_bar else None)
    o, c, previous = block.open[gap_bar], block.close[gap_bar], block.close[gap_bar - 1]
    # The fit's window: the in-session return at the gap, ln(C/C_prev) everywhere else.
    assert fitted[gap_bar][-1] == pytest.approx(math.log(c / o), rel=1e-12)
    assert fitted[gap_bar + 1][-2] == fitted[gap_bar][-1]
    assert fitted[gap_bar][-2] == pytest.approx(
        math.log(previous / block.close[gap_bar - 2]), rel=1e-12
    )
    # data.returns stays the close-to-close return: the gap is in it.
    assert data["returns"] is not None
    marked = one_by_one(SymbolPipeline("X", config), block, gaps={gap_bar: 63_060.0})
    assert marked[gap_bar]["returns"] == pytest.approx(math.log(c / previous), rel=1e-12)


@pytest.mark.parametrize("hours", [0.0, -1.0, 24.01])
def test_session_hours_outside_zero_to_twenty_four_are_refused(hours: float) -> None:
    with pytest.raises(ValueError, match="session_hours"):
        GeneratorSettings(session_hours=hours)
