"""The GARCH(1,1) Gaussian negative log-likelihood of `garch_fit` and its derivatives.

Pure numpy: the variance recursion as a vectorised geometric filter (`negloglik`, with its
gradient for SLSQP), and the value, gradient and Hessian in closed form for Newton's method
(`newton_terms`, `short_memory_terms` for short memories). Every function takes squared
returns ``x`` scaled to ``mean(x) = 1``, ``xlag`` (``x`` shifted one step, the backcast in
front) and the backcast ``b``, and returns the MEAN negative log-likelihood per observation.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

_BACKCAST_LAMBDA = 0.94  # arch's EWMA decay for the backcast
_BACKCAST_TAU = 75  # arch's backcast window
# Smallest power beta**j the geometric filter divides by; larger blocks would overflow 1 / beta**j.
MIN_POWER = 1e-200
LOG_2PI = math.log(2.0 * math.pi)
LOG_MIN_POWER = math.log(MIN_POWER)
# ``ndarray.sum`` without its Python wrapper (the same reduction, bit for bit): at n = 500 the
# per-call cost is what an evaluation spends.
_sum = np.add.reduce


def filter_powers(beta: float, n: int) -> FloatArray:
    """``beta**j`` for ``j < L``, with the block length ``L <= n`` keeping every power >= 1e-200."""
    length = n
    if beta <= 0.0:
        length = 1
    elif beta < 1.0:  # beta == 1 (the boundary) never underflows
        length = min(n, max(1, int(math.log(MIN_POWER) / math.log(beta))))
    return np.power(beta, np.arange(length, dtype=np.float64))


def geometric_filter(u: FloatArray, beta: float, init: FloatArray, q: FloatArray) -> FloatArray:
    """``y[..., t] = u[..., t] + beta * y[..., t-1]`` with ``y[..., -1] = init``, vectorised.

    The sequential recursion is rewritten as a geometric-weights filter
    ``y_t = beta**t * cumsum(u_j / beta**j)_t + beta**(t+1) * init``, evaluated in blocks of
    ``len(q)`` so ``1 / beta**j`` never overflows (one block unless beta**T < 1e-200). All inputs
    here are >= 0, so the cumulative sums cannot cancel and the relative error stays ~T * eps.
    ``q`` is `filter_powers(beta, T)`. ``u`` has shape ``(..., T)`` and ``init`` shape
    ``u.shape[:-1]``.
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


def variances(params: FloatArray, x: FloatArray, xlag: FloatArray, backcast: float) -> FloatArray:
    """Conditional variances sigma2_0..sigma2_{T-1} for squared returns ``x``.

    ``xlag`` is ``x`` shifted one step with the backcast in front, so ``u_0 = omega + alpha * b``
    and the filter's initial value ``b`` adds ``beta * b``: exactly arch's start.
    """
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    q = filter_powers(beta, x.shape[0])
    return geometric_filter(omega + alpha * xlag, beta, np.asarray(backcast), q)


def negloglik(
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
    q = filter_powers(beta, n)
    if grad is None:
        s2 = geometric_filter(omega + alpha * xlag, beta, np.asarray(backcast), q)
    else:
        stacked = np.stack((omega + alpha * xlag, np.ones(n), xlag))
        filtered = geometric_filter(stacked, beta, np.array((backcast, 0.0, 0.0)), q)
        s2 = filtered[0]
    ratio = x / s2
    value = 0.5 * (LOG_2PI + float(np.mean(np.log(s2))) + float(np.mean(ratio)))
    if grad is not None:
        s2lag = np.empty(n)
        s2lag[0] = backcast
        s2lag[1:] = s2[:-1]
        d_beta = geometric_filter(s2lag, beta, np.asarray(0.0), q)
        weights = (0.5 / n) * (1.0 - ratio) / s2
        grad[0] = float(weights @ filtered[1])
        grad[1] = float(weights @ filtered[2])
        grad[2] = float(weights @ d_beta)
    return value


def arch_backcast(squared: FloatArray) -> float:
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


@lru_cache(maxsize=8)
def index_tables(n: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Read-only tables of ``t = 0..n-1`` for `newton_terms`: ``t``, the weights
    ``[1, t, t² - t, 2t - 1, t + 1, t (t + 1)]`` as rows (6, n) and ``[t, t²]`` (2, n)."""
    t = np.arange(n, dtype=np.float64)
    weights = np.stack((np.ones(n), t, t * t - t, 2.0 * t - 1.0, t + 1.0, t * (t + 1.0)))
    moments = np.stack((t, t * t))
    for table in (t, weights, moments):
        table.setflags(write=False)
    return t, weights, moments


def newton_terms(
    params: FloatArray | list[float], x: FloatArray, xlag: FloatArray, b: float, hessian: bool
) -> tuple[float, FloatArray | None, FloatArray | None, FloatArray | None]:
    """Mean negative log-likelihood and, with ``hessian``, its gradient and Hessian (3, 3).

    Returns ``(value, grad, hess, fisher)``; without ``hessian`` the last three are None.
    ``fisher`` is the Gauss-Newton part of the Hessian with ``x / s2`` replaced by its
    expectation 1 (Fisher scoring's matrix, positive semi-definite). ``0 <= beta <= 1``;
    where ``beta**(n-1) < 1e-200`` (beta below ~0.4 at n = 500, where ``1 / beta**t`` would
    overflow) `short_memory_terms` computes the same quantities.

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
    if beta <= 0.0 or (n - 1) * math.log(beta) < LOG_MIN_POWER:
        return short_memory_terms(omega, alpha, beta, x, xlag, b, hessian)
    t, weights, moments = index_tables(n)
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
        s2 = (xlag / q).cumsum()
        s2 *= alpha
        s2 += b * beta
        s2 *= q
        s2 += omega * a
        value = 0.5 * (LOG_2PI + (float(_sum(np.log(s2))) + float(_sum(x / s2))) / n)
        return value, None, None, None
    z = np.empty((5, n))
    np.multiply(moments, q, out=z[:2])  # q t, q t²
    np.divide(xlag, q, out=z[2])
    np.multiply(moments, z[2], out=z[3:])  # xlag t / q, xlag t² / q
    sums = z.cumsum(axis=1)  # rows S_1, S_2, T_0, T_1, T_2
    np.multiply(sums[2], q, out=d[1])
    s2 = sums[2] * alpha
    s2 += b * beta
    s2 *= q
    s2 += omega * a
    inv = 1.0 / s2
    ratio = x * inv
    value = 0.5 * (LOG_2PI + (float(_sum(np.log(s2))) + float(_sum(ratio))) / n)
    w = 1.0 - ratio  # d value / d s2_t, times n / 0.5
    w *= inv
    w *= 0.5 / n
    # The sums over t with w: sw = (w.S_1, w.S_2), tw[i, k] = (w q weights_i).T_k,
    # ew = sum(w q (t + 1)), sum(w q t (t + 1)).
    weighted = weights * (w * q)
    sw0, sw1 = (sums[:2] @ w).tolist()
    tw = (weighted @ sums[2:].T).tolist()
    ew0, ew1 = _sum(weighted[4:], axis=1).tolist()
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


_SHORT_MEMORY_EPS = 2.0**-60  # the weights beta**j dropped by `short_memory_terms` are below


def short_memory_terms(
    omega: float,
    alpha: float,
    beta: float,
    x: FloatArray,
    xlag: FloatArray,
    b: float,
    hessian: bool,
) -> tuple[float, FloatArray | None, FloatArray | None, FloatArray | None]:
    """`newton_terms` for a short memory (``beta`` up to ~0.4 at n = 500, down to 0).

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
    t = index_tables(n)[0]
    q = np.power(beta, t)  # beta**t
    s2 = omega * sums[1, :, 0] + alpha * sums[0, :, 0] + (b * beta) * q
    inv = 1.0 / s2
    ratio = x * inv
    value = 0.5 * (LOG_2PI + (float(_sum(np.log(s2))) + float(_sum(ratio))) / n)
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
