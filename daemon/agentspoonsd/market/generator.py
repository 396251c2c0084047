"""The generator service: drives the GARCH simulator on a fixed schedule and sends the bars on.

This is the thin Trio layer over the pure `garch` and `volatility` modules: it owns the clock and
the channel, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import trio
from structlog.typing import FilteringBoundLogger

from agentspoonsd.market.bar import Bar
from agentspoonsd.market.garch import GarchSimulator
from agentspoonsd.market.volatility import RollingVolatility
from agentspoonsd.settings import GeneratorSettings


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Generator:
    """Produces one `Bar` per configured symbol every `settings.interval` seconds.

    The simulator and rolling-volatility state live on this object, not in `run()`: the supervisor
    restarts `run()` on the same object and channel after a crash, and the price series simply
    continues (the first bar after a restart opens at the last close sent before it).
    """

    def __init__(
        self,
        settings: GeneratorSettings,
        send_channel: trio.MemorySendChannel[list[Bar]],
        log: FilteringBoundLogger,
        *,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """`wall_clock` stamps the bars (it must return timezone-aware datetimes); the schedule
        itself runs on Trio's clock, so tests can drive it with `trio.testing.MockClock`."""
        self._settings = settings
        self._send = send_channel
        self._log = log
        self._wall_clock = wall_clock
        self._symbols = tuple(settings.symbols)
        self._rng = np.random.default_rng(settings.seed)
        self._simulator = GarchSimulator(
            len(self._symbols), self._rng, initial_price=settings.initial_price
        )
        self._volatility = RollingVolatility(len(self._symbols), settings.volatility_window)
        # A batch whose send was interrupted (cancelled or failed). It is sent first on the next
        # run, so consumers never see a gap in the price series.
        self._unsent: list[Bar] | None = None
        self._running = False

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbols, in the order of every batch this generator sends."""
        return self._symbols

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send one batch of bars (``list[Bar]`` in `symbols` order) per tick, forever.

        Schedule: `task_status.started()` is called at once and the first tick is emitted
        immediately; tick ``k`` is due at ``start + k * interval`` on Trio's clock. Deadlines are
        absolute, so time spent generating or blocked in ``send`` (a slow consumer) never
        accumulates as drift. If the loop falls behind by one or more whole intervals, the ticks
        whose deadlines have all passed are skipped (logged as ``generator_ticks_skipped`` with
        their ``count``) and a single batch is sent for the latest due tick: never a burst.

        Each bar's timestamp is `wall_clock()` when its batch is emitted. If a send is
        interrupted, that batch is re-sent (re-stamped) first by the next `run()`.

        Cancellation: cancellable at every await (while waiting for a deadline or in ``send``);
        cancelled in ``send`` means the batch was not delivered. `run()` never closes the send
        channel, on any exit, so the supervisor can call it again on the same object. Errors
        from the channel (e.g. `trio.BrokenResourceError`) propagate. Raises RuntimeError if
        this object is already running.
        """
        if self._running:
            raise RuntimeError("Generator.run() is already running on this object")
        self._running = True
        try:
            interval = self._settings.interval
            start = trio.current_time()
            task_status.started()
            self._log.info(
                "generator_started",
                symbols=list(self._symbols),
                interval=interval,
                model=self._settings.model,
                seed=self._settings.seed,
            )
            tick = 0
            while True:
                await trio.sleep_until(start + tick * interval)
                due = _latest_due_tick(start, interval, trio.current_time())
                if due > tick:
                    self._log.warning("generator_ticks_skipped", count=due - tick)
                    tick = due
                await self._emit()
                tick += 1
        finally:
            self._running = False

    async def _emit(self) -> None:
        stamp = self._timestamp()
        if self._unsent is not None:
            batch = [replace(bar, timestamp=stamp) for bar in self._unsent]
        else:
            batch = self._next_batch(stamp)
        # Remember the batch until the send completes: a Cancelled from a Trio channel send means
        # it was not delivered, and dropping it would leave a hole in the price series.
        self._unsent = batch
        await self._send.send(batch)
        self._unsent = None

    def _next_batch(self, stamp: datetime) -> list[Bar]:
        arrays = self._simulator.step()
        volatility = self._volatility.push(arrays.returns)
        # tolist() turns float64 into Python floats in one pass, which is what Bar promises.
        return [
            Bar(
                symbol=symbol,
                timestamp=stamp,
                open=open_,
                high=high,
                low=low,
                close=close,
                volume=volume,
                returns=ret,
                volatility=vol,
            )
            for symbol, open_, high, low, close, volume, ret, vol in zip(
                self._symbols,
                arrays.open.tolist(),
                arrays.high.tolist(),
                arrays.low.tolist(),
                arrays.close.tolist(),
                arrays.volume.tolist(),
                arrays.returns.tolist(),
                volatility.tolist(),
                strict=True,
            )
        ]

    def _timestamp(self) -> datetime:
        stamp = self._wall_clock()
        if stamp.tzinfo is None or stamp.utcoffset() is None:
            raise ValueError("wall_clock() must return a timezone-aware datetime")
        return stamp.astimezone(UTC)


def _latest_due_tick(start: float, interval: float, now: float) -> int:
    """The largest k with ``start + k * interval <= now`` (the same arithmetic as the deadlines,
    so float rounding can neither invent nor hide a skipped tick)."""
    k = math.floor((now - start) / interval)
    while start + (k + 1) * interval <= now:
        k += 1
    while k > 0 and start + k * interval > now:
        k -= 1
    return k
