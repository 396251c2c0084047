"""Rolling per-bar volatility estimators over OHLC bars: pure numpy, no I/O, no clocks.

`RollingEstimators` consumes the `BarBlock` stream of one symbol and returns, for every bar, six
volatility estimates in per-bar units (standard deviations of per-bar log returns; annualisation
is done elsewhere). With ``C_{t-1}`` the previous bar's close::

    r_t = ln(C_t / C_{t-1})   close-to-close return
    o_t = ln(O_t / C_{t-1})   gap ("overnight") return
    c_t = ln(C_t / O_t)       open-to-close return
    u_t = ln(H_t / O_t)       d_t = ln(L_t / O_t)

Row ``t`` uses the ``n_t = min(W, k_t)`` most recent bars ending at ``t``, where ``k_t`` counts the
bars so far (``t`` included) that have a previous close: every bar except the very first one the
instance ever sees. All windowed estimators of a row use the same bars:

- ``close_to_close``: sample standard deviation (ddof=1) of ``r``.
- ``parkinson``: ``sqrt(sum(ln(H/L)²) / (4·ln 2·n))``.
- ``garman_klass``: ``sqrt(mean(0.5·ln(H/L)² − (2·ln 2 − 1)·c²))``.
- ``rogers_satchell``: ``sqrt(mean(u·(u − c) + d·(d − c)))``.
- ``yang_zhang``: ``sqrt(σo² + k·σc² + (1 − k)·σrs²)``, ``σo²``/``σc²`` the ddof=1 variances of
  ``o``/``c``, ``σrs²`` the Rogers–Satchell mean, ``k = 0.34 / (1.34 + (n + 1) / (n − 1))``.
- ``ewma``: RiskMetrics ``σ²_t = λ·σ²_{t−1} + (1 − λ)·r_t²`` seeded with ``σ²_1 = r_1²``; it ignores
  the window and reports ``sqrt(σ²_t)``.

Two marks a caller may put on bars (`RollingEstimators.update`):

- a *session gap* (the bar closes after the market was shut, e.g. the first bar of a trading day):
  ``close_to_close`` and ``ewma`` read the bar's in-session return ``c_t`` in place of ``r_t``, so
  the overnight move is not mixed into them as if it were one bar's; ``yang_zhang`` keeps ``o_t``
  (its overnight term is made for exactly that); ``returns`` stays ``r_t``.
- *close-only* (the source gave no high/low; they were made up from open and close): the four
  range-based estimators (``parkinson``, ``garman_klass``, ``rogers_satchell``, ``yang_zhang``)
  are NaN for every row whose window holds such a bar, and ``range_missing`` says so.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from agentspoonsd.market.block import BarBlock

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

ESTIMATOR_NAMES: tuple[str, ...] = (
    "close_to_close",
    "ewma",
    "parkinson",
    "garman_klass",
    "rogers_satchell",
    "yang_zhang",
)

_PARKINSON_DENOMINATOR = 4.0 * math.log(2.0)
_GK_CLOSE_WEIGHT = 2.0 * math.log(2.0) - 1.0

# Rows of the per-bar quantity matrix. The first three are those whose ddof=1 variance is needed
# (kept at the top so one slice selects them); the last three only need a window mean.
_R, _O, _C, _HL2, _GK, _RS = range(6)
_N_QUANTITIES = 6
_N_VARIANCES = 3
# The six log ratios r, o, c, ln(H/L), u, d as numerator / denominator rows of the price matrix
# (previous close, open, high, low, close): one division and one log for all of them.
_NUMERATORS = np.array([4, 1, 4, 2, 2, 3])
_DENOMINATORS = np.array([0, 0, 1, 3, 1, 1])
# Output matrix rows: the estimators in ESTIMATOR_NAMES order, then the returns.
_EWMA_ROW = ESTIMATOR_NAMES.index("ewma")
_RETURNS_ROW = len(ESTIMATOR_NAMES)
_WINDOWED_ROWS = np.array([i for i, name in enumerate(ESTIMATOR_NAMES) if name != "ewma"])
#: The estimators that read the bars' high and low (a contiguous run of output rows).
RANGE_ESTIMATORS: tuple[str, ...] = ("parkinson", "garman_klass", "rogers_satchell", "yang_zhang")
_RANGE_ROWS = slice(ESTIMATOR_NAMES.index("parkinson"), ESTIMATOR_NAMES.index("yang_zhang") + 1)
assert ESTIMATOR_NAMES[_RANGE_ROWS] == RANGE_ESTIMATORS
# Fewer full-window rows than this go through one accumulate over a strided window view; more go
# through a loop over the W window offsets with whole-block vector operations (cheaper per row,
# but ~4·W NumPy calls of fixed overhead).
_SMALL_BLOCK = 64
# Rows per pass of the offset loop: keeps its temporaries in cache on long blocks.
_CHUNK_ROWS = 16384


class EstimatorBlock(NamedTuple):
    """Estimates for the ``T`` bars of one `BarBlock`; every field is an array of shape ``(T,)``.

    The six estimator fields (named as in `ESTIMATOR_NAMES`) are float64 per-bar standard
    deviations of log returns, never negative. The five windowed ones are NaN where
    ``window < 2``, the four range-based ones (`RANGE_ESTIMATORS`) also where ``range_missing``,
    and nowhere else. ``ewma`` does not use the window: it is NaN exactly where ``returns`` is NaN
    (the very first bar ever) and defined from the first return on (equal to ``|r_1|`` there).
    The fields are rows of one freshly allocated matrix: they share nothing with the estimator.
    """

    close_to_close: FloatArray
    ewma: FloatArray
    parkinson: FloatArray
    garman_klass: FloatArray
    rogers_satchell: FloatArray
    yang_zhang: FloatArray
    returns: FloatArray
    """Log close-to-close return ``ln(C_t / C_{t-1})``; NaN only for the very first bar ever."""
    window: IntArray
    """int64: ``n_t``, how many bars the windowed estimators of the row use (0 ≤ n_t ≤ W)."""
    range_missing: BoolArray
    """True where the row's window holds a close-only bar (the range-based ones are NaN)."""

    @classmethod
    def from_rows(
        cls, rows: FloatArray, window: IntArray, range_missing: BoolArray
    ) -> EstimatorBlock:
        """The block whose float fields are the rows of `rows` (views, not copies): the
        estimators in `ESTIMATOR_NAMES` order, then the returns (``_RETURNS_ROW + 1`` rows)."""
        close_to_close, ewma, parkinson, garman_klass, rogers_satchell, yang_zhang, returns = rows
        return cls(
            close_to_close,
            ewma,
            parkinson,
            garman_klass,
            rogers_satchell,
            yang_zhang,
            returns,
            window,
            range_missing,
        )


class RollingEstimators:
    """Rolling volatility estimators of one symbol, fed block by block.

    Warm-up, for the instance's bar sequence ``0, 1, 2, ...`` (whatever the block boundaries):
    bar 0 has no previous close, so its row is all NaN with ``window == 0``; bar ``i >= 1`` has
    ``window == min(W, i)``, so the windowed estimators are NaN at bar 1 (``window == 1``) and
    defined from bar 2 on, while ``returns`` and ``ewma`` are defined from bar 1 on.

    Streaming guarantee: feeding blocks ``a`` then ``b`` gives the same rows as feeding their
    concatenation, bit for bit: a row is computed from the same window values by the same
    operations in the same order whichever block it arrives in. The state is exactly what that
    needs: the per-bar quantities of the last ``W − 1`` bars, the last close, the EWMA variance,
    how many bars with a return were seen and how long ago the last close-only one was (both
    capped at ``W``). The bar marks are part of the input: the guarantee holds for the same marks.

    Window sums are recomputed from the window for every row (mean first, then squared deviations
    from it) rather than kept as running or cumulative sums: O(W) per row, but no rounding drift
    over a daemon's lifetime and no cancellation at high price levels.
    """

    def __init__(self, window: int, ewma_lambda: float = 0.94) -> None:
        """Raise ValueError unless ``window >= 2`` and ``0 < ewma_lambda < 1``.

        A non-integral ``window`` (a float, say) raises TypeError.
        """
        window = operator.index(window)
        if window < 2:
            raise ValueError(f"window must be >= 2 (a sample variance needs 2 bars), got {window}")
        ewma_lambda = float(ewma_lambda)
        if not 0.0 < ewma_lambda < 1.0:  # also rejects NaN
            raise ValueError(f"ewma_lambda must be in (0, 1), got {ewma_lambda}")
        self.window = window
        self.ewma_lambda = ewma_lambda
        # Quantities of the last W - 1 bars with a return, oldest first. Zero padding while fewer
        # have been seen: padded columns add exactly 0 to sums and are masked out of deviations.
        self._history = np.zeros((_N_QUANTITIES, window - 1), dtype=np.float64)
        self._seen = 0  # bars with a return so far, capped at `window`
        self._last_close: float | None = None
        self._ewma_var: float | None = None  # None until the first return
        # Bars with a return since the last close-only one (0: the latest bar was), capped at W:
        # a window of n bars holds a close-only bar exactly when this age is < n.
        self._close_only_age = window

    def update(
        self,
        block: BarBlock,
        *,
        gaps: BoolArray | None = None,
        close_only: BoolArray | None = None,
    ) -> EstimatorBlock:
        """Consume the next ``T`` bars of the symbol and return their estimates (new arrays).

        ``gaps[t]`` marks bar ``t`` as closing after a session gap, ``close_only[t]`` as having no
        real high/low (see the module docstring); None means no bar is marked. On the very first
        bar ever (which has no return) the marks change nothing.

        ``T == 0`` returns empty arrays and changes nothing. Raises ValueError, before changing any
        state, if the block's fields (or the marks) are not 1-D arrays of one common shape. Values
        are assumed to satisfy the `BarBlock` guarantees (finite, prices > 0, low <= open,
        close <= high).
        """
        close = block.close
        shape = close.shape
        if not (
            len(shape) == 1
            and block.open.shape == block.high.shape == block.low.shape == shape
            and block.volume.shape == shape
        ):
            raise ValueError(f"BarBlock fields must be 1-D of one shape, got {_shapes(block)}")
        for name, marks in (("gaps", gaps), ("close_only", close_only)):
            if marks is not None and np.shape(marks) != shape:
                raise ValueError(f"{name} must have the block's shape {shape}: {np.shape(marks)}")
        n_bars = shape[0]
        skip = 1 if self._last_close is None else 0  # the very first bar ever has no return
        n_valid = n_bars - skip
        result = np.empty((_RETURNS_ROW + 1, n_bars), dtype=np.float64)
        window_counts = np.empty(n_bars, dtype=np.int64)
        range_missing = np.zeros(n_bars, dtype=np.bool_)
        if skip and n_bars:
            result[:, 0] = np.nan
            window_counts[0] = 0
        if n_valid <= 0:
            if n_bars:
                self._last_close = float(close[-1])
            return EstimatorBlock.from_rows(result, window_counts, range_missing)

        width = self.window
        prices = np.empty((5, n_valid), dtype=np.float64)
        prices[0, 0] = close[0] if skip else self._last_close
        prices[0, 1:] = close[skip:-1]
        prices[1] = block.open[skip:]
        prices[2] = block.high[skip:]
        prices[3] = block.low[skip:]
        prices[4] = close[skip:]
        # Logs of ratios, not differences of logs: at a price of 5e4, ln(C) ~ 10.8 carries ~2e-15
        # of absolute rounding, which would be ~1e-12 relative on a 1e-3 return.
        logs = np.log(prices.take(_NUMERATORS, axis=0) / prices.take(_DENOMINATORS, axis=0))
        c = logs[_C]
        up = logs[4]
        down = logs[5]

        quantities = np.empty((_N_QUANTITIES, width - 1 + n_valid), dtype=np.float64)
        quantities[:, : width - 1] = self._history
        new = quantities[:, width - 1 :]
        new[:_N_VARIANCES] = logs[:_N_VARIANCES]
        if gaps is not None:
            # Across a session gap close_to_close and ewma read the in-session return.
            np.copyto(new[_R], c, where=np.asarray(gaps, dtype=np.bool_)[skip:])
        np.multiply(logs[3], logs[3], out=new[_HL2])
        new[_GK] = 0.5 * new[_HL2] - _GK_CLOSE_WEIGHT * (c * c)
        new[_RS] = up * (up - c) + down * (down - c)

        # Rows 0 .. n_warm - 1 still have n < W (a prefix: n only grows); the rest have n = W.
        n_warm = min(max(width - 1 - self._seen, 0), n_valid)
        warm_counts = np.arange(self._seen + 1, self._seen + 1 + n_warm)
        means, square_sums = _window_moments(quantities, warm_counts, width)
        counts: IntArray | int = width
        if n_warm:
            counts = np.full(n_valid, width)
            counts[:n_warm] = warm_counts

        # Output rows follow ESTIMATOR_NAMES (0 close_to_close, 1 ewma, 2 parkinson,
        # 3 garman_klass, 4 rogers_satchell, 5 yang_zhang), then 6 returns.
        rows = result[:, skip:]
        if n_warm:
            # n = 1 rows get 0 / 1 here and are set to NaN below; this only avoids 0 / 0 warnings.
            ddof_counts = np.maximum(counts - 1, 1)
            k = 0.34 / (1.34 + (counts + 1) / ddof_counts)
        else:
            ddof_counts = width - 1
            k = 0.34 / (1.34 + (width + 1) / (width - 1))
        variances = square_sums / ddof_counts
        # Variances go into the output rows and one in-place sqrt turns them all into vols.
        # GK and RS terms are non-negative bar by bar (|c| <= ln(H/L), u >= max(0, c),
        # d <= min(0, c)) but u - c and d - c can round to a hair below 0: clamp before sqrt.
        rs_var = np.maximum(means[_RS], 0.0, out=rows[4])
        rows[0] = variances[_R]
        rows[_EWMA_ROW] = self._ewma(new[_R])
        np.divide(means[_HL2], _PARKINSON_DENOMINATOR, out=rows[2])
        np.maximum(means[_GK], 0.0, out=rows[3])
        rows[5] = variances[_O] + k * variances[_C] + (1.0 - k) * rs_var
        np.sqrt(rows[:_RETURNS_ROW], out=rows[:_RETURNS_ROW])
        rows[_RETURNS_ROW] = logs[_R]
        window_counts[skip:] = counts
        if self._seen == 0:  # the first return has n = 1: too few bars for the windowed ones
            rows[_WINDOWED_ROWS, 0] = np.nan
        flags = None if close_only is None else np.asarray(close_only, dtype=np.bool_)[skip:]
        if (flags is not None and flags.any()) or self._close_only_age + 1 < width:
            missing = self._close_only_windows(flags, counts, n_valid)
            rows[_RANGE_ROWS, missing] = np.nan
            range_missing[skip:] = missing
        else:  # no close-only bar in any window of the block: nothing to mask
            self._close_only_age = width

        self._history = quantities[:, -(width - 1) :].copy()
        self._seen = min(self._seen + n_valid, width)
        self._last_close = float(prices[4, -1])
        return EstimatorBlock.from_rows(result, window_counts, range_missing)

    def _close_only_windows(
        self, flags: BoolArray | None, counts: IntArray | int, n_valid: int
    ) -> BoolArray:
        """Which of the block's rows (with a return) have a close-only bar in their window;
        advances the age of the last close-only bar."""
        positions = np.arange(n_valid)
        age = positions + (self._close_only_age + 1)  # from the last one before the block
        if flags is not None:
            latest = np.maximum.accumulate(np.where(flags, positions, -1))
            age = np.where(latest >= 0, positions - latest, age)
        self._close_only_age = min(int(age[-1]), self.window)
        return age < counts

    def _ewma(self, returns: FloatArray) -> list[float]:
        """Run the EWMA variance recursion over ``returns``, advance the state, return variances.

        The recursion is inherently sequential: a tight loop over Python floats (~0.1 µs per bar),
        the same operations in the same order as the textbook form.
        """
        lam = self.ewma_lambda
        weight = 1.0 - lam
        squares = (returns * returns).tolist()
        variance = self._ewma_var
        if variance is None:
            variance = squares[0]  # seed: sigma²_1 = r_1²
            result = [variance]
            squares = squares[1:]
        else:
            result = []
        append = result.append
        for square in squares:
            variance = lam * variance + weight * square
            append(variance)
        self._ewma_var = variance
        return result


def _window_moments(
    quantities: FloatArray, warm_counts: IntArray, width: int
) -> tuple[FloatArray, FloatArray]:
    """Per-row window means of all six quantities, and sums of squared deviations of the first 3.

    ``quantities`` is C-contiguous ``(6, W - 1 + T)``; output row ``t`` covers its columns
    ``t .. t + W - 1``. The first ``len(warm_counts)`` rows are warm-up rows: only their last
    ``warm_counts[t]`` (< W) columns are real, the rest zero padding. Every later row is full.

    Every sum is strictly sequential over the window, oldest first: ``np.add.accumulate`` on small
    blocks, a loop over window offsets on large ones. Both add the same numbers in the same order,
    so a row comes out bit-identical whichever block it arrives in, and each path is fast where
    it is used.
    """
    n_rows = quantities.shape[1] - (width - 1)
    n_warm = warm_counts.shape[0]
    means = np.empty((_N_QUANTITIES, n_rows), dtype=np.float64)
    square_sums = np.empty((_N_VARIANCES, n_rows), dtype=np.float64)
    if n_warm:
        _moments_small(quantities, warm_counts, width, 0, n_warm, means, square_sums)
    for start in range(n_warm, n_rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n_rows)
        if stop - start < _SMALL_BLOCK:
            _moments_small(quantities, width, width, start, stop, means, square_sums)
        else:
            _moments_offsets(quantities, width, start, stop, means, square_sums)
    return means, square_sums


def _moments_small(
    quantities: FloatArray,
    counts: IntArray | int,
    width: int,
    start: int,
    stop: int,
    means: FloatArray,
    square_sums: FloatArray,
) -> None:
    """Fill rows ``start:stop`` of the outputs by accumulating over a ``(6, rows, W)`` view."""
    item = quantities.itemsize
    # The view sliding_window_view would build, made directly: that helper's Python overhead is
    # a large share of a 1-bar update (bench/README.md, "Figures behind the daemon's constants").
    windows = np.ndarray(
        (_N_QUANTITIES, stop - start, width),
        dtype=np.float64,
        buffer=quantities,
        offset=start * item,
        strides=(quantities.strides[0], item, item),
    )
    block_means = np.add.accumulate(windows, axis=2)[:, :, -1]
    block_means /= counts
    means[:, start:stop] = block_means
    deviations = windows[:_N_VARIANCES] - block_means[:_N_VARIANCES, :, None]
    if not isinstance(counts, int):
        # Zero padding sits left of the real values; keep it out of the squared deviations.
        deviations *= np.arange(width) >= (width - counts)[:, None]
    deviations *= deviations
    square_sums[:, start:stop] = np.add.accumulate(deviations, axis=2)[:, :, -1]


def _moments_offsets(
    quantities: FloatArray,
    width: int,
    start: int,
    stop: int,
    means: FloatArray,
    square_sums: FloatArray,
) -> None:
    """Fill full-window rows ``start:stop`` by a loop over the W offsets inside the window."""
    sums = quantities[:, start:stop].copy()
    for offset in range(1, width):
        sums += quantities[:, start + offset : stop + offset]
    sums /= width
    means[:, start:stop] = sums
    centre = sums[:_N_VARIANCES]
    total = square_sums[:, start:stop]
    np.subtract(quantities[:_N_VARIANCES, start:stop], centre, out=total)
    total *= total
    deviation = np.empty_like(total)
    for offset in range(1, width):
        np.subtract(quantities[:_N_VARIANCES, start + offset : stop + offset], centre, deviation)
        deviation *= deviation
        total += deviation


def _shapes(block: BarBlock) -> dict[str, tuple[int, ...]]:
    return {name: np.shape(field) for name, field in zip(block._fields, block, strict=True)}
