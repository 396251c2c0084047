"""Tests of the simulation models (market/models.py, market/intrabar.py).

Statistics are checked against textbook formulas, and the exact arithmetic against plain-Python
re-implementations written here from the documented equations and seeding scheme (children
0, 1, 2, 3, 4 of ``SeedSequence(seed).spawn(5)`` feed innovations, intrabar path, volume,
heston's variance shocks and the exponentials of the substep extremes). Everything uses fixed
seeds; hypothesis runs derandomised. The range estimators' unbiasedness is in test_ranges.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import FrozenInstanceError

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentspoonsd.market.block import BarBlock
from agentspoonsd.market.models import (
    MODEL_KINDS,
    GarchParams,
    GbmParams,
    GjrGarchParams,
    HestonModel,
    HestonParams,
    Model,
    ModelKind,
    ModelParams,
    VolumeParams,
    make_model,
)

BARS_PER_YEAR = 525_600
STYLISED_BARS = 200_000
PRICE0 = 50_000.0

DEFAULT_PARAMS: dict[ModelKind, ModelParams] = {
    "gbm": GbmParams(),
    "garch": GarchParams(),
    "gjr_garch": GjrGarchParams(),
    "heston": HestonParams(),
}


# ---------------------------------------------------------------- helpers (plain textbook code)


def log_returns(block: BarBlock) -> np.ndarray:
    """r_t = ln(C_t / C_{t-1}), with C_0 the first open."""
    closes = np.concatenate(([block.open[0]], block.close))
    return np.diff(np.log(closes))


def excess_kurtosis(x: np.ndarray) -> float:
    d = x - x.mean()
    return float(np.mean(d**4) / np.mean(d**2) ** 2 - 3.0)


def acf(x: np.ndarray, lag: int) -> float:
    d = x - x.mean()
    return float(np.dot(d[:-lag], d[lag:]) / np.dot(d, d))


def concat(blocks: list[BarBlock]) -> BarBlock:
    return BarBlock(*(np.concatenate(f) for f in zip(*blocks, strict=True)))


def model(
    kind: ModelKind,
    params: ModelParams | None = None,
    seed: int = 7,
    *,
    price: float = PRICE0,
    substeps: int = 16,
    volume: VolumeParams | None = None,
) -> Model:
    return make_model(
        kind,
        params,
        seed=np.random.SeedSequence(seed),
        initial_price=price,
        volume=volume or VolumeParams(),
        substeps=substeps,
    )


@pytest.fixture(scope="module")
def long_runs() -> Callable[[ModelKind], tuple[Model, BarBlock, np.ndarray]]:
    """200k default bars per kind (seed 2024), simulated once per module on first use."""
    cache: dict[ModelKind, tuple[Model, BarBlock, np.ndarray]] = {}

    def get(kind: ModelKind) -> tuple[Model, BarBlock, np.ndarray]:
        if kind not in cache:
            m = model(kind, seed=2024)
            block = m.simulate(STYLISED_BARS)
            cache[kind] = (m, block, log_returns(block))
        return cache[kind]

    return get


def assert_bar_invariants(block: BarBlock, first_open: float) -> None:
    o, h, lo, c, v = block
    for a in block:
        assert a.dtype == np.float64
        assert a.shape == c.shape
        assert np.isfinite(a).all()
    assert (lo > 0).all()
    assert (lo <= np.minimum(o, c)).all()
    assert (np.maximum(o, c) <= h).all()
    assert (v >= 0).all()
    assert o[0] == first_open
    assert np.array_equal(o[1:], c[:-1])


# ---------------------------------------------------------------- defaults and stylised facts


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_default_volatility_is_a_liquid_crypto_pair(kind: ModelKind) -> None:
    sd = math.sqrt(DEFAULT_PARAMS[kind].unconditional_variance)
    assert 0.0007 <= sd <= 0.0011
    assert 0.50 <= sd * math.sqrt(BARS_PER_YEAR) <= 0.80


def test_default_moment_conditions() -> None:
    g, j, h = GarchParams(), GjrGarchParams(), HestonParams()
    k = 3 + 6 / (g.nu - 4)  # kurtosis of a unit-variance t(nu)
    assert g.beta**2 + 2 * g.alpha * g.beta + k * g.alpha**2 < 1
    assert g.fourth_moment_finite and j.fourth_moment_finite
    assert not GarchParams(alpha=0.3, beta=0.65).fourth_moment_finite
    assert not GarchParams(nu=4.0).fourth_moment_finite
    assert h.feller_ratio == pytest.approx(2 * h.kappa * h.theta / h.xi**2)
    assert h.feller_ratio > 1
    assert h.rho < 0
    assert h.initial_variance == h.theta
    assert HestonParams(v0=2e-6).initial_variance == 2e-6


# Relative tolerance of the sample variance vs the unconditional variance over 200k bars. GBM:
# SE = sqrt(2/N) = 0.3 %. The others: fat tails and persistent variance widen it to a few %
# (about 2-4 % over seeds for these defaults), so 8 % is a safe but still meaningful bound.
VARIANCE_TOLERANCE: dict[ModelKind, float] = {
    "gbm": 0.015,
    "garch": 0.08,
    "gjr_garch": 0.08,
    "heston": 0.08,
}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_stylised_facts(kind: ModelKind, long_runs) -> None:
    m, _, r = long_runs(kind)
    assert r.shape == (STYLISED_BARS,)
    uv = DEFAULT_PARAMS[kind].unconditional_variance
    assert np.var(r) == pytest.approx(uv, rel=VARIANCE_TOLERANCE[kind])
    kurt = excess_kurtosis(r)
    acfs = [acf(r * r, lag) for lag in range(1, 6)]
    if kind == "gbm":
        assert abs(kurt) < 0.06  # SE sqrt(24/N) = 0.011
        assert max(abs(a) for a in acfs) < 0.015  # SE 1/sqrt(N) = 0.0022
    else:
        assert kurt > 1
        assert min(acfs) > 0.05
    assert np.isfinite(m.conditional_variance) and m.conditional_variance > 0


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_volume_clusters_with_volatility(kind: ModelKind, long_runs) -> None:
    _, block, r = long_runs(kind)
    v = block.volume
    # Volume is driven by |r|, so it follows the size of the move...
    assert np.corrcoef(np.abs(r), v)[0, 1] > 0.3
    # ...and inherits volatility clustering (none for GBM, whose |r| is i.i.d.).
    if kind == "gbm":
        assert abs(acf(v, 1)) < 0.015
        assert v.mean() == pytest.approx(1.0, rel=0.01)  # E|z| normalisation is exact here
    else:
        assert acf(v, 1) > 0.03
        assert v.mean() == pytest.approx(1.0, rel=0.1)


def leverage_ratio(r: np.ndarray) -> float:
    """E[r_t² | r_{t-1} < 0] / E[r_t² | r_{t-1} > 0]."""
    r2 = r[1:] ** 2
    return float(r2[r[:-1] < 0].mean() / r2[r[:-1] > 0].mean())


def gjr_theoretical_ratio(p: GjrGarchParams) -> float:
    # Symmetric z independent of sigma_t: E[r²|r<0] = E[r²|r>0] = E[sigma²] = s.
    s = p.omega / (1 - p.alpha - p.gamma / 2 - p.beta)
    return (p.omega + (p.alpha + p.gamma + p.beta) * s) / (p.omega + (p.alpha + p.beta) * s)


def test_gjr_leverage(long_runs) -> None:
    _, _, r_gjr = long_runs("gjr_garch")
    _, _, r_garch = long_runs("garch")
    expected = gjr_theoretical_ratio(GjrGarchParams())  # 1.051
    ratio = leverage_ratio(r_gjr)
    assert ratio > 1 + (expected - 1) / 2
    assert ratio == pytest.approx(expected, abs=0.03)
    assert leverage_ratio(r_garch) == pytest.approx(1.0, abs=0.03)

    strong = GjrGarchParams(omega=2e-8, alpha=0.0, gamma=0.15, beta=0.9)
    r = log_returns(model("gjr_garch", strong, seed=5).simulate(STYLISED_BARS))
    assert leverage_ratio(r) == pytest.approx(gjr_theoretical_ratio(strong), abs=0.05)  # 1.16


def test_heston_mean_variance_is_theta(long_runs) -> None:
    _, _, r = long_runs("heston")
    theta = HestonParams().theta
    assert np.mean(r * r) == pytest.approx(theta, rel=0.06)
    # Over 2,000 blocks of 100 bars the sampled instantaneous variance averages theta too.
    h = model("heston", seed=11, substeps=4)
    assert isinstance(h, HestonModel)
    samples = []
    for _ in range(2_000):
        h.simulate(100)
        samples.append(h.instantaneous_variance)
    assert np.mean(samples) == pytest.approx(theta, rel=0.1)


def test_heston_leverage_sign_follows_rho(long_runs) -> None:
    _, _, r = long_runs("heston")
    # Corr(r_t, r²_{t+1}) ≈ rho·xi / sqrt(theta·(3c + 2)) ≈ -0.033 for the defaults.
    assert np.corrcoef(r[:-1], r[1:] ** 2)[0, 1] < -0.015
    flipped = HestonParams(rho=0.4)
    r_pos = log_returns(model("heston", flipped, seed=2024).simulate(100_000))
    assert np.corrcoef(r_pos[:-1], r_pos[1:] ** 2)[0, 1] > 0.015


def test_heston_conditional_variance() -> None:
    p = HestonParams(v0=3e-6)
    h = model("heston", p)
    assert isinstance(h, HestonModel)
    # E[∫_0^1 v dt] for a CIR process started at v0.
    expected = p.theta + (3e-6 - p.theta) * (1 - math.exp(-p.kappa)) / p.kappa
    assert h.conditional_variance == pytest.approx(expected, rel=1e-12)
    assert model("heston").conditional_variance == pytest.approx(p.theta, rel=1e-15)


def test_gbm_range_has_the_law_of_a_continuous_brownian_path() -> None:
    """E[ln(H/L)²] = 4·ln 2·sigma² for Brownian motion (Feller 1951; Parkinson's constant). The
    relative sd of ln(H/L)² is ~0.6, so over 40,000 bars its SE is 0.3 %; a 16-point sampled path
    would read ~28 % low (the excursions between points missed). Even with substeps = 1 the
    wicks extend past the body."""
    sigma = 0.001
    block = model("gbm", GbmParams(sigma=sigma), seed=3, substeps=16).simulate(40_000)
    got = np.mean(np.log(block.high / block.low) ** 2)
    assert got == pytest.approx(4 * math.log(2) * sigma**2, rel=0.015)

    one = model("gbm", seed=3, substeps=1).simulate(1000)
    assert (one.high > np.maximum(one.open, one.close)).mean() > 0.99
    assert (one.low < np.minimum(one.open, one.close)).mean() > 0.99


# ---------------------------------------------------------------- exact arithmetic vs references


def unit_t_mean_abs(nu: float) -> float:
    return (
        2
        * math.sqrt(nu - 2)
        * math.gamma((nu + 1) / 2)
        / (math.sqrt(math.pi) * (nu - 1) * math.gamma(nu / 2))
    )


def reference_bars(
    kind: ModelKind, p: ModelParams, seed: int, n_bars: int, substeps: int, vol: VolumeParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Plain per-bar, per-substep loops straight from the model equations."""
    innov, path, noise, var_shocks, extremes = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    rows = []
    prev_close, log_price = PRICE0, math.log(PRICE0)
    if isinstance(p, HestonParams):
        v = p.initial_variance
        long_run, mean_abs = p.theta, math.sqrt(2 / math.pi)
    elif isinstance(p, GbmParams):
        long_run, mean_abs = p.sigma**2, math.sqrt(2 / math.pi)
    else:
        long_run = p.unconditional_variance
        sigma2 = long_run
        mean_abs = unit_t_mean_abs(p.nu)
    for _ in range(n_bars):
        if isinstance(p, HestonParams):
            dt = 1 / substeps
            x, points, step_vars = 0.0, [0.0], []
            for _ in range(substeps):
                z1, z2 = innov.standard_normal(), var_shocks.standard_normal()
                vp = max(v, 0.0)
                x += p.mu * dt + math.sqrt(vp * dt) * z1
                v += p.kappa * (p.theta - vp) * dt + p.xi * math.sqrt(vp * dt) * (
                    p.rho * z1 + math.sqrt(1 - p.rho**2) * z2
                )
                points.append(x)
                step_vars.append(vp * dt)
            r = x
        else:
            if isinstance(p, GbmParams):
                bar_var = p.sigma**2
                r = p.mu + p.sigma * innov.standard_normal()
            else:
                bar_var = sigma2
                r = math.sqrt(sigma2) * innov.standard_t(p.nu) * math.sqrt((p.nu - 2) / p.nu)
                if isinstance(p, GjrGarchParams):
                    lev = p.gamma if r < 0 else 0.0
                    sigma2 = p.omega + (p.alpha + lev) * r * r + p.beta * sigma2
                else:
                    sigma2 = p.omega + p.alpha * r * r + p.beta * sigma2
            steps = path.standard_normal(substeps) * math.sqrt(bar_var / substeps)
            walk = np.cumsum(steps)
            interior = [walk[k - 1] - k / substeps * (walk[-1] - r) for k in range(1, substeps)]
            points = [0.0, *interior, r]
            step_vars = [bar_var / substeps] * substeps
        # The exact extremes of the Brownian bridge between consecutive points: invert
        # P(max > m) = exp(-2 (m - a)(m - b) / v) with U = exp(-E); the minimum symmetrically.
        e_max, e_min = (
            extremes.standard_exponential(substeps),
            extremes.standard_exponential(substeps),
        )
        top = bottom = 0.0
        for k in range(substeps):
            a, b, var = points[k], points[k + 1], step_vars[k]
            top = max(top, a, b, (a + b + math.sqrt((b - a) ** 2 + 2 * var * e_max[k])) / 2)
            bottom = min(bottom, a, b, (a + b - math.sqrt((b - a) ** 2 + 2 * var * e_min[k])) / 2)
        log_open = log_price
        log_price += r
        close = math.exp(log_price)
        high = max(prev_close, close, math.exp(log_open + top))
        low = min(prev_close, close, math.exp(log_open + bottom))
        s = vol.dispersion
        volume = (
            vol.scale
            * (0.5 + abs(r) / math.sqrt(long_run))
            / (0.5 + mean_abs)
            * math.exp(s * noise.standard_normal() - s * s / 2)
        )
        rows.append((prev_close, high, low, close, volume))
        prev_close = close
    if isinstance(p, HestonParams):
        vp = max(v, 0.0)
        next_var = p.theta + (vp - p.theta) * (1 - math.exp(-p.kappa)) / p.kappa
    elif isinstance(p, GbmParams):
        next_var = p.sigma**2
    else:
        next_var = sigma2
    o, h, lo, c, vv = (np.array(col) for col in zip(*rows, strict=True))
    return o, h, lo, c, vv, next_var


REFERENCE_CASES: list[tuple[ModelKind, ModelParams, int]] = [
    ("gbm", GbmParams(mu=2e-5, sigma=0.002), 16),
    ("garch", GarchParams(), 16),
    ("garch", GarchParams(omega=1e-7, alpha=0.2, beta=0.75, nu=3.5), 5),
    ("gjr_garch", GjrGarchParams(), 16),
    ("gjr_garch", GjrGarchParams(alpha=0.1, gamma=-0.05, beta=0.8), 3),
    ("heston", HestonParams(), 16),
    ("heston", HestonParams(kappa=0.5, xi=2e-3, rho=0.7, v0=0.0, mu=1e-5), 4),
]


@pytest.mark.parametrize(("kind", "params", "substeps"), REFERENCE_CASES)
def test_matches_plain_reference(kind: ModelKind, params: ModelParams, substeps: int) -> None:
    vol = VolumeParams(scale=3.0, dispersion=0.7)
    m = model(kind, params, seed=321, substeps=substeps, volume=vol)
    block = concat([m.simulate(150), m.simulate(250)])
    o, h, lo, c, v, next_var = reference_bars(kind, params, 321, 400, substeps, vol)
    # The reference uses math.exp/log and per-bar loops, so it agrees to rounding, not bits.
    for got, want in zip(block, (o, h, lo, c, v), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)
    assert m.conditional_variance == pytest.approx(next_var, rel=1e-9)
    assert m.last_close == block.close[-1]


# ---------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_same_seed_same_bars_different_seed_different_bars(kind: ModelKind) -> None:
    seed = np.random.SeedSequence(1234)
    a = make_model(kind, seed=seed, initial_price=PRICE0).simulate(500)
    # Reusing the very same SeedSequence object must reproduce: the model does not mutate it.
    b = make_model(kind, seed=seed, initial_price=PRICE0).simulate(500)
    c = make_model(kind, seed=np.random.SeedSequence(1234), initial_price=PRICE0).simulate(500)
    d = make_model(kind, seed=np.random.SeedSequence(1235), initial_price=PRICE0).simulate(500)
    for x, y, z in zip(a, b, c, strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    assert seed.n_children_spawned == 0
    assert not np.array_equal(a.close, d.close)
    assert not np.array_equal(a.volume, d.volume)
    assert not np.array_equal(a.high, d.high)


def assert_same(a: BarBlock, b: BarBlock) -> None:
    for name, x, y in zip(BarBlock._fields, a, b, strict=True):
        assert np.array_equal(x, y), name


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_split_invariance(kind: ModelKind) -> None:
    # 20_000 + 30_000 crosses the model's internal chunk boundaries at different places than
    # 50_000 in one call does; the 1-bar calls exercise the smallest blocks.
    whole_model = model(kind, seed=77)
    whole = whole_model.simulate(50_007)
    parts_model = model(kind, seed=77)
    parts = concat(
        [parts_model.simulate(n) for n in (1, 1, 3, 20_000, 1, 30_000, 1)],
    )
    assert_same(whole, parts)
    assert whole_model.last_close == parts_model.last_close
    assert whole_model.conditional_variance == parts_model.conditional_variance


def block_sizes(total: int) -> st.SearchStrategy[list[int]]:
    cuts = st.lists(st.integers(1, total - 1), max_size=6, unique=True)
    return cuts.map(lambda cs: np.diff([0, *sorted(cs), total]).tolist())


@st.composite
def any_model_params(draw: st.DrawFn) -> tuple[ModelKind, ModelParams]:
    kind: ModelKind = draw(st.sampled_from(MODEL_KINDS))
    log_uniform = st.floats(-10, -4).map(lambda e: 10.0**e)  # per-bar variance 1e-10 .. 1e-4
    if kind == "gbm":
        return kind, GbmParams(mu=draw(st.floats(-1e-4, 1e-4)), sigma=math.sqrt(draw(log_uniform)))
    if kind == "garch":
        persistence = draw(st.floats(0.0, 0.999))
        alpha = persistence * draw(st.floats(0.0, 0.3))
        return kind, GarchParams(
            omega=draw(log_uniform) * (1 - persistence),
            alpha=alpha,
            beta=persistence - alpha,
            nu=draw(st.floats(2.5, 60.0)),
        )
    if kind == "gjr_garch":
        alpha = draw(st.floats(0.0, 0.2))
        gamma = draw(st.floats(-alpha, 0.3))
        room = 0.999 - alpha - gamma / 2
        return kind, GjrGarchParams(
            omega=draw(log_uniform) * 0.01,
            alpha=alpha,
            gamma=gamma,
            beta=max(0.0, room * draw(st.floats(0.0, 1.0))),
            nu=draw(st.floats(2.5, 60.0)),
        )
    kappa = draw(st.floats(1e-3, 1.0))
    theta = draw(log_uniform)
    feller_inverse = draw(st.floats(0.0, 5.0))  # > 1 violates Feller: truncation is exercised
    return kind, HestonParams(
        kappa=kappa,
        theta=theta,
        xi=math.sqrt(2 * kappa * theta * feller_inverse),
        rho=draw(st.floats(-1.0, 1.0)),
        v0=draw(st.none() | st.floats(0.0, 10.0).map(lambda f: f * theta)),
        mu=draw(st.floats(-1e-4, 1e-4)),
    )


BARS_PER_EXAMPLE = 25_000
INVARIANT_EXAMPLES = 42


def test_ohlc_invariants_property() -> None:
    """Random valid parameters, seeds, prices, volume settings and block splits; >= 1M bars."""
    simulated: list[int] = []
    kinds: set[str] = set()

    @settings(
        max_examples=INVARIANT_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        spec=any_model_params(),
        seed=st.integers(0, 2**63),
        price=st.floats(1e-3, 1e6),
        volume=st.builds(VolumeParams, st.floats(1e-3, 1e6), st.floats(0.0, 2.0)),
        substeps=st.integers(1, 32),
        sizes=block_sizes(BARS_PER_EXAMPLE),
    )
    def check(spec, seed, price, volume, substeps, sizes) -> None:
        kind, params = spec
        m = make_model(
            kind,
            params,
            seed=np.random.SeedSequence(seed),
            initial_price=price,
            volume=volume,
            substeps=substeps,
        )
        blocks = [m.simulate(n) for n in sizes]
        block = concat(blocks)
        assert [b.n_bars for b in blocks] == sizes
        assert block.n_bars == BARS_PER_EXAMPLE
        assert_bar_invariants(block, price)
        assert m.last_close == block.close[-1]
        assert math.isfinite(m.conditional_variance) and m.conditional_variance >= 0
        simulated.append(block.n_bars)
        kinds.add(kind)

    check()
    assert sum(simulated) >= 1_000_000
    assert kinds == set(MODEL_KINDS)


def test_split_invariance_property() -> None:
    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(
        spec=any_model_params(),
        seed=st.integers(0, 2**63),
        substeps=st.integers(1, 20),
        sizes=block_sizes(600),
    )
    def check(spec, seed, substeps, sizes) -> None:
        kind, params = spec
        a = model(kind, params, seed=seed, substeps=substeps)
        b = model(kind, params, seed=seed, substeps=substeps)
        assert_same(a.simulate(600), concat([b.simulate(n) for n in sizes]))
        assert a.conditional_variance == b.conditional_variance

    check()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: GbmParams(sigma=0.0), "sigma"),
        (lambda: GbmParams(sigma=math.nan), "sigma"),
        (lambda: GbmParams(mu=math.inf), "mu"),
        (lambda: GarchParams(omega=0.0), "omega"),
        (lambda: GarchParams(alpha=-0.01), "alpha"),
        (lambda: GarchParams(beta=-0.01), "beta"),
        (lambda: GarchParams(alpha=0.1, beta=0.9), "alpha + beta"),
        (lambda: GarchParams(nu=2.0), "nu"),
        (lambda: GjrGarchParams(alpha=0.05, gamma=-0.06), "alpha + gamma"),
        (lambda: GjrGarchParams(alpha=0.05, gamma=0.1, beta=0.9), "alpha + gamma/2 + beta"),
        (lambda: GjrGarchParams(omega=-1.0), "omega"),
        (lambda: GjrGarchParams(nu=1.0), "nu"),
        (lambda: HestonParams(kappa=0.0), "kappa"),
        (lambda: HestonParams(kappa=1.5), "kappa"),
        (lambda: HestonParams(theta=0.0), "theta"),
        (lambda: HestonParams(xi=-1e-4), "xi"),
        (lambda: HestonParams(rho=-1.01), "rho"),
        (lambda: HestonParams(v0=-1e-9), "v0"),
        (lambda: HestonParams(mu=math.nan), "mu"),
        (lambda: VolumeParams(scale=0.0), "scale"),
        (lambda: VolumeParams(dispersion=-0.1), "dispersion"),
    ],
)
def test_params_validation(factory: Callable[[], object], name: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} must")):
        factory()


def test_params_are_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        GarchParams().alpha = 0.5  # type: ignore[misc]


def test_make_model_validation() -> None:
    seed = np.random.SeedSequence(0)
    with pytest.raises(TypeError, match="GarchParams"):
        make_model("garch", GjrGarchParams(), seed=seed, initial_price=1.0)
    with pytest.raises(TypeError, match="HestonParams"):
        make_model("heston", GbmParams(), seed=seed, initial_price=1.0)
    with pytest.raises(ValueError, match="kind"):
        make_model("arima", seed=seed, initial_price=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        make_model("gbm", seed=42, initial_price=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="volume"):
        make_model("gbm", seed=seed, initial_price=1.0, volume=None)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="initial_price"):
            make_model("gbm", seed=seed, initial_price=bad)
    for bad_steps in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="substeps"):
            make_model("gbm", seed=seed, initial_price=1.0, substeps=bad_steps)  # type: ignore[arg-type]
    m = make_model("gbm", seed=seed, initial_price=1.0)
    with pytest.raises(ValueError, match="n_bars"):
        m.simulate(0)
    with pytest.raises(TypeError, match="n_bars"):
        m.simulate(2.0)  # type: ignore[arg-type]
    assert m.simulate(np.int64(3)).n_bars == 3


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_basics(kind: ModelKind) -> None:
    m = model(kind, price=123.5)
    assert m.kind == kind
    assert m.last_close == 123.5
    first = m.simulate(1)
    assert first.n_bars == 1 and first.open[0] == 123.5
    assert m.last_close == first.close[0]
    second = m.simulate(2)
    assert second.open[0] == first.close[0]


def test_overflow_is_reported_and_the_model_retired() -> None:
    m = model("gbm", GbmParams(mu=1.0, sigma=1e-3), price=1.0)
    m.simulate(600)
    with pytest.raises(OverflowError):
        m.simulate(200)
    with pytest.raises(RuntimeError):
        m.simulate(1)
