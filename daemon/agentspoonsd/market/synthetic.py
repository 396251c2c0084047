"""The synthetic source: one model per symbol, simulated in blocks, one bar per symbol per
tick of a `TickSchedule`, each closing on the market clock (`clock.MarketClock`).

`SyntheticProducer` owns the models and the schedule; the pipelines (shared with the
generator) turn prices into updates, and a `FitScheduler` runs the refits they ask for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import trio
from structlog.typing import FilteringBoundLogger

from .bar import Bar
from .block import BarBlock, FloatArray
from .clock import MarketClock
from .fitting import FitScheduler
from .models import Model, make_model
from .pipeline import PipelineConfig, SymbolPipeline
from .spec import GeneratorSpec
from .ticks import TickSchedule

# Bars simulated per model call: large enough to amortise numpy's per-call cost, small enough
# that a refill (every BLOCK_BARS ticks) costs well under a millisecond per symbol.
BLOCK_BARS = 256


def pipeline_config(spec: GeneratorSpec) -> PipelineConfig:
    fit = spec.garch_fit
    return PipelineConfig(
        window=spec.volatility_window,
        ewma_lambda=spec.ewma_lambda,
        bars_per_year=spec.seconds_per_year / spec.bar_seconds,
        bar_seconds=spec.bar_seconds,
        fit_enabled=fit.enabled,
        fit_window=fit.window,
        refit_every=fit.refit_every,
        horizon=fit.horizon,
    )


def symbol_seed(seed: int | None, symbol: str) -> np.random.SeedSequence:
    """The seed of one symbol's model: derived from the configured seed and the symbol's name,
    so a symbol's stream does not change when other symbols are added or reordered.

    The spawn key is the name's UTF-8 bytes, one per word: distinct names always get distinct
    streams (a 32-bit hash of the name would give colliding names, e.g. "plumless" and
    "buckeroo", the very same prices)."""
    if seed is None:
        return np.random.SeedSequence()
    return np.random.SeedSequence(entropy=seed, spawn_key=tuple(symbol.encode()))


def build_model(spec: GeneratorSpec, symbol: str) -> Model:
    one = spec.symbol(symbol)
    return make_model(
        one.model,
        one.params,
        seed=symbol_seed(spec.seed, symbol),
        initial_price=one.initial_price,
        volume=one.volume,
        substeps=spec.substeps,
    )


def continuation_seed(seed: int | None, symbol: str, seq: int) -> np.random.SeedSequence:
    """The seed of a symbol's model carried on after the update `seq` (see `continue_from`):
    `symbol_seed`'s key plus the seq, so each continuation draws shocks of its own."""
    if seed is None:
        return np.random.SeedSequence()
    return np.random.SeedSequence(entropy=seed, spawn_key=(*symbol.encode(), seq))


def published_block(updates: Sequence[Mapping[str, Any]]) -> BarBlock:
    """The bars of published updates (their `data` objects, oldest first), as one block."""

    def column(name: str) -> np.ndarray:
        return np.array([float(u[name]) for u in updates], dtype=np.float64)

    return BarBlock(
        column("open"), column("high"), column("low"), column("close"), column("volume")
    )


class SyntheticProducer:
    """Simulates every symbol and sends one batch of bars per due tick (see `run`).

    State lives here, not in `run()`: the supervisor restarts `run()` on the same object and
    every series continues; a batch whose send was interrupted is sent first on the next run.
    """

    def __init__(
        self,
        spec: GeneratorSpec,
        pipelines: MutableMapping[str, SymbolPipeline],
        fits: FitScheduler,
        clock: MarketClock,
        log: FilteringBoundLogger,
    ) -> None:
        self._spec = spec
        self._symbols = tuple(spec.symbols)
        self._pipelines = pipelines
        self._fits = fits
        self._clock = clock
        self._log = log
        self.models: dict[str, Model] = {s: build_model(spec, s) for s in self._symbols}
        self.continued: set[str] = set()  # symbols carried on from published updates
        self.warmed_up = False
        # A batch whose send was interrupted (cancelled or failed): never delivered, so never
        # published; it is sent first on the next run, so consumers never see a hole.
        self.unsent: list[Bar] | None = None

    def continue_symbol(self, symbol: str, updates: Sequence[Mapping[str, Any]]) -> None:
        """Carry on `symbol` from its published updates (`data` objects, oldest first, at least
        one): a new pipeline fed those bars (refits run in place: call from a worker thread) and
        a model starting at the last close, seeded for this continuation."""
        last = updates[-1]
        pipeline = SymbolPipeline(symbol, pipeline_config(self._spec))
        self._pipelines[symbol] = pipeline
        pipeline.feed(published_block(updates))
        while pipeline.pending:
            window = pipeline.advance()
            if window is not None:
                self._fits.fit_now(symbol, window)
        one = self._spec.symbol(symbol)
        self.models[symbol] = make_model(
            one.model,
            one.params,
            seed=continuation_seed(self._spec.seed, symbol, int(last["seq"])),
            initial_price=float(last["close"]),
            volume=one.volume,
            substeps=self._spec.substeps,
        )
        self.continued.add(symbol)
        self.unsent = None

    def step(self, symbol: str) -> FloatArray | None:
        """Move `symbol` to its next simulated bar; the returns to fit when a refit is due."""
        pipeline = self._pipelines[symbol]
        if not pipeline.pending:
            pipeline.feed(self.models[symbol].simulate(BLOCK_BARS))
        return pipeline.advance()

    def warm_up(self, bars: int) -> None:
        """Run `bars` bars of every symbol not continued through its pipeline, unpublished
        (refits in place: call from a worker thread)."""
        for symbol in self._symbols:
            if symbol in self.continued:
                continue  # its pipeline carries a published series already
            for _ in range(bars):
                window = self.step(symbol)
                if window is not None:
                    self._fits.fit_now(symbol, window)

    async def run(
        self,
        send: trio.MemorySendChannel[list[Bar]],
        wall_clock: Callable[[], datetime],
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Schedule: the first tick is emitted at once after `task_status.started()`; then one
        batch per wake-up of the `TickSchedule` on Trio's clock, making up to
        `ticks.MAX_CATCH_UP_TICKS` missed ticks (each symbol's bars in series order) and skipping
        older ones (logged as ``generator_ticks_skipped`` with their ``count``): never a burst.
        Bars close on the market clock: the run's round n at its origin (`wall_clock()` at the
        start, or one bar after the newest published close if that is later) + n × bar_seconds;
        skipped ticks take no market time. Cancellable at every await.
        """
        spec = self._spec
        if not self.warmed_up:
            # The first update then already carries full estimator windows and a GARCH fit.
            await trio.to_thread.run_sync(self.warm_up, spec.warmup_bars)
            self.warmed_up = True
        schedule = TickSchedule(trio.current_time(), spec.interval)
        origin = self._clock.start_run(_aware_utc(wall_clock()))
        task_status.started()
        self._log.info(
            "generator_started",
            source="synthetic",
            symbols=list(self._symbols),
            interval=spec.interval,
            bar_seconds=spec.bar_seconds,
            clock_origin=origin.isoformat(),
            model=spec.model,
            seed=spec.seed,
        )
        while True:
            await trio.sleep_until(schedule.deadline())
            due = schedule.take(trio.current_time())
            if due.skipped:
                # Not simulated, so no market time passes for them: the market clock now runs
                # `clock_lag_s` behind the schedule for the rest of this run.
                self._log.warning(
                    "generator_ticks_skipped",
                    count=due.skipped,
                    clock_lag_s=round(schedule.skipped * spec.bar_seconds, 6),
                )
            await self._emit(send, due.bars_per_symbol)

    async def _emit(self, send: trio.MemorySendChannel[list[Bar]], bars_per_symbol: int) -> None:
        if self.unsent is not None:
            # Never delivered, so never published: its rounds become this run's first ones.
            symbols = len(self._symbols)
            stamps = self._clock.next_rounds(len(self.unsent) // symbols)
            batch = [
                bar._replace(timestamp=stamps[i // symbols]) for i, bar in enumerate(self.unsent)
            ]
        else:
            batch = await self._next_batch(self._clock.next_rounds(bars_per_symbol))
        # Remember the batch until the send completes: a Cancelled from a Trio channel send means
        # it was not delivered, and dropping it would leave a hole in the price series.
        self.unsent = batch
        await send.send(batch)
        self._clock.mark_published(batch[-1].timestamp)
        self.unsent = None

    async def _next_batch(self, stamps: list[datetime]) -> list[Bar]:
        """One bar of every symbol per stamp, round by round (each symbol's bars in series
        order)."""
        # Shielded: the batch is built whole or not at all (a cancel between symbols would
        # advance some series without publishing them). Its only wait is a bounded GARCH fit.
        batch = []
        with trio.CancelScope(shield=True):
            for stamp in stamps:
                for symbol in self._symbols:
                    window = self.step(symbol)
                    if window is not None:
                        await self._fits.fit_in_thread(symbol, window)
                    batch.append(self._pipelines[symbol].bar(stamp))
        return batch


def _aware_utc(stamp: datetime) -> datetime:
    if stamp.tzinfo is None or stamp.utcoffset() is None:
        raise ValueError("wall_clock() must return a timezone-aware datetime")
    return stamp.astimezone(UTC)
