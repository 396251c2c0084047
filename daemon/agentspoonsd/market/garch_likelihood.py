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
from typing import NamedTuple

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
    n = x.shape[0]
    if _long_memory(beta, n):
        return _long_memory_variances(omega, alpha, beta, xlag, backcast)
    q = filter_powers(beta, n)
    return geometric_filter(omega + alpha * xlag, beta, np.asarray(backcast), q)


def _long_memory(beta: float, n: int) -> bool:
    """Whether ``beta**(n-1) >= 1e-200``: the closed forms divide by ``beta**t`` (`_powers`);
    below, `short_memory_terms` and the block filter do without."""
    return beta > 0.0 and (n - 1) * math.log(beta) >= LOG_MIN_POWER


def _powers(beta: float, n: int) -> tuple[FloatArray, FloatArray]:
    """``(beta**t, A_t)`` for ``t < n``, ``A_t = sum_{j<=t} beta**j``; ``beta**(n-1) >= 1e-200``.

    ``A_t = (1 - beta**(t+1)) / (1 - beta)`` through expm1: accurate for beta near 1 too; at the
    corner beta = 1 ("nonstationary" with alpha = 0) it is ``t + 1``.
    """
    tables = index_tables(n)
    log_beta = math.log(beta)
    scaled = tables.t_next * log_beta
    q = np.exp(scaled[0], out=scaled[0])
    if beta == 1.0:
        return q, tables.tail[0].copy()
    a = np.expm1(scaled[1], out=scaled[1])
    a *= 1.0 / math.expm1(log_beta)
    return q, a


def _long_memory_variances(
    omega: float, alpha: float, beta: float, xlag: FloatArray, b: float
) -> FloatArray:
    """`variances` as ``omega A_t + beta**t (alpha cumsum(xlag / beta**t) + b beta)`` (see
    `newton_terms`), for ``beta**(n-1) >= 1e-200``: a few numpy calls, no block loop."""
    q, a = _powers(beta, xlag.shape[0])
    s2 = (xlag / q).cumsum()
    s2 *= alpha
    s2 += b * beta
    s2 *= q
    a *= omega
    s2 += a
    return s2


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


class IndexTables(NamedTuple):
    """Read-only tables of ``t = 0..n-1`` for `newton_terms`, each row a function of ``t``."""

    t: FloatArray
    """``t`` (n,)."""
    t_next: FloatArray
    """``[t, t + 1]`` (2, n): the exponents of ``beta**t`` and ``A_t``."""
    moments: FloatArray
    """``[t, t²]`` (2, n): the rows of ``T_1`` and ``T_2`` from ``T_0``'s."""
    moments_reversed: FloatArray
    """``[t², t]`` (2, n): the rows of ``S_2`` and ``S_1`` from ``beta**t``."""
    tail: FloatArray
    """``[t + 1, t (t + 1)]`` (2, n): the backcast term's first and second beta-derivatives."""
    curvature: FloatArray
    """``[t² - t, 2t - 1]`` (2, n): the weights of ``T_0`` and ``T_1`` in ``d2B/dbeta2``."""


@lru_cache(maxsize=8)
def index_tables(n: int) -> IndexTables:
    t = np.arange(n, dtype=np.float64)
    tables = IndexTables(
        t,
        np.stack((t, t + 1.0)),
        np.stack((t, t * t)),
        np.stack((t * t, t)),
        np.stack((t + 1.0, t * (t + 1.0))),
        np.stack((t * t - t, 2.0 * t - 1.0)),
    )
    for table in tables:
        table.setflags(write=False)
    return tables


Terms = tuple[float, list[float] | None, list[list[float]] | None, list[list[float]] | None]
"""``(value, grad, hess, fisher)`` of `newton_terms`: plain floats, for the 3-vector arithmetic
of `garch_newton` (cheaper as lists than as arrays)."""


def newton_terms(
    params: FloatArray | list[float], x: FloatArray, xlag: FloatArray, b: float, hessian: bool
) -> Terms:
    """Mean negative log-likelihood and, with ``hessian``, its gradient and Hessian (3 × 3).

    Returns ``(value, grad, hess, fisher)`` as plain floats and lists; without ``hessian`` the
    last three are None. ``fisher`` is the Gauss-Newton part of the Hessian with ``x / s2``
    replaced by its expectation 1 (Fisher scoring's matrix, positive semi-definite).
    ``0 <= beta <= 1``; where ``beta**(n-1) < 1e-200`` (beta below ~0.4 at n = 500, where
    ``1 / beta**t`` would overflow) `short_memory_terms` computes the same quantities.

    For a fixed backcast ``b`` the variance is linear in omega and alpha:
    ``s2_t = omega A_t + alpha B_t + b beta**(t+1)`` with ``A_t = sum_{j<=t} beta**j`` (closed
    form) and ``B_t = sum_{j<=t} beta**(t-j) xlag_j``. Their beta-derivatives are closed forms
    in the running sums ``S_k = cumsum(j**k beta**j)`` (k = 1, 2) and
    ``T_k = cumsum(j**k xlag_j / beta**j)`` (k = 0, 1, 2), so one cumulative sum over five
    rows replaces nested derivative filters: ``dA/dbeta = S_1 / beta``,
    ``d2A/dbeta2 = (S_2 - S_1) / beta²``, ``dB/dbeta = beta**t (t T_0 - T_1) / beta`` and
    ``d2B/dbeta2 = beta**t ((t² - t) T_0 - (2t - 1) T_1 + T_2) / beta²``. The differences
    cancel up to a factor ~t / (1 - beta) (~1e3 at n = 500): the gradient stays accurate to
    ~1e-13 relative, the Hessian (which only steers the steps) to ~1e-10.

    Every sum over t is an entry of ONE matrix product ``weights @ rows.T`` (12 × 12): at
    n = 500 numpy's per-call cost dominates, not the flops, so the rows are built in place in
    two arrays and a few unused entries cost less than more calls.
    """
    omega, alpha, beta = float(params[0]), float(params[1]), float(params[2])
    n = x.shape[0]
    if not _long_memory(beta, n):
        return short_memory_terms(omega, alpha, beta, x, xlag, b, hessian)
    if not hessian:
        s2 = _long_memory_variances(omega, alpha, beta, xlag, b)
        value = 0.5 * (LOG_2PI + (float(_sum(np.log(s2))) + float(_sum(x / s2))) / n)
        return value, None, None, None
    tables = index_tables(n)
    q, a = _powers(beta, n)
    # rows: 0 A, 1 B, 2 q = beta**t, 3 ds2/dbeta, 4-8 T_0, T_1, T_2, S_2, S_1,
    # 9 q (t T_0 - T_1) = beta dB/dbeta, 10 (t + 1) q, 11 t (t + 1) q
    rows = np.empty((12, n))
    rows[0] = a
    rows[2] = q
    np.divide(xlag, q, out=rows[4])
    np.multiply(tables.moments, rows[4], out=rows[5:7])
    np.multiply(tables.moments_reversed, q, out=rows[7:9])
    np.add.accumulate(rows[4:9], axis=1, out=rows[4:9])
    np.multiply(rows[4], q, out=rows[1])
    db = rows[9]
    np.multiply(tables.t, rows[4], out=db)
    db -= rows[5]
    db *= q
    np.multiply(tables.tail, q, out=rows[10:12])
    # ds2/dbeta = omega S_1 / beta + alpha q (t T_0 - T_1) / beta + b (t + 1) q
    np.dot((omega / beta, alpha / beta, b), rows[8:11], out=rows[3])
    s2 = np.dot((omega, alpha, b * beta), rows[0:3])
    inv = 1.0 / s2
    ratio = x * inv
    value = 0.5 * (LOG_2PI + (float(_sum(np.log(s2))) + float(_sum(ratio))) / n)
    # weights: 0-3 c rows 0-3, 4-7 c ratio rows 0-3 (c = inv² / (2n): the Gauss-Newton
    # terms), 8 w = d value / d s2_t, 9-10 w q (t² - t), w q (2t - 1), 11 w q
    weights = np.empty((12, n))
    c = inv * inv
    c *= 0.5 / n
    np.multiply(rows[0:4], c, out=weights[0:4])
    np.multiply(weights[0:4], ratio, out=weights[4:8])
    w = weights[8]
    np.subtract(1.0, ratio, out=w)
    w *= inv
    w *= 0.5 / n
    np.multiply(w, q, out=weights[11])
    np.multiply(tables.curvature, weights[11], out=weights[9:11])
    m = (weights @ rows.T).tolist()
    mw = m[8]
    grad = [mw[0], mw[1], mw[3]]
    # The second derivatives of s2 add w.d2s2 where they are non-zero (s2 is linear in omega
    # and alpha: beta-omega = w.dA/dbeta, beta-alpha = w.dB/dbeta and beta-beta).
    a_b = mw[8] / beta
    b_b = mw[9] / beta
    s2_bb = (omega * (mw[7] - mw[8]) + alpha * (m[9][4] - m[10][5] + m[11][6])) / (
        beta * beta
    ) + b * mw[11] / beta
    # The derivative rows are 0, 1 and 3: sum c (2 ratio - 1) d_i d_j = 2 (c ratio) - c.
    fisher = [[m[i][j] for j in (0, 1, 3)] for i in (0, 1, 3)]
    hess = [[2.0 * m[4 + i][j] - m[i][j] for j in (0, 1, 3)] for i in (0, 1, 3)]
    hess[0][2] += a_b
    hess[2][0] += a_b
    hess[1][2] += b_b
    hess[2][1] += b_b
    hess[2][2] += s2_bb
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
) -> Terms:
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
    t = index_tables(n).t
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
    return value, grad.tolist(), hess.tolist(), fisher.tolist()
