"""Capped exponential backoff: the one rule every retry loop of the project follows.

Pure and dependency-free (the client imports it too): the supervisor's restarts, the redis
broker's reconnects and the client's reconnects (with full jitter on top) all wait
``min(maximum, initial × 2**attempt)`` before retry `attempt` (0 for the first).
"""

from __future__ import annotations

# 2**64 × any sane initial delay is past every cap; larger exponents would only risk an
# OverflowError when a retry loop has been failing for a very long time.
_MAX_DOUBLINGS = 64


def capped_exponential(attempt: int, initial: float, maximum: float) -> float:
    """Seconds before retry `attempt` (>= 0): `initial` doubled per attempt, at most `maximum`.

    Raises ValueError for a negative argument."""
    if attempt < 0 or initial < 0 or maximum < 0:
        raise ValueError("attempt, initial and maximum must be >= 0")
    return min(maximum, initial * 2.0 ** min(attempt, _MAX_DOUBLINGS))


class Backoff:
    """The delays of one retry loop: `next()` gives `capped_exponential` of the attempts so far,
    `reset()` after a success starts over at `initial`."""

    def __init__(self, initial: float, cap: float) -> None:
        self._initial, self._cap = initial, cap
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next(self) -> float:
        delay = capped_exponential(self._attempt, self._initial, self._cap)
        self._attempt += 1
        return delay
