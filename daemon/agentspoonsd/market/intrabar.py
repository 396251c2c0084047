"""Pure helpers shared by the simulation models: intrabar paths, high/low and clustered volume.

No randomness is drawn here: every function takes the standard normal and exponential variates
it needs, so the models decide which generator feeds which purpose. Every operation is elementwise
or runs along the substep axes of one bar (running sums, ``max``/``min``), so each bar's result
depends only on that bar's inputs and never on how many bars are processed together; this is what
lets the models promise identical output whatever the block sizes.

High and low are those of a continuous path: the bar is cut into ``n`` substeps whose end points
(the skeleton) are simulated, and the maximum and minimum of the Brownian bridge between
consecutive points are drawn from their exact law (`substep_extremes`). Taking the extremes over
the skeleton points alone would miss the excursions between them and make every range estimator
read low (15-23 % on GBM with 16 substeps; tests/test_ranges.py).

Shapes: ``T`` bars, ``n`` substeps per bar. All arrays are float64. Inputs come bar-major as the
generators draw them (``(T, n)``); the work is done substep-major (``(n, T)``), where numpy's
reductions over the substeps are fast.
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


def substep_extremes(
    points: FloatArray, variance: FloatArray, exponentials: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Highest and lowest point of a continuous path over each bar, given its substep skeleton.

    Between consecutive skeleton points ``a = points[k]`` and ``b = points[k + 1]`` the path is a
    Brownian bridge of variance ``v = variance[k]``, whose maximum has the classic law
    ``P(max > m) = exp(-2·(m - a)·(m - b) / v)`` for ``m >= max(a, b)`` (Glasserman, *Monte Carlo
    Methods in Financial Engineering*, 2004, §6.4). Inverting it with ``E = -ln U`` (a standard
    exponential) gives the exact draw ``max = (a + b + sqrt((b - a)² + 2·v·E)) / 2``, and the
    minimum symmetrically, ``(a + b - sqrt((b - a)² + 2·v·E')) / 2``. The bar's extremes are the
    max / min over its substeps.

    The maximum and the minimum of one substep use independent exponentials: each is exact on
    its own, their joint law within a substep is not (they are dependent). Across substeps the
    bridges are conditionally independent given the skeleton, so with several substeps the
    bar's high and low rarely come from the same one (tests/test_ranges.py measures the effect
    on the range estimators).

    Args:
        points: shape (n + 1, T), n >= 1, substep-major: ``points[k, t]`` is bar t's path at the
            end of substep k (``points[0]`` its start).
        variance: shape (n, T), or broadcastable to it (e.g. (T,)), >= 0, each substep's
            variance.
        exponentials: shape (T, 2, n), i.i.d. standard exponentials in the order a generator
            draws them bar by bar: ``[t, 0]`` for the maxima, ``[t, 1]`` for the minima.

    Returns:
        ``(highest, lowest)``, shape (T,) each, bounding every skeleton point of the bar exactly
        (``highest >= points.max(axis=0)``, ``lowest <= points.min(axis=0)``).
    """
    n, n_bars = points.shape[0] - 1, points.shape[1]
    start, end = points[:-1], points[1:]
    total = start + end
    gap = end - start
    np.multiply(gap, gap, out=gap)
    # Substep-major (2, n, T) so that the max / min over substeps are elementwise over rows:
    # numpy reduces along a short last axis many times slower.
    spread = np.empty((2, n, n_bars), dtype=np.float64)
    np.multiply(exponentials.transpose(1, 2, 0), 2.0 * variance, out=spread)
    spread += gap
    np.sqrt(spread, out=spread)
    np.add(total, spread[0], out=spread[0])
    np.subtract(total, spread[1], out=spread[1])
    highest = spread[0].max(axis=0)
    lowest = spread[1].min(axis=0)
    highest *= 0.5
    lowest *= 0.5
    # (a + b + |b - a|) / 2 may round an ulp below max(a, b): keep the skeleton inside exactly.
    np.maximum(highest, points.max(axis=0), out=highest)
    np.minimum(lowest, points.min(axis=0), out=lowest)
    return highest, lowest


def _running_sum(rows: FloatArray) -> None:
    """In place, ``rows[k] += rows[k - 1]`` for k = 1, 2, ...: every column's sequential
    left-to-right sum (the same floats as ``np.cumsum`` along axis 0, which numpy runs slowly
    along a short leading axis)."""
    for k in range(1, rows.shape[0]):
        np.add(rows[k - 1], rows[k], out=rows[k])


def bridge_extremes(
    log_return: FloatArray,
    bar_variance: FloatArray,
    normals: FloatArray,
    exponentials: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """Highest and lowest point of a Brownian bridge per bar, relative to the bar's log open.

    The bridge runs from 0 to ``log_return`` and has total variance ``bar_variance`` (so its
    scale matches the bar's own volatility). Its skeleton at ``n = normals.shape[1]`` equal
    substeps is built from a free walk ``W`` with steps ``normals * sqrt(bar_variance / n)`` as
    ``B_k = W_k - (k/n) * (W_n - log_return)``, k = 1..n-1 (the interior points), with
    ``B_0 = 0`` and ``B_n = log_return``; the extremes between skeleton points are then drawn
    exactly (`substep_extremes`, substep variance ``bar_variance / n``), so no excursion of the
    continuous path is missed.

    Args:
        log_return: shape (T,), the bar's log return (the bridge's end point).
        bar_variance: shape (T,), >= 0, the bar's variance of the log return.
        normals: shape (T, n), n >= 1, i.i.d. standard normals.
        exponentials: shape (T, 2, n), i.i.d. standard exponentials.

    Returns:
        ``(max_excursion, min_excursion)``, shape (T,) each, with
        ``max_excursion >= max(0, log_return)`` and ``min_excursion <= min(0, log_return)``.
    """
    n_bars, n = normals.shape
    step_variance = bar_variance / n
    points = np.empty((n + 1, n_bars), dtype=np.float64)
    points[0] = 0.0
    points[n] = log_return
    if n > 1:
        walk = np.multiply(normals.T, np.sqrt(step_variance), out=np.empty((n, n_bars)))
        _running_sum(walk)
        frac = (np.arange(1, n, dtype=np.float64) / n)[:, None]
        np.subtract(walk[:-1], frac * (walk[-1] - log_return), out=points[1:n])
    return substep_extremes(points, step_variance, exponentials)


def path_extremes(
    increments: FloatArray, variance: FloatArray, exponentials: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Bar return and extremes of a simulated intrabar log-price path.

    The path's points (the start 0 and every substep end) are its skeleton; between them it is
    taken as a Brownian bridge of the substep's own variance and its extremes are drawn exactly
    (`substep_extremes`). A drift within the substep does not change the bridge's law.

    Args:
        increments: shape (n, T), n >= 1, substep-major: ``increments[k, t]`` is the log-price
            increment of bar t's substep k.
        variance: shape (n, T), >= 0, each substep's variance, laid out as ``increments``.
        exponentials: shape (T, 2, n), i.i.d. standard exponentials (bar-major, as drawn).

    Returns:
        ``(log_return, max_excursion, min_excursion)``, shape (T,) each, relative to the bar's log
        open: the return is the path's end point (a sequential sum of the bar's increments in
        substep order), the extremes bound every point of the path, so they bound the return
        and 0.
    """
    n, n_bars = increments.shape
    points = np.empty((n + 1, n_bars), dtype=np.float64)
    points[0] = 0.0
    points[1:] = increments
    _running_sum(points[1:])
    hi, lo = substep_extremes(points, variance, exponentials)
    return points[n].copy(), hi, lo


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
