"""The value every market-data source produces: one finished update of one symbol."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple

_NO_ANALYTICS: Mapping[str, Any] = MappingProxyType({})


class Bar(NamedTuple):
    """One finished OHLCV bar and what was computed on it.

    Guarantees (checked by the producers' tests): ``low <= min(open, close)``,
    ``high >= max(open, close)``, ``volume >= 0``. ``returns`` is ``log(close / previous close)``
    and None for the first bar of a series; ``volatility`` is the per-bar ``close_to_close``
    estimator (sample standard deviation, ddof=1, of the last ``generator.volatility_window`` log
    returns), None until two returns exist. ``analytics`` holds the rest of ``data``:
    ``bar_seconds``, ``gap_seconds``, ``estimators``, ``estimators_annualized``,
    ``estimators_quality`` and ``garch_forecast``.

    A NamedTuple rather than a frozen dataclass: one is built per symbol per tick (and per bar in
    `agentspoonsd simulate`), and a tuple is several times cheaper to create.
    """

    symbol: str
    timestamp: datetime  # bar close time, timezone-aware UTC
    open: float
    high: float
    low: float
    close: float
    volume: float
    returns: float | None
    volatility: float | None
    analytics: Mapping[str, Any] = _NO_ANALYTICS
