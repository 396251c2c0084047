"""The value every market-data source produces: one OHLCV bar of one symbol."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Bar:
    """One finished OHLCV bar.

    Guarantees (checked by the producers' tests): ``low <= min(open, close)``,
    ``high >= max(open, close)``, ``volume >= 0``; ``returns`` is ``log(close / previous close)``;
    ``volatility`` is the per-bar standard deviation (ddof=1) of the last
    ``generator.volatility_window`` log returns (NaN-free: 0.0 until two returns exist).
    """

    symbol: str
    timestamp: datetime  # bar close time, timezone-aware UTC
    open: float
    high: float
    low: float
    close: float
    volume: float
    returns: float
    volatility: float
