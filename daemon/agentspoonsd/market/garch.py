"""GARCH(1,1) market simulator: pure numpy, no I/O, no clocks.

One `GarchSimulator.step()` produces one OHLCV bar for every symbol at once (vectorised over
symbols). The model, per symbol and bar ``t``::

    sigma2_t = omega + alpha * r_{t-1}**2 + beta * sigma2_{t-1}    # conditional variance
    r_t      = sqrt(sigma2_t) * z_t,   z_t ~ Student-t(nu) scaled to unit variance
    open_t   = close_{t-1},   close_t = open_t * exp(r_t)

High and low come from an intrabar Brownian bridge between ``log(open)`` and ``log(close)`` with the
bar's variance; volume is lognormal and grows with ``|r_t|`` so it clusters with volatility.

Determinism: every random number comes from the `numpy.random.Generator` handed in, drawn in a fixed
order per step, so the same seed, parameters and symbol count give a bit-for-bit identical series
(for a given numpy version: numpy does not promise identical streams across versions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class GarchParams:
    """Parameters of the GARCH(1,1) process, at the scale of one bar.

    The defaults give a per-bar unconditional volatility of 0.2 % (variance 4e-6), persistence
    ``alpha + beta = 0.97`` (a volatility shock halves in about 23 bars) and Student-t(5)
    innovations: fat tails and visible volatility clustering, like a liquid crypto pair.
    The defaults also keep the fourth moment of returns finite
    (``beta² + 2·alpha·beta + kurtosis(z)·alpha² < 1``) so sample kurtosis is meaningful.

    Raises ValueError on construction if the process would not be stationary or a value is
    out of range.
    """

    omega: float = 1.2e-7
    """Constant term of the variance recursion (per-bar variance units); > 0."""
    alpha: float = 0.07
    """Weight of the last squared return (reaction to shocks); >= 0."""
    beta: float = 0.90
    """Weight of the last variance (persistence); >= 0, and alpha + beta < 1."""
    nu: float = 5.0
    """Degrees of freedom of the Student-t innovations; > 2, so they scale to unit variance."""
    volume_scale: float = 1.0
    """Typical volume of one bar (units of the base asset); > 0."""
    volume_dispersion: float = 0.5
    """Standard deviation of log volume around its volatility-driven level; >= 0."""

    def __post_init__(self) -> None:
        if not self.omega > 0:
            raise ValueError(f"omega must be > 0, got {self.omega}")
        if not (self.alpha >= 0 and self.beta >= 0):
            raise ValueError(f"alpha and beta must be >= 0, got {self.alpha}, {self.beta}")
        if not self.alpha + self.beta < 1:
            raise ValueError(
                f"alpha + beta must be < 1 for a stationary process, got {self.alpha + self.beta}"
            )
        if not self.nu > 2:
            raise ValueError(f"nu must be > 2 (finite variance), got {self.nu}")
        if not self.volume_scale > 0:
            raise ValueError(f"volume_scale must be > 0, got {self.volume_scale}")
        if not self.volume_dispersion >= 0:
            raise ValueError(f"volume_dispersion must be >= 0, got {self.volume_dispersion}")

    @property
    def unconditional_variance(self) -> float:
        """Long-run per-bar variance of the log return: omega / (1 - alpha - beta)."""
        return self.omega / (1.0 - self.alpha - self.beta)

    @property
    def unconditional_volatility(self) -> float:
        """Long-run per-bar standard deviation of the log return."""
        return math.sqrt(self.unconditional_variance)


class BarArrays(NamedTuple):
    """One bar for every symbol: each field is a float64 array of shape ``(n_symbols,)``.

    Guarantees: ``low <= min(open, close) <= max(open, close) <= high``, ``volume > 0``,
    ``close == open * exp(returns)``, all values finite.
    """

    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray
    returns: FloatArray


class GarchSimulator:
    """Simulates `n_symbols` independent GARCH(1,1) price series, one bar per `step()`.

    All state (last close, variance of the next bar) lives on the object, so whoever drives it
    can stop and resume and the series simply continues. Not thread-safe; no I/O.
    """

    def __init__(
        self,
        n_symbols: int,
        rng: np.random.Generator,
        params: GarchParams | None = None,
        initial_price: float = 50000.0,
        *,
        substeps: int = 16,
    ) -> None:
        """`substeps` is the resolution of the intrabar path that sets high and low."""
        if n_symbols < 1:
            raise ValueError(f"n_symbols must be >= 1, got {n_symbols}")
        if not (initial_price > 0 and math.isfinite(initial_price)):
            raise ValueError(f"initial_price must be a positive finite number, got {initial_price}")
        if substeps < 1:
            raise ValueError(f"substeps must be >= 1, got {substeps}")
        self.n_symbols = n_symbols
        self.params = params if params is not None else GarchParams()
        self.substeps = substeps
        self._rng = rng
        self._t_scale = math.sqrt((self.params.nu - 2.0) / self.params.nu)
        self._sigma_bar = self.params.unconditional_volatility
        # Mean of the volume's |r|-driven factor, so the long-run mean volume is about volume_scale.
        self._volume_norm = 0.5 + _mean_abs_unit_t(self.params.nu)
        # Fractions k/n of the interior bridge points, as a column to broadcast over symbols.
        self._bridge_t = (np.arange(1, substeps, dtype=np.float64) / substeps)[:, None]
        self._close = np.full(n_symbols, float(initial_price), dtype=np.float64)
        # Start at the long-run variance: the same as a previous return of typical size, and
        # avoids an artificially calm (or wild) first stretch.
        self._next_variance = np.full(
            n_symbols, self.params.unconditional_variance, dtype=np.float64
        )

    @property
    def last_close(self) -> FloatArray:
        """Close of the last bar per symbol (the initial price before the first step); a copy."""
        return self._close.copy()

    @property
    def next_variance(self) -> FloatArray:
        """Conditional variance sigma2 of the next bar's log return, per symbol; a copy."""
        return self._next_variance.copy()

    def step(self) -> BarArrays:
        """Advance every symbol by one bar and return it.

        The new bar's open is exactly the previous close (float for float). Draws, in this order,
        ``n_symbols`` Student-t variates, ``substeps * n_symbols`` normals and ``n_symbols``
        normals from the generator.
        """
        p = self.params
        n = self.n_symbols
        rng = self._rng
        sigma2 = self._next_variance
        sigma = np.sqrt(sigma2)

        z = rng.standard_t(p.nu, size=n) * self._t_scale
        r = sigma * z
        open_ = self._close
        close = open_ * np.exp(r)

        # Intrabar path: a Brownian bridge pinned at log(open) and log(close). Build a free walk W
        # with the bar's variance, then subtract (k/n)·W_n so it ends at 0, and add the drift line
        # from 0 to r. Only interior points are needed: the endpoints are open and close themselves.
        steps = rng.standard_normal(size=(self.substeps, n)) * (sigma / math.sqrt(self.substeps))
        walk = np.cumsum(steps, axis=0)
        interior = walk[:-1] - self._bridge_t * walk[-1] + self._bridge_t * r
        body_high = np.maximum(open_, close)
        body_low = np.minimum(open_, close)
        if interior.shape[0]:
            log_open = np.log(open_)
            # Compare against open/close themselves, not exp(log(...)), so the OHLC invariant holds
            # exactly despite rounding.
            high = np.maximum(body_high, np.exp(log_open + interior.max(axis=0)))
            low = np.minimum(body_low, np.exp(log_open + interior.min(axis=0)))
        else:
            high, low = body_high, body_low

        # Volume follows |r| relative to the long-run volatility (not to sigma_t: |r|/sigma_t = |z|
        # is i.i.d. and would not cluster), with lognormal noise of mean 1.
        activity = (0.5 + np.abs(r) / self._sigma_bar) / self._volume_norm
        s = p.volume_dispersion
        noise = np.exp(s * rng.standard_normal(size=n) - 0.5 * s * s)
        volume = p.volume_scale * activity * noise

        self._next_variance = p.omega + p.alpha * r * r + p.beta * sigma2
        self._close = close
        # close is copied because it is also our state: a caller mutating its bar must not
        # change the next open. open_ is the previous state array, no longer referenced.
        return BarArrays(
            open=open_, high=high, low=low, close=close.copy(), volume=volume, returns=r
        )


def _mean_abs_unit_t(nu: float) -> float:
    """E|z| for a Student-t(nu) variate scaled to unit variance."""
    log_ratio = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)
    mean_abs_t = 2.0 * math.sqrt(nu) * math.exp(log_ratio) / (math.sqrt(math.pi) * (nu - 1))
    return mean_abs_t * math.sqrt((nu - 2) / nu)
