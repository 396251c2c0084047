"""arch's 16-point grid of starting values for the GARCH(1,1) fit, evaluated at once.

`grid_values` gives the mean negative log-likelihood at every starting point of the grid of
`starting_grid` for a window of ``n`` returns, by blocks (a few numpy calls for all 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .garch_likelihood import LOG_2PI, FloatArray, filter_powers

_sum = np.add.reduce  # ndarray.sum without its Python wrapper

# arch's starting-value grid: every (alpha, alpha + beta) pair, omega = (1 - persistence) * mean(r²)
_START_ALPHAS = (0.01, 0.05, 0.1, 0.2)
_START_PERSISTENCES = (0.5, 0.7, 0.9, 0.98)
_GRID_MIN_POWER = 1e-280  # smallest beta**j of the single-pass grid (1 / it and sums stay finite)


_GRID_BLOCK = 25  # columns per block of the single-pass grid's cumulative sums and products


@dataclass(frozen=True, slots=True)
class StartingGrid:
    """arch's 16 starting points for windows of ``n`` returns, with what `grid_values` needs.

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
def starting_grid(n: int) -> StartingGrid:
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
        return StartingGrid(params, tables, upper, None)  # type: ignore[arg-type]
    length = min(filter_powers(float(b), n).shape[0] for b in beta[:, 0])
    powers = beta ** np.arange(length, dtype=np.float64)
    powers.setflags(write=False)
    return StartingGrid(params, None, None, powers)


def grid_values(
    grid: StartingGrid, target: float, x: FloatArray, xlag: FloatArray, b: float
) -> FloatArray:
    """`negloglik` at every starting point of ``grid`` at once (omega scaled by ``target``)."""
    n = x.shape[0]
    alpha = grid.params[:, 1]
    if grid.single is not None:
        assert grid.upper is not None
        q_inverse, alpha_q, omega_a, beta_q = grid.single
        rows, m = q_inverse.shape
        padded = np.zeros((2, m))
        padded[0, :n] = xlag
        padded[1, :n] = x
        # Cumulative sums of positive terms by blocks: one 2-D matrix product for the sums inside
        # every block (numpy's cumsum is a sequential loop, 2-3x slower here; a 2-D product is
        # one BLAS call where a batched one is a loop of small ones), plus the running totals of
        # the blocks before.
        blocks = ((q_inverse * padded[0]).reshape(-1, _GRID_BLOCK) @ grid.upper).reshape(
            rows, m // _GRID_BLOCK, _GRID_BLOCK
        )
        blocks[:, 1:, :] += blocks[:, :-1, -1].cumsum(axis=1)[:, :, None]
        s2 = blocks.reshape(rows, m)
        s2 *= alpha_q
        s2 += target * omega_a
        s2 += b * beta_q
        s2[:, n:] = 1.0  # the padding: log 1 = 0, and x is 0 there
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            by_start: FloatArray = 0.5 * (
                LOG_2PI + (_sum(np.log(s2), axis=1) + _sum(padded[1] / s2, axis=1)) / n
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
        values: FloatArray = 0.5 * (LOG_2PI + (np.log(s2).sum(axis=1) + (x / s2).sum(axis=1)) / n)
    return values
