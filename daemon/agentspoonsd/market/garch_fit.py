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
  (the best of it and ``previous`` is the start).
* The optimiser: Newton's method for the constrained problem (`_newton`: each step goes to the
  minimum of the exact second-order model over the constraints, so the bounds that bind at the
  optimum, ``alpha = 0``, ``beta = 0``, ``alpha + beta = 1``, omega's lower bound, are found in
  one step and held exactly) on closed-form first and second derivatives (`_newton_terms`, and
  `_short_memory_terms` where beta is below ~0.4). It stops at a Newton decrement below 1e-7
  (`_NEWTON_DECREMENT`: the log-likelihood within ~1e-7 of its maximum, tighter than arch's own
  stopping rule), typically after 4-7 evaluations. Where it gives up (rare: a stalled line search,
  too many iterations) nlopt's ``LD_SLSQP`` (arch's algorithm family, with an analytic
  gradient and tighter tolerances) takes over from the same start; ``GarchFit.method`` says
  which one found the estimate.
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
from functools import lru_cache
from typing import Any, Literal

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
    return float(np.dot(_backcast_weights(tau), squared[:tau]))


@lru_cache(maxsize=8)
def _backcast_weights(tau: int) -> FloatArray:
    """arch's backcast weights ``0.94**i`` for ``i < tau``, normalised to sum to 1 (read-only)."""
    w = _BACKCAST_LAMBDA ** np.arange(tau, dtype=np.float64)
    w /= w.sum()
    w.setflags(write=False)
    return w


# ---------------------------------------------------------------------------------------------
# The quick path: Newton's method on closed-form derivatives (see `_newton`).

_NEWTON_MAX_ITERATIONS = 16
_NEWTON_DECREMENT = 1e-7
"""Converged when the Newton decrement ``g' H^-1 g`` (twice the predicted decrease of the mean
negative log-likelihood, ~1.4 at the optimum) falls below this; the step is then taken, which
leaves an error of the order of its square. Measured on 1,000 refits of `agentspoonsd simulate
--seed 1` (500-bar windows, many of them flat along the omega/beta ridge), against 1e-13: the
total log-likelihood within 9e-8 (arch stops at a change of 1e-6), the one-step variance within
4e-5 relative (99 % of fits: 5e-6), alpha within 2e-6, beta within 3e-4 and omega within 0.2 %
along that flat ridge (99 %: 6e-5 and 0.03 %). On well-identified data the parameters agree
with arch's to 5e-6 (tests/test_garch_fit.py)."""
_ARMIJO = 1e-4  # sufficient decrease, as a fraction of the decrease the step predicts
_MIN_STEP = 2.0**-12  # shortest step of the backtracking line search (shorter: give up)
_LOG_MIN_POWER = math.log(_MIN_POWER)


@lru_cache(maxsize=8)
def _index_tables(n: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Read-only tables of ``t = 0..n-1`` for `_newton_terms`: ``t``, the weights
    ``[1, t, t² - t, 2t - 1, t + 1, t (t + 1)]`` as rows (6, n) and ``[t, t²]`` (2, n)."""
    t = np.arange(n, dtype=np.float64)
    weights = np.stack((np.ones(n), t, t * t - t, 2.0 * t - 1.0, t + 1.0, t * (t + 1.0)))
    moments = np.stack((t, t * t))
    for table in (t, weights, moments):
        table.setflags(write=False)
    return t, weights, moments


_GRID_MIN_POWER = 1e-280  # smallest beta**j of the single-pass grid (1 / it and sums stay finite)


_GRID_BLOCK = 25  # columns per block of the single-pass grid's cumulative sums and products


@dataclass(frozen=True, slots=True)
class _Grid:
    """arch's 16 starting points for windows of ``n`` returns, with what `_grid_values` needs.

    ``params`` (16, 3) has omega = 1 - persistence (the target mean(x) = 1; scaled by the
    actual target at use). When every ``beta**(n-1) >= 1e-280`` (n up to ~535 with arch's
    smallest beta, 0.3), ``single`` holds per-row tables (16, m), ``m`` = n rounded up to a
    multiple of `_GRID_BLOCK`: ``beta**-t``, ``alpha beta**t``, ``omega A_t``
    (``A_t = sum_{j<=t} beta**j``) and ``beta**(t+1)``, zero beyond n, so that
    ``s2 = target omega A + alpha beta**t cumsum(xlag beta**-t) + b beta**(t+1)`` is one pass;
    and ``upper``, the (block, block) upper-triangular matrix of ones that makes the cumulative
    sums of every block one matrix product. Otherwise ``powers`` (16, L) holds ``beta**j`` for
    the block length L of the row-wise geometric filter.
    """

    params: FloatArray
    single: tuple[FloatArray, FloatArray, FloatArray, FloatArray] | None
    upper: FloatArray | None
    powers: FloatArray | None


@lru_cache(maxsize=8)
def _grid(n: int) -> _Grid:
    params = np.array([(1.0 - p, a, p - a) for a in _START_ALPHAS for p in _START_PERSISTENCES])
    beta = params[:, 2:3]
    params.setflags(write=False)
    if (n - 1) * math.log(float(beta.min())) >= math.log(_GRID_MIN_POWER):
        m = -(-n // _GRID_BLOCK) * _GRID_BLOCK
        t = np.arange(n, dtype=np.float64)
        q = beta**t
        tables = tuple(
            np.pad(table, ((0, 0), (0, m - n)))
            for table in (
                beta**-t,
                params[:, 1:2] * q,
                params[:, 0:1] * (1.0 - beta * q) / (1.0 - beta),
                beta * q,
            )
        )
        upper = np.triu(np.ones((_GRID_BLOCK, _GRID_BLOCK)))
        for table in (*tables, upper):
            table.setflags(write=False)
        return _Grid(params, tables, upper, None)  # type: ignore[arg-type]
    length = min(_powers(float(b), n).shape[0] for b in beta[:, 0])
    powers = beta ** np.arange(length, dtype=np.float64)
    powers.setflags(write=False)
    return _Grid(params, None, None, powers)


def _grid_values(
    grid: _Grid, target: float, x: FloatArray, xlag: FloatArray, b: float
) -> FloatArray:
    """`_negloglik` at every starting point of ``grid`` at once (omega scaled by ``target``)."""
    n = x.shape[0]
    alpha = grid.params[:, 1]
    if grid.single is not None:
        assert grid.upper is not None
        q_inverse, alpha_q, omega_a, beta_q = grid.single
        rows, m = q_inverse.shape
        padded = np.zeros((2, m))
        padded[0, :n] = xlag
        padded[1, :n] = x
        # Cumulative sums of positive terms by blocks: one matrix product for the sums inside
        # every block (numpy's cumsum is a sequential loop, 2-3x slower here), plus the running
        # totals of the blocks before.
        blocks = (q_inverse * padded[0]).reshape(rows, m // _GRID_BLOCK, _GRID_BLOCK) @ grid.upper
        blocks[:, 1:, :] += np.cumsum(blocks[:, :-1, -1], axis=1)[:, :, None]
        s2 = blocks.reshape(rows, m)
        s2 *= alpha_q
        s2 += target * omega_a
        s2 += b * beta_q
        s2[:, n:] = 1.0  # the padding: log 1 = 0, and x is 0 there
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            # Logs of products of 25 variances (each within ~1e-2..1e4 of mean(x) = 1 on any
            # window, so no product leaves float range): 25x fewer logs; the exact sum of logs
            # where a product does.
            logs = np.log(np.prod(blocks, axis=2))
            if not np.isfinite(logs).all() or not (logs != 0.0).all():
                logs = np.log(s2)
            by_start: FloatArray = 0.5 * (
                _LOG_2PI + (logs.sum(axis=1) + (padded[1] / s2).sum(axis=1)) / n
            )
            return by_start
    assert grid.powers is not None
    powers = grid.powers
    beta = grid.params[:, 2:3]
    u = target * grid.params[:, 0:1] + alpha[:, None] * xlag
    block = powers.shape[1]
    s2 = np.empty_like(u)
    carry = np.full((alpha.shape[0], 1), b)
    for start in range(0, n, block):
        stop = min(start + block, n)
        qb = powers[:, : stop - start]
        seg = qb * np.cumsum(u[:, start:stop] / qb, axis=1) + (beta * qb) * carry
        s2[:, start:stop] = seg
        carry = seg[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        values: FloatArray = 0.5 * (_LOG_2PI + (np.log(s2).sum(axis=1) + (x / s2).sum(axis=1)) / n)
    return values


def _newton_terms(
    params: FloatArray | list[float], x: FloatArray, xlag: FloatArray, b: float, hessian: bool
) -> tuple[float, FloatArray | None, FloatArray | None, FloatArray | None]:
    """Mean negative log-likelihood and, with ``hessian``, its gradient and Hessian (3, 3).

    Returns ``(value, grad, hess, fisher)``; without ``hessian`` the last three are None.
    ``fisher`` is the Gauss-Newton part of the Hessian with ``x / s2`` replaced by its
    expectation 1 (Fisher scoring's matrix, positive semi-definite). ``0 <= beta <= 1``;
    where ``beta**(n-1) < 1e-200`` (beta below ~0.4 at n = 500, where ``1 / beta**t`` would
    overflow) `_short_memory_terms` computes the same quantities.

    For a fixed backcast ``b`` the variance is linear in omega and alpha:
    ``s2_t = omega A_t + alpha B_t + b beta**(t+1)`` with ``A_t = sum_{j<=t} beta**j`` (closed
    form) and ``B_t = sum_{j<=t} beta**(t-j) xlag_j``. Their beta-derivatives are closed forms
    in the running sums ``S_k = cumsum(j**k beta**j)`` (k = 1, 2) and
    ``T_k = cumsum(j**k xlag_j / beta**j)`` (k = 0, 1, 2), so one cumulative sum over five
    rows replaces nested derivative filters: ``dA/dbeta = S_1 / beta``,
    ``d2A/dbeta2 = (S_2 - S_1) / beta²``, ``dB/dbeta = beta**t (t T_0 - T_1) / beta`` and
    ``d2B/dbeta2 = beta**t ((t² - t) T_0 - (2t - 1) T_1 + T_2) / beta²``. The differences
    cancel up to a factor ~t / (1 - beta) (~1e3 at n = 500): the gradient stays accurate to
    ~1e-13 relative, the Hessian (which only steers the steps) to ~1e-10. Every sum over t that
    the gradient and the second-derivative terms need is a matrix product with the tables.
    """
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    n = x.shape[0]
    if beta <= 0.0 or (n - 1) * math.log(beta) < _LOG_MIN_POWER:
        return _short_memory_terms(omega, alpha, beta, x, xlag, b, hessian)
    t, weights, moments = _index_tables(n)
    log_beta = math.log(beta)
    scaled_t = t * log_beta
    q = np.exp(scaled_t)
    # d: the first derivatives of s2 (rows omega, alpha, beta); d[0] is A, d[1] is B.
    d = np.empty((3, n))
    a = d[0]
    # A_t = (1 - beta**(t+1)) / (1 - beta), through expm1: accurate for beta near 1 too.
    if beta == 1.0:  # the corner alpha = 0, beta = 1 ("nonstationary"): A_t = t + 1
        a[:] = weights[4]
    else:
        scaled_t += log_beta
        np.expm1(scaled_t, out=a)
        a *= 1.0 / math.expm1(log_beta)
    # In-place operations throughout: at n = 500 numpy's per-call cost dominates, not the flops.
    if not hessian:
        s2 = np.cumsum(xlag / q)
        s2 *= alpha
        s2 += b * beta
        s2 *= q
        s2 += omega * a
        value = 0.5 * (_LOG_2PI + (float(np.log(s2).sum()) + float((x / s2).sum())) / n)
        return value, None, None, None
    z = np.empty((5, n))
    np.multiply(moments, q, out=z[:2])  # q t, q t²
    np.divide(xlag, q, out=z[2])
    np.multiply(moments, z[2], out=z[3:])  # xlag t / q, xlag t² / q
    sums = np.cumsum(z, axis=1)  # rows S_1, S_2, T_0, T_1, T_2
    np.multiply(sums[2], q, out=d[1])
    s2 = sums[2] * alpha
    s2 += b * beta
    s2 *= q
    s2 += omega * a
    inv = 1.0 / s2
    ratio = x * inv
    value = 0.5 * (_LOG_2PI + (float(np.log(s2).sum()) + float(ratio.sum())) / n)
    w = 1.0 - ratio  # d value / d s2_t, times n / 0.5
    w *= inv
    w *= 0.5 / n
    # The sums over t with w: sw = (w.S_1, w.S_2), tw[i, k] = (w q weights_i).T_k,
    # ew = sum(w q (t + 1)), sum(w q t (t + 1)).
    weighted = weights * (w * q)
    sw0, sw1 = (sums[:2] @ w).tolist()
    tw = (weighted @ sums[2:].T).tolist()
    ew0, ew1 = weighted[4:].sum(axis=1).tolist()
    a_b = sw0 / beta  # w.dA/dbeta
    b_b = (tw[1][0] - tw[0][1]) / beta  # w.dB/dbeta
    s2_b = omega * a_b + alpha * b_b + b * ew0  # w.ds2/dbeta (the backcast term: b (t+1) q)
    s2_bb = (
        omega * (sw1 - sw0) / beta + alpha * (tw[2][0] - tw[3][1] + tw[0][2]) / beta + b * ew1
    ) / beta  # w.d2s2/dbeta2
    grad = np.array((float(w @ a), tw[0][0], s2_b))
    # ds2/dbeta = omega S_1 / beta + alpha q (t T_0 - T_1) / beta + b (t + 1) q
    tmp = t * sums[2]
    tmp -= sums[3]
    tmp *= alpha / beta
    tmp += b * weights[4]
    tmp *= q
    np.multiply(sums[0], omega / beta, out=d[2])
    d[2] += tmp
    # The Gauss-Newton part of the Hessian; the second derivatives of s2 add w.d2s2 where they
    # are non-zero (s2 is linear in omega and alpha: beta-omega = w.dA/dbeta, beta-alpha =
    # w.dB/dbeta and beta-beta).
    c = np.empty((2, n))
    np.multiply(inv, inv, out=c[0])
    c[0] *= 0.5 / n
    ratio *= 2.0
    ratio -= 1.0
    np.multiply(c[0], ratio, out=c[1])
    # One product for the Fisher matrix (rows 0-2) and the Hessian's (3-5).
    both = (c[:, None, :] * d).reshape(6, n) @ d.T
    fisher = both[:3]
    hess = both[3:]
    hess[0, 2] += a_b
    hess[2, 0] += a_b
    hess[1, 2] += b_b
    hess[2, 1] += b_b
    hess[2, 2] += s2_bb
    return value, grad, hess, fisher


_SHORT_MEMORY_EPS = 2.0**-60  # the weights beta**j dropped by `_short_memory_terms` are below


def _short_memory_terms(
    omega: float,
    alpha: float,
    beta: float,
    x: FloatArray,
    xlag: FloatArray,
    b: float,
    hessian: bool,
) -> tuple[float, FloatArray | None, FloatArray | None, FloatArray | None]:
    """`_newton_terms` for a short memory (``beta`` up to ~0.4 at n = 500, down to 0).

    ``B_t = sum_j beta**j xlag_{t-j}`` and ``A_t = sum_j beta**j`` with their first two
    beta-derivatives (weights ``j beta**(j-1)`` and ``j (j-1) beta**(j-2)``) are one matrix
    product of a sliding-window view of ``xlag`` (and of ones) with the weights, truncated at
    the ``K`` lags where ``beta**K < 2**-60`` (K <= ~45 here): no division by ``beta**t``, so
    no overflow, and exact derivatives at ``beta = 0`` too.
    """
    n = x.shape[0]
    if beta > 0.0:
        lags = min(n, max(3, int(math.log(_SHORT_MEMORY_EPS) / math.log(beta)) + 2))
    else:
        lags = 3
    j = np.arange(lags, dtype=np.float64)
    powers = np.power(beta, j)  # 0**0 = 1
    # Rows in reverse lag order (see `windows`); only the weights themselves without hessian.
    weights = np.zeros((lags, 3) if hessian else (lags, 1))
    weights[::-1, 0] = powers
    if hessian:
        weights[-2::-1, 1] = j[1:] * powers[:-1]
        weights[-3::-1, 2] = j[2:] * j[1:-1] * powers[:-2]
    padded = np.zeros((2, lags - 1 + n))
    padded[0, lags - 1 :] = xlag
    padded[1, lags - 1 :] = 1.0
    item = padded.itemsize
    windows = np.ndarray(
        (2, n, lags), dtype=np.float64, buffer=padded, strides=(padded.strides[0], item, item)
    )
    # windows[k, t, i] is lag lags - 1 - i of row k at t, the weights' row i.
    sums = windows @ weights  # (2, n, 3): [B, dB, d2B] and [A, dA, d2A] (column 0 alone: V)
    t = _index_tables(n)[0]
    q = np.power(beta, t)  # beta**t
    s2 = omega * sums[1, :, 0] + alpha * sums[0, :, 0] + (b * beta) * q
    inv = 1.0 / s2
    ratio = x * inv
    value = 0.5 * (_LOG_2PI + (float(np.log(s2).sum()) + float(ratio.sum())) / n)
    if not hessian:
        return value, None, None, None
    d = np.empty((3, n))
    d[0] = sums[1, :, 0]
    d[1] = sums[0, :, 0]
    d[2] = omega * sums[1, :, 1] + alpha * sums[0, :, 1] + b * (t + 1.0) * q
    q_before = np.zeros(n)  # beta**(t-1), where its factor t is not 0
    q_before[1:] = q[:-1]
    d_bb = omega * sums[1, :, 2] + alpha * sums[0, :, 2] + b * (t + 1.0) * t * q_before
    w = (1.0 - ratio) * inv
    w *= 0.5 / n
    grad = d @ w
    c = inv * inv
    c *= 0.5 / n
    dc = np.empty((6, n))
    np.multiply(d, c, out=dc[:3])
    np.multiply(dc[:3], 2.0 * ratio - 1.0, out=dc[3:])
    both = dc @ d.T
    fisher = both[:3]
    hess = both[3:]
    a_b = float(w @ sums[1, :, 1])
    b_b = float(w @ sums[0, :, 1])
    hess[0, 2] += a_b
    hess[2, 0] += a_b
    hess[1, 2] += b_b
    hess[2, 1] += b_b
    hess[2, 2] += float(w @ d_bb)
    return value, grad, hess, fisher


def _newton_feasible(
    params: FloatArray | list[float],
    lower: FloatArray | list[float],
    upper: FloatArray | list[float],
) -> bool:
    """Inside the constraints (where `_newton_terms` is defined)."""
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    return lower[0] <= omega <= upper[0] and alpha >= 0.0 and beta >= 0.0 and alpha + beta <= 1.0


def _project(params: list[float], lower: list[float], upper: list[float]) -> list[float]:
    """Onto ``alpha + beta <= 1``, ``alpha, beta >= 0`` and omega's bounds (a rounding error
    away; in place; returns it)."""
    excess = params[1] + params[2] - 1.0
    if excess > 0.0:
        params[1] -= 0.5 * excess
        params[2] = 1.0 - params[1]
    if params[1] < 0.0:
        params[1] = 0.0
    if params[2] < 0.0:
        params[2] = 0.0
    params[0] = min(max(params[0], lower[0]), upper[0])
    return params


# The quick path's constraints, as a working set (w0, w1, w2, w3) of which are held as
# equalities: w0: omega >= its lower bound; w1: alpha >= 0; w2: alpha + beta <= 1; w3: beta >= 0.
# omega's upper bound (10 times the variance) is never near an optimum: a step beyond it ends
# the quick path (`_newton_feasible`), and SLSQP takes over.
_WorkingSet = tuple[bool, bool, bool, bool]
# Every working set, likeliest first where the last one fails (on simulate's refits: none, then
# alpha = 0, then alpha = 0 with alpha + beta = 1 or with omega at its bound, ...).
_LIKELY_FACES: tuple[_WorkingSet, ...] = (
    (False, False, False, False),
    (False, True, False, False),
    (False, True, True, False),
    (True, True, False, False),
    (False, False, True, False),
    (True, False, False, False),
    (False, True, False, True),
    (False, False, False, True),
)
_WORKING_SETS: tuple[_WorkingSet, ...] = _LIKELY_FACES + tuple(
    (w0, w1, w2, w3)
    for w0 in (False, True)
    for w1 in (False, True)
    for w2 in (False, True)
    for w3 in (False, True)
    # alpha = beta = 0 with alpha + beta = 1 is empty
    if not (w1 and w2 and w3) and (w0, w1, w2, w3) not in _LIKELY_FACES
)
_Gap = tuple[float, float, float, float]
_E_OMEGA, _E_ALPHA, _E_BETA = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
_ALONG_PERSISTENCE = (0.0, 1.0, -1.0)  # on alpha + beta = 1: beta follows alpha


@lru_cache(maxsize=8)
def _free_directions(working: _WorkingSet) -> tuple[tuple[float, float, float], ...]:
    """A basis of the moves that keep every constraint of ``working`` an equality."""
    w0, w1, w2, w3 = working
    basis = [] if w0 else [_E_OMEGA]
    held = w1 + w2 + w3  # constraints on (alpha, beta), independent two by two
    if held == 0:
        basis.extend((_E_ALPHA, _E_BETA))
    elif held == 1:
        basis.append(_E_BETA if w1 else _ALONG_PERSISTENCE if w2 else _E_ALPHA)
    return tuple(basis)


def _solve_pd(m: list[list[float]], rhs: list[float]) -> list[float] | None:
    """``m^-1 rhs`` for a symmetric positive definite ``m`` of size 1, 2 or 3 by Cholesky,
    unrolled in plain Python (several times faster than numpy.linalg at this size); None if a
    pivot falls below 1e-14 of its diagonal entry (not positive definite, or too
    ill-conditioned to trust)."""
    k = len(rhs)
    a00 = m[0][0]
    if not a00 > 0.0:
        return None
    l00 = math.sqrt(a00)
    y0 = rhs[0] / l00
    if k == 1:
        return [y0 / l00]
    l10 = m[1][0] / l00
    a11 = m[1][1]
    d1 = a11 - l10 * l10
    if not d1 > 1e-14 * abs(a11):
        return None
    l11 = math.sqrt(d1)
    y1 = (rhs[1] - l10 * y0) / l11
    if k == 2:
        x1 = y1 / l11
        return [(y0 - l10 * x1) / l00, x1]
    l20 = m[2][0] / l00
    l21 = (m[2][1] - l20 * l10) / l11
    a22 = m[2][2]
    d2 = a22 - l20 * l20 - l21 * l21
    if not d2 > 1e-14 * abs(a22):
        return None
    l22 = math.sqrt(d2)
    x2 = (rhs[2] - l20 * y0 - l21 * y1) / l22 / l22
    x1 = (y1 - l21 * x2) / l11
    return [(y0 - l10 * x1 - l20 * x2) / l00, x1, x2]


def _equality_step(
    h: list[list[float]], g: list[float], gap: _Gap, working: _WorkingSet
) -> tuple[list[float], list[float]] | None:
    """Minimiser ``d`` of the model ``g.d + d.h.d / 2`` with the constraints of ``working`` held
    as equalities (``gap``: the move that puts each exactly on its bound), and the model's
    gradient ``g + h d`` there; None where ``h`` is not positive definite on the face."""
    w0, w1, w2, w3 = working
    d = [gap[0] if w0 else 0.0, gap[1] if w1 else 0.0, gap[3] if w3 else 0.0]
    if w2:
        if w3:
            d[1] = gap[2] - d[2]
        else:
            d[2] = gap[2] - d[1]
    h0, h1, h2 = h
    d0, d1, d2 = d
    # The model's gradient at the fixed part of the step.
    g0 = g[0] + h0[0] * d0 + h0[1] * d1 + h0[2] * d2
    g1 = g[1] + h1[0] * d0 + h1[1] * d1 + h1[2] * d2
    g2 = g[2] + h2[0] * d0 + h2[1] * d1 + h2[2] * d2
    free = _free_coordinates(working)
    if free is not None:  # a coordinate face: the reduced system is a submatrix
        if free:
            u = _solve_pd([[h[i][j] for j in free] for i in free], [-(g0, g1, g2)[i] for i in free])
            if u is None:
                return None
            for ui, i in zip(u, free, strict=True):
                d[i] += ui
    else:  # on alpha + beta = 1 (alpha, beta free there): along (0, 1, -1), with omega or not
        z = _ALONG_PERSISTENCE
        hz = [h0[1] - h0[2], h1[1] - h1[2], h2[1] - h2[2]]
        if w0:
            u = _solve_pd([[hz[1] - hz[2]]], [-(g1 - g2)])
            if u is None:
                return None
            d[1] += u[0]
            d[2] -= u[0]
        else:
            reduced = [[h0[0], hz[0]], [hz[0], hz[1] - hz[2]]]
            u = _solve_pd(reduced, [-g0, -(g1 - g2)])
            if u is None:
                return None
            d[0] += u[0]
            d[1] += u[1] * z[1]
            d[2] += u[1] * z[2]
    d0, d1, d2 = d
    grad = [
        g[0] + h0[0] * d0 + h0[1] * d1 + h0[2] * d2,
        g[1] + h1[0] * d0 + h1[1] * d1 + h1[2] * d2,
        g[2] + h2[0] * d0 + h2[1] * d1 + h2[2] * d2,
    ]
    return d, grad


@lru_cache(maxsize=16)
def _free_coordinates(working: _WorkingSet) -> tuple[int, ...] | None:
    """The coordinates free on the face of ``working`` when it is a coordinate face (every
    basis vector of `_free_directions` a unit vector); None on the face alpha + beta = 1 with
    alpha and beta free."""
    indices = []
    for z in _free_directions(working):
        if z == _ALONG_PERSISTENCE:
            return None
        indices.append(z.index(1.0))
    return tuple(indices)


def _qp_step(
    h: list[list[float]],
    g: list[float],
    params: list[float],
    lower: list[float],
    guess: _WorkingSet,
    convex: bool,
) -> tuple[list[float], _WorkingSet] | None:
    """The step of the quadratic model ``g.d + d.h.d / 2`` to its minimum over the constraints
    (``omega >= lower[0]``, ``alpha >= 0``, ``alpha + beta <= 1``, ``beta >= 0``), and the
    working set that holds there: Newton's step with the active set found exactly.

    A working set is the answer when its equality-constrained minimiser is feasible and its
    Lagrange multipliers are >= 0 (the KKT conditions; ``h`` positive definite on that face:
    a local minimum of the model). ``guess`` (the last iteration's working set) is tried first;
    then, when ``h`` is positive definite (``convex``, or checked here), the others, likeliest
    first (`_WORKING_SETS`): for a convex model the KKT point is its unique minimum. None: no
    answer (the guess failed and ``h`` is not positive definite).
    """
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    gap = (float(lower[0]) - omega, -alpha, 1.0 - alpha - beta, -beta)
    found = _kkt_step(h, g, gap, guess)
    if found is not None:
        return found, guess
    if not (convex or _solve_pd(h, [0.0, 0.0, 0.0]) is not None):
        return None
    for working in _WORKING_SETS:
        if working != guess:
            found = _kkt_step(h, g, gap, working)
            if found is not None:
                return found, working
    return None


def _kkt_step(
    h: list[list[float]], g: list[float], gap: _Gap, working: _WorkingSet
) -> list[float] | None:
    """`_equality_step` of ``working`` where it satisfies the KKT conditions, else None."""
    solved = _equality_step(h, g, gap, working)
    if solved is None:
        return None
    d, grad = solved
    w0, w1, w2, w3 = working
    # Feasible for the constraints not held (a rounding error outside is snapped later).
    if (
        (not w0 and d[0] < gap[0] - 1e-13)
        or (not w1 and d[1] < gap[1] - 1e-13)
        or (not w2 and d[1] + d[2] > gap[2] + 1e-13)
        or (not w3 and d[2] < gap[3] - 1e-13)
    ):
        return None
    # Multipliers of c(params + d) >= 0: grad = sum lambda_i grad c_i, with grad c =
    # e_omega, e_alpha, -(e_alpha + e_beta) and e_beta.
    lambda2 = (-grad[1] if w3 and not w1 else -grad[2]) if w2 else 0.0
    lambda1 = grad[1] + lambda2 if w1 else 0.0
    lambda3 = grad[2] + lambda2 if w3 else 0.0
    if (w0 and grad[0] < 0.0) or lambda1 < 0.0 or lambda2 < 0.0 or lambda3 < 0.0:
        return None
    return d


def _on_face(params: list[float], working: _WorkingSet, lower: list[float]) -> list[float]:
    """``params`` with the constraints of ``working`` made exact equalities (in place)."""
    if working[0]:
        params[0] = lower[0]
    if working[1]:
        params[1] = 0.0
    if working[3]:
        params[2] = 0.0
    if working[2]:
        if working[3]:
            params[1] = 1.0
        else:
            params[2] = 1.0 - params[1]
    return params


def _newton(
    start: FloatArray,
    x: FloatArray,
    xlag: FloatArray,
    b: float,
    lower: FloatArray,
    upper: FloatArray,
    budget: int,
) -> tuple[FloatArray | None, int]:
    """Newton's method for the constrained problem (sequential quadratic programming with the
    exact Hessian), with a backtracking line search inside the constraints.

    Returns ``(params, evaluations)``; ``params`` is None when the quick path gives up: the
    start is outside the region `_newton_terms` handles (``beta`` below ~0.4 at n = 500), a
    step leaves it, the line search stalls, or `_NEWTON_MAX_ITERATIONS` or ``budget``
    evaluations passed.

    Each step goes to the minimum of the quadratic model over the constraints (`_qp_step`), so
    the bounds that bind at the optimum are found in one step and held exactly: ``alpha >= 0``
    (calm windows: alpha = 0 exactly), ``alpha + beta <= 1`` ("nonstationary" windows), both
    (the corner alpha = 0, beta = 1) and omega's lower bound. The segment from a feasible point
    to a feasible step is feasible (the constraints are linear), so the line search needs no
    projection. Where the Hessian is not positive definite (far from the optimum) the model
    uses its Gauss-Newton part (Fisher scoring). Converged means: the model is the exact
    Hessian's, and the Newton decrement ``-g.d`` is below `_NEWTON_DECREMENT`.
    """
    if budget < 1 or not _newton_feasible(start, lower, upper):
        return None, 0
    # Python floats between the evaluations: 3-vectors are cheaper as lists than as arrays.
    params = start.tolist()
    bounds = lower.tolist(), upper.tolist()
    evaluations = 1
    terms = _newton_terms(params, x, xlag, b, True)
    value, grad, hess, fisher = terms
    working: _WorkingSet = (
        params[0] <= bounds[0][0],
        params[1] <= 0.0,
        params[1] + params[2] >= 1.0,
        params[2] <= 0.0,
    )
    for _ in range(_NEWTON_MAX_ITERATIONS):
        assert grad is not None and hess is not None and fisher is not None
        g = grad.tolist()
        h = hess.tolist()
        # The exact Hessian's model: its KKT point on the guessed face (positive definite
        # there), else its minimum over every face when it is positive definite everywhere;
        # where that is no descent (a non-convex model), Fisher scoring's.
        found = _qp_step(h, g, params, bounds[0], working, False)
        exact = found is not None
        if found is not None:
            d = found[0]
            decrement = -(g[0] * d[0] + g[1] * d[1] + g[2] * d[2])
            exact = decrement >= 0.0
        if not exact:
            found = _qp_step(fisher.tolist(), g, params, bounds[0], working, True)
            if found is None:
                return None, evaluations
            d = found[0]
            decrement = -(g[0] * d[0] + g[1] * d[1] + g[2] * d[2])
            if not decrement >= 0.0:
                return None, evaluations
        assert found is not None
        working = found[1]
        if exact and decrement < _NEWTON_DECREMENT:
            final = [params[0] + d[0], params[1] + d[1], params[2] + d[2]]
            final = _on_face(_project(final, *bounds), working, bounds[0])
            if not _newton_feasible(final, *bounds):
                return None, evaluations
            return np.array(final), evaluations
        # Backtracking: the full step with every derivative (usually accepted: then they are
        # the next iteration's), shorter ones by the value alone.
        size = 1.0
        while True:
            trial = [params[0] + size * d[0], params[1] + size * d[1], params[2] + size * d[2]]
            _project(trial, *bounds)
            if size == 1.0:
                _on_face(trial, working, bounds[0])
            if _newton_feasible(trial, *bounds):
                if evaluations >= budget:
                    return None, evaluations
                evaluations += 1
                terms = _newton_terms(trial, x, xlag, b, size == 1.0)
                slope = sum(gi * (ti - pi) for gi, ti, pi in zip(g, trial, params, strict=True))
                if terms[0] <= value + _ARMIJO * slope:
                    break
            size *= 0.5
            if size < _MIN_STEP:
                return None, evaluations
        params = trial
        if terms[1] is None:
            if evaluations >= budget:
                return None, evaluations
            evaluations += 1
            terms = _newton_terms(params, x, xlag, b, True)
        value, grad, hess, fisher = terms
    return None, evaluations


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
    backcast = _arch_backcast(x)
    xlag = np.empty(n)
    xlag[0] = backcast
    xlag[1:] = x[:-1]
    target = float(x.sum()) / n  # 1 up to rounding; kept explicit to mirror arch's formulas
    lower = np.array((_OMEGA_BOUNDS[0] * target, 0.0, 0.0))
    upper = np.array((_OMEGA_BOUNDS[1] * target, 1.0, 1.0))
    budget = max(1, int(max_evaluations))

    warm: FloatArray | None = None
    if previous is not None and previous.status != "failed":
        warm = np.array((previous.omega / (rms * rms), previous.alpha, previous.beta))
        if np.isfinite(warm).all():
            warm = np.clip(warm, lower, upper)
            if warm[1] + warm[2] > 1.0:  # the constraint may be marginally violated by rounding
                warm[1:] /= warm[1] + warm[2]
        else:
            warm = None

    # The quick path: Newton from the previous optimum (the window moved by a few bars, so the
    # optimum moved a little); then, if it gave up, the full path: the best of arch's grid and
    # the warm start, by Newton and else by SLSQP.
    grid = _grid(n)
    values = _grid_values(grid, target, x, xlag, backcast)
    best = int(np.nanargmin(values)) if np.isfinite(values).any() else 0
    start = grid.params[best] * np.array((target, 1.0, 1.0))
    if warm is not None:
        # Its value alone (the grid wins ~70% of the refits of `simulate`, where Newton's first
        # evaluation, with derivatives, would be wasted).
        if _newton_feasible(warm, lower, upper):
            warm_value = _newton_terms(warm, x, xlag, backcast, False)[0]
        else:
            warm_value = _negloglik(warm, None, x, xlag, backcast)
        if not warm_value > values[best]:
            start = warm  # the warm start wins ties against the grid
    method: Literal["newton", "slsqp"] = "newton"
    params, evaluations = _newton(start, x, xlag, backcast, lower, upper, budget)
    if params is None and evaluations < budget:
        method = "slsqp"
        params, more, failure = _slsqp(start, x, xlag, backcast, lower, upper, budget - evaluations)
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
    s2 = _variances(params, x, xlag, backcast)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        value = 0.5 * (_LOG_2PI + (float(np.log(s2).sum()) + float((x / s2).sum())) / n)
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


def _slsqp(
    start: FloatArray,
    x: FloatArray,
    xlag: FloatArray,
    backcast: float,
    lower: FloatArray,
    upper: FloatArray,
    budget: int,
) -> tuple[FloatArray | None, int, str | None]:
    """nlopt's SLSQP from ``start``: ``(params, evaluations, failure)``; ``params`` is None when
    it fails (``failure`` says why, or is None when the ``budget`` of evaluations ran out)."""
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

    if budget < 1:
        return None, 0, None
    opt = nlopt.opt(nlopt.LD_SLSQP, 3)
    opt.set_min_objective(objective)
    opt.add_inequality_constraint(stationarity, 0.0)
    opt.set_lower_bounds(lower)
    opt.set_upper_bounds(upper)
    opt.set_ftol_rel(_FTOL_REL)
    opt.set_xtol_rel(_XTOL_REL)
    opt.set_maxeval(budget)
    try:
        params = np.asarray(opt.optimize(start), dtype=np.float64)
        result = opt.last_optimize_result()
    except nlopt.RoundoffLimited:
        # SLSQP stops this way when rounding prevents further progress: the best point it saw
        # is the optimum to the precision the likelihood can be evaluated at.
        return best_params, evaluations, None
    except Exception as exc:  # nlopt's failures (nlopt.runtime_error, ...) are not RuntimeError
        # Seen on degenerate data, e.g. an explosive series whose omega is far below its bound.
        reason = opt.get_errmsg() or str(exc) or type(exc).__name__
        return None, evaluations, f"optimiser failed: {reason}"
    if result == nlopt.MAXEVAL_REACHED:
        return None, evaluations, None
    return params, evaluations, None


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
