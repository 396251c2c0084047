"""A source's bar spacing, inferred from its records' timestamps, and its session gaps. Pure.

A file or replay source does not say how long its bars are; its timestamps do. Annualising a
5-minute series with a configured 1-minute bar overstates every annualised value by √5, so the
bar length used for annualisation comes from the data: the median of the recent positive
spacings between consecutive records of the symbol. The median ignores the odd long spacing (an
overnight close, a weekend, a missing bar) as long as such spacings are fewer than half of the
recent ones.

A spacing much longer than the inferred bar (more than ``gap_factor`` × it) is a *session gap*:
the return across it mixes the market's move while it was closed into one bar. The tracker
reports such spacings so the estimators can treat that return apart (see
`agentspoonsd.market.estimators`).

No I/O and no clock: `SpacingTracker` is fed timestamps and returns values; the Trio layer
(`agentspoonsd.market.generator`) logs what it reports.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)

#: Recent spacings the median is taken over: enough that a gap per trading session (one in 390
#: one-minute bars) or weekends in daily data (two in seven) never move it, few enough that a
#: series whose spacing really changes is followed within a few dozen records.
RECENT_SPACINGS = 64
#: Spacings known before the median is used; until then the configured bar length is.
MIN_SPACINGS = 2
#: A spacing longer than this many bars is a session gap.
GAP_FACTOR = 1.5
#: Relative difference between the inferred and the configured bar length beyond which the
#: inferred one is used (and the difference reported once). Within it the configured one stays,
#: so jitter in the timestamps does not move the annualisation.
TOLERANCE = 0.05


class Spacing(NamedTuple):
    """What one record's timestamp says about the series' time base (see `SpacingTracker`)."""

    bar_seconds: float
    """The bar length to annualise this record's bar with: the inferred spacing where it
    contradicts the configured bar length, else the configured one."""
    inferred_seconds: float | None
    """The median of the recent spacings, this record's included; None until `MIN_SPACINGS`
    spacings are known."""
    gap_seconds: float | None
    """The spacing from the previous record when it is a session gap (more than ``gap_factor``
    × the spacing inferred before this record), else None. Never set before a spacing has been
    inferred: a gap cannot be told from a bar of unknown length."""
    mismatch: bool
    """True for the one record at which the inferred spacing first contradicts the configured
    bar length (the moment to warn), False for every other record."""


class SpacingTracker:
    """The time base of one symbol's series, record by record.

    Guarantees, for ``observe(t)`` called with the symbol's record timestamps in order:

    - ``bar_seconds`` is the configured length until `MIN_SPACINGS` positive spacings are known;
      then the median of the last ``recent`` positive spacings (``inferred_seconds``) when it
      differs from the configured length by more than ``tolerance`` (relative), else still the
      configured length (exactly that float).
    - ``gap_seconds`` is set exactly when the spacing to the previous record exceeds
      ``gap_factor`` × the median known *before* this record (so a gap never hides itself).
    - ``mismatch`` is True for at most one record over the tracker's life: the first one whose
      ``bar_seconds`` is not the configured length.
    - A timestamp not after the previous one (a replay started over) is no spacing: it is not
      counted, not a gap, and the series continues from it.

    Timestamps are compared in whole microseconds (exact; the medians are computed on integers).
    """

    def __init__(
        self,
        configured_seconds: float,
        *,
        recent: int = RECENT_SPACINGS,
        min_spacings: int = MIN_SPACINGS,
        gap_factor: float = GAP_FACTOR,
        tolerance: float = TOLERANCE,
    ) -> None:
        """Raise ValueError unless ``configured_seconds > 0`` (finite), ``recent >=
        min_spacings >= 1``, ``gap_factor > 1`` and ``0 <= tolerance < 1``."""
        if not (math.isfinite(configured_seconds) and configured_seconds > 0):
            raise ValueError(f"configured_seconds must be > 0, got {configured_seconds!r}")
        if not 1 <= min_spacings <= recent:
            raise ValueError(f"need 1 <= min_spacings <= recent, got {min_spacings}, {recent}")
        if not gap_factor > 1:
            raise ValueError(f"gap_factor must be > 1, got {gap_factor!r}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        self.configured_seconds = float(configured_seconds)
        self._min_spacings = min_spacings
        self._gap_factor = gap_factor
        self._tolerance = tolerance
        self._spacings: deque[int] = deque(maxlen=recent)  # microseconds, oldest first
        self._previous: int | None = None  # the last timestamp, in epoch microseconds
        self._median: float | None = None  # of self._spacings, in microseconds
        self._warned = False

    @property
    def inferred_seconds(self) -> float | None:
        """The median of the recent spacings, None until `MIN_SPACINGS` are known."""
        return None if self._median is None else self._median / 1e6

    def observe(self, timestamp: datetime) -> Spacing:
        """Take the next record's timestamp (timezone-aware); what it says about its bar."""
        now = (timestamp - _EPOCH) // _ONE_MICROSECOND
        previous, self._previous = self._previous, now
        gap_seconds = None
        if previous is not None and now > previous:
            spacing = now - previous
            before = self._median
            if before is not None and spacing > self._gap_factor * before:
                gap_seconds = spacing / 1e6
            self._spacings.append(spacing)
            if len(self._spacings) >= self._min_spacings:
                self._median = _median(self._spacings)
        inferred = self.inferred_seconds
        bar_seconds = self.configured_seconds
        if inferred is not None and abs(inferred - bar_seconds) > self._tolerance * bar_seconds:
            bar_seconds = inferred
        mismatch = bar_seconds != self.configured_seconds and not self._warned
        if mismatch:
            self._warned = True
        return Spacing(bar_seconds, inferred, gap_seconds, mismatch)


def _median(values: deque[int]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2
