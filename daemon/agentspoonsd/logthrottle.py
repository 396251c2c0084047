"""Per-key log rate limiting, pure: the caller passes the time.

One peer that provokes errors over and over must not flood the log (or the disk behind it), and
must not hide other peers' events either. `LogThrottle` lets through the first `limit` events of
each key in a window of `interval` seconds, counts the rest, and reports that count once, when the
window is over, so that a caller logs a single `log_suppressed count=N` line for it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OVERFLOW_KEY", "LogThrottle", "Verdict"]

OVERFLOW_KEY = "*"
"""Where events of new keys are counted while `max_keys` keys already have open windows."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """`emit`: log this event. `suppressed` > 0: first log a summary of that many events, the ones
    suppressed in this key's previous window (which has just ended)."""

    emit: bool
    suppressed: int = 0


@dataclass(slots=True)
class _Window:
    start: float
    emitted: int = 0
    suppressed: int = 0


class LogThrottle:
    """At most `limit` events per key in each window of `interval` seconds.

    A key's window opens at its first event and ends `interval` seconds later. Memory is bounded:
    at most `max_keys` windows are open (plus the overflow key); ended windows are dropped by
    `admit` (for their own key) and by `flush` (for all keys).
    """

    def __init__(self, limit: int = 5, interval: float = 10.0, max_keys: int = 1024) -> None:
        if limit < 1 or interval <= 0 or max_keys < 1:
            raise ValueError("limit and max_keys must be >= 1, interval > 0")
        self.limit = limit
        self.interval = interval
        self.max_keys = max_keys
        self._windows: dict[str, _Window] = {}

    def admit(self, key: str, now: float) -> Verdict:
        """Count one event of `key` at time `now`; say whether to log it and what to summarise."""
        window = self._windows.get(key)
        suppressed = 0
        if window is not None and now >= window.start + self.interval:
            suppressed = window.suppressed
            del self._windows[key]
            window = None
        if window is None:
            if len(self._windows) >= self.max_keys and key != OVERFLOW_KEY:
                return self._count_overflow(now, suppressed)
            window = self._windows[key] = _Window(now)
        if window.emitted < self.limit:
            window.emitted += 1
            return Verdict(True, suppressed)
        window.suppressed += 1
        return Verdict(False, suppressed)

    def _count_overflow(self, now: float, suppressed: int) -> Verdict:
        overflow = self._windows.get(OVERFLOW_KEY)
        if overflow is None or now >= overflow.start + self.interval:
            # The overflow window's own summary is left for `flush`; this one starts afresh.
            overflow = self._windows[OVERFLOW_KEY] = _Window(now, suppressed=_pending(overflow))
        overflow.suppressed += 1
        return Verdict(False, suppressed)

    def flush(self, now: float, *, everything: bool = False) -> list[tuple[str, int]]:
        """Close the windows that have ended by `now` (every window with `everything`); return
        (key, suppressed count) for those that suppressed something, to be summarised."""
        ended = [
            key
            for key, window in self._windows.items()
            if everything or now >= window.start + self.interval
        ]
        summaries = []
        for key in ended:
            window = self._windows.pop(key)
            if window.suppressed:
                summaries.append((key, window.suppressed))
        return summaries

    def __len__(self) -> int:
        """Open windows."""
        return len(self._windows)


def _pending(window: _Window | None) -> int:
    return window.suppressed if window is not None else 0
