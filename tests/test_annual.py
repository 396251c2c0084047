"""Yearly model parameters scaled to the bar (`market/annual.py`), and what the models then
produce: the same annualised volatility whatever `interval` and `bar_seconds` are.

The statistical checks use fixed seeds and 100,000 bars per case, simulated by the models
directly (vectorised numpy; the pipeline adds nothing to close-to-close); the annualisation
factor is built from the formula, not taken from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from agentspoonsd.market import annual, models
from agentspoonsd.market.generator import build_model
from agentspoonsd.settings import GeneratorSettings

YEAR = 365 * 86400.0
MINUTE_BARS = annual.BarTime(bar_seconds=60.0, seconds_per_year=YEAR)
PAIRS = [(2.0, None), (2.0, 60.0), (1.0, 300.0)]  # (interval, bar_seconds); None: real time


def annualised_close_to_close(settings: GeneratorSettings, bars: int) -> float:
    block = build_model(settings.spec(), "BTC/USD").simulate(bars)
    returns = np.diff(np.log(np.concatenate(([block.open[0]], block.close))))
    return float(np.std(returns, ddof=1) * math.sqrt(365 * 86400 / settings.bar_seconds))


# --- the conversion ------------------------------------------------------------------------------


def test_default_yearly_tables_are_the_former_per_bar_defaults_on_one_minute_bars() -> None:
    """At 1-minute bars the yearly defaults reproduce the per-bar defaults of the models (the
    behaviour before parameters were yearly), to the rounding of the yearly figures."""
    defaults = GeneratorSettings(bar_seconds=60.0)
    for kind, params in [
        ("gbm", models.GbmParams()),
        ("garch", models.GarchParams()),
        ("gjr_garch", models.GjrGarchParams()),
        ("heston", models.HestonParams()),
    ]:
        got = defaults.model_copy(update={"model": kind}).params_for("BTC/USD")
        for name in params.__slots__:  # type: ignore[attr-defined]
            want, value = getattr(params, name), getattr(got, name)
            if want is None or want == 0:
                assert value == want, (kind, name)
            else:  # 0.65 stands for 0.0009 x sqrt(525,600) = 0.6525
                assert value == pytest.approx(want, rel=8e-3), (kind, name)


def test_gbm_is_scaled_exactly() -> None:
    t = annual.BarTime(bar_seconds=300.0, seconds_per_year=252 * 6.5 * 3600)
    p = t.periods_per_year
    assert p == pytest.approx(252 * 78)
    params = annual.gbm_params(t, annual_volatility=0.2, annual_drift=0.05)
    assert params.sigma == pytest.approx(0.2 / math.sqrt(p), rel=1e-15)
    assert params.mu == pytest.approx(0.05 / p, rel=1e-15)


@pytest.mark.parametrize("bar_seconds", [0.5, 2.0, 60.0, 3600.0, 86400.0])
def test_garch_long_run_variance_and_half_life_hold_at_every_bar(bar_seconds: float) -> None:
    t = annual.BarTime(bar_seconds=bar_seconds, seconds_per_year=YEAR)
    g = annual.garch_params(t, annual_volatility=0.8, half_life=1800.0, reaction=0.3, nu=6.0)
    # Long-run per-bar variance x bars per year = the annual variance.
    assert g.unconditional_variance * t.periods_per_year == pytest.approx(0.64, rel=1e-12)
    # A shock decays by half in 1800 s of market time: (alpha + beta) per bar, compounded.
    assert g.persistence ** (1800.0 / bar_seconds) == pytest.approx(0.5, rel=1e-9)
    assert g.alpha >= 0 and g.beta >= 0


def test_garch_kurtosis_does_not_depend_on_the_bar() -> None:
    """alpha = reaction x sqrt(1 - p²) keeps p² + (E[z⁴] - 1)·alpha² - 1 proportional to 1 - p²,
    so the kurtosis of returns, k(1 - p²)/(1 - p² - (k - 1)alpha²), is the same at every bar
    while bars are shorter than the half-life (alpha <= p)."""
    k = 3.0 + 6.0 / (8.0 - 4.0)  # unit Student-t(8)
    kurtoses = []
    for bar_seconds in (1.0, 2.0, 60.0, 600.0):
        t = annual.BarTime(bar_seconds=bar_seconds, seconds_per_year=YEAR)
        g = annual.garch_params(t, annual_volatility=0.6, half_life=2000.0, reaction=0.35, nu=8.0)
        assert g.fourth_moment_finite
        p2 = g.persistence**2
        kurtoses.append(k * (1 - p2) / (1 - p2 - (k - 1) * g.alpha**2))
    assert kurtoses == pytest.approx([k / (1 - (k - 1) * 0.35**2)] * 4, rel=1e-9)


def test_a_bar_longer_than_the_half_life_keeps_beta_non_negative() -> None:
    t = annual.BarTime(bar_seconds=86400.0, seconds_per_year=YEAR)
    g = annual.garch_params(t, annual_volatility=0.6, half_life=40_000.0, reaction=0.9, nu=8.0)
    assert g.beta == pytest.approx(0.0, abs=1e-15) and g.alpha == pytest.approx(g.persistence)
    gjr = annual.gjr_garch_params(
        t, annual_volatility=0.6, half_life=40_000.0, reaction=0.5, leverage=0.8, nu=8.0
    )
    assert gjr.beta == pytest.approx(0.0, abs=1e-15)
    assert gjr.alpha + gjr.gamma / 2 == pytest.approx(gjr.persistence)


def test_heston_is_scaled_in_time_and_keeps_its_feller_ratio() -> None:
    ratios = []
    for bar_seconds in (2.0, 60.0, 900.0):
        t = annual.BarTime(bar_seconds=bar_seconds, seconds_per_year=YEAR)
        h = annual.heston_params(
            t, annual_volatility=0.7, half_life=3600.0, vol_of_vol=50.0, rho=-0.5,
            initial_volatility=0.9, annual_drift=0.1,
        )  # fmt: skip
        assert h.theta * t.periods_per_year == pytest.approx(0.49, rel=1e-12)
        assert h.initial_variance * t.periods_per_year == pytest.approx(0.81, rel=1e-12)
        assert math.exp(-h.kappa * 3600.0 / bar_seconds) == pytest.approx(0.5, rel=1e-12)
        assert h.mu * t.periods_per_year == pytest.approx(0.1, rel=1e-12)
        ratios.append(h.feller_ratio)
    assert ratios == pytest.approx([ratios[0]] * 3, rel=1e-9)


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (lambda t: annual.gbm_params(t, annual_volatility=0.0), "annual_volatility"),
        (
            lambda t: annual.garch_params(
                t, annual_volatility=0.5, half_life=1e300, reaction=0.1, nu=8.0
            ),
            "half_life",
        ),
        (
            lambda t: annual.garch_params(
                t, annual_volatility=0.5, half_life=600.0, reaction=1.5, nu=8.0
            ),
            "reaction",
        ),
        (
            lambda t: annual.gjr_garch_params(
                t, annual_volatility=0.5, half_life=600.0, reaction=0.1, leverage=-0.2, nu=8.0
            ),
            "leverage",
        ),
        (
            lambda t: annual.heston_params(
                t, annual_volatility=0.5, half_life=30.0, vol_of_vol=1.0, rho=0.0
            ),
            "half_life",
        ),
    ],
)
def test_an_impossible_yearly_parameter_names_its_key(call: object, key: str) -> None:
    with pytest.raises(annual.YearlyParamError) as error:
        call(MINUTE_BARS)  # type: ignore[operator]
    assert error.value.key == key and str(error.value).startswith(f"{key}: ")


# --- the annualised volatility the models produce ------------------------------------------------


@pytest.mark.parametrize(("interval", "bar_seconds"), PAIRS)
def test_gbm_annualised_close_to_close_is_the_configured_volatility(
    interval: float, bar_seconds: float | None
) -> None:
    settings = GeneratorSettings(
        model="gbm", interval=interval, bar_seconds=bar_seconds, seed=101, substeps=1,
        gbm={"annual_volatility": 0.55},
    )  # fmt: skip
    assert annualised_close_to_close(settings, 100_000) == pytest.approx(0.55, rel=0.02)


@pytest.mark.parametrize("model", ["garch", "gjr_garch"])
@pytest.mark.parametrize(("interval", "bar_seconds"), [(2.0, 60.0), (1.0, 300.0), (5.0, 900.0)])
def test_garch_annualised_close_to_close_is_the_long_run_volatility(
    model: str, interval: float, bar_seconds: float
) -> None:
    # A 10-minute half-life: 100,000 bars span thousands of half-lives at each bar length, so
    # the sampling error of the persistent variance stays small: over 20 seeds the standard
    # deviation of this estimate was 0.65 % (60 s bars, GARCH) to 1.0 % (60 s bars, GJR).
    settings = GeneratorSettings(
        model=model,  # type: ignore[arg-type]
        interval=interval, bar_seconds=bar_seconds, seed=202, substeps=1,
        **{model: {"annual_volatility": 0.7, "half_life": 600.0}},  # type: ignore[arg-type]
    )  # fmt: skip
    assert annualised_close_to_close(settings, 100_000) == pytest.approx(0.7, rel=0.02)
