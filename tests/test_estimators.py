"""Tests of the rolling volatility estimators against a plain textbook implementation.

The reference below is written independently of the module: a Python loop over bars using `math`
and `statistics` (exact-rational variances) on lists, straight from the formulas. Prices sit near
50,000 with per-bar moves of ~1e-3, gaps (open != previous close) and intrabar wicks, so log
ratios that were computed carelessly (differences of large logs) would miss the 1e-12 tolerance.
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from agentspoonsd.market.block import BarBlock
from agentspoonsd.market.estimators import (
    ESTIMATOR_NAMES,
    RANGE_ESTIMATORS,
    EstimatorBlock,
    RollingEstimators,
)

N_BARS = 3000
WINDOWED = tuple(name for name in ESTIMATOR_NAMES if name != "ewma")


def gbm_bars(
    n_bars: int,
    seed: int,
    price: float = 50_000.0,
    vol: float = 1e-3,
    wick_probability: float = 0.8,
) -> BarBlock:
    """A GBM-like path: gaps between bars, a random body and (mostly) non-zero wicks."""
    rng = np.random.default_rng(seed)
    gaps = rng.standard_normal(n_bars) * 0.3 * vol
    bodies = rng.standard_normal(n_bars) * vol
    log_close = math.log(price) + np.cumsum(gaps + bodies)
    log_open = np.concatenate(([math.log(price)], log_close[:-1])) + gaps
    opens = np.exp(log_open)
    closes = np.exp(log_close)
    upper = (
        np.abs(rng.standard_normal(n_bars)) * 0.5 * vol * (rng.random(n_bars) < wick_probability)
    )
    lower = (
        np.abs(rng.standard_normal(n_bars)) * 0.5 * vol * (rng.random(n_bars) < wick_probability)
    )
    highs = np.maximum(opens, closes) * np.exp(upper)
    lows = np.minimum(opens, closes) * np.exp(-lower)
    volume = rng.lognormal(0.0, 0.5, n_bars)
    return BarBlock(opens, highs, lows, closes, volume)


def textbook(
    bars: BarBlock,
    window: int,
    lam: float = 0.94,
    gaps: list[bool] | None = None,
    close_only: list[bool] | None = None,
) -> dict[str, list[float]]:
    """Every output column, bar by bar, from the formulas (NaN where undefined).

    A bar marked in `gaps` counts its in-session return ln(C/O) in close_to_close and ewma; a
    window holding a bar marked in `close_only` has no range-based estimate."""
    o, h, low, c = (field.tolist() for field in bars[:4])
    gaps = gaps or [False] * len(c)
    close_only = close_only or [False] * len(c)
    nan = math.nan
    out: dict[str, list] = {
        name: [] for name in (*ESTIMATOR_NAMES, "returns", "window", "range_missing")
    }
    per_bar: list[tuple[float, float, float, float, float, float, bool]] = []
    ewma_var = None
    for t in range(len(c)):
        if t == 0:
            for name in out:
                out[name].append({"window": 0, "range_missing": False}.get(name, nan))
            continue
        gap = math.log(o[t] / c[t - 1])
        body = math.log(c[t] / o[t])
        r = body if gaps[t] else math.log(c[t] / c[t - 1])
        up = math.log(h[t] / o[t])
        down = math.log(low[t] / o[t])
        hl = math.log(h[t] / low[t])
        per_bar.append((r, gap, body, up, down, hl, close_only[t]))
        ewma_var = r * r if ewma_var is None else lam * ewma_var + (1 - lam) * r * r
        out["returns"].append(math.log(c[t] / c[t - 1]))
        out["ewma"].append(math.sqrt(ewma_var))
        recent = per_bar[-window:]
        n = len(recent)
        out["window"].append(n)
        rs, gs, bs, us, ds, hls, flags = (list(column) for column in zip(*recent, strict=True))
        out["range_missing"].append(any(flags))
        if n < 2:
            for name in WINDOWED:
                out[name].append(nan)
            continue
        rs_var = statistics.fmean(
            u * (u - b) + d * (d - b) for u, d, b in zip(us, ds, bs, strict=True)
        )
        k = 0.34 / (1.34 + (n + 1) / (n - 1))
        out["close_to_close"].append(statistics.stdev(rs))
        out["parkinson"].append(math.sqrt(math.fsum(x * x for x in hls) / (4 * math.log(2) * n)))
        out["garman_klass"].append(
            math.sqrt(
                statistics.fmean(
                    0.5 * x * x - (2 * math.log(2) - 1) * b * b
                    for x, b in zip(hls, bs, strict=True)
                )
            )
        )
        out["rogers_satchell"].append(math.sqrt(rs_var))
        out["yang_zhang"].append(
            math.sqrt(statistics.variance(gs) + k * statistics.variance(bs) + (1 - k) * rs_var)
        )
        if any(flags):
            for name in RANGE_ESTIMATORS:
                out[name][-1] = nan
    return out


def run(
    bars: BarBlock,
    window: int,
    splits: list[int] | None = None,
    gaps: np.ndarray | None = None,
    close_only: np.ndarray | None = None,
    **kwargs: float,
) -> dict:
    """Feed `bars` to a fresh instance (in pieces cut at `splits`) and concatenate the outputs."""
    estimators = RollingEstimators(window, **kwargs)
    cuts = [0, *(splits or []), bars.n_bars]
    blocks = [
        estimators.update(
            BarBlock(*(field[a:b] for field in bars)),
            gaps=None if gaps is None else gaps[a:b],
            close_only=None if close_only is None else close_only[a:b],
        )
        for a, b in itertools.pairwise(cuts)
    ]
    return {
        name: np.concatenate([getattr(block, name) for block in blocks])
        for name in EstimatorBlock._fields
    }


def bar_slice(bars: BarBlock, start: int, stop: int) -> BarBlock:
    return BarBlock(*(field[start:stop] for field in bars))


@pytest.fixture(scope="module")
def bars() -> BarBlock:
    return gbm_bars(N_BARS, seed=11)


@pytest.fixture(scope="module")
def reference(bars: BarBlock) -> dict[int, dict[str, list[float]]]:
    return {window: textbook(bars, window) for window in (2, 3, 20, 64)}


@pytest.mark.parametrize("window", [2, 3, 20, 64])
@pytest.mark.parametrize("name", [*ESTIMATOR_NAMES, "returns"])
def test_matches_textbook(
    bars: BarBlock, reference: dict[int, dict[str, list[float]]], window: int, name: str
) -> None:
    got = run(bars, window)[name]
    expected = np.array(reference[window][name])
    assert got.dtype == np.float64
    assert got.shape == (N_BARS,)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0.0)
    # The data is non-degenerate: a relative check on zeros would prove little. (Zeros do occur:
    # Rogers-Satchell is exactly 0 over bars without wicks, and must then come out exactly 0.)
    defined = expected[~np.isnan(expected)]
    assert np.count_nonzero(defined) > 0.9 * defined.size


@pytest.mark.parametrize("window", [2, 20])
def test_window_counts_match_textbook(
    bars: BarBlock, reference: dict[int, dict[str, list[float]]], window: int
) -> None:
    got = run(bars, window)["window"]
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, reference[window]["window"])


def test_matches_textbook_bar_by_bar(
    bars: BarBlock, reference: dict[int, dict[str, list[float]]]
) -> None:
    # One bar per call, as the daemon does for file sources (the small-block path throughout).
    got = run(bar_slice(bars, 0, 400), 20, splits=list(range(1, 400)))
    for name in (*ESTIMATOR_NAMES, "returns"):
        expected = reference[20][name][:400]
        np.testing.assert_allclose(got[name], expected, rtol=1e-12, atol=0, err_msg=name)


def test_warm_up_rows() -> None:
    window = 4
    bars = gbm_bars(10, seed=3)
    out = run(bars, window)
    np.testing.assert_array_equal(out["window"], [0, 1, 2, 3, 4, 4, 4, 4, 4, 4])
    assert np.isnan(out["returns"][0])
    assert not np.isnan(out["returns"][1:]).any()
    assert np.isnan(out["ewma"][0])
    assert out["ewma"][1] == abs(out["returns"][1])  # seeded with r_1²: sqrt gives |r_1| exactly
    assert not np.isnan(out["ewma"][1:]).any()
    for name in WINDOWED:
        assert np.isnan(out[name][:2]).all(), name
        assert not np.isnan(out[name][2:]).any(), name
    # Row 2 uses exactly bars 1 and 2: the sample std of two returns is |r1 - r2| / sqrt(2).
    r1, r2 = out["returns"][1:3]
    assert out["close_to_close"][2] == pytest.approx(abs(r1 - r2) / math.sqrt(2), rel=1e-12)


def test_warm_up_does_not_depend_on_block_boundaries() -> None:
    # A first block of one bar (no return at all), then bars one at a time through the warm-up.
    bars = gbm_bars(12, seed=4)
    estimators = RollingEstimators(5)
    first = estimators.update(bar_slice(bars, 0, 1))
    assert first.window.tolist() == [0]
    assert all(np.isnan(getattr(first, name)).all() for name in (*ESTIMATOR_NAMES, "returns"))
    assert first.range_missing.tolist() == [False]
    second = estimators.update(bar_slice(bars, 1, 2))
    assert second.window.tolist() == [1]
    assert not np.isnan(second.returns).any()
    assert not np.isnan(second.ewma).any()
    assert all(np.isnan(getattr(second, name)).all() for name in WINDOWED)
    rest = estimators.update(bar_slice(bars, 2, 12))
    assert rest.window.tolist() == [2, 3, 4, 5, 5, 5, 5, 5, 5, 5]


@pytest.mark.parametrize("window", [2, 7, 20, 70])
def test_split_invariance(window: int) -> None:
    # Long enough to cross the 16,384-row chunks of the large-block path; splits mix empty,
    # one-bar, small (accumulate path) and large (offset-loop path) blocks, inside the warm-up too.
    bars = gbm_bars(40_000, seed=window)
    whole = run(bars, window)
    rng = np.random.default_rng(100 + window)
    # Fixed cuts in the warm-up: a first block of one bar (no return), of three bars, and blocks
    # ending just before, at and after the window fills; repeated cuts make empty blocks.
    heads = ([1, 2, 3, 5, 5, 40, 41], [3, 4, 6], [window - 1, window, window, window + 1])
    for head in heads:
        cuts = rng.choice(np.arange(1, bars.n_bars), size=60, replace=False).tolist()
        cuts = sorted([*cuts, *(cut for cut in head if cut > 0), 39_999])
        pieces = run(bars, window, splits=cuts)
        for name in EstimatorBlock._fields:
            # Bit-for-bit: same window values, same operations, same order in every path.
            np.testing.assert_array_equal(pieces[name], whole[name], err_msg=name)


def test_window_two_is_the_pair_of_returns(bars: BarBlock) -> None:
    out = run(bars, 2)
    r = out["returns"]
    expected = np.abs(r[2:] - r[1:-1]) / math.sqrt(2.0)
    np.testing.assert_allclose(out["close_to_close"][2:], expected, rtol=1e-12)
    assert set(out["window"].tolist()) == {0, 1, 2}


def test_constant_prices_give_exact_zero() -> None:
    n_bars = 50
    flat = np.full(n_bars, 50_123.25)
    bars = BarBlock(flat, flat, flat, flat, np.ones(n_bars))
    out = run(bars, 10, splits=[1, 2, 5, 30])
    for name in ESTIMATOR_NAMES:
        values = out[name]
        first_defined = 1 if name == "ewma" else 2
        assert np.isnan(values[:first_defined]).all(), name
        np.testing.assert_array_equal(values[first_defined:], 0.0, err_msg=name)
    np.testing.assert_array_equal(out["returns"][1:], 0.0)


def test_no_wicks_and_tiny_ranges_stay_non_negative() -> None:
    # Without wicks u = max(0, c) and d = min(0, c), so each Rogers-Satchell term is exactly 0
    # in exact arithmetic: rounding must not push a variance below 0 (sqrt would give NaN).
    bars = gbm_bars(5000, seed=5, vol=1e-9, wick_probability=0.0)
    out = run(bars, 20)
    for name in ESTIMATOR_NAMES:
        values = out[name][2:]
        assert not np.isnan(values).any(), name
        assert (values >= 0.0).all(), name
    np.testing.assert_array_equal(out["rogers_satchell"][2:], 0.0)


def test_ewma_lambda_is_used(bars: BarBlock) -> None:
    lam = 0.8
    got = run(bars, 5, ewma_lambda=lam)["ewma"]
    expected = [math.nan]
    variance = None
    previous = float(bars.close[0])
    for close in bars.close[1:].tolist():
        r = math.log(close / previous)
        previous = close
        variance = r * r if variance is None else lam * variance + (1 - lam) * r * r
        expected.append(math.sqrt(variance))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_empty_block_changes_nothing(bars: BarBlock) -> None:
    estimators = RollingEstimators(6)
    empty = estimators.update(bar_slice(bars, 0, 0))
    assert all(value.shape == (0,) for value in empty)
    assert empty.window.dtype == np.int64
    estimators.update(bar_slice(bars, 0, 50))
    estimators.update(bar_slice(bars, 50, 50))
    tail = estimators.update(bar_slice(bars, 50, 100))
    whole = run(bar_slice(bars, 0, 100), 6)
    for name in EstimatorBlock._fields:
        np.testing.assert_array_equal(getattr(tail, name), whole[name][50:], err_msg=name)


@pytest.mark.parametrize("window", [1, 0, -3])
def test_window_below_two_is_rejected(window: int) -> None:
    with pytest.raises(ValueError, match="window"):
        RollingEstimators(window)


def test_non_integral_window_is_rejected() -> None:
    with pytest.raises(TypeError):
        RollingEstimators(2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("lam", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_lambda_outside_open_unit_interval_is_rejected(lam: float) -> None:
    with pytest.raises(ValueError, match="ewma_lambda"):
        RollingEstimators(5, ewma_lambda=lam)


def test_malformed_block_is_rejected_without_changing_state(bars: BarBlock) -> None:
    estimators = RollingEstimators(4)
    estimators.update(bar_slice(bars, 0, 10))
    ragged = bar_slice(bars, 10, 20)._replace(high=bars.high[10:19])
    with pytest.raises(ValueError, match="shape"):
        estimators.update(ragged)
    two_d = BarBlock(*(field[10:20].reshape(2, 5) for field in bars))
    with pytest.raises(ValueError, match="shape"):
        estimators.update(two_d)
    after = estimators.update(bar_slice(bars, 10, 30))
    whole = run(bar_slice(bars, 0, 30), 4)
    for name in EstimatorBlock._fields:
        np.testing.assert_array_equal(getattr(after, name), whole[name][10:], err_msg=name)


# --- session gaps and close-only bars ----------------------------------------------------------


def marks(n_bars: int, seed: int, probability: float) -> np.ndarray:
    return np.random.default_rng(seed).random(n_bars) < probability


@pytest.mark.parametrize("window", [2, 20])
def test_marked_bars_match_textbook(bars: BarBlock, window: int) -> None:
    # Sparse marks, so that windows with and without a close-only bar both occur often.
    n_bars = 1500
    head = bar_slice(bars, 0, n_bars)
    gaps = marks(n_bars, seed=1, probability=0.05)
    close_only = marks(n_bars, seed=2, probability=0.4 / window)
    expected = textbook(head, window, gaps=gaps.tolist(), close_only=close_only.tolist())
    for splits in (None, list(range(1, 300))):  # one block; then bar by bar, then one block
        got = run(head, window, splits=splits, gaps=gaps, close_only=close_only)
        for name in (*ESTIMATOR_NAMES, "returns"):
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, err_msg=name)
        np.testing.assert_array_equal(got["window"], expected["window"])
        np.testing.assert_array_equal(got["range_missing"], expected["range_missing"])
    missing = np.array(expected["range_missing"])
    assert 0.1 < missing.mean() < 0.9  # the case is not degenerate either way


def test_a_close_only_bar_masks_exactly_the_windows_it_is_in() -> None:
    window, k = 5, 9
    bars = gbm_bars(30, seed=6)
    close_only = np.zeros(30, dtype=bool)
    close_only[k] = True
    marked = run(bars, window, close_only=close_only)
    plain = run(bars, window)
    inside = np.zeros(30, dtype=bool)
    inside[k : k + window] = True  # rows k .. k + W - 1 have bar k in their window
    np.testing.assert_array_equal(marked["range_missing"], inside)
    for name in RANGE_ESTIMATORS:
        assert np.isnan(marked[name][inside]).all(), name
        np.testing.assert_array_equal(marked[name][~inside], plain[name][~inside], err_msg=name)
    for name in ("close_to_close", "ewma", "returns"):  # close-only bars still have a close
        np.testing.assert_array_equal(marked[name], plain[name], err_msg=name)


def test_a_close_only_first_bar_masks_nothing() -> None:
    # The very first bar has no return: its range is in no window.
    bars = gbm_bars(10, seed=7)
    close_only = np.zeros(10, dtype=bool)
    close_only[0] = True
    out = run(bars, 4, close_only=close_only)
    assert not out["range_missing"].any()
    for name in RANGE_ESTIMATORS:
        assert not np.isnan(out[name][2:]).any(), name


def test_close_only_series_has_no_range_estimate_ever() -> None:
    # High and low made up from open and close: Rogers-Satchell would be exactly 0.
    bars = gbm_bars(200, seed=8, wick_probability=0.0)
    out = run(bars, 20, splits=[1, 7, 50], close_only=np.ones(200, dtype=bool))
    assert out["range_missing"][1:].all()
    for name in RANGE_ESTIMATORS:
        assert np.isnan(out[name]).all(), name
    assert not np.isnan(out["close_to_close"][2:]).any()


def test_a_gap_return_is_read_in_session_by_close_to_close_and_ewma_only() -> None:
    # Two sessions of flat-ish bars; between them the price opens 5 % higher.
    n_bars, window = 40, 10
    bars = gbm_bars(n_bars, seed=9, vol=1e-4)
    jump = np.ones(n_bars)
    jump[20:] = 1.05
    bars = BarBlock(*(field * jump for field in bars[:4]), bars.volume)
    gaps = np.zeros(n_bars, dtype=bool)
    gaps[20] = True
    marked = run(bars, window, gaps=gaps)
    plain = run(bars, window)
    # returns stay ln(C_t / C_{t-1}): the 5 % jump is there.
    assert marked["returns"][20] == plain["returns"][20]
    assert marked["returns"][20] > 0.045
    # Unmarked, the jump dominates close_to_close for the W rows whose window holds it.
    rows = slice(20, 20 + window)
    assert (plain["close_to_close"][rows] > 0.01).all()
    assert (marked["close_to_close"][rows] < 1e-3).all()
    assert marked["ewma"][20] < 1e-3 < plain["ewma"][20]
    # Yang-Zhang's overnight term keeps the gap: it is the same with or without the mark.
    np.testing.assert_array_equal(marked["yang_zhang"], plain["yang_zhang"])
    assert (marked["yang_zhang"][rows] > 0.01).all()
    for name in ("parkinson", "garman_klass", "rogers_satchell"):
        np.testing.assert_array_equal(marked[name], plain[name], err_msg=name)


@pytest.mark.parametrize("window", [3, 20])
def test_split_invariance_with_marks(window: int) -> None:
    bars = gbm_bars(20_000, seed=window + 1)
    gaps = marks(bars.n_bars, seed=3, probability=0.01)
    close_only = marks(bars.n_bars, seed=4, probability=0.02)
    whole = run(bars, window, gaps=gaps, close_only=close_only)
    cuts = sorted(np.random.default_rng(5).choice(np.arange(1, 20_000), 40, replace=False))
    pieces = run(bars, window, splits=[1, 2, 3, *cuts], gaps=gaps, close_only=close_only)
    for name in EstimatorBlock._fields:
        np.testing.assert_array_equal(pieces[name], whole[name], err_msg=name)


def test_marks_of_the_wrong_shape_are_rejected_without_changing_state(bars: BarBlock) -> None:
    estimators = RollingEstimators(4)
    estimators.update(bar_slice(bars, 0, 10))
    for bad in ({"gaps": np.zeros(9, dtype=bool)}, {"close_only": np.zeros((2, 5), dtype=bool)}):
        with pytest.raises(ValueError, match="shape"):
            estimators.update(bar_slice(bars, 10, 20), **bad)
    after = estimators.update(bar_slice(bars, 10, 30))
    whole = run(bar_slice(bars, 0, 30), 4)
    for name in EstimatorBlock._fields:
        np.testing.assert_array_equal(getattr(after, name), whole[name][10:], err_msg=name)
