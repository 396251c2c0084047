"""Pure helpers shared by the simulation models: intrabar paths, high/low and clustered volume.

No randomness is drawn here: every function takes the standard normal variates it needs, so the
models decide which generator feeds which purpose. Every operation is elementwise or runs along
the substep axis of one bar (``cumsum``/``max``/``min`` along axis 1), so each bar's result depends
only on that bar's inputs and never on how many bars are processed together; this is what lets the
models promise identical output whatever the block sizes.

Shapes: ``T`` bars, ``n`` substeps per bar. All arrays are float64.
"""

from __future__ import annotations

import math

import numpy as np

from agentspoonsd.market.block import FloatArray

MEAN_ABS_NORMAL: float = math.sqrt(2.0 / math.pi)
"""E|z| for a standard normal z."""


def mean_abs_unit_t(nu: float) -> float:
    """E|z| for a Student-t(nu) variate scaled to unit variance; nu > 2 (else ValueError)."""
    if not nu > 2:
        raise ValueError(f"nu must be > 2, got {nu}")
    log_ratio = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)
    mean_abs_t = 2.0 * math.sqrt(nu) * math.exp(log_ratio) / (math.sqrt(math.pi) * (nu - 1))
    return mean_abs_t * math.sqrt((nu - 2) / nu)


def bridge_extremes(
    log_return: FloatArray, bar_variance: FloatArray, normals: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Highest and lowest point of a Brownian bridge per bar, relative to the bar's log open.

    The bridge runs from 0 to ``log_return`` over ``n = normals.shape[1]`` equal substeps and has
    total variance ``bar_variance`` (so its scale matches the bar's own volatility). It is built
    from a free walk ``W`` with steps ``normals * sqrt(bar_variance / n)`` as
    ``B_k = W_k - (k/n) * (W_n - log_return)``, k = 1..n-1 (the interior points).

    Args:
        log_return: shape (T,), the bar's log return (the bridge's end point).
        bar_variance: shape (T,), >= 0, the bar's variance of the log return.
        normals: shape (T, n), n >= 1, i.i.d. standard normals.

    Returns:
        ``(max_excursion, min_excursion)``, shape (T,) each: max and min over the endpoints 0 and
        ``log_return`` and the interior points, so ``max_excursion >= max(0, log_return)`` and
        ``min_excursion <= min(0, log_return)``. With ``n == 1`` there are no interior points.
    """
    n = normals.shape[1]
    hi = np.maximum(log_return, 0.0)
    lo = np.minimum(log_return, 0.0)
    if n == 1:
        return hi, lo
    steps = normals * np.sqrt(bar_variance / n)[:, None]
    walk = np.cumsum(steps, axis=1)
    frac = np.arange(1, n, dtype=np.float64) / n
    interior = walk[:, :-1] - frac * (walk[:, -1:] - log_return[:, None])
    return np.maximum(hi, interior.max(axis=1)), np.minimum(lo, interior.min(axis=1))


def path_extremes(increments: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Bar return and extremes of a simulated intrabar log-price path.

    Args:
        increments: shape (T, n), n >= 1, the log-price increment of each substep.

    Returns:
        ``(log_return, max_excursion, min_excursion)``, shape (T,) each, relative to the bar's log
        open: the return is the path's end point (a sequential left-to-right sum of the row), the
        extremes are taken over the start 0 and every substep end, so they bound the return.
    """
    path = np.cumsum(increments, axis=1)
    log_return = np.ascontiguousarray(path[:, -1])
    hi = np.maximum(path.max(axis=1), 0.0)
    lo = np.minimum(path.min(axis=1), 0.0)
    return log_return, hi, lo


def high_low(
    open_: FloatArray,
    close: FloatArray,
    log_open: FloatArray,
    max_excursion: FloatArray,
    min_excursion: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """High and low prices from the intrabar excursions; shape (T,) each.

    ``exp(log_open + excursion)`` may differ from open or close by an ulp, so the result is also
    compared against ``open_`` and ``close`` themselves: ``low <= min(open, close)`` and
    ``max(open, close) <= high`` hold exactly.
    """
    high = np.maximum(np.maximum(open_, close), np.exp(log_open + max_excursion))
    low = np.minimum(np.minimum(open_, close), np.exp(log_open + min_excursion))
    return high, low


def clustered_volume(
    log_return: FloatArray,
    long_run_sd: float,
    mean_abs_ratio: float,
    scale: float,
    dispersion: float,
    normals: FloatArray,
) -> FloatArray:
    """Volume per bar that rises with the size of the move, so it clusters with volatility.

    ``volume = scale * (0.5 + |r| / long_run_sd) / (0.5 + mean_abs_ratio) * exp(s*N - s²/2)``
    with ``s = dispersion`` and N the given normals: lognormal noise of mean 1. The move is
    measured against the long-run volatility, not the bar's conditional one (``|r| / sigma_t =
    |z|`` is i.i.d. and would not cluster). ``mean_abs_ratio`` should be E|r| / long_run_sd so
    the long-run mean volume is about ``scale`` (exact when volatility is constant).

    Args:
        log_return: shape (T,).
        long_run_sd: > 0, per-bar long-run standard deviation of the log return.
        mean_abs_ratio: >= 0.
        scale: > 0; dispersion: >= 0.
        normals: shape (T,), standard normals.

    Returns:
        shape (T,), >= 0 (it can underflow to 0 only for an absurd dispersion).
    """
    activity = (0.5 + np.abs(log_return) / long_run_sd) * (scale / (0.5 + mean_abs_ratio))
    return activity * np.exp(dispersion * normals - 0.5 * dispersion * dispersion)
