"""`RetryPlan`: how long each connect attempt may take, how long to wait before the next, and
when to give up on the first connection. Pure: the time is passed in, the jitter injectable."""

from __future__ import annotations

import random
from collections.abc import Callable

from .errors import ConnectFailed
from .tracker import backoff_delay


class RetryPlan:
    """The reconnect schedule of one connection task (see the `agentspoonsd.client` module
    docstring, "Reconnection" and "Visible failures").

    Until the first connection, `connect_timeout` (None: no limit) bounds the whole: attempts
    are cut to the time left (the last, made at the deadline, still gets up to a second), the
    waits too, and `next_delay` returns None once the deadline has passed. After it, attempts
    are bounded by `step_timeout` alone and retried forever. The attempt counter of the backoff
    starts over once a connection has delivered an update.
    """

    def __init__(
        self,
        *,
        connect_timeout: float | None,
        step_timeout: float,
        backoff_initial: float,
        backoff_max: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.step_timeout = step_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rand = rand
        self.deadline: float | None = None
        self.attempt = 0  # the backoff's attempt counter
        self.failures = 0  # failed connect attempts since the last connection

    def start(self, now: float) -> None:
        """The connection task starts at `now`: the first connection is due by the deadline."""
        self.deadline = None if self.connect_timeout is None else now + self.connect_timeout
        self.attempt = 0

    def attempt_timeout(self, now: float, *, connected_before: bool) -> float:
        """The bound of an attempt starting at `now`."""
        timeout = self.step_timeout
        if self.deadline is not None and not connected_before:
            # Bounded by the time left, but the last attempt, made at the deadline, still gets
            # up to a second: time enough to be accepted.
            left = self.deadline - now
            timeout = max(min(1.0, timeout), min(timeout, left))
        return timeout

    def failed(self) -> bool:
        """A connect attempt failed; True when it is the first since the last connection."""
        self.failures += 1
        return self.failures == 1

    def connected(self) -> None:
        self.failures = 0

    def next_delay(
        self, now: float, *, connected_before: bool, delivered: bool, retry_after: float
    ) -> float | None:
        """Seconds to wait before the next attempt, after one that ended at `now` (`delivered`:
        its connection delivered updates; `retry_after`: the daemon's asked minimum). None: the
        first connection's deadline has passed, give up."""
        if delivered:
            self.attempt = 0
        delay = max(
            backoff_delay(self.attempt, self.backoff_initial, self.backoff_max, self._rand),
            min(retry_after, self.backoff_max),
        )
        self.attempt += 1
        if self.deadline is not None and not connected_before:
            # Keep trying until the deadline, not only while a whole backoff fits before it:
            # a daemon that comes up late in the window is still found.
            left = self.deadline - now
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay

    def give_up_error(self, last: ConnectFailed | None) -> ConnectFailed:
        """The error raised to the consumer when the first connection's deadline passed: the
        last attempt's cause, with the time allowed and the attempts made."""
        cause = str(last) if last is not None else "no connection"
        attempts = self.failures
        return ConnectFailed(
            f"{cause} (no connection within {self.connect_timeout:g} s, "
            f"{attempts} attempt{'s' if attempts != 1 else ''})",
            refused=last.refused if last else False,
            timeout=last.timeout if last else True,
            reason=last.reason if last else "timeout",
            status=last.status if last else None,
        )
