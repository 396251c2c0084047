"""The market clock of the synthetic source: the close time of every bar it publishes.

Pure: the wall-clock reading is passed in. The rule, for the daemon and `agentspoonsd simulate`
alike: a run's bars close at ``origin + n × bar_seconds`` (n = 0, 1, 2… counts the rounds of
bars the run has handed out, one bar per symbol per round), to the microsecond, so the bars of a
symbol are exactly ``bar_seconds`` apart within a run however late the loop is. The clock
counts bars, not wall time:

- real time (``bar_seconds == interval``): the origin is the wall clock at the run's start, so
  bar n closes at tick n's scheduled time; a tick the loop skips (a stall beyond the catch-up)
  is not simulated and so takes no market time: from then on the bars close that much earlier
  than their ticks (the lag is logged with the skip);
- accelerated (``bar_seconds > interval``): the same rule, the market running ahead of the wall
  clock by ``bar_seconds / interval``;
- a new run (a restart, a takeover, the supervisor's restart after a crash) starts at the wall
  clock or one bar after the newest bar already published, whichever is later: never backwards,
  and a gap (the time the daemon was down) is possible only there.
"""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["MarketClock", "bar_step"]


def bar_step(bar_seconds: float) -> timedelta:
    """`bar_seconds` as the timedelta bars are spaced by: rounded to the microsecond (the
    resolution of the timestamps), at least one."""
    return timedelta(microseconds=max(1, round(bar_seconds * 1_000_000)))


class MarketClock:
    """Close times for the rounds of bars of successive runs (see the module docstring)."""

    def __init__(self, bar_seconds: float) -> None:
        self._step = bar_step(bar_seconds)
        self._origin: datetime | None = None
        self._rounds = 0
        self._published: datetime | None = None

    @property
    def published(self) -> datetime | None:
        """The newest close time known to be published (None: none yet)."""
        return self._published

    def mark_published(self, close: datetime) -> None:
        """A bar closing at `close` (aware) was published, by this clock or before it (a
        persisted history, another node): no later run closes a bar at or before it."""
        if self._published is None or close > self._published:
            self._published = close

    def start_run(self, now: datetime) -> datetime:
        """Begin a run at the wall-clock time `now` (aware); returns its origin, the close of its
        first round: `now`, or one bar after the newest published close if that is later."""
        origin = now
        if self._published is not None and self._published + self._step > now:
            origin = self._published + self._step
        self._origin = origin
        self._rounds = 0
        return origin

    def next_rounds(self, rounds: int) -> list[datetime]:
        """The close times of the run's next `rounds` rounds, `bar_seconds` apart, continuing
        from the last round handed out. Raises RuntimeError before `start_run`."""
        if self._origin is None:
            raise RuntimeError("MarketClock.start_run() was not called")
        first = self._rounds
        self._rounds += rounds
        return [self._origin + (first + k) * self._step for k in range(rounds)]
