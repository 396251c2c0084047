"""The models' parameters: plain frozen dataclasses, per bar, validated on construction.

Pure Python (no numpy): `settings` and `annual` build and check them without loading the
simulation stack; `models` simulates with them. Each raises ValueError naming the parameter
when it makes no valid model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, TypeAlias

ModelKind: TypeAlias = Literal["gbm", "garch", "gjr_garch", "heston"]
MODEL_KINDS: tuple[ModelKind, ...] = ("gbm", "garch", "gjr_garch", "heston")
"""Every valid `ModelKind`, in documentation order."""


def _require(ok: bool, name: str, condition: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {condition}, got {value!r}")


def _finite(name: str, value: float) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    _require(ok, name, "a finite number", value)


def _unit_t_kurtosis(nu: float) -> float:
    """Kurtosis E[z⁴] of a unit-variance Student-t(nu); inf for nu <= 4."""
    return 3.0 + 6.0 / (nu - 4.0) if nu > 4 else math.inf


@dataclass(frozen=True, slots=True)
class GbmParams:
    """Geometric Brownian motion: i.i.d. normal log returns, per-bar units.

    The default is a per-bar volatility of 0.09 % (65 % a year at 525,600 one-minute bars) and no
    drift. No fat tails and no clustering: the baseline the other models are compared to.

    Raises ValueError (naming the parameter) if mu is not finite or sigma is not finite and > 0.
    """

    mu: float = 0.0
    """Per-bar drift of the log price (E[r_t]); finite. Not corrected by -sigma²/2."""
    sigma: float = 0.0009
    """Per-bar standard deviation of the log return; finite, > 0."""

    def __post_init__(self) -> None:
        _finite("mu", self.mu)
        _finite("sigma", self.sigma)
        _require(self.sigma > 0, "sigma", "> 0", self.sigma)

    @property
    def unconditional_variance(self) -> float:
        """Per-bar variance of the log return: sigma²."""
        return self.sigma * self.sigma


@dataclass(frozen=True, slots=True)
class GarchParams:
    """GARCH(1,1) with Student-t(nu) innovations scaled to unit variance, per-bar units.

    Defaults: unconditional per-bar volatility 0.09 % (variance 8.1e-7; 65 % a year), persistence
    ``alpha + beta = 0.98`` (a variance shock halves in about 35 bars) and t(8) innovations
    (kurtosis 4.5). The fourth moment of returns is finite (``beta² + 2·alpha·beta +
    E[z⁴]·alpha² = 0.9775 < 1``): theoretical kurtosis of returns about 7.9 (excess 4.9), and the
    autocorrelation of r² is about 0.14 at lag 1, decaying by 0.98 per lag.

    Raises ValueError (naming the parameter) unless every value is finite, omega > 0,
    alpha >= 0, beta >= 0, alpha + beta < 1 (stationarity) and nu > 2 (finite variance).
    """

    omega: float = 1.62e-8
    """Constant of the variance recursion (per-bar variance units); > 0."""
    alpha: float = 0.07
    """Reaction to the last squared return; >= 0."""
    beta: float = 0.91
    """Persistence of the last variance; >= 0, alpha + beta < 1."""
    nu: float = 8.0
    """Degrees of freedom of the innovations; > 2 (finite variance), > 4 for a finite kurtosis."""

    def __post_init__(self) -> None:
        for name in ("omega", "alpha", "beta", "nu"):
            _finite(name, getattr(self, name))
        _require(self.omega > 0, "omega", "> 0", self.omega)
        _require(self.alpha >= 0, "alpha", ">= 0", self.alpha)
        _require(self.beta >= 0, "beta", ">= 0", self.beta)
        _require(self.alpha + self.beta < 1, "alpha + beta", "< 1 (stationarity)", self.persistence)
        _require(self.nu > 2, "nu", "> 2 (finite variance)", self.nu)

    @property
    def persistence(self) -> float:
        """alpha + beta: the per-bar decay factor of a variance shock."""
        return self.alpha + self.beta

    @property
    def unconditional_variance(self) -> float:
        """Long-run per-bar variance of the log return: omega / (1 - alpha - beta)."""
        return self.omega / (1.0 - self.persistence)

    @property
    def fourth_moment_finite(self) -> bool:
        """Whether returns have a finite kurtosis: beta² + 2·alpha·beta + E[z⁴]·alpha² < 1."""
        k = _unit_t_kurtosis(self.nu)
        a, b = self.alpha, self.beta
        return math.isfinite(k) and b * b + 2 * a * b + k * a * a < 1


@dataclass(frozen=True, slots=True)
class GjrGarchParams:
    """GJR-GARCH(1,1): GARCH plus a leverage term for negative returns, per-bar units.

    ``sigma2_t = omega + (alpha + gamma · 1[r_{t-1} < 0]) · r_{t-1}² + beta · sigma2_{t-1}``,
    Student-t(nu) innovations scaled to unit variance (symmetric, so P(r < 0) = 1/2).

    Defaults: unconditional per-bar volatility 0.09 % (variance 8.1e-7; 65 % a year), persistence
    ``alpha + gamma/2 + beta = 0.98``, a down move raises next variance 2.7 times as much as an up
    move of the same size, t(8) innovations. The fourth moment is finite
    (``beta² + 2·beta·(alpha + gamma/2) + E[z⁴]·(alpha² + alpha·gamma + gamma²/2) ≈ 0.977``).

    Raises ValueError (naming the parameter) unless every value is finite, omega > 0,
    alpha >= 0, alpha + gamma >= 0 (variance stays positive), beta >= 0,
    alpha + gamma/2 + beta < 1 (stationarity) and nu > 2.
    """

    omega: float = 1.62e-8
    """Constant of the variance recursion (per-bar variance units); > 0."""
    alpha: float = 0.03
    """Reaction to the last squared return, any sign; >= 0."""
    gamma: float = 0.05
    """Extra reaction to the last squared return when it was negative; alpha + gamma >= 0."""
    beta: float = 0.925
    """Persistence of the last variance; >= 0."""
    nu: float = 8.0
    """Degrees of freedom of the innovations; > 2."""

    def __post_init__(self) -> None:
        for name in ("omega", "alpha", "gamma", "beta", "nu"):
            _finite(name, getattr(self, name))
        _require(self.omega > 0, "omega", "> 0", self.omega)
        _require(self.alpha >= 0, "alpha", ">= 0", self.alpha)
        _require(self.alpha + self.gamma >= 0, "alpha + gamma", ">= 0", self.alpha + self.gamma)
        _require(self.beta >= 0, "beta", ">= 0", self.beta)
        _require(
            self.persistence < 1, "alpha + gamma/2 + beta", "< 1 (stationarity)", self.persistence
        )
        _require(self.nu > 2, "nu", "> 2 (finite variance)", self.nu)

    @property
    def persistence(self) -> float:
        """alpha + gamma/2 + beta: the mean per-bar decay factor of a variance shock."""
        return self.alpha + 0.5 * self.gamma + self.beta

    @property
    def unconditional_variance(self) -> float:
        """Long-run per-bar variance of the log return: omega / (1 - alpha - gamma/2 - beta)."""
        return self.omega / (1.0 - self.persistence)

    @property
    def fourth_moment_finite(self) -> bool:
        """Whether returns have a finite kurtosis (condition in the class docstring)."""
        k = _unit_t_kurtosis(self.nu)
        a, g, b = self.alpha, self.gamma, self.beta
        if not math.isfinite(k):
            return False
        return b * b + 2 * b * (a + 0.5 * g) + k * (a * a + a * g + 0.5 * g * g) < 1


@dataclass(frozen=True, slots=True)
class HestonParams:
    """Heston stochastic volatility, per-bar units (one bar is one unit of time).

    ``d ln S = mu dt + sqrt(v) dW1``, ``dv = kappa (theta - v) dt + xi sqrt(v) dW2``,
    ``corr(dW1, dW2) = rho``. ``v`` is an instantaneous per-bar variance, so a bar's return has
    variance ≈ the integral of v over the bar, and theta is the long-run per-bar variance.

    Defaults: theta = 8.1e-7 (per-bar volatility 0.09 %, 65 % a year), kappa = 0.02 (a variance
    shock halves in about 35 bars), xi = 1.5e-4, rho = -0.4 (leverage: down moves raise variance).
    The Feller condition ``2·kappa·theta >= xi²`` holds (ratio 1.44), so v stays positive in
    continuous time; the Euler scheme still truncates at 0. The stationary variance of v is
    ``c·theta²`` with ``c = xi² / (2·kappa·theta) ≈ 0.69``, giving an excess kurtosis of
    returns of about 3c ≈ 2.1 and an autocorrelation of r² of about c/(3c + 2)·e^{-kappa·k} ≈ 0.17
    at lag k = 1.

    Raises ValueError (naming the parameter) unless every value is finite, 0 < kappa <= 1 (a
    larger per-bar rate would make the Euler step overshoot with substeps = 1), theta > 0,
    xi >= 0, -1 <= rho <= 1 and v0 is None or >= 0.
    """

    kappa: float = 0.02
    """Mean-reversion rate of v per bar; 0 < kappa <= 1."""
    theta: float = 8.1e-7
    """Long-run per-bar variance; > 0."""
    xi: float = 1.5e-4
    """Volatility of the variance (per-bar units); >= 0."""
    rho: float = -0.4
    """Correlation of price and variance shocks; in [-1, 1], < 0 for leverage."""
    v0: float | None = None
    """Initial instantaneous variance; None means theta. >= 0."""
    mu: float = 0.0
    """Per-bar drift of the log price; finite."""

    def __post_init__(self) -> None:
        for name in ("kappa", "theta", "xi", "rho", "mu"):
            _finite(name, getattr(self, name))
        _require(0 < self.kappa <= 1, "kappa", "in (0, 1]", self.kappa)
        _require(self.theta > 0, "theta", "> 0", self.theta)
        _require(self.xi >= 0, "xi", ">= 0", self.xi)
        _require(-1 <= self.rho <= 1, "rho", "in [-1, 1]", self.rho)
        if self.v0 is not None:
            _finite("v0", self.v0)
            _require(self.v0 >= 0, "v0", ">= 0", self.v0)

    @property
    def initial_variance(self) -> float:
        """v0, or theta when v0 is None."""
        return self.theta if self.v0 is None else float(self.v0)

    @property
    def unconditional_variance(self) -> float:
        """Long-run per-bar variance of the log return: theta."""
        return self.theta

    @property
    def feller_ratio(self) -> float:
        """2·kappa·theta / xi² (inf when xi = 0); >= 1 means the Feller condition holds."""
        return math.inf if self.xi == 0 else 2 * self.kappa * self.theta / (self.xi * self.xi)


@dataclass(frozen=True, slots=True)
class VolumeParams:
    """How bar volume is drawn (see `intrabar.clustered_volume`).

    Raises ValueError (naming the parameter) unless scale is finite and > 0 and dispersion is
    finite and >= 0.
    """

    scale: float = 1.0
    """Long-run mean volume of one bar (units of the base asset), approximately; > 0."""
    dispersion: float = 0.5
    """Standard deviation of the lognormal noise on log volume; >= 0."""

    def __post_init__(self) -> None:
        _finite("scale", self.scale)
        _finite("dispersion", self.dispersion)
        _require(self.scale > 0, "scale", "> 0", self.scale)
        _require(self.dispersion >= 0, "dispersion", ">= 0", self.dispersion)


DEFAULT_VOLUME = VolumeParams()

ModelParams: TypeAlias = GbmParams | GarchParams | GjrGarchParams | HestonParams
