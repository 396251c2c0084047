"""The generator service: bars from the configured source, through the pipeline, to the hub.

Sources (``[generator] source``):

- ``synthetic``: one model per symbol (`models`), simulated in blocks and published one bar per
  symbol every ``interval`` seconds, on an absolute schedule; each bar closes on the market
  clock (`clock.MarketClock`), ``bar_seconds`` after the previous one;
- ``file``: records another process writes to a JSON array or JSON Lines file (`sources`);
- ``replay``: the bars of a CSV, paced by their own timestamps at ``speed`` × real time.

Every bar goes through the same `SymbolPipeline` (estimators, annualisation, GARCH forecast).
This module is the thin Trio layer: it owns the clock, the channel and the worker thread that
fits GARCH; the numbers are computed by the pure modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np
import trio
from structlog.typing import FilteringBoundLogger

from .bar import Bar
from .block import BarBlock, FloatArray
from .clock import MarketClock
from .garch_fit import GarchFit, fit_garch11, fit_log_event
from .models import Model, make_model
from .pipeline import PipelineConfig, SymbolPipeline
from .records import Record
from .sources import follow_file, replay_csv
from .spacing import SpacingTracker
from .spec import GeneratorSpec

# Bars simulated per model call: large enough to amortise numpy's per-call cost, small enough
# that a refill (every BLOCK_BARS ticks) costs well under a millisecond per symbol.
BLOCK_BARS = 256
# Ticks a late loop makes up in its next batch (bars of each symbol beyond the due one). Falling
# behind by a tick under load then costs no update: the hub sends a symbol's bars of one batch to
# each client in one write, so catching up is cheaper than the ticks were. Later ticks than this
# are skipped, so a long stall never turns into a burst.
MAX_CATCH_UP_TICKS = 2


def _utc_now() -> datetime:
    return datetime.now(UTC)


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


def _published_block(updates: Sequence[Mapping[str, Any]]) -> BarBlock:
    def column(name: str) -> np.ndarray:
        return np.array([float(u[name]) for u in updates], dtype=np.float64)

    return BarBlock(
        column("open"), column("high"), column("low"), column("close"), column("volume")
    )


_CLOSE_ONLY = np.array([True])  # the `close_only` marks of a one-bar block without a real range


def single_bar_block(record: Record) -> BarBlock:
    def one(value: float) -> np.ndarray:
        return np.array([value], dtype=np.float64)

    return BarBlock(
        one(record.open), one(record.high), one(record.low), one(record.close), one(record.volume)
    )


class Generator:
    """Produces one `Bar` per symbol per tick (synthetic) or per record (file, replay).

    All state (models, pipelines, the file watermarks) lives on this object, not in `run()`: the
    supervisor restarts `run()` on the same object and channel after a crash, and every series
    simply continues.
    """

    def __init__(
        self,
        spec: GeneratorSpec,
        send_channel: trio.MemorySendChannel[list[Bar]],
        log: FilteringBoundLogger,
        *,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """`wall_clock` (timezone-aware datetimes) is read once per synthetic run, for the origin
        of its market clock; the schedule itself runs on Trio's clock, so tests can drive it
        with a MockClock."""
        self._spec = spec
        self._send = send_channel
        self._log = log
        self._wall_clock = wall_clock
        self._symbols = tuple(spec.symbols)
        config = pipeline_config(spec)
        self._pipelines = {s: SymbolPipeline(s, config) for s in self._symbols}
        self._models: dict[str, Model] = {}
        if spec.source == "synthetic":
            self._models = {s: build_model(spec, s) for s in self._symbols}
        self._warmed_up = False
        # A batch whose send was interrupted (cancelled or failed). It is sent first on the next
        # run, so consumers never see a gap in the price series.
        self._unsent: list[Bar] | None = None
        self._watermarks: dict[str, datetime] = {}  # file source: last record per symbol
        self._spacings: dict[str, SpacingTracker] = {}  # file and replay: each symbol's time base
        self._unknown_symbols: set[str] = set()
        self._continued: set[str] = set()  # symbols carried on from published updates
        self._clock = MarketClock(spec.bar_seconds)
        self._running = False

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbols, in the order of every batch this generator sends."""
        return self._symbols

    def continue_from(self, published: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Carry on series another node published (the redis broker's takeover), instead of
        starting them afresh. Call before `run()`; CPU-bound (GARCH fits): a worker thread.

        `published` maps a symbol to the `data` of its newest updates, oldest first. A synthetic
        symbol's pipeline is fed those bars (estimator windows and the GARCH fit continue, with
        no warm-up) and its model starts again at the last close, with a seed of its own for
        this continuation (a fixed seed stays reproducible without replaying the same shocks).
        A file source skips records up to the last published timestamp. Symbols not named, or
        with nothing published, start as they would without it. The market clock continues
        after the newest published bar (`continue_clock`).
        """
        config = pipeline_config(self._spec)
        self.continue_clock(published)
        for symbol, updates in published.items():
            if symbol not in self._pipelines or not updates:
                continue
            last = updates[-1]
            if self._spec.source == "file":
                self._watermarks[symbol] = datetime.fromisoformat(last["timestamp"])
                continue
            if self._spec.source != "synthetic":
                continue
            pipeline = SymbolPipeline(symbol, config)
            self._pipelines[symbol] = pipeline
            pipeline.feed(_published_block(updates))
            while pipeline.pending:
                window = pipeline.advance()
                if window is not None:
                    self._install(symbol, fit_garch11(window, previous=pipeline.last_fit))
            one = self._spec.symbol(symbol)
            self._models[symbol] = make_model(
                one.model,
                one.params,
                seed=continuation_seed(self._spec.seed, symbol, int(last["seq"])),
                initial_price=float(last["close"]),
                volume=one.volume,
                substeps=self._spec.substeps,
            )
            self._continued.add(symbol)
        self._unsent = None

    def continue_clock(self, published: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """Start the synthetic market clock after the newest `timestamp` of the `data` objects
        in `published` (symbol → updates, as for `continue_from`; a persisted history's newest
        ones): the next run's first bar closes at the wall clock or one `bar_seconds` after
        that timestamp, whichever is later, so close times never go backwards across a
        restart. Call before `run()`."""
        for updates in published.values():
            if updates:
                stamp = datetime.fromisoformat(str(updates[-1]["timestamp"]))
                if stamp.utcoffset() is not None:
                    self._clock.mark_published(stamp.astimezone(UTC))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches of bars (``list[Bar]``) forever; see the module docstring per source.

        Cancellation: cancellable at every await. `run()` never closes the send channel, on any
        exit, so the supervisor can call it again on the same object. Errors from the channel
        (e.g. `trio.BrokenResourceError`) and an unreadable replay file propagate. Raises
        RuntimeError if this object is already running.
        """
        if self._running:
            raise RuntimeError("Generator.run() is already running on this object")
        self._running = True
        try:
            if self._spec.source == "synthetic":
                await self._run_synthetic(task_status)
            else:
                await self._run_external(task_status)
        finally:
            self._running = False

    # ------------------------------------------------------------------ synthetic

    async def _run_synthetic(self, task_status: trio.TaskStatus[None]) -> None:
        """Schedule: the first tick is emitted at once after `task_status.started()`; tick ``k``
        is due at ``start + k * interval`` on Trio's clock. Deadlines are absolute, so time spent
        generating or blocked in ``send`` (a slow consumer) never accumulates as drift. If the
        loop falls behind by whole intervals, the next batch makes up to `MAX_CATCH_UP_TICKS` of
        the missed ticks: it carries their bars too, each symbol's in series order. Ticks missed
        beyond that are skipped (logged as ``generator_ticks_skipped`` with their ``count``):
        never a burst. Bars close on the market clock (`clock.MarketClock`): the run's round n at
        its origin (`wall_clock()` at the start, or one bar after the newest published close if
        that is later) + n × bar_seconds; skipped ticks take no market time.
        """
        spec = self._spec
        if not self._warmed_up:
            # The first update then already carries full estimator windows and a GARCH fit.
            await trio.to_thread.run_sync(self._warm_up, spec.warmup_bars)
            self._warmed_up = True
        interval = spec.interval
        start = trio.current_time()
        origin = self._clock.start_run(self._timestamp())
        task_status.started()
        self._log.info(
            "generator_started",
            source="synthetic",
            symbols=list(self._symbols),
            interval=interval,
            bar_seconds=spec.bar_seconds,
            clock_origin=origin.isoformat(),
            model=spec.model,
            seed=spec.seed,
        )
        tick = 0
        skipped = 0
        while True:
            await trio.sleep_until(start + tick * interval)
            due = _latest_due_tick(start, interval, trio.current_time())
            if due - tick > MAX_CATCH_UP_TICKS:
                count = due - tick - MAX_CATCH_UP_TICKS
                skipped += count
                # Not simulated, so no market time passes for them: the market clock now runs
                # `clock_lag_s` behind the schedule for the rest of this run.
                self._log.warning(
                    "generator_ticks_skipped",
                    count=count,
                    clock_lag_s=round(skipped * spec.bar_seconds, 6),
                )
                tick = due - MAX_CATCH_UP_TICKS
            await self._emit(bars_per_symbol=due - tick + 1)
            tick = due + 1

    def _warm_up(self, bars: int) -> None:
        """Run `bars` bars of every symbol through its pipeline, unpublished (a worker thread)."""
        for symbol in self._symbols:
            if symbol in self._continued:
                continue  # its pipeline carries a published series already
            pipeline = self._pipelines[symbol]
            for _ in range(bars):
                window = self._step_model(symbol)
                if window is not None:
                    self._install(symbol, fit_garch11(window, previous=pipeline.last_fit))

    async def _emit(self, bars_per_symbol: int = 1) -> None:
        if self._unsent is not None:
            # Never delivered, so never published: its rounds become this run's first ones.
            symbols = len(self._symbols)
            stamps = self._clock.next_rounds(len(self._unsent) // symbols)
            batch = [
                bar._replace(timestamp=stamps[i // symbols]) for i, bar in enumerate(self._unsent)
            ]
        else:
            batch = await self._next_batch(self._clock.next_rounds(bars_per_symbol))
        # Remember the batch until the send completes: a Cancelled from a Trio channel send means
        # it was not delivered, and dropping it would leave a hole in the price series.
        self._unsent = batch
        await self._send.send(batch)
        self._clock.mark_published(batch[-1].timestamp)
        self._unsent = None

    async def _next_batch(self, stamps: list[datetime]) -> list[Bar]:
        """One bar of every symbol per stamp, round by round (each symbol's bars in series
        order)."""
        # Shielded: the batch is built whole or not at all (a cancel between symbols would
        # advance some series without publishing them). Its only wait is a bounded GARCH fit.
        with trio.CancelScope(shield=True):
            batch = []
            for stamp in stamps:
                for symbol in self._symbols:
                    pipeline = self._pipelines[symbol]
                    window = self._step_model(symbol)
                    if window is not None:
                        fit = await trio.to_thread.run_sync(
                            partial(fit_garch11, window, previous=pipeline.last_fit)
                        )
                        self._install(symbol, fit)
                    batch.append(pipeline.bar(stamp))
            return batch

    def _step_model(self, symbol: str) -> FloatArray | None:
        """Move `symbol` to its next simulated bar; the returns to fit when a refit is due."""
        pipeline = self._pipelines[symbol]
        if not pipeline.pending:
            pipeline.feed(self._models[symbol].simulate(BLOCK_BARS))
        return pipeline.advance()

    def _install(self, symbol: str, fit: GarchFit) -> None:
        self._pipelines[symbol].install(fit)
        level, event, fields = fit_log_event(fit)
        getattr(self._log, level)(event, symbol=symbol, **fields)

    def _timestamp(self) -> datetime:
        stamp = self._wall_clock()
        if stamp.tzinfo is None or stamp.utcoffset() is None:
            raise ValueError("wall_clock() must return a timezone-aware datetime")
        return stamp.astimezone(UTC)

    # ------------------------------------------------------------------ file and replay

    async def _run_external(self, task_status: trio.TaskStatus[None]) -> None:
        """Publish one batch (one bar) per record the source delivers, in its order.

        Each symbol's bars are annualised with the spacing of its records (`SpacingTracker`),
        marked after a session gap, and flagged close-only where the record gave no range. The
        first time a symbol's spacing contradicts a configured ``bar_seconds`` one warning is
        logged, ``source_spacing_mismatch`` (``symbol``, ``inferred_seconds``, ``bar_seconds``).

        A replay that reaches its end (``loop = false``) leaves the service idle, not finished:
        the supervisor treats a returning service as a crash.
        """
        spec = self._spec
        if self._unsent is not None:
            await self._send.send(self._unsent)
            self._unsent = None
        # Unbuffered: a record the source has handed over (and counts as published, in its
        # watermarks) is already in this task's hands, where _bar_of/_unsent keep it through a
        # cancellation. A buffer would drop the records it holds when run() is cancelled.
        records_in, records_out = trio.open_memory_channel[Record](0)
        async with trio.open_nursery() as nursery:
            if spec.source == "file":
                source = partial(
                    follow_file,
                    spec.file.path,
                    send=records_in,
                    log=self._log,
                    default_symbol=self._symbols[0],
                    file_format=spec.file.format,
                    poll_interval=spec.file.poll_interval,
                    published=self._watermarks,
                )
            else:
                source = partial(
                    replay_csv,
                    spec.replay.path,
                    send=records_in,
                    log=self._log,
                    default_symbol=self._symbols[0],
                    speed=spec.replay.speed,
                    loop=spec.replay.loop,
                )
            await nursery.start(_closing_when_done, source, records_in)
            task_status.started()
            self._log.info("generator_started", source=spec.source, symbols=list(self._symbols))
            async for record in records_out:
                bar = await self._bar_of(record)
                if bar is not None:
                    self._unsent = [bar]
                    await self._send.send(self._unsent)
                    self._unsent = None
            self._log.info("generator_source_finished", source=spec.source)
            await trio.sleep_forever()

    async def _bar_of(self, record: Record) -> Bar | None:
        pipeline = self._pipelines.get(record.symbol)
        if pipeline is None:
            if record.symbol not in self._unknown_symbols:
                self._unknown_symbols.add(record.symbol)
                self._log.warning(
                    "source_record_rejected", reason="unknown_symbol", symbol=record.symbol
                )
            return None
        with trio.CancelScope(shield=True):  # as in _next_batch: advanced means published
            tracker = self._spacings.get(record.symbol)
            if tracker is None:
                tracker = SpacingTracker(self._spec.bar_seconds)
                self._spacings[record.symbol] = tracker
            spacing = tracker.observe(record.timestamp)
            # An unset bar_seconds is the tick interval, which says nothing of a file's bars.
            if spacing.mismatch and self._spec.bar_seconds_set:
                self._log.warning(
                    "source_spacing_mismatch",
                    symbol=record.symbol,
                    inferred_seconds=spacing.inferred_seconds,
                    bar_seconds=tracker.configured_seconds,
                )
            pipeline.feed(
                single_bar_block(record),
                bar_seconds=spacing.bar_seconds,
                gap_seconds=None if spacing.gap_seconds is None else [spacing.gap_seconds],
                close_only=None if record.has_range else _CLOSE_ONLY,
            )
            window = pipeline.advance()
            if window is not None:
                fit = await trio.to_thread.run_sync(
                    partial(fit_garch11, window, previous=pipeline.last_fit)
                )
                self._install(record.symbol, fit)
            return pipeline.bar(record.timestamp)


async def _closing_when_done(
    source: Callable[..., object],
    channel: trio.MemorySendChannel[Record],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `source` and close `channel` when it returns, so the reader sees the end."""
    async with channel:
        await source(task_status=task_status)  # type: ignore[operator]


def _latest_due_tick(start: float, interval: float, now: float) -> int:
    """The largest k with ``start + k * interval <= now`` (the same arithmetic as the deadlines,
    so float rounding can neither invent nor hide a skipped tick)."""
    k = math.floor((now - start) / interval)
    while start + (k + 1) * interval <= now:
        k += 1
    while k > 0 and start + k * interval > now:
        k -= 1
    return k
