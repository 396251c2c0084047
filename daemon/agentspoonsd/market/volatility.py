"""Rolling volatility estimator: pure numpy, no I/O, no clocks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class RollingVolatility:
    """Per-symbol sample standard deviation (ddof=1) of the last `window` log returns.

    The returns live in a ``(window, n_symbols)`` ring buffer. Each `push` costs O(window) per
    symbol, vectorised over symbols (no Python loop over them). The std is recomputed from the
    buffer on every push instead of kept as running sums: that costs a little more but cannot
    accumulate rounding error over a daemon's lifetime or lose precision to cancellation.
    """

    def __init__(self, n_symbols: int, window: int) -> None:
        if n_symbols < 1:
            raise ValueError(f"n_symbols must be >= 1, got {n_symbols}")
        if window < 2:
            raise ValueError(f"window must be >= 2 (a sample std needs two values), got {window}")
        self.n_symbols = n_symbols
        self.window = window
        self._buffer = np.zeros((window, n_symbols), dtype=np.float64)
        self._next = 0  # row the next push writes
        self._count = 0  # rows holding data, <= window

    def __len__(self) -> int:
        """How many returns per symbol the estimate currently uses (at most `window`)."""
        return self._count

    def push(self, returns: npt.ArrayLike) -> FloatArray:
        """Add one return per symbol; return the per-symbol volatility including it.

        The result is a new float64 array of shape ``(n_symbols,)``: the sample std (ddof=1) of
        the last ``min(pushed, window)`` returns, and exactly 0.0 while fewer than two returns
        have been pushed (never NaN for finite input). Raises ValueError on a wrong shape, before
        changing any state.
        """
        values = np.asarray(returns, dtype=np.float64)
        if values.shape != (self.n_symbols,):
            raise ValueError(f"expected shape ({self.n_symbols},), got {values.shape}")
        self._buffer[self._next] = values
        self._next = (self._next + 1) % self.window
        self._count = min(self._count + 1, self.window)
        if self._count < 2:
            return np.zeros(self.n_symbols, dtype=np.float64)
        # While filling, the rows in use are exactly 0..count-1 (order does not matter for a std).
        held = self._buffer if self._count == self.window else self._buffer[: self._count]
        return held.std(axis=0, ddof=1)
