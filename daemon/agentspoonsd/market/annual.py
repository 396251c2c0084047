"""Model parameters given per year, turned into the per-bar parameters the models run on.

Pure: no I/O, no settings. The operator states what a quant states (an annual volatility, how
long a volatility shock lasts in market time); `per_bar_params` scales it to one bar of
``bar_seconds`` in a year of ``seconds_per_year`` market seconds, so that changing the bar length
(``[generator] bar_seconds``, ``interval``) leaves the annualised volatility of the simulated
series unchanged. With ``P = seconds_per_year / bar_seconds`` bars per year:

- gbm: ``sigma = annual_volatility / sqrt(P)``, ``mu = annual_drift / P`` (drift of the log
  price). Exact: a sum of P i.i.d. bar returns has the annual variance and drift.
- garch, gjr_garch: per-bar persistence ``p = 0.5 ** (bar_seconds / half_life)`` (a variance
  shock halves in ``half_life`` market seconds, whatever the bar);
  ``alpha = reaction · s`` (gjr: ``gamma = leverage · s``) with ``s = sqrt(1 - p²)``;
  ``beta = p - alpha`` (gjr: ``p - alpha - gamma / 2``); ``omega = v · (1 - p)`` with
  ``v = annual_volatility² / P``, the long-run per-bar variance. So the unconditional variance
  per bar is exactly v (P bars make the annual variance), and the kurtosis of the bar returns,
  ``E[z⁴] / (1 - (E[z⁴] - 1) · reaction²)`` for garch, does not depend on the bar length either
  (finite when ``reaction² < 1 / (E[z⁴] - 1)``, at every bar length). ``s`` shrinks like
  ``sqrt(bar_seconds)`` for short bars, as in Nelson's (1990) diffusion limit of GARCH; a
  reaction that kept ``alpha`` itself (or ``alpha / p``) fixed would make short bars ever more
  fat-tailed: at 2 s bars and a 34-minute half-life, ``alpha = 0.07`` has an infinite fourth
  moment, and the close-to-close volatility of 100,000 bars read 35–53 % below the configured
  one for 4 of 5 seeds (this scaling: −9 % to +18 %, centred, the spread being that of a
  variance whose half-life is 1,000 bars). When bars are longer than about a half-life, ``s`` is
  capped so that ``beta >= 0`` (alpha at most p).
- heston: the variance follows ``dV = k (V̄ - V) dt + vol_of_vol sqrt(V) dW`` with t in years;
  per bar (the model's unit of time): ``theta = annual_volatility² / P``,
  ``kappa = ln 2 * bar_seconds / half_life``, ``xi = vol_of_vol / P``,
  ``v0 = initial_volatility² / P``, ``mu = annual_drift / P``. The Feller ratio
  ``2·kappa·theta / xi²`` is the same at every bar length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .params import (
    GarchParams,
    GbmParams,
    GjrGarchParams,
    HestonParams,
    ModelKind,
    ModelParams,
)

__all__ = [
    "BarTime",
    "YearlyParamError",
    "garch_params",
    "gbm_params",
    "gjr_garch_params",
    "heston_params",
    "per_bar_params",
]


class YearlyParamError(ValueError):
    """A yearly parameter cannot make a valid per-bar model at this bar length. `key` names it
    (e.g. ``half_life``), so a config loader can point at the operator's key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class BarTime:
    """The length of one bar and of one year, both in market seconds (> 0, finite)."""

    bar_seconds: float
    seconds_per_year: float

    def __post_init__(self) -> None:
        for name in ("bar_seconds", "seconds_per_year"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    @property
    def periods_per_year(self) -> float:
        """P: bars per year, the factor between per-bar and annual variances."""
        return self.seconds_per_year / self.bar_seconds

    def variance_per_bar(self, annual_volatility: float) -> float:
        """The per-bar variance whose P-bar sum is `annual_volatility`²."""
        return annual_volatility * annual_volatility / self.periods_per_year

    def persistence(self, half_life: float) -> float:
        """The per-bar factor by which a shock decays when it halves in `half_life` seconds."""
        return math.pow(0.5, self.bar_seconds / half_life)


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise YearlyParamError(key, f"must be a finite number > 0, got {value!r}")


def gbm_params(t: BarTime, *, annual_volatility: float, annual_drift: float = 0.0) -> GbmParams:
    """GBM per bar: ``sigma = annual_volatility / sqrt(P)``, ``mu = annual_drift / P``."""
    _positive("annual_volatility", annual_volatility)
    return GbmParams(
        mu=annual_drift / t.periods_per_year,
        sigma=annual_volatility / math.sqrt(t.periods_per_year),
    )


def _reaction_scale(p: float, share: float) -> float:
    """``sqrt(1 - p²)``, capped so that ``share × it <= p`` (beta stays >= 0)."""
    s = math.sqrt(1.0 - p * p)
    return min(s, p / share) if share > 0 else s


def _garch_persistence(t: BarTime, half_life: float) -> float:
    _positive("half_life", half_life)
    p = t.persistence(half_life)
    if p >= 1.0:  # bar_seconds / half_life below float resolution: a unit root
        raise YearlyParamError(
            "half_life",
            f"{half_life!r} s is too long for bars of {t.bar_seconds!r} s"
            " (the per-bar persistence rounds to 1)",
        )
    return p


def garch_params(
    t: BarTime, *, annual_volatility: float, half_life: float, reaction: float, nu: float
) -> GarchParams:
    """GARCH(1,1) per bar (see the module docstring); `reaction` in [0, 1]."""
    _positive("annual_volatility", annual_volatility)
    if not (0.0 <= reaction <= 1.0):
        raise YearlyParamError("reaction", f"must be in [0, 1], got {reaction!r}")
    p = _garch_persistence(t, half_life)
    alpha = reaction * _reaction_scale(p, reaction)
    return GarchParams(
        omega=t.variance_per_bar(annual_volatility) * (1.0 - p),
        alpha=alpha,
        beta=max(p - alpha, 0.0),  # reaction = 1: p - p may round below 0
        nu=nu,
    )


def gjr_garch_params(
    t: BarTime,
    *,
    annual_volatility: float,
    half_life: float,
    reaction: float,
    leverage: float,
    nu: float,
) -> GjrGarchParams:
    """GJR-GARCH(1,1) per bar: ``alpha = reaction·s``, ``gamma = leverage·s``,
    ``beta = p - alpha - gamma/2`` (see the module docstring); needs reaction >= 0,
    reaction + leverage >= 0 and reaction + leverage/2 <= 1."""
    _positive("annual_volatility", annual_volatility)
    if reaction < 0:
        raise YearlyParamError("reaction", f"must be >= 0, got {reaction!r}")
    if reaction + leverage < 0:
        raise YearlyParamError(
            "leverage", f"reaction + leverage must be >= 0, got {reaction + leverage!r}"
        )
    if reaction + leverage / 2 > 1:
        raise YearlyParamError(
            "leverage", f"reaction + leverage / 2 must be <= 1, got {reaction + leverage / 2!r}"
        )
    p = _garch_persistence(t, half_life)
    s = _reaction_scale(p, reaction + leverage / 2)
    alpha, gamma = reaction * s, leverage * s
    return GjrGarchParams(
        omega=t.variance_per_bar(annual_volatility) * (1.0 - p),
        alpha=alpha,
        gamma=gamma,
        beta=max(p - alpha - gamma / 2, 0.0),
        nu=nu,
    )


def heston_params(
    t: BarTime,
    *,
    annual_volatility: float,
    half_life: float,
    vol_of_vol: float,
    rho: float,
    initial_volatility: float | None = None,
    annual_drift: float = 0.0,
) -> HestonParams:
    """Heston per bar (see the module docstring). The Euler scheme needs kappa <= 1 per bar, so
    `half_life` must be at least ``ln 2 × bar_seconds``."""
    _positive("annual_volatility", annual_volatility)
    _positive("half_life", half_life)
    kappa = math.log(2.0) * t.bar_seconds / half_life
    if kappa > 1.0:
        raise YearlyParamError(
            "half_life",
            f"must be at least ln 2 × bar_seconds = {math.log(2.0) * t.bar_seconds:.6g} s for"
            f" bars of {t.bar_seconds!r} s (the variance would revert by more than its distance"
            f" in one Euler step), got {half_life!r}",
        )
    if initial_volatility is not None and not (
        math.isfinite(initial_volatility) and initial_volatility >= 0
    ):
        raise YearlyParamError(
            "initial_volatility", f"must be a finite number >= 0, got {initial_volatility!r}"
        )
    p = t.periods_per_year
    return HestonParams(
        kappa=kappa,
        theta=t.variance_per_bar(annual_volatility),
        xi=vol_of_vol / p,
        rho=rho,
        v0=None if initial_volatility is None else t.variance_per_bar(initial_volatility),
        mu=annual_drift / p,
    )


_CONVERTERS: dict[ModelKind, Callable[..., ModelParams]] = {
    "gbm": gbm_params,
    "garch": garch_params,
    "gjr_garch": gjr_garch_params,
    "heston": heston_params,
}


def per_bar_params(kind: ModelKind, yearly: Mapping[str, Any], t: BarTime) -> ModelParams:
    """The per-bar parameter dataclass of model `kind` from its yearly parameters (the keyword
    arguments of that kind's function here, e.g. a `[generator.garch]` table).

    Raises YearlyParamError naming the yearly key when no valid per-bar model results, and
    ValueError (naming the per-bar parameter) for a rule the yearly keys cannot break alone.
    """
    return _CONVERTERS[kind](t, **yearly)
