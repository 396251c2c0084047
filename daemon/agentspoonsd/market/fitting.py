"""Fit scheduling: when a symbol's pipeline asks for a GARCH refit, run it and install it.

A fit is CPU-bound (tens of milliseconds): the generator's Trio task runs it in a worker thread
(`fit_in_thread`); warm-up and continuation, already in a worker thread, run it in place
(`fit_now`). Either way the fit is installed in the symbol's pipeline and logged once
(`fit_log_event`: ``garch_fitted``, ``garch_fit_nonstationary`` or ``garch_fit_failed``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import trio
from structlog.typing import FilteringBoundLogger

from .block import FloatArray
from .garch_fit import GarchFit, fit_garch11, fit_log_event
from .pipeline import SymbolPipeline

FitFunction = Callable[..., GarchFit]  # `fit_garch11(window, previous=...)`'s signature


class FitScheduler:
    """Runs and installs the refits of the pipelines in `pipelines` (symbol → pipeline).

    `pipelines` is read at each call, not copied: a pipeline replaced in it (a continuation)
    gets the next fit. `fit` is `fit_garch11` unless a test injects another.
    """

    def __init__(
        self,
        pipelines: Mapping[str, SymbolPipeline],
        log: FilteringBoundLogger,
        *,
        fit: FitFunction = fit_garch11,
    ) -> None:
        self._pipelines = pipelines
        self._log = log
        self._fit = fit

    def install(self, symbol: str, fit: GarchFit) -> None:
        """Install `fit` in `symbol`'s pipeline and log it (level by its outcome)."""
        self._pipelines[symbol].install(fit)
        level, event, fields = fit_log_event(fit)
        getattr(self._log, level)(event, symbol=symbol, **fields)

    def fit_now(self, symbol: str, window: FloatArray) -> GarchFit:
        """Fit `window` in the calling thread, starting from the symbol's last fit; install it."""
        fit = self._fit(window, previous=self._pipelines[symbol].last_fit)
        self.install(symbol, fit)
        return fit

    async def fit_in_thread(self, symbol: str, window: FloatArray) -> GarchFit:
        """`fit_now` in a Trio worker thread. Not cancellable once started (a thread cannot be
        interrupted): callers shield it anyway, so a batch is built whole."""
        previous = self._pipelines[symbol].last_fit
        fit = await trio.to_thread.run_sync(partial(self._fit, window, previous=previous))
        self.install(symbol, fit)
        return fit
