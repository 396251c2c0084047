"""The file and replay sources: one bar per record another process writes (``file``) or a CSV
holds (``replay``), through the symbol's pipeline.

`RecordFeed` is the synchronous part (which symbol, which spacing, into the pipeline);
`ExternalSource` the Trio part (the source task, the channel, the refits in a worker thread).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial

import numpy as np
import trio
from structlog.typing import FilteringBoundLogger

from .bar import Bar
from .block import BarBlock, FloatArray
from .fitting import FitScheduler
from .pipeline import SymbolPipeline
from .records import Record
from .sources import follow_file, replay_csv
from .spacing import SpacingTracker
from .spec import GeneratorSpec

_CLOSE_ONLY = np.array([True])  # the `close_only` marks of a one-bar block without a real range


def single_bar_block(record: Record) -> BarBlock:
    def one(value: float) -> np.ndarray:
        return np.array([value], dtype=np.float64)

    return BarBlock(
        one(record.open), one(record.high), one(record.low), one(record.close), one(record.volume)
    )


@dataclass(frozen=True, slots=True)
class Fed:
    """A record taken into its symbol's pipeline: `window` holds the returns to fit first when a
    refit is due, then `pipeline.bar(timestamp)` is the bar to publish."""

    symbol: str
    timestamp: datetime
    window: FloatArray | None


class RecordFeed:
    """Takes records into the pipelines, each symbol's annualised with the spacing of its own
    records (`SpacingTracker`). No I/O, no clock; warnings go to `log`, each kind once:

    - ``source_record_rejected`` (``reason="unknown_symbol"``) once per unknown symbol;
    - ``source_spacing_mismatch`` once per symbol whose spacing contradicts a configured
      ``bar_seconds`` (an unset one is the tick interval, which says nothing of a file's bars).
    """

    def __init__(
        self,
        spec: GeneratorSpec,
        pipelines: Mapping[str, SymbolPipeline],
        log: FilteringBoundLogger,
    ) -> None:
        self._spec = spec
        self._pipelines = pipelines
        self._log = log
        self._spacings: dict[str, SpacingTracker] = {}
        self._unknown_symbols: set[str] = set()

    def feed(self, record: Record) -> Fed | None:
        """Advance the record's symbol by one bar; None for a symbol not configured."""
        pipeline = self._pipelines.get(record.symbol)
        if pipeline is None:
            if record.symbol not in self._unknown_symbols:
                self._unknown_symbols.add(record.symbol)
                self._log.warning(
                    "source_record_rejected", reason="unknown_symbol", symbol=record.symbol
                )
            return None
        tracker = self._spacings.get(record.symbol)
        if tracker is None:
            tracker = SpacingTracker(self._spec.bar_seconds)
            self._spacings[record.symbol] = tracker
        spacing = tracker.observe(record.timestamp)
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
        return Fed(record.symbol, record.timestamp, pipeline.advance())


class ExternalSource:
    """Runs the configured file or replay source and sends one batch (one bar) per record.

    State lives here, not in `run()`: the file's watermarks (records up to them count as
    published) and a bar whose send was interrupted survive a supervisor restart of `run()`.
    """

    def __init__(
        self,
        spec: GeneratorSpec,
        pipelines: Mapping[str, SymbolPipeline],
        fits: FitScheduler,
        log: FilteringBoundLogger,
    ) -> None:
        self._spec = spec
        self._pipelines = pipelines
        self._fits = fits
        self._log = log
        self.feed = RecordFeed(spec, pipelines, log)
        self.watermarks: dict[str, datetime] = {}  # file source: last record per symbol
        self.unsent: list[Bar] | None = None

    def _source(self, records: trio.MemorySendChannel[Record]) -> Callable[..., Awaitable[object]]:
        spec = self._spec
        default_symbol = spec.symbols[0]
        if spec.source == "file":
            assert spec.file.path is not None  # the settings require it for this source
            return partial(
                follow_file,
                spec.file.path,
                send=records,
                log=self._log,
                default_symbol=default_symbol,
                file_format=spec.file.format,
                poll_interval=spec.file.poll_interval,
                published=self.watermarks,
            )
        assert spec.replay.path is not None  # the settings require it for this source
        return partial(
            replay_csv,
            spec.replay.path,
            send=records,
            log=self._log,
            default_symbol=default_symbol,
            speed=spec.replay.speed,
            loop=spec.replay.loop,
        )

    async def run(
        self, send: trio.MemorySendChannel[list[Bar]], task_status: trio.TaskStatus[None]
    ) -> None:
        """Publish one batch (one bar) per record the source delivers, in its order.

        Each symbol's bars are annualised with the spacing of its records, marked after a
        session gap, and flagged close-only where the record gave no range (`RecordFeed`).
        A replay that reaches its end (``loop = false``) leaves the service idle, not finished:
        the supervisor treats a returning service as a crash.
        """
        if self.unsent is not None:
            await send.send(self.unsent)
            self.unsent = None
        # Unbuffered: a record the source has handed over (and counts as published, in its
        # watermarks) is already in this task's hands, where bar_of/unsent keep it through a
        # cancellation. A buffer would drop the records it holds when run() is cancelled.
        records_in, records_out = trio.open_memory_channel[Record](0)
        source = self._spec.source
        async with trio.open_nursery() as nursery:
            await nursery.start(_closing_when_done, self._source(records_in), records_in)
            task_status.started()
            self._log.info("generator_started", source=source, symbols=list(self._spec.symbols))
            async for record in records_out:
                bar = await self.bar_of(record)
                if bar is not None:
                    self.unsent = [bar]
                    await send.send(self.unsent)
                    self.unsent = None
            self._log.info("generator_source_finished", source=source)
            await trio.sleep_forever()

    async def bar_of(self, record: Record) -> Bar | None:
        """The bar of `record` (None: an unknown symbol), refit first if one is due."""
        with trio.CancelScope(shield=True):  # advanced means published: see SyntheticProducer
            fed = self.feed.feed(record)
            if fed is not None and fed.window is not None:
                await self._fits.fit_in_thread(fed.symbol, fed.window)
        return None if fed is None else self._pipelines[fed.symbol].bar(fed.timestamp)


async def _closing_when_done(
    source: Callable[..., Awaitable[object]],
    channel: trio.MemorySendChannel[Record],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `source` and close `channel` when it returns, so the reader sees the end."""
    async with channel:
        await source(task_status=task_status)
