"""GARCH(1,1) estimation by Gaussian (quasi-)maximum likelihood, and its variance forecasts.

Pure numpy + nlopt: no I/O, no clocks, no global mutable state. The model, for per-bar log returns
``r_t`` (zero mean)::

    sigma2_t = omega + alpha * r_{t-1}**2 + beta * sigma2_{t-1}
    r_t      = sqrt(sigma2_t) * z_t,   z_t ~ N(0, 1)   (quasi-likelihood: z need not be Gaussian)

It is the model ``arch.arch_model(r * c, mean="Zero", vol="GARCH", p=1, q=1, dist="normal")``
of the `arch` package for any scale ``c`` (arch's omega is this omega times ``c**2``; alpha and
beta are the same). ``tests/test_garch_fit.py`` fits with ``rescale=True`` and compares in
arch's units (``c = result.scale``). It is estimated the same way, so the two agree:

* Backcast, as arch's ``GARCH.backcast``: the recursion starts from
  ``sigma2_{-1} = r_{-1}**2 = b`` where ``b = sum_i w_i r_i**2`` over the first
  ``tau = min(75, T)`` returns with weights ``w_i ∝ 0.94**i`` normalised to sum to 1 (an EWMA run
  backwards from the start of the sample), so ``sigma2_0 = omega + (alpha + beta) * b``.
* Same parameter bounds (``omega`` in ``[1e-8, 10] * mean(r²)``, ``alpha, beta`` in ``[0, 1]``),
  the same linear constraint ``alpha + beta <= 1`` and the same 16-point grid of starting values
  (the best of it and ``previous`` is the start; `garch_grid`).
* The optimiser: Newton's method for the constrained problem (`garch_newton`: each step goes
  to the minimum of the exact second-order model over the constraints, so the bounds that bind
  at the optimum, ``alpha = 0``, ``beta = 0``, ``alpha + beta = 1``, omega's lower bound, are
  found in one step and held exactly) on closed-form first and second derivatives
  (`garch_likelihood`). It stops at a Newton decrement below 1e-7 (the log-likelihood within
  ~1e-7 of its maximum, tighter than arch's own stopping rule), typically after 4-7
  evaluations. Where it gives up (rare: a stalled line search, too many iterations) nlopt's
  ``LD_SLSQP`` (`garch_slsqp`; arch's algorithm family, with an analytic gradient and tighter
  tolerances) takes over from the same start; ``GarchFit.method`` says which one found the
  estimate.
* arch also clips each ``sigma2_t`` into loose bounds (``1e-6`` to ``1e6`` times an EWMA of the
  data) to keep the likelihood finite at absurd parameters; inside the constraints above the
  variance is always ``>= omega > 0`` and finite, so this module does not clip. The two
  likelihoods are identical wherever arch's clipping is inactive, which is everywhere near an
  optimum on real data.

Scaling: per-bar returns are ~1e-3, so ``omega`` would be ~1e-8 and badly scaled for an optimiser.
The returns are divided by their root mean square before fitting (so ``mean(r²) = 1`` and
``omega ≈ 1 - alpha - beta``) and the estimates are mapped back: ``omega`` scales with the square
of the returns, ``alpha`` and ``beta`` are scale-free. Every public number is in per-bar units of
the ORIGINAL returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .garch_grid import grid_values, starting_grid
from .garch_likelihood import LOG_2PI, FloatArray, arch_backcast, negloglik, newton_terms, variances
from .garch_newton import feasible, newton
from .garch_slsqp import slsqp

_sum = np.add.reduce  # ndarray.sum without its Python wrapper

__all__ = [
    "DEFAULT_MAX_EVALUATIONS",
    "MIN_OBSERVATIONS",
    "NONSTATIONARY_TOLERANCE",
    "FloatArray",
    "GarchFit",
    "cumulative_variance",
    "fit_garch11",
    "fit_log_event",
    "next_variance",
    "variance_forecast",
]

MIN_OBSERVATIONS = 50
"""Fewer returns than this give a "failed" fit: the likelihood is too flat to identify 3 params."""

NONSTATIONARY_TOLERANCE = 1e-6
"""A fit with ``alpha + beta >= 1 - NONSTATIONARY_TOLERANCE`` is reported as "nonstationary"."""

DEFAULT_MAX_EVALUATIONS = 300
"""Default cap on likelihood evaluations by the optimiser (a cold fit typically needs 15-40)."""

_OMEGA_BOUNDS = (1e-8, 10.0)  # times mean(r²), as arch


@dataclass(frozen=True, slots=True)
class GarchFit:
    """The result of `fit_garch11`, in per-bar variance units of the original returns.

    ``status`` is "ok" for a stationary fit, "nonstationary" when the optimum lies on the
    stationarity boundary (``alpha + beta >= 1 - 1e-6``: the estimates are still reported and
    usable with the recursion), and "failed" when there is no estimate: then ``omega``, ``alpha``,
    ``beta``, ``loglik``, ``last_variance`` and ``next_variance`` are NaN and ``message`` says why.
    """

    status: Literal["ok", "nonstationary", "failed"]
    omega: float
    """Constant of the variance recursion (per-bar variance); > 0, NaN when failed."""
    alpha: float
    """Reaction to the last squared return; in [0, 1], NaN when failed."""
    beta: float
    """Weight of the last conditional variance; in [0, 1], NaN when failed."""
    loglik: float
    """Gaussian log-likelihood of the original returns at the estimate (NaN when failed). Rescaling
    the returns by ``c`` shifts it by ``-n_obs * log(c)``."""
    n_obs: int
    """Number of returns given (all of them are used)."""
    iterations: int
    """Likelihood evaluations by the optimiser (excluding the choice of its start: arch's
    16-point grid and the value of the warm start)."""
    message: str
    """Why the status is not "ok"; empty when it is."""
    last_variance: float
    """Conditional variance sigma2_T of the last observation (per-bar variance)."""
    next_variance: float
    """One-step forecast sigma2_{T+1} = omega + alpha * r_T**2 + beta * sigma2_T."""
    method: Literal["newton", "slsqp", ""] = ""
    """How the optimum was found: "newton" (the quick path), "slsqp" (the full optimiser, when
    the quick path gave up), "" when failed before or while optimising."""

    @property
    def persistence(self) -> float:
        """``alpha + beta``: how slowly a variance shock decays (NaN when failed)."""
        return self.alpha + self.beta

    @property
    def unconditional_variance(self) -> float:
        """``omega / (1 - alpha - beta)``, per-bar variance.

        NaN when failed or nonstationary, i.e. ``alpha + beta >= 1 - 1e-6`` (the same threshold as
        the status): just below 1 the ratio is huge and meaningless, not a usable long-run level.
        """
        persistence = self.persistence
        if not persistence < 1.0 - NONSTATIONARY_TOLERANCE:  # also catches NaN
            return math.nan
        return self.omega / (1.0 - persistence)


def _failed(n_obs: int, message: str, iterations: int = 0) -> GarchFit:
    nan = math.nan
    return GarchFit("failed", nan, nan, nan, nan, n_obs, iterations, message, nan, nan)


def fit_garch11(
    returns: npt.ArrayLike,
    *,
    previous: GarchFit | None = None,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
) -> GarchFit:
    """Fit a zero-mean Gaussian GARCH(1,1) to per-bar log returns by (quasi-)maximum likelihood.

    ``returns``: 1-D, finite, oldest first. ``previous``: an earlier fit (e.g. on the previous
    rolling window) to warm-start from; it competes with arch's 16-point starting grid and the
    better starting point wins, so a stale or unrelated ``previous`` cannot do worse than a cold
    start. A failed ``previous`` is ignored. Constraints: ``omega > 0``, ``alpha, beta >= 0``,
    ``alpha + beta <= 1``.

    Never raises on data: fewer than `MIN_OBSERVATIONS` returns, a non-1-D or non-numeric input,
    NaN/inf, all-zero returns, or an optimiser failure (including ``max_evaluations`` reached)
    give status "failed" with a message; an optimum with ``alpha + beta >= 1 - 1e-6`` gives
    "nonstationary" (the estimates are kept). Deterministic: same input, same output.
    """
    try:
        r = np.asarray(returns, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return _failed(0, f"returns are not numeric: {exc}")
    if r.ndim != 1:
        return _failed(int(r.size), f"returns must be 1-D, got shape {r.shape}")
    n = int(r.shape[0])
    if n < MIN_OBSERVATIONS:
        return _failed(n, f"need at least {MIN_OBSERVATIONS} returns, got {n}")
    peak = float(np.abs(r).max())  # NaN or inf where any return is
    if not math.isfinite(peak):
        return _failed(n, "returns contain NaN or inf")
    if peak == 0.0:
        return _failed(n, "all returns are zero: the variance is not identified")
    # Divide by the root mean square so mean(y²) == 1 (computed via the peak: no underflow of r²).
    scaled = r / peak
    rms = peak * math.sqrt(float(scaled @ scaled) / n)
    y = r / rms
    x = y * y
    backcast = arch_backcast(x)
    xlag = np.empty(n)
    xlag[0] = backcast
    xlag[1:] = x[:-1]
    target = float(x.sum()) / n  # 1 up to rounding; kept explicit to mirror arch's formulas
    bounds = ((_OMEGA_BOUNDS[0] * target, 0.0, 0.0), (_OMEGA_BOUNDS[1] * target, 1.0, 1.0))
    lower, upper = np.array(bounds[0]), np.array(bounds[1])
    budget = max(1, int(max_evaluations))

    warm: FloatArray | None = None
    if previous is not None and previous.status != "failed":
        guess = (previous.omega / (rms * rms), previous.alpha, previous.beta)
        if all(map(math.isfinite, guess)):
            # Clipped into the bounds (as np.clip, in plain floats: a few microseconds less).
            warm = np.array([min(max(g, lo), hi) for g, lo, hi in zip(guess, *bounds, strict=True)])
            if warm[1] + warm[2] > 1.0:  # the constraint may be marginally violated by rounding
                warm[1:] /= warm[1] + warm[2]

    # The start: the better of arch's grid and the warm start. Newton from there; SLSQP from
    # the same start where Newton gives up. Newton from the warm start alone is no shortcut:
    # on `simulate --seed 1`'s refits (the window moves by a fifth) it took 7.5 evaluations on
    # average against 6.2 this way, and ended at a lower likelihood in 9 % of them.
    grid = starting_grid(n)
    values = grid_values(grid, target, x, xlag, backcast)
    # np.nanargmin's choice (the first smallest value, NaN skipped; 0 when none is finite)
    # without its Python-level checks.
    best = int(np.where(values == values, values, math.inf).argmin())
    start = grid.params[best] * np.array((target, 1.0, 1.0))
    if warm is not None:
        # Its value alone (the grid wins ~70% of the refits of `simulate`, where Newton's first
        # evaluation, with derivatives, would be wasted).
        if feasible(warm, lower, upper):
            warm_value = newton_terms(warm, x, xlag, backcast, False)[0]
        else:
            warm_value = negloglik(warm, None, x, xlag, backcast)
        if not warm_value > values[best]:
            start = warm  # the warm start wins ties against the grid
    method: Literal["newton", "slsqp"] = "newton"
    params, evaluations = newton(start, x, xlag, backcast, lower, upper, budget)
    if params is None and evaluations < budget:
        method = "slsqp"
        params, more, failure = slsqp(start, x, xlag, backcast, lower, upper, budget - evaluations)
        evaluations += more
        if params is None and failure is not None:
            return _failed(n, failure, evaluations)
        if params is not None:
            params = np.clip(params, lower, upper)
            if params[1] + params[2] > 1.0:  # SLSQP may end a rounding error outside
                params[1:] /= params[1] + params[2]
    if params is None:
        message = f"optimiser did not converge in {max_evaluations} evaluations"
        return _failed(n, message, evaluations)
    s2 = variances(params, x, xlag, backcast)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        value = 0.5 * (LOG_2PI + (float(_sum(np.log(s2))) + float(_sum(x / s2))) / n)
    if not (math.isfinite(value) and np.isfinite(params).all()):
        return _failed(n, "optimiser returned a non-finite likelihood", evaluations)

    omega_s, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    scale2 = rms * rms
    last_variance = float(s2[-1]) * scale2
    omega = omega_s * scale2
    loglik = -value * n - n * math.log(rms)
    persistence = alpha + beta
    if persistence >= 1.0 - NONSTATIONARY_TOLERANCE:
        status: Literal["ok", "nonstationary"] = "nonstationary"
        message = f"alpha + beta = {persistence:.9f} is on the stationarity boundary"
    else:
        status, message = "ok", ""
    return GarchFit(
        status=status,
        omega=omega,
        alpha=alpha,
        beta=beta,
        loglik=loglik,
        n_obs=n,
        iterations=evaluations,
        message=message,
        last_variance=last_variance,
        next_variance=next_variance(omega, alpha, beta, float(r[-1]), last_variance),
        method=method,
    )


def next_variance(
    omega: float, alpha: float, beta: float, last_return: float, last_variance: float
) -> float:
    """One step of the recursion: ``omega + alpha * last_return**2 + beta * last_variance``.

    Per-bar units in and out. No validation (NaN in gives NaN out): the daemon calls it every bar
    to roll the one-step forecast forward between refits.
    """
    return omega + alpha * last_return * last_return + beta * last_variance


def variance_forecast(fit: GarchFit, horizon: int) -> FloatArray:
    """Forecasts ``sigma2_{T+1}, ..., sigma2_{T+horizon}`` (shape ``(horizon,)``, per-bar units).

    Evaluates the closed form of ``sigma2_{T+h} = omega + p * sigma2_{T+h-1}`` (``p = alpha +
    beta``) written as ``p**(h-1) * sigma2_{T+1} + omega * (1 - p**(h-1)) / (1 - p)``. For a
    stationary fit this equals ``uncond + p**(h-1) * (sigma2_{T+1} - uncond)`` but does not
    cancel catastrophically when ``p`` is close to 1; for a nonstationary fit (``p`` up to 1) it
    is the recursion itself (``omega * (h-1)`` growth when ``p == 1``).

    Raises ValueError if ``horizon < 1`` or the fit has status "failed".
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if fit.status == "failed":
        raise ValueError(f"cannot forecast from a failed fit: {fit.message}")
    p = fit.persistence
    steps = np.arange(horizon, dtype=np.float64)  # h - 1
    decay = np.power(p, steps)
    if p == 1.0:
        geometric_sum = steps
    elif p < 0.5:
        # Far from 1 nothing cancels; log1p(p - 1) would not exist at p <= 0 (an estimate a
        # rounding error below 0 included).
        geometric_sum = (1.0 - decay) / (1.0 - p)
    else:
        # (1 - p**k) / (1 - p) through expm1/log1p: accurate even when p is within 1e-9 of 1
        geometric_sum = np.expm1(steps * math.log1p(p - 1.0)) / (p - 1.0)
    return decay * fit.next_variance + fit.omega * geometric_sum


def cumulative_variance(omega: float, persistence: float, variance_1: float, horizon: int) -> float:
    """``sum_{k=1..h} sigma2_{T+k}``: the variance of the h-bar log return ``r_{T+1} + ... +
    r_{T+h}`` (returns are uncorrelated), from the one-step forecast ``variance_1``.

    Closed form of the sum of `variance_forecast`'s terms: with ``p = persistence`` and
    ``G = sum_{k<h} p**k = (1 - p**h) / (1 - p)``, it is ``variance_1 G + omega (h - G) / (1 - p)``
    (``h (h - 1) / 2`` in place of ``(h - G) / (1 - p)`` at ``p = 1``). ``G`` is evaluated through
    expm1/log1p for ``p >= 1/2``, directly below (nothing cancels there, and ``log1p(p - 1)``
    would not exist where ``p - 1`` rounds to -1 or below). ``h - G`` cancels as ``p`` nears 1,
    which bounds the relative error by about ``eps * omega / ((1 - p) variance_1)``: below 1e-9
    for every stationary fit (``p < 1 - 1e-6``, ``variance_1 >= omega``), ~eps in practice
    (``variance_1`` near ``omega / (1 - p)``). Per-bar units in and out; no validation beyond the
    horizon (NaN in gives NaN out). Raises ValueError if ``horizon < 1``.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    h = float(horizon)
    if persistence == 1.0:
        return variance_1 * h + omega * h * (h - 1.0) / 2.0
    if persistence < 0.5:  # nothing cancels; log1p(p - 1) would not exist at p <= 0
        geometric = (1.0 - math.pow(persistence, h)) / (1.0 - persistence)
    else:
        geometric = math.expm1(h * math.log1p(persistence - 1.0)) / (persistence - 1.0)
    return variance_1 * geometric + omega * (h - geometric) / (1.0 - persistence)


def fit_log_event(fit: GarchFit) -> tuple[Literal["debug", "info", "warning"], str, dict[str, Any]]:
    """``(level, event, fields)`` of the log record for a finished fit.

    "ok": debug ``garch_fitted``. "nonstationary" is an estimate, not a failure (alpha + beta at
    the stationarity boundary: the data look integrated or explosive over the window): info
    ``garch_fit_nonstationary`` with the estimates. "failed" (no estimate): warning
    ``garch_fit_failed`` with the reason in ``detail``.
    """
    if fit.status == "ok":
        return (
            "debug",
            "garch_fitted",
            {"alpha": fit.alpha, "beta": fit.beta, "observations": fit.n_obs, "method": fit.method},
        )
    if fit.status == "nonstationary":
        return (
            "info",
            "garch_fit_nonstationary",
            {
                "alpha": fit.alpha,
                "beta": fit.beta,
                "persistence": fit.persistence,
                "observations": fit.n_obs,
            },
        )
    return "warning", "garch_fit_failed", {"status": fit.status, "detail": fit.message}
