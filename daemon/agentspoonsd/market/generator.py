"""The generator service: bars from the configured source, through the pipeline, to the hub.

Sources (``[generator] source``):

- ``synthetic``: one model per symbol (`models`), simulated in blocks and published one bar per
  symbol every ``interval`` seconds, on an absolute schedule; each bar closes on the market
  clock (`clock.MarketClock`), ``bar_seconds`` after the previous one;
- ``file``: records another process writes to a JSON array or JSON Lines file (`sources`);
- ``replay``: the bars of a CSV, paced by their own timestamps at ``speed`` × real time.

Every bar goes through the same `SymbolPipeline` (estimators, annualisation, GARCH forecast).
`Generator` is the service the daemon supervises: it owns the pipelines, the market clock and the
channel, and hands the run to the source's producer (`synthetic.SyntheticProducer`,
`external.ExternalSource`); refits go through one `fitting.FitScheduler`; the numbers are
computed by the pure modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import trio
from structlog.typing import FilteringBoundLogger

from .bar import Bar
from .clock import MarketClock
from .external import ExternalSource, single_bar_block
from .fitting import FitScheduler
from .garch_fit import GarchFit
from .pipeline import SymbolPipeline
from .spec import GeneratorSpec
from .synthetic import (
    BLOCK_BARS,
    SyntheticProducer,
    build_model,
    continuation_seed,
    pipeline_config,
    symbol_seed,
)
from .ticks import MAX_CATCH_UP_TICKS

__all__ = [
    "BLOCK_BARS",
    "MAX_CATCH_UP_TICKS",
    "Generator",
    "build_model",
    "continuation_seed",
    "pipeline_config",
    "single_bar_block",
    "symbol_seed",
]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Generator:
    """Produces one `Bar` per symbol per tick (synthetic) or per record (file, replay).

    All state (models, pipelines, the file watermarks) lives on this object and its source's,
    not in `run()`: the supervisor restarts `run()` on the same object and channel after a
    crash, and every series simply continues.
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
        self._fits = FitScheduler(self._pipelines, log)
        self._clock = MarketClock(spec.bar_seconds)
        self._synthetic: SyntheticProducer | None = None
        self._external: ExternalSource | None = None
        if spec.source == "synthetic":
            self._synthetic = SyntheticProducer(spec, self._pipelines, self._fits, self._clock, log)
        else:
            self._external = ExternalSource(spec, self._pipelines, self._fits, log)
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
        self.continue_clock(published)
        for symbol, updates in published.items():
            if symbol not in self._pipelines or not updates:
                continue
            if self._spec.source == "file" and self._external is not None:
                stamp = datetime.fromisoformat(updates[-1]["timestamp"])
                self._external.watermarks[symbol] = stamp
            elif self._synthetic is not None:
                self._synthetic.continue_symbol(symbol, updates)
        # A batch left unsent by an earlier term belongs to a series now carried on from
        # what was published instead.
        for source in (self._synthetic, self._external):
            if source is not None:
                source.unsent = None

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
            if self._synthetic is not None:
                await self._synthetic.run(self._send, self._wall_clock, task_status)
            else:
                assert self._external is not None
                await self._external.run(self._send, task_status)
        finally:
            self._running = False

    def _install(self, symbol: str, fit: GarchFit) -> None:
        """Install and log a fit of `symbol` (see `FitScheduler.install`)."""
        self._fits.install(symbol, fit)
