"""The synthetic source's tick schedule: which ticks are due, how many a late loop makes up,
how many it skips. Pure: the time is passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Ticks a late loop makes up in its next batch (bars of each symbol beyond the due one). Falling
# behind by a tick under load then costs no update: the hub sends a symbol's bars of one batch to
# each client in one write, so catching up is cheaper than the ticks were. Later ticks than this
# are skipped, so a long stall never turns into a burst.
MAX_CATCH_UP_TICKS = 2


@dataclass(frozen=True, slots=True)
class Due:
    """What one wake-up of the loop emits: `bars_per_symbol` rounds (the due tick and the ones
    made up), after skipping `skipped` ticks (0: none skipped)."""

    bars_per_symbol: int
    skipped: int


class TickSchedule:
    """Tick ``k`` is due at ``start + k * interval``: absolute deadlines, so time spent
    generating or blocked in a send never accumulates as drift.

    Use: sleep until `deadline()`, then `take(now)`; it advances past the ticks it returns.
    """

    def __init__(
        self, start: float, interval: float, *, max_catch_up: int = MAX_CATCH_UP_TICKS
    ) -> None:
        if interval <= 0 or max_catch_up < 0:
            raise ValueError("interval must be > 0 and max_catch_up >= 0")
        self.start = start
        self.interval = interval
        self.max_catch_up = max_catch_up
        self.tick = 0  # the next tick to emit
        self.skipped = 0  # ticks skipped so far in this schedule

    def deadline(self) -> float:
        """When the next tick is due."""
        return self.start + self.tick * self.interval

    def take(self, now: float) -> Due:
        """The ticks due at `now` (at least the next one: call it at or after `deadline()`):
        up to `max_catch_up` missed ticks are made up, older ones skipped."""
        due = max(self.tick, latest_due_tick(self.start, self.interval, now))
        skipped = 0
        if due - self.tick > self.max_catch_up:
            skipped = due - self.tick - self.max_catch_up
            self.skipped += skipped
            self.tick = due - self.max_catch_up
        result = Due(bars_per_symbol=due - self.tick + 1, skipped=skipped)
        self.tick = due + 1
        return result


def latest_due_tick(start: float, interval: float, now: float) -> int:
    """The largest k with ``start + k * interval <= now`` (the same arithmetic as the deadlines,
    so float rounding can neither invent nor hide a skipped tick)."""
    k = math.floor((now - start) / interval)
    while start + (k + 1) * interval <= now:
        k += 1
    while k > 0 and start + k * interval > now:
        k -= 1
    return k
