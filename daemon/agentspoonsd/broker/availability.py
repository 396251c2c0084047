"""Whether this node can talk to Redis, and what "unreachable right now" looks like."""

from __future__ import annotations

from typing import Any

import trio
from coredis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

from .entries import redact_url

# What "Redis is unreachable or unusable right now" looks like: retried, never a crash.
UNAVAILABLE = (RedisError, OSError, trio.TooSlowError)

BACKOFF_INITIAL = 0.05  # seconds before the first retry after a failure, doubling...
BACKOFF_MAX = 1.0  # ...up to this
LINK_GRACE = 0.25  # seconds after a success during which a failure is not yet an outage


class Link:
    """Whether this node can talk to Redis, as the loops last found out. Logs each change once.

    Both loops report every outcome; a failure more than `LINK_GRACE` after the last success
    logs `broker_disconnected`, the first success after it `broker_connected`. (Right after
    Redis comes back, a command may still fail on a connection of the old server while another
    succeeds: that is not a new outage, and must not log one.)
    """

    def __init__(self, log: FilteringBoundLogger, url: str) -> None:
        self._log = log
        self._url = redact_url(url)
        self.connected: bool | None = None  # None: not tried yet
        self.error: str | None = None
        self._down_since: float | None = None
        self._last_ok = float("-inf")
        self.outages = 0  # broker_disconnected events so far

    def up(self) -> None:
        self._last_ok = trio.current_time()
        if self.connected:
            return
        fields: dict[str, Any] = {"url": self._url}
        if self._down_since is not None:
            fields["down_s"] = round(trio.current_time() - self._down_since, 3)
        self.connected, self.error, self._down_since = True, None, None
        self._log.info("broker_connected", **fields)

    def down(self, exc: BaseException) -> None:
        error = describe(exc)
        if self.connected is False:
            self.error = error  # the newest reason for /readyz, without a new log line
            return
        if self.connected and trio.current_time() - self._last_ok < LINK_GRACE:
            return  # one stale pooled connection right after a success: not an outage yet
        self.connected, self.error = False, error
        self.outages += 1
        self._down_since = trio.current_time()
        self._log.warning("broker_disconnected", url=self._url, error=error)


def describe(exc: BaseException) -> str:
    """A Redis failure in a few words, for logs and the readiness probe."""
    if isinstance(exc, trio.TooSlowError):
        return "no reply in time"
    return f"{type(exc).__name__}: {exc}"
