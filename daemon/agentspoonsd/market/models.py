"""Price-path simulation models: GBM, GARCH(1,1), GJR-GARCH(1,1) and Heston. Pure numpy, no I/O.

Every model produces consecutive OHLCV bars of one symbol as a `BarBlock`. Per bar ``t``, with
``x_t`` the log close (the model's state) and ``r_t`` the bar's log return::

    x_t     = x_{t-1} + r_t            (a sequential float sum, see "Reproducibility")
    close_t = exp(x_t),   open_t = close_{t-1}   (the very same float)

The models differ in how ``r_t`` is drawn (all in per-bar units; ``z_t`` i.i.d., unit variance):

- ``gbm``:       ``r_t = mu + sigma * z_t``, z standard normal (constant volatility).
- ``garch``:     ``sigma2_t = omega + alpha * r_{t-1}² + beta * sigma2_{t-1}``,
                 ``r_t = sqrt(sigma2_t) * z_t``, z Student-t(nu) scaled to unit variance.
- ``gjr_garch``: as garch plus the leverage term ``gamma * r_{t-1}² * 1[r_{t-1} < 0]``.
- ``heston``:    ``d ln S = mu dt + sqrt(v) dW1``, ``dv = kappa (theta - v) dt + xi sqrt(v) dW2``,
                 ``corr(dW1, dW2) = rho``, one bar = one unit of time, simulated by full-truncation
                 Euler on ``substeps`` steps per bar (``v+ = max(v, 0)`` in drift and diffusion).

High and low are those of a continuous intrabar path, cut into ``substeps`` substeps: for heston
the simulated Euler path, for the others a Brownian bridge pinned at ``log(open)`` and
``log(close)`` whose variance is the bar's (conditional) variance. Between consecutive substep
points the path is a Brownian bridge of that substep's variance, and its maximum and minimum are
drawn from their exact law (Glasserman 2004, §6.4; see `intrabar.substep_extremes`), so the range
estimators are unbiased rather than reading the extremes of a few sampled points. Volume rises with
``|r_t|`` relative to the long-run volatility, times lognormal noise of mean 1 (see
`intrabar.clustered_volume`).

Randomness: the `numpy.random.SeedSequence` given to a model is never mutated. Its children
``0, 1, 2, 3, 4`` (derived exactly as ``seed.spawn(5)`` would on a fresh copy) seed one
`numpy.random.Generator` each, for: innovations (``z``; heston: the price shocks), the intrabar
bridge skeleton, the volume noise, (heston only) the variance shocks, and the standard
exponentials of the substep extremes (``2 · substeps`` per bar: the maxima, then the minima).
Pass each model its own SeedSequence (e.g. one child of a root per symbol), not one whose
children are used elsewhere.

Reproducibility: same seed, parameters, ``substeps`` and total bar count ⇒ bit-for-bit identical
bars, *however the total is split into `simulate` calls* (``simulate(a)`` then ``simulate(b)`` ==
``simulate(a + b)``). This holds because each generator is consumed element by element in bar
order, the only cross-bar recursions (variance, log price) are sequential, and everything else is
elementwise or along one bar's substeps, so no result depends on the block length (numpy does not
promise identical streams across numpy versions, though).
"""

from __future__ import annotations

import math
import numbers
from typing import Protocol

import numpy as np

from agentspoonsd.market.block import BarBlock, FloatArray
from agentspoonsd.market.intrabar import (
    MEAN_ABS_NORMAL,
    bridge_extremes,
    clustered_volume,
    high_low,
    mean_abs_unit_t,
    path_extremes,
)
from agentspoonsd.market.params import (
    DEFAULT_VOLUME,
    MODEL_KINDS,
    GarchParams,
    GbmParams,
    GjrGarchParams,
    HestonParams,
    ModelKind,
    ModelParams,
    VolumeParams,
    _require,
)

__all__ = [
    "DEFAULT_VOLUME",
    "MODEL_KINDS",
    "GarchModel",
    "GarchParams",
    "GbmModel",
    "GbmParams",
    "GjrGarchModel",
    "GjrGarchParams",
    "HestonModel",
    "HestonParams",
    "Model",
    "ModelKind",
    "ModelParams",
    "VolumeParams",
    "make_model",
]

# Bars simulated per internal pass: keeps the (bars x substeps) temporaries, about 1 MB each at
# 16 substeps, in cache; larger passes ran markedly slower per bar. Results do not depend on it
# (see "Reproducibility" above).
_CHUNK_BARS = 4096


class Model(Protocol):
    """A stateful single-symbol bar simulator; not thread-safe, no I/O."""

    @property
    def kind(self) -> ModelKind:
        """Which model this is."""
        ...

    @property
    def last_close(self) -> float:
        """Close of the last simulated bar (the initial price before the first call)."""
        ...

    @property
    def conditional_variance(self) -> float:
        """The model's per-bar variance of the next bar's log return given the state now."""
        ...

    def simulate(self, n_bars: int) -> BarBlock:
        """Simulate the next ``n_bars >= 1`` bars and advance the state (see module docstring)."""
        ...


def _child_seeds(seed: np.random.SeedSequence, n: int) -> list[np.random.SeedSequence]:
    # What seed.spawn(n) returns on a fresh copy, without bumping the caller's spawn counter:
    # rebuilding a model from the same SeedSequence object must give the same streams.
    return [
        np.random.SeedSequence(
            entropy=seed.entropy, spawn_key=(*seed.spawn_key, i), pool_size=seed.pool_size
        )
        for i in range(n)
    ]


class _BaseModel:
    """The shared machinery: state, seeding, chunking, prices, high/low, volume and checks.

    Subclasses implement `_draw(n)`, returning the bars' log returns, their intrabar extremes
    relative to the log open, and the model's variance state after the n bars (not yet stored).
    """

    _KIND: ModelKind

    def __init__(
        self,
        *,
        seed: np.random.SeedSequence,
        initial_price: float,
        volume: VolumeParams,
        substeps: int,
        long_run_variance: float,
        mean_abs_ratio: float,
        state: float,
    ) -> None:
        if not isinstance(seed, np.random.SeedSequence):
            raise TypeError(f"seed must be a numpy.random.SeedSequence, got {type(seed).__name__}")
        if not isinstance(volume, VolumeParams):
            raise TypeError(f"volume must be a VolumeParams, got {type(volume).__name__}")
        _require(
            isinstance(initial_price, numbers.Real)
            and math.isfinite(initial_price)
            and initial_price > 0,
            "initial_price",
            "a finite number > 0",
            initial_price,
        )
        _require(
            isinstance(substeps, int) and not isinstance(substeps, bool) and substeps >= 1,
            "substeps",
            "an int >= 1",
            substeps,
        )
        self._seed = seed
        self._volume = volume
        self._substeps = substeps
        # Child 4 was added after the others: appending a stream keeps 0-3 (and so the returns,
        # volume and heston variance) what they were for a given seed.
        innovations, path, vol_noise, variance, extremes = _child_seeds(seed, 5)
        self._rng_innovations = np.random.default_rng(innovations)
        self._rng_path = np.random.default_rng(path)
        self._rng_volume = np.random.default_rng(vol_noise)
        self._rng_variance = np.random.default_rng(variance)
        self._rng_extremes = np.random.default_rng(extremes)
        self._long_run_sd = math.sqrt(long_run_variance)
        self._mean_abs_ratio = mean_abs_ratio
        self._close = float(initial_price)
        self._log_close = math.log(initial_price)
        self._state = state
        self._failed = False

    @property
    def kind(self) -> ModelKind:
        """Which model this is."""
        return self._KIND

    @property
    def substeps(self) -> int:
        """Intrabar substeps per bar of the high/low path (heston: Euler steps per bar)."""
        return self._substeps

    @property
    def volume(self) -> VolumeParams:
        """The volume parameters."""
        return self._volume

    @property
    def last_close(self) -> float:
        """Close of the last simulated bar (the initial price before the first call)."""
        return self._close

    def simulate(self, n_bars: int) -> BarBlock:
        """Simulate the next ``n_bars`` bars and advance the state.

        Returns a `BarBlock` of fresh arrays of shape (n_bars,) meeting its guarantees; the first
        open is `last_close` before the call, float for float. Output depends only on the seed,
        parameters, substeps and the number of bars simulated before, not on how the calls split
        them.

        Raises:
            TypeError: n_bars is not an int.
            ValueError: n_bars < 1.
            OverflowError: a price or volume left the float range (e.g. a large drift over a
                very long run: the log price must stay within about ±709). The model's generators
                have advanced by then, so it is marked failed and later calls raise RuntimeError.
            RuntimeError: a previous call raised OverflowError.
        """
        if isinstance(n_bars, bool) or not isinstance(n_bars, int | np.integer):
            raise TypeError(f"n_bars must be an int, got {type(n_bars).__name__}")
        _require(n_bars >= 1, "n_bars", ">= 1", n_bars)
        if self._failed:
            raise RuntimeError("this model failed earlier (price overflow); build a new one")
        n_bars = int(n_bars)
        parts = []
        done = 0
        while done < n_bars:
            n = min(_CHUNK_BARS, n_bars - done)
            parts.append(self._simulate_chunk(n))
            done += n
        if len(parts) == 1:
            return parts[0]
        return BarBlock(*(np.concatenate(field) for field in zip(*parts, strict=True)))

    def _simulate_chunk(self, n: int) -> BarBlock:
        log_return, max_exc, min_exc, new_state = self._draw(n)
        # The log price is a sequential sum from the stored state: np.cumsum adds strictly left to
        # right, so the same bar gets the same float whatever block it falls in. (Summing the block
        # alone and adding the state afterwards would round differently.)
        log_price = np.cumsum(np.concatenate(([self._log_close], log_return)))
        noise = self._rng_volume.standard_normal(n)
        # Overflow is detected below and raised as OverflowError; numpy's warnings would be noise.
        with np.errstate(over="ignore", invalid="ignore"):
            close = np.exp(log_price[1:])
            open_ = np.empty(n, dtype=np.float64)
            open_[0] = self._close
            open_[1:] = close[:-1]
            high, low = high_low(open_, close, log_price[:-1], max_exc, min_exc)
            volume = clustered_volume(
                log_return,
                self._long_run_sd,
                self._mean_abs_ratio,
                self._volume.scale,
                self._volume.dispersion,
                noise,
            )
        # high bounds open/close from above and low from below, so a finite high and a positive low
        # cover every price; NaN fails both comparisons.
        if not (np.isfinite(high).all() and low.min() > 0 and np.isfinite(volume).all()):
            self._failed = True
            raise OverflowError("simulated price or volume left the float range")
        self._close = float(close[-1])
        self._log_close = float(log_price[-1])
        self._state = new_state
        return BarBlock(open=open_, high=high, low=low, close=close, volume=volume)

    def _draw(self, n: int) -> tuple[FloatArray, FloatArray, FloatArray, float]:
        raise NotImplementedError

    def _exponentials(self, n: int) -> FloatArray:
        """The next n bars' standard exponentials for `intrabar.substep_extremes`, (n, 2, substeps):
        drawn in bar order, so the stream does not depend on the block sizes."""
        return self._rng_extremes.standard_exponential((n, 2, self._substeps))


class GbmModel(_BaseModel):
    """Geometric Brownian motion bars (see `GbmParams`); build with `make_model`."""

    _KIND: ModelKind = "gbm"

    def __init__(
        self,
        params: GbmParams,
        *,
        seed: np.random.SeedSequence,
        initial_price: float,
        volume: VolumeParams = DEFAULT_VOLUME,
        substeps: int = 16,
    ) -> None:
        self._params = params
        self._bar_variance = params.unconditional_variance
        super().__init__(
            seed=seed,
            initial_price=initial_price,
            volume=volume,
            substeps=substeps,
            long_run_variance=params.unconditional_variance,
            mean_abs_ratio=MEAN_ABS_NORMAL,
            state=params.unconditional_variance,
        )

    @property
    def params(self) -> GbmParams:
        """The model parameters."""
        return self._params

    @property
    def conditional_variance(self) -> float:
        """sigma², constant."""
        return self._bar_variance

    def _draw(self, n: int) -> tuple[FloatArray, FloatArray, FloatArray, float]:
        p = self._params
        log_return = p.mu + p.sigma * self._rng_innovations.standard_normal(n)
        hi, lo = bridge_extremes(
            log_return,
            np.full(n, self._bar_variance),
            self._rng_path.standard_normal((n, self._substeps)),
            self._exponentials(n),
        )
        return log_return, hi, lo, self._bar_variance


class _GarchFamily(_BaseModel):
    """GARCH and GJR-GARCH: the variance recursion is ``sigma2_{t+1} = omega + c_t·sigma2_t``.

    With ``r_t = sqrt(sigma2_t)·z_t``,
    ``alpha·r_t² + beta·sigma2_t = (alpha·z_t² + beta)·sigma2_t``, so the per-bar coefficient
    ``c_t`` depends on z_t only and is computed vectorised; just the one multiply-add per bar
    runs in a Python loop over floats (inherently sequential).
    """

    def __init__(
        self,
        params: GarchParams | GjrGarchParams,
        *,
        seed: np.random.SeedSequence,
        initial_price: float,
        volume: VolumeParams,
        substeps: int,
    ) -> None:
        self._omega = params.omega
        self._nu = params.nu
        self._t_scale = math.sqrt((params.nu - 2.0) / params.nu)
        # Start at the long-run variance rather than an arbitrarily calm or wild first stretch.
        super().__init__(
            seed=seed,
            initial_price=initial_price,
            volume=volume,
            substeps=substeps,
            long_run_variance=params.unconditional_variance,
            mean_abs_ratio=mean_abs_unit_t(params.nu),
            state=params.unconditional_variance,
        )

    @property
    def conditional_variance(self) -> float:
        """sigma2 of the next bar's log return (known one bar ahead)."""
        return self._state

    def _coefficients(self, z: FloatArray) -> FloatArray:
        raise NotImplementedError

    def _draw(self, n: int) -> tuple[FloatArray, FloatArray, FloatArray, float]:
        z = self._rng_innovations.standard_t(self._nu, size=n) * self._t_scale
        omega = self._omega
        s = self._state
        variances: list[float] = []
        append = variances.append
        for c in self._coefficients(z).tolist():
            append(s)
            s = omega + c * s
        bar_variance = np.array(variances, dtype=np.float64)
        log_return = np.sqrt(bar_variance) * z
        hi, lo = bridge_extremes(
            log_return,
            bar_variance,
            self._rng_path.standard_normal((n, self._substeps)),
            self._exponentials(n),
        )
        return log_return, hi, lo, s


class GarchModel(_GarchFamily):
    """GARCH(1,1) bars with Student-t innovations (see `GarchParams`); build with `make_model`."""

    _KIND: ModelKind = "garch"

    def __init__(
        self,
        params: GarchParams,
        *,
        seed: np.random.SeedSequence,
        initial_price: float,
        volume: VolumeParams = DEFAULT_VOLUME,
        substeps: int = 16,
    ) -> None:
        self._params = params
        super().__init__(
            params, seed=seed, initial_price=initial_price, volume=volume, substeps=substeps
        )

    @property
    def params(self) -> GarchParams:
        """The model parameters."""
        return self._params

    def _coefficients(self, z: FloatArray) -> FloatArray:
        return self._params.alpha * (z * z) + self._params.beta


class GjrGarchModel(_GarchFamily):
    """GJR-GARCH(1,1) bars (see `GjrGarchParams`); build with `make_model`."""

    _KIND: ModelKind = "gjr_garch"

    def __init__(
        self,
        params: GjrGarchParams,
        *,
        seed: np.random.SeedSequence,
        initial_price: float,
        volume: VolumeParams = DEFAULT_VOLUME,
        substeps: int = 16,
    ) -> None:
        self._params = params
        super().__init__(
            params, seed=seed, initial_price=initial_price, volume=volume, substeps=substeps
        )

    @property
    def params(self) -> GjrGarchParams:
        """The model parameters."""
        return self._params

    def _coefficients(self, z: FloatArray) -> FloatArray:
        p = self._params
        # sign(r_t) = sign(z_t) because sigma_t > 0, so the leverage indicator can use z.
        return np.where(z < 0, p.alpha + p.gamma, p.alpha) * (z * z) + p.beta


class HestonModel(_BaseModel):
    """Heston bars by full-truncation Euler on `substeps` steps per bar (see `HestonParams`).

    Per substep of length ``dt = 1/substeps`` with ``v+ = max(v, 0)``::

        ln S += mu·dt + sqrt(v+·dt)·Z1
        v    += kappa·(theta - v+)·dt + xi·sqrt(v+·dt)·(rho·Z1 + sqrt(1 - rho²)·Z2)

    Z1 come from the innovations generator, Z2 from the variance generator. The variance
    recursion is a Python loop over floats (sequential and non-linear: about 0.3 µs per
    substep); the price path is then vectorised, and the bar's high and low are the exact
    extremes of Brownian bridges between that path's points, each with its substep's variance
    ``v+·dt`` (`intrabar.path_extremes`). Build with `make_model`.
    """

    _KIND: ModelKind = "heston"

    def __init__(
        self,
        params: HestonParams,
        *,
        seed: np.random.SeedSequence,
        initial_price: float,
        volume: VolumeParams = DEFAULT_VOLUME,
        substeps: int = 16,
    ) -> None:
        self._params = params
        super().__init__(
            seed=seed,
            initial_price=initial_price,
            volume=volume,
            substeps=substeps,
            long_run_variance=params.theta,
            mean_abs_ratio=MEAN_ABS_NORMAL,
            state=params.initial_variance,
        )
        self._dt = 1.0 / substeps
        self._shock_scale = params.xi * math.sqrt(self._dt)
        self._rho_perp = math.sqrt(max(0.0, 1.0 - params.rho * params.rho))

    @property
    def params(self) -> HestonParams:
        """The model parameters."""
        return self._params

    @property
    def instantaneous_variance(self) -> float:
        """max(v, 0): the current instantaneous per-bar variance."""
        return max(self._state, 0.0)

    @property
    def conditional_variance(self) -> float:
        """Expected integrated variance over the next bar, ``E[∫_0^1 v dt | v]``, in continuous
        time: ``theta + (v - theta)·(1 - e^{-kappa})/kappa`` with v = `instantaneous_variance`
        (the Euler scheme agrees up to O(1/substeps))."""
        p = self._params
        return p.theta + (self.instantaneous_variance - p.theta) * (-math.expm1(-p.kappa) / p.kappa)

    def _draw(self, n: int) -> tuple[FloatArray, FloatArray, FloatArray, float]:
        p = self._params
        m = n * self._substeps
        dt = self._dt
        z1 = self._rng_innovations.standard_normal(m)
        z2 = self._rng_variance.standard_normal(m)
        shocks = self._shock_scale * (p.rho * z1 + self._rho_perp * z2)
        # v += kappa·dt·(theta - v+) + sqrt(v+)·shock, shock = xi·sqrt(dt)·(correlated normal).
        rate = p.kappa * dt
        theta = p.theta
        sqrt = math.sqrt
        v = self._state
        truncated: list[float] = []
        append = truncated.append
        for w in shocks.tolist():
            vp = v if v > 0.0 else 0.0
            append(vp)
            v = v + rate * (theta - vp) + sqrt(vp) * w
        # Substep-major (substeps, n) from here on, as `path_extremes` wants: the transposes are
        # read once, fused into operations the path needs anyway.
        by_bar = (n, self._substeps)
        substep_variance = np.empty(by_bar[::-1], dtype=np.float64)
        np.multiply(
            np.array(truncated, dtype=np.float64).reshape(by_bar).T, dt, out=substep_variance
        )
        increments = p.mu * dt + np.sqrt(substep_variance) * z1.reshape(by_bar).T
        log_return, hi, lo = path_extremes(increments, substep_variance, self._exponentials(n))
        return log_return, hi, lo, v


_PARAM_TYPES: dict[str, type[ModelParams]] = {
    "gbm": GbmParams,
    "garch": GarchParams,
    "gjr_garch": GjrGarchParams,
    "heston": HestonParams,
}


def make_model(
    kind: ModelKind,
    params: ModelParams | None = None,
    *,
    seed: np.random.SeedSequence,
    initial_price: float,
    volume: VolumeParams = DEFAULT_VOLUME,
    substeps: int = 16,
) -> Model:
    """Build the model of `kind`.

    Args:
        kind: one of `MODEL_KINDS`.
        params: the parameter class of that kind (`GbmParams`, `GarchParams`, `GjrGarchParams`,
            `HestonParams`), or None for its defaults.
        seed: seeds the model's generators (not mutated; see the module docstring).
        initial_price: finite, > 0: the first bar's open.
        volume: volume parameters.
        substeps: >= 1, intrabar substeps per bar (heston: Euler steps per bar); high and low
            are drawn exactly between the substep points. Changing it changes the whole series
            (high/low, and for heston the returns too).

    Raises:
        ValueError: unknown kind, or initial_price / substeps out of range.
        TypeError: params of another kind's class, or seed / volume of the wrong type.
    """
    if kind not in _PARAM_TYPES:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    expected = _PARAM_TYPES[kind]
    if params is None:
        params = expected()
    elif not isinstance(params, expected):
        raise TypeError(
            f"params for kind {kind!r} must be {expected.__name__}, got {type(params).__name__}"
        )
    if isinstance(params, GbmParams):
        return GbmModel(
            params, seed=seed, initial_price=initial_price, volume=volume, substeps=substeps
        )
    if isinstance(params, GarchParams):
        return GarchModel(
            params, seed=seed, initial_price=initial_price, volume=volume, substeps=substeps
        )
    if isinstance(params, GjrGarchParams):
        return GjrGarchModel(
            params, seed=seed, initial_price=initial_price, volume=volume, substeps=substeps
        )
    return HestonModel(
        params, seed=seed, initial_price=initial_price, volume=volume, substeps=substeps
    )
