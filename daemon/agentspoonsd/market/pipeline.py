"""From bars to updates, for one symbol: estimators, annualisation and the GARCH forecast. Pure.

Every source (the models, a followed file, a replayed CSV) feeds `SymbolPipeline` the same way::

    pipeline.feed(block)                # a BarBlock: the estimators run vectorised over it
    while pipeline.pending:
        window = pipeline.advance()     # next bar; a returns window when a GARCH refit is due
        if window is not None:
            pipeline.install(fit_garch11(window, previous=pipeline.last_fit))
        bar = pipeline.bar(timestamp)   # the finished update of that bar

The refit is the caller's so it can run where it likes (the daemon: a worker thread, awaited
before the bar is published; `simulate`: inline). Either way it is installed at the same bar, so
the daemon and `agentspoonsd simulate` produce the same numbers for the same seed.

Units: everything per bar (standard deviations of log returns per bar) except
``estimators_annualized``, which multiplies by ``sqrt(bars per year)``. A block may come with its
own bar length (a file or replay source's spacing, inferred from its timestamps): its bars are
then annualised with ``sqrt(seconds per year / that length)``, and say so in ``bar_seconds``.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from .bar import Bar
from .block import BarBlock, FloatArray
from .estimators import (
    ESTIMATOR_NAMES,
    BoolArray,
    EstimatorBlock,
    RollingEstimators,
)
from .garch_fit import GarchFit, cumulative_variance

# `SymbolPipeline._records_of` spells the estimators out, in this order.
assert ESTIMATOR_NAMES == (
    "close_to_close",
    "ewma",
    "parkinson",
    "garman_klass",
    "rogers_satchell",
    "yang_zhang",
)

# Bars whose `data` dicts `SymbolPipeline.data` builds at once: enough to amortise the call, few
# enough that the garbage collector's young generations stay small (bench/README.md, "Figures
# behind the daemon's constants").
_RECORD_CHUNK = 64

# Fewer returns than this make a fit mostly noise (and usually a boundary solution).
MIN_FIT_BARS = 100

# The estimator `data.volatility` reports: the prototype's "volatility" was a rolling standard
# deviation of log returns, which is exactly close_to_close.
VOLATILITY_ESTIMATOR = "close_to_close"


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """What the pipeline of every symbol shares."""

    window: int = 20
    """W: bars in every rolling estimator."""
    ewma_lambda: float = 0.94
    bars_per_year: float = 525_600.0
    """Annualisation: estimators_annualized = per-bar value × sqrt(bars_per_year)."""
    bar_seconds: float = 60.0
    """The configured bar length, the one `bars_per_year` counts (``data.bar_seconds``)."""
    fit_enabled: bool = True
    fit_window: int = 500
    """Returns in each GARCH fit (the most recent ones)."""
    refit_every: int = 100
    """Bars between fits."""
    horizon: int = 10
    """h of the h-step variance forecast."""

    def __post_init__(self) -> None:
        if not self.bars_per_year > 0:
            raise ValueError(f"bars_per_year must be > 0, got {self.bars_per_year}")
        if not self.bar_seconds > 0:
            raise ValueError(f"bar_seconds must be > 0, got {self.bar_seconds}")
        if self.fit_window < MIN_FIT_BARS:
            raise ValueError(f"fit_window must be >= {MIN_FIT_BARS}, got {self.fit_window}")
        if self.refit_every < 1 or self.horizon < 1:
            raise ValueError("refit_every and horizon must be >= 1")


def fit_phase(symbol: str, refit_every: int) -> int:
    """The bar count (mod refit_every) at which `symbol` refits: spread by name, so a daemon with
    many symbols does not fit them all on the same tick, and the same in `simulate`."""
    return zlib.crc32(symbol.encode()) % refit_every


class GarchTracker:
    """The GARCH(1,1) side of one symbol: the returns to fit, the last fit, the rolling forecast.

    Between fits the one-step variance is rolled forward with the last good fit's parameters,
    ``σ²_{t+1} = ω + α r_t² + β σ²_t``, so every bar's forecast is conditional on that bar.
    A fit whose status is not "ok" is reported (``status``, ``message``) while the forecast keeps
    using the previous good fit; before the first good fit the forecast values are None.
    """

    def __init__(self, config: PipelineConfig, phase: int) -> None:
        self._config = config
        self._phase = phase
        self._returns: deque[float] = deque(maxlen=config.fit_window)
        self._observed = 0  # finite returns seen
        self._fit: GarchFit | None = None  # the last "ok" fit
        self._last_attempt: GarchFit | None = None
        self._next_variance = math.nan  # σ²_{t+1} under self._fit
        self._bars_since_fit = 0
        self._empty_forecast: dict[str, Any] | None = None  # the forecast while there is no fit
        # Per fit, so a bar costs two multiply-adds: σ²_{t+h} = c_h + d_h σ²_{t+1} and
        # Σ_{k=1..h} σ²_{t+k} = c_cum + d_cum σ²_{t+1} (see `_forecast_coefficients`).
        self._coefficients = (math.nan, math.nan, math.nan, math.nan)
        # `forecast`'s dict for the last good fit, the per-bar values left None
        self._template: dict[str, Any] = {}

    @property
    def last_fit(self) -> GarchFit | None:
        """The last fit with status "ok" (the warm start of the next one)."""
        return self._fit

    def observe(self, r: float) -> FloatArray | None:
        """Record the return of a new bar. Returns the window to fit when a refit is due."""
        if not math.isfinite(r):
            return None  # the very first bar of a series has no return
        self._returns.append(r)
        self._observed += 1
        self._bars_since_fit += 1
        fit = self._fit
        if fit is not None:
            self._next_variance = fit.omega + fit.alpha * r * r + fit.beta * self._next_variance
        config = self._config
        if (
            config.fit_enabled
            and len(self._returns) >= MIN_FIT_BARS
            and (self._observed - self._phase) % config.refit_every == 0
        ):
            return np.fromiter(self._returns, dtype=np.float64, count=len(self._returns))
        return None

    def install(self, fit: GarchFit) -> None:
        """Use `fit`, made on the window `observe` returned for the current bar."""
        self._last_attempt = fit
        self._empty_forecast = None
        if fit.status == "ok":
            self._fit = fit
            self._next_variance = fit.next_variance
            self._bars_since_fit = 0
            self._coefficients = _forecast_coefficients(fit, self._config.horizon)
        good = self._fit
        if good is not None:  # what `forecast` repeats every bar until the next fit
            self._template = {
                "status": fit.status,
                "message": fit.message or None,
                "horizon": self._config.horizon,
                "omega": good.omega,
                "alpha": good.alpha,
                "beta": good.beta,
                "persistence": good.alpha + good.beta,
                **dict.fromkeys(_FORECAST_VALUES[4:10]),  # variance_1 .. volatility_cum_h
                "fit_bars": good.n_obs,
                "bars_since_fit": None,
            }

    def forecast(self) -> dict[str, Any]:
        """``data.garch_forecast`` for the current bar; always the same keys, in the same order.

        ``status``: "disabled" (``garch_fit.enabled = false``), "pending" (no fit tried yet), or
        the status of the latest fit ("ok", "nonstationary", "failed"; ``message`` says why).
        The values come from the latest "ok" fit and are None before there is one.
        """
        fit = self._fit
        if fit is None:
            # Nothing changes from bar to bar until a fit succeeds: one dict serves them all.
            if self._empty_forecast is None:
                self._empty_forecast = self._header() | dict.fromkeys(_FORECAST_VALUES)
            return self._empty_forecast
        v1 = self._next_variance
        c_h, d_h, c_cum, d_cum = self._coefficients
        vh = c_h + d_h * v1
        cumulative = c_cum + d_cum * v1
        # A copy of the fit's template (its keys in order) with the bar's values: cheaper than
        # building the 15 entries.
        forecast = self._template.copy()
        forecast["variance_1"] = v1
        forecast["variance_h"] = vh
        forecast["volatility_1"] = math.sqrt(v1)
        forecast["volatility_h"] = math.sqrt(vh)
        forecast["variance_cum_h"] = cumulative
        forecast["volatility_cum_h"] = math.sqrt(cumulative)
        forecast["bars_since_fit"] = self._bars_since_fit
        return forecast

    def _header(self) -> dict[str, Any]:
        attempt = self._last_attempt
        if not self._config.fit_enabled:
            status, message = "disabled", None
        elif attempt is None:
            status, message = "pending", None
        else:
            status, message = attempt.status, attempt.message or None
        return {"status": status, "message": message, "horizon": self._config.horizon}


def _forecast_coefficients(fit: GarchFit, horizon: int) -> tuple[float, float, float, float]:
    """``(c_h, d_h, c_cum, d_cum)`` with ``σ²_{t+h} = c_h + d_h σ²_{t+1}`` and
    ``Σ_{k=1..h} σ²_{t+k} = c_cum + d_cum σ²_{t+1}`` under a stationary ("ok") fit.

    The h-step forecast is the closed form of the recursion, σ̄² + p^{h−1} (σ²_{t+1} − σ̄²)
    with σ̄² = ω / (1 − p) and p = α + β < 1; the cumulative one is `cumulative_variance`,
    which is linear in σ²_{t+1} (its value at 0 and its slope).
    """
    persistence = fit.alpha + fit.beta
    long_run = fit.omega / (1.0 - persistence)
    decay = persistence ** (horizon - 1)
    c_cum = cumulative_variance(fit.omega, persistence, 0.0, horizon)
    d_cum = cumulative_variance(0.0, persistence, 1.0, horizon)
    return long_run * (1.0 - decay), decay, c_cum, d_cum


_FORECAST_VALUES = (
    "omega",
    "alpha",
    "beta",
    "persistence",
    "variance_1",
    "variance_h",
    "volatility_1",
    "volatility_h",
    "variance_cum_h",
    "volatility_cum_h",
    "fit_bars",
    "bars_since_fit",
)


class SymbolPipeline:
    """One symbol's bars in, finished `Bar` updates out (see the module docstring).

    Not thread-safe. Feeding a block while bars of the previous one are pending raises
    RuntimeError: nothing is skipped silently.
    """

    def __init__(self, symbol: str, config: PipelineConfig) -> None:
        self.symbol = symbol
        self.config = config
        self._estimators = RollingEstimators(config.window, config.ewma_lambda)
        self._garch = GarchTracker(config, fit_phase(symbol, config.refit_every))
        self._annualize = math.sqrt(config.bars_per_year)
        self._seconds_per_year = config.bars_per_year * config.bar_seconds
        self._block: BarBlock | None = None
        # Per column, a value per bar: o h l c v r, 6 estimators, 6 annualised
        self._columns: list[list[float]] = [[] for _ in range(18)]
        self._windows: list[int] = []
        self._bar_seconds = config.bar_seconds  # of the fed block
        self._gaps: list[float | None] | None = None  # per bar of the fed block; None: no gap
        self._close_only: list[bool] | None = None  # per bar; None: no range estimator masked
        self._next = 0  # index of the next bar `advance` moves to
        self._current = -1
        # `data` of the bars of one chunk of the block (`_records_of`), and which chunk
        self._records: list[dict[str, Any]] | None = None
        self._records_chunk = -1

    @property
    def pending(self) -> int:
        """Bars of the fed block not yet advanced to."""
        return len(self._windows) - self._next

    @property
    def last_fit(self) -> GarchFit | None:
        return self._garch.last_fit

    def feed(
        self,
        block: BarBlock,
        *,
        bar_seconds: float | None = None,
        gap_seconds: Sequence[float | None] | None = None,
        close_only: BoolArray | None = None,
    ) -> None:
        """Take the next bars of the symbol.

        ``bar_seconds``: the length of these bars when it is not the configured one (a source's
        inferred spacing): they are annualised with ``sqrt(seconds per year / bar_seconds)`` and
        their updates say ``bar_seconds``. ``gap_seconds[t]``: the spacing before bar ``t`` when
        it is a session gap, else None (the estimators read its in-session return, so does the
        GARCH fit; the update carries ``gap_seconds``). ``close_only[t]``: bar ``t`` has no real
        high/low (the range-based estimators are null while it is in their window, and the
        update's ``estimators_quality.range`` is ``"close_only"``). None: the default for every
        bar (configured length, no gap, real ranges). Raises ValueError, before changing any
        state, for a bar length that is not a positive number or marks of the wrong length.
        """
        if self.pending:
            raise RuntimeError(f"{self.pending} bars of the previous block are still pending")
        if bar_seconds is not None and not (math.isfinite(bar_seconds) and bar_seconds > 0):
            raise ValueError(f"bar_seconds must be > 0, got {bar_seconds!r}")
        gaps = None
        if gap_seconds is not None:
            if len(gap_seconds) != block.n_bars:
                raise ValueError(f"gap_seconds has {len(gap_seconds)} values for {block.n_bars}")
            if any(gap is not None for gap in gap_seconds):
                gaps = np.array([gap is not None for gap in gap_seconds], dtype=np.bool_)
        est: EstimatorBlock = self._estimators.update(block, gaps=gaps, close_only=close_only)
        annualize = self._annualize
        if bar_seconds is None or bar_seconds == self.config.bar_seconds:
            self._bar_seconds = self.config.bar_seconds
        else:
            self._bar_seconds = float(bar_seconds)
            annualize = math.sqrt(self._seconds_per_year / bar_seconds)
        columns = [
            block.open,
            block.high,
            block.low,
            block.close,
            block.volume,
            est.returns,
            *(getattr(est, name) for name in ESTIMATOR_NAMES),
            *(getattr(est, name) * annualize for name in ESTIMATOR_NAMES),
        ]
        # One conversion to Python floats per column (tolist), not one per value; columns, not
        # rows: no list per bar, and `_records_of` zips them.
        self._columns = [column.tolist() for column in columns]
        self._windows = est.window.tolist()
        self._gaps = None if gaps is None or gap_seconds is None else list(gap_seconds)
        self._close_only = est.range_missing.tolist() if est.range_missing.any() else None
        self._records = None
        self._next = 0
        self._current = -1

    def advance(self) -> FloatArray | None:
        """Move to the next bar; returns the returns window to fit when a refit is due."""
        current = self._next
        if current >= len(self._windows):
            raise RuntimeError("no pending bar: feed a block first")
        self._current = current
        self._next = current + 1
        columns = self._columns
        if self._gaps is not None and self._gaps[current] is not None:
            # Across a session gap the fit reads the in-session return, as close_to_close does.
            return self._garch.observe(math.log(columns[3][current] / columns[0][current]))
        return self._garch.observe(columns[5][current])

    def install(self, fit: GarchFit) -> None:
        """Install the fit of the window `advance` just returned (any status)."""
        self._garch.install(fit)

    def bar(self, timestamp: datetime) -> Bar:
        """The update of the current bar, stamped `timestamp` (its close time)."""
        o, h, lo, c, v, r, estimators, annualized, quality, gap = self._current_values()
        analytics = {
            "bar_seconds": self._bar_seconds,
            "gap_seconds": gap,
            "estimators": estimators,
            "estimators_annualized": annualized,
            "estimators_quality": quality,
            "garch_forecast": self._garch.forecast(),
        }
        volatility = estimators["close_to_close"]
        return Bar(self.symbol, timestamp, o, h, lo, c, v, r, volatility, analytics)

    def data(self, timestamp: str, seq: int) -> dict[str, Any]:
        """The current bar as the ``data`` object of its update, for a pre-formatted timestamp.

        Equal to ``protocol.update_data(self.bar(t), seq)`` where ``timestamp == iso_utc(t)``
        (a test holds them together); `simulate` uses it to skip a datetime, a Bar and a dict
        per bar. The dicts of `_RECORD_CHUNK` bars are built together on the first call for
        one of them (one comprehension over per-column lists, not a method call, slices and
        two dict builds per bar); this call fills in ``timestamp``, ``seq`` and
        ``garch_forecast``. The dict is the bar's own: a second call for the same bar returns
        it again, updated.
        """
        current = self._current
        if current < 0:
            raise RuntimeError("advance() first")
        chunk, offset = divmod(current, _RECORD_CHUNK)
        records = self._records
        if records is None or self._records_chunk != chunk:
            start = chunk * _RECORD_CHUNK
            records = self._records = self._records_of(start, start + _RECORD_CHUNK)
            self._records_chunk = chunk
        record = records[offset]
        record["timestamp"] = timestamp
        record["seq"] = seq
        record["garch_forecast"] = self._garch.forecast()
        return record

    def _records_of(self, start: int, stop: int) -> list[dict[str, Any]]:
        """The `data` dicts of bars ``start:stop`` of the fed block, ``timestamp``, ``seq`` and
        ``garch_forecast`` left None; NaN (undefined estimators and returns) becomes None."""
        symbol = self.symbol
        bar_seconds = self._bar_seconds
        records = [
            {
                "timestamp": None,
                "symbol": symbol,
                "seq": None,
                "volatility": cc,
                "price": c,
                "returns": r,
                "open": o,
                "high": h,
                "low": lo,
                "close": c,
                "volume": v,
                "bar_seconds": bar_seconds,
                "gap_seconds": None,
                "estimators": {
                    "close_to_close": cc,
                    "ewma": ew,
                    "parkinson": pk,
                    "garman_klass": gk,
                    "rogers_satchell": rs,
                    "yang_zhang": yz,
                    "window": window,
                },
                "estimators_annualized": {
                    "close_to_close": a_cc,
                    "ewma": a_ew,
                    "parkinson": a_pk,
                    "garman_klass": a_gk,
                    "rogers_satchell": a_rs,
                    "yang_zhang": a_yz,
                    "window": window,
                },
                "estimators_quality": {"range": "ok"},
                "garch_forecast": None,
            }
            for (o, h, lo, c, v, r, cc, ew, pk, gk, rs, yz, a_cc, a_ew, a_pk, a_gk, a_rs, a_yz), (
                window
            ) in zip(
                zip(*(column[start:stop] for column in self._columns), strict=True),
                self._windows[start:stop],
                strict=True,
            )
        ]
        # The rows that may hold NaN (EstimatorBlock: the first bars ever, whose windows hold
        # fewer than 2 returns, and close-only windows), as `_current_values` converts them.
        windows = self._windows[start:stop]
        nan_rows = []
        for i, window in enumerate(windows):  # windows only grow: the rows < 2 lead
            if window >= 2:
                break
            nan_rows.append(i)
        close_only = self._close_only
        if close_only is not None:
            nan_rows.extend(i for i, flagged in enumerate(close_only[start:stop]) if flagged)
        for i in nan_rows:
            record = records[i]
            for key in ("estimators", "estimators_annualized"):
                values = record[key]
                for name in ESTIMATOR_NAMES:
                    if values[name] != values[name]:
                        values[name] = None
            if record["returns"] != record["returns"]:
                record["returns"] = None
            record["volatility"] = record["estimators"]["close_to_close"]
            if close_only is not None and close_only[start + i]:
                record["estimators_quality"] = {"range": "close_only"}
        gaps = self._gaps
        if gaps is not None:
            for record, gap in zip(records, gaps[start:stop], strict=True):
                record["gap_seconds"] = gap
        return records

    def _current_values(self) -> tuple[Any, ...]:
        """``o h l c v r``, the two estimator dicts, ``estimators_quality`` and ``gap_seconds``
        of the current bar."""
        current = self._current
        if current < 0:
            raise RuntimeError("advance() first")
        row = [column[current] for column in self._columns]
        o, h, lo, c, v, r = row[:6]
        window = self._windows[current]
        close_only = self._close_only is not None and self._close_only[current]
        if window >= 2 and not close_only:  # warmed up: every value is a number
            # Lengths are fixed by `feed` (six estimators, six annualised): no strict check here.
            estimators: dict[str, Any] = dict(zip(ESTIMATOR_NAMES, row[6:12]))  # noqa: B905
            annualized: dict[str, Any] = dict(zip(ESTIMATOR_NAMES, row[12:]))  # noqa: B905
        else:  # NaN (undefined during warm-up, or a close-only range) becomes JSON null
            estimators = {
                name: (value if value == value else None)
                for name, value in zip(ESTIMATOR_NAMES, row[6:12], strict=True)
            }
            annualized = {
                name: (value if value == value else None)
                for name, value in zip(ESTIMATOR_NAMES, row[12:], strict=True)
            }
        estimators["window"] = window
        annualized["window"] = window
        quality = {"range": "close_only" if close_only else "ok"}
        gap = None if self._gaps is None else self._gaps[current]
        return o, h, lo, c, v, (r if r == r else None), estimators, annualized, quality, gap
