"""GARCH(1,1) estimation by Gaussian (quasi-)maximum likelihood, and its variance forecasts.

Pure numpy + nlopt: no I/O, no clocks, no global mutable state. The model, for per-bar log returns
``r_t`` (zero mean)::

    sigma2_t = omega + alpha * r_{t-1}**2 + beta * sigma2_{t-1}
    r_t      = sqrt(sigma2_t) * z_t,   z_t ~ N(0, 1)   (quasi-likelihood: z need not be Gaussian)

It is the model ``arch.arch_model(r, mean="Zero", vol="GARCH", p=1, q=1, dist="normal")`` of the
`arch` package, estimated the same way so the two agree (see ``tests/test_garch_fit.py``):

* Backcast, as arch's ``GARCH.backcast``: the recursion starts from
  ``sigma2_{-1} = r_{-1}**2 = b`` where ``b = sum_i w_i r_i**2`` over the first
  ``tau = min(75, T)`` returns with weights ``w_i ∝ 0.94**i`` normalised to sum to 1 (an EWMA run
  backwards from the start of the sample), so ``sigma2_0 = omega + (alpha + beta) * b``.
* Same parameter bounds (``omega`` in ``[1e-8, 10] * mean(r²)``, ``alpha, beta`` in ``[0, 1]``),
  the same linear constraint ``alpha + beta <= 1``, the same 16-point grid of starting values, and
  the same algorithm family (SLSQP, here nlopt's ``LD_SLSQP``, with an analytic gradient instead of
  arch's finite differences, and tighter tolerances).
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
from typing import Literal

import nlopt
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

MIN_OBSERVATIONS = 50
"""Fewer returns than this give a "failed" fit: the likelihood is too flat to identify 3 params."""

NONSTATIONARY_TOLERANCE = 1e-6
"""A fit with ``alpha + beta >= 1 - NONSTATIONARY_TOLERANCE`` is reported as "nonstationary"."""

DEFAULT_MAX_EVALUATIONS = 300
"""Default cap on likelihood evaluations by the optimiser (a cold fit typically needs 15-40)."""

_BACKCAST_LAMBDA = 0.94  # arch's EWMA decay for the backcast
_BACKCAST_TAU = 75  # arch's backcast window
_OMEGA_BOUNDS = (1e-8, 10.0)  # times mean(r²), as arch
# arch's starting-value grid: every (alpha, alpha + beta) pair, omega = (1 - persistence) * mean(r²)
_START_ALPHAS = (0.01, 0.05, 0.1, 0.2)
_START_PERSISTENCES = (0.5, 0.7, 0.9, 0.98)
# Tolerances on the mean negative log-likelihood per observation (~1.4 at the optimum). arch stops
# at an absolute change of 1e-6 of the TOTAL log-likelihood (scipy SLSQP's default ftol); a
# relative 1e-12 of the per-observation value is tighter for any window shorter than ~700k bars.
_FTOL_REL = 1e-12
_XTOL_REL = 1e-9
# Smallest power beta**j the geometric filter divides by; larger blocks would overflow 1 / beta**j.
_MIN_POWER = 1e-200
_LOG_2PI = math.log(2.0 * math.pi)


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
    """Likelihood evaluations by the optimiser (excluding the 16-point starting grid)."""
    message: str
    """Why the status is not "ok"; empty when it is."""
    last_variance: float
    """Conditional variance sigma2_T of the last observation (per-bar variance)."""
    next_variance: float
    """One-step forecast sigma2_{T+1} = omega + alpha * r_T**2 + beta * sigma2_T."""

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


def _powers(beta: float, n: int) -> FloatArray:
    """``beta**j`` for ``j < L``, with the block length ``L <= n`` keeping every power >= 1e-200."""
    length = n
    if beta <= 0.0:
        length = 1
    elif beta < 1.0:  # beta == 1 (the boundary) never underflows
        length = min(n, max(1, int(math.log(_MIN_POWER) / math.log(beta))))
    return np.power(beta, np.arange(length, dtype=np.float64))


def _geometric_filter(u: FloatArray, beta: float, init: FloatArray, q: FloatArray) -> FloatArray:
    """``y[..., t] = u[..., t] + beta * y[..., t-1]`` with ``y[..., -1] = init``, vectorised.

    The sequential recursion is rewritten as a geometric-weights filter
    ``y_t = beta**t * cumsum(u_j / beta**j)_t + beta**(t+1) * init``, evaluated in blocks of
    ``len(q)`` so ``1 / beta**j`` never overflows (one block unless beta**T < 1e-200). All inputs
    here are >= 0, so the cumulative sums cannot cancel and the relative error stays ~T * eps.
    ``q`` is `_powers(beta, T)`. ``u`` has shape ``(..., T)`` and ``init`` shape ``u.shape[:-1]``.
    """
    if beta == 0.0:
        return u.copy()
    n = u.shape[-1]
    block = q.shape[0]
    if block >= n:
        return q * np.cumsum(u / q, axis=-1) + (beta * q) * init[..., None]
    out = np.empty_like(u)
    carry = init
    for start in range(0, n, block):
        stop = min(start + block, n)
        qb = q[: stop - start]
        seg = qb * np.cumsum(u[..., start:stop] / qb, axis=-1) + (beta * qb) * carry[..., None]
        out[..., start:stop] = seg
        carry = seg[..., -1]
    return out


def _variances(params: FloatArray, x: FloatArray, xlag: FloatArray, backcast: float) -> FloatArray:
    """Conditional variances sigma2_0..sigma2_{T-1} for squared returns ``x``.

    ``xlag`` is ``x`` shifted one step with the backcast in front, so ``u_0 = omega + alpha * b``
    and the filter's initial value ``b`` adds ``beta * b``: exactly arch's start.
    """
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    q = _powers(beta, x.shape[0])
    return _geometric_filter(omega + alpha * xlag, beta, np.asarray(backcast), q)


def _negloglik(
    params: FloatArray, grad: FloatArray | None, x: FloatArray, xlag: FloatArray, backcast: float
) -> float:
    """Mean Gaussian negative log-likelihood per observation; fills ``grad`` when given.

    The gradient uses the derivative recursions of the variance, which are themselves geometric
    filters with the same beta (so they cost two more vectorised passes, not a Python loop):
    ``d_omega_t = 1 + beta d_omega_{t-1}``, ``d_alpha_t = r²_{t-1} + beta d_alpha_{t-1}``,
    ``d_beta_t = sigma2_{t-1} + beta d_beta_{t-1}``, all starting from 0 (``r²_{-1}`` and
    ``sigma2_{-1}`` are the backcast).
    """
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    n = x.shape[0]
    q = _powers(beta, n)
    if grad is None:
        s2 = _geometric_filter(omega + alpha * xlag, beta, np.asarray(backcast), q)
    else:
        stacked = np.stack((omega + alpha * xlag, np.ones(n), xlag))
        filtered = _geometric_filter(stacked, beta, np.array((backcast, 0.0, 0.0)), q)
        s2 = filtered[0]
    ratio = x / s2
    value = 0.5 * (_LOG_2PI + float(np.mean(np.log(s2))) + float(np.mean(ratio)))
    if grad is not None:
        s2lag = np.empty(n)
        s2lag[0] = backcast
        s2lag[1:] = s2[:-1]
        d_beta = _geometric_filter(s2lag, beta, np.asarray(0.0), q)
        weights = (0.5 / n) * (1.0 - ratio) / s2
        grad[0] = float(weights @ filtered[1])
        grad[1] = float(weights @ filtered[2])
        grad[2] = float(weights @ d_beta)
    return value


def _arch_backcast(squared: FloatArray) -> float:
    """arch's backcast: EWMA(0.94) weighted mean of the first ``min(75, T)`` squared returns.

    ``squared`` must be non-empty; the weights ``0.94**i`` are normalised to sum to 1, so the result
    has the units of ``squared``.
    """
    tau = min(_BACKCAST_TAU, squared.shape[0])
    w = _BACKCAST_LAMBDA ** np.arange(tau, dtype=np.float64)
    return float(np.dot(w / w.sum(), squared[:tau]))


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
    if not np.all(np.isfinite(r)):
        return _failed(n, "returns contain NaN or inf")
    peak = float(np.max(np.abs(r)))
    if peak == 0.0:
        return _failed(n, "all returns are zero: the variance is not identified")
    # Divide by the root mean square so mean(y²) == 1 (computed via the peak: no underflow of r²).
    rms = peak * math.sqrt(float(np.mean(np.square(r / peak))))
    y = r / rms
    x = y * y
    backcast = _arch_backcast(x)
    xlag = np.empty(n)
    xlag[0] = backcast
    xlag[1:] = x[:-1]
    target = float(np.mean(x))  # 1 up to rounding; kept explicit to mirror arch's formulas
    lower = np.array((_OMEGA_BOUNDS[0] * target, 0.0, 0.0))
    upper = np.array((_OMEGA_BOUNDS[1] * target, 1.0, 1.0))

    candidates = [
        np.array(((1.0 - p) * target, a, p - a)) for a in _START_ALPHAS for p in _START_PERSISTENCES
    ]
    if previous is not None and previous.status != "failed":
        warm = np.array((previous.omega / (rms * rms), previous.alpha, previous.beta))
        if np.all(np.isfinite(warm)):
            warm = np.clip(warm, lower, upper)
            if warm[1] + warm[2] > 1.0:  # the constraint may be marginally violated by rounding
                warm[1:] /= warm[1] + warm[2]
            candidates.insert(0, warm)  # first, so it wins ties against the grid
    values = [_negloglik(c, None, x, xlag, backcast) for c in candidates]
    start = candidates[int(np.nanargmin(values))] if np.any(np.isfinite(values)) else candidates[0]

    evaluations = 0
    # Best feasible point seen: nlopt's Python binding raises on RoundoffLimited without
    # returning its point, so the objective keeps it.
    best_value, best_params = math.inf, start.copy()

    def objective(params: FloatArray, grad: FloatArray) -> float:
        nonlocal evaluations, best_value, best_params
        evaluations += 1
        value = _negloglik(params, grad if grad.size > 0 else None, x, xlag, backcast)
        if not math.isfinite(value):
            # Only reachable at absurd trial points; a huge value steers the line search back.
            if grad.size > 0:
                grad[:] = 0.0
            return 1e300
        if value < best_value and params[1] + params[2] <= 1.0:
            best_value, best_params = value, params.copy()
        return value

    def stationarity(params: FloatArray, grad: FloatArray) -> float:
        if grad.size > 0:
            grad[:] = (0.0, 1.0, 1.0)
        return float(params[1] + params[2] - 1.0)  # nlopt: constraint(x) <= 0

    opt = nlopt.opt(nlopt.LD_SLSQP, 3)
    opt.set_min_objective(objective)
    opt.add_inequality_constraint(stationarity, 0.0)
    opt.set_lower_bounds(lower)
    opt.set_upper_bounds(upper)
    opt.set_ftol_rel(_FTOL_REL)
    opt.set_xtol_rel(_XTOL_REL)
    opt.set_maxeval(max(1, int(max_evaluations)))
    try:
        params = np.asarray(opt.optimize(start), dtype=np.float64)
        result = opt.last_optimize_result()
    except nlopt.RoundoffLimited:
        # SLSQP stops this way when rounding prevents further progress: the best point it saw
        # is the optimum to the precision the likelihood can be evaluated at.
        params, result = best_params, nlopt.ROUNDOFF_LIMITED
    except Exception as exc:  # nlopt's failures (nlopt.runtime_error, ...) are not RuntimeError
        # Seen on degenerate data, e.g. an explosive series whose omega is far below its bound.
        reason = opt.get_errmsg() or str(exc) or type(exc).__name__
        return _failed(n, f"optimiser failed: {reason}", evaluations)
    if result == nlopt.MAXEVAL_REACHED:
        message = f"optimiser did not converge in {max_evaluations} evaluations"
        return _failed(n, message, evaluations)
    params = np.clip(params, lower, upper)
    if params[1] + params[2] > 1.0:  # SLSQP may end a rounding error outside the constraint
        params[1:] /= params[1] + params[2]
    value = _negloglik(params, None, x, xlag, backcast)
    if not (math.isfinite(value) and np.all(np.isfinite(params))):
        return _failed(n, "optimiser returned a non-finite likelihood", evaluations)

    omega_s, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    s2 = _variances(params, x, xlag, backcast)
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
    elif p == 0.0:
        geometric_sum = np.minimum(steps, 1.0)  # sigma2 is omega from the second step on
    else:
        # (1 - p**k) / (1 - p) through expm1/log1p: accurate even when p is within 1e-9 of 1
        geometric_sum = np.expm1(steps * math.log1p(p - 1.0)) / (p - 1.0)
    return decay * fit.next_variance + fit.omega * geometric_sum
