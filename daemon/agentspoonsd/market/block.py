"""`BarBlock`: consecutive OHLCV bars of one symbol as numpy arrays (the unit of the pipeline).

Models produce blocks, sources are batched into blocks, estimators consume blocks. Everything in
the market package is vectorised over time within one symbol; symbols are independent.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class BarBlock(NamedTuple):
    """``T`` consecutive bars of one symbol; every field is a float64 array of shape ``(T,)``.

    Guarantees, for every producer: all values finite, prices > 0,
    ``low <= min(open, close) <= max(open, close) <= high`` and ``volume >= 0``.
    Row ``t`` is the bar that closes after row ``t - 1``.
    """

    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray

    @property
    def n_bars(self) -> int:
        """How many bars (``T``) the block holds."""
        return int(self.close.shape[0])
