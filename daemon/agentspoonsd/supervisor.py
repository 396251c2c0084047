"""Supervision of long-running services: restart with capped exponential backoff, within a budget.

`RestartPolicy` is pure (it takes the time as an argument) and decides; `supervise` is the Trio
loop that applies it. A service is any object with
``async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None`` that calls
``task_status.started()`` once it is serving, and keeps its state on the object so a restarted
`run` carries on where the last one stopped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import trio
from structlog.typing import FilteringBoundLogger

from .backoff import capped_exponential
from .metrics import Stats


class Service(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


class CrashBudgetExceeded(Exception):
    """A service crashed more often than its policy allows; the daemon must exit non-zero."""

    def __init__(self, service: str, crashes: int, window: float) -> None:
        super().__init__(f"service {service!r} crashed {crashes} times within {window:g} s")
        self.service = service


@dataclass
class RestartPolicy:
    """Backoff doubles from `initial_backoff` to `max_backoff` per consecutive crash, and resets
    after a run that lasted `stable_after` seconds. More than `max_crashes` crashes within
    `window` seconds exhausts the budget."""

    initial_backoff: float = 0.1
    max_backoff: float = 10.0
    max_crashes: int = 5
    window: float = 60.0
    stable_after: float = 30.0
    _crashes: deque[float] = field(default_factory=deque, repr=False)
    _consecutive: int = field(default=0, repr=False)

    def on_crash(self, now: float, ran_for: float) -> float | None:
        """Record a crash at `now`; return the delay before the restart, or None: give up."""
        self._crashes.append(now)
        while self._crashes and self._crashes[0] <= now - self.window:
            self._crashes.popleft()
        if len(self._crashes) > self.max_crashes:
            return None
        self._consecutive = 1 if ran_for >= self.stable_after else self._consecutive + 1
        return capped_exponential(self._consecutive - 1, self.initial_backoff, self.max_backoff)

    @property
    def recent_crashes(self) -> int:
        return len(self._crashes)


class _StartedOnce:
    """Forwards the first `started()` to the real task status, swallows later ones (restarts)."""

    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self._task_status = task_status
        self.done = False

    def started(self, value: None = None) -> None:
        if not self.done:
            self.done = True
            self._task_status.started(value)


async def supervise(
    name: str,
    service: Service,
    policy: RestartPolicy,
    stats: Stats,
    log: FilteringBoundLogger,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `service` forever, restarting it when it raises or returns.

    Reports started (to `nursery.start`) the first time the service does. Cancellation passes
    straight through: a cancelled service is not restarted. Raises CrashBudgetExceeded when the
    policy gives up; that ends the daemon.
    """
    started = _StartedOnce(task_status)
    while True:
        began = trio.current_time()
        try:
            await service.run(task_status=started)
            log.error("service_exited", service=name)
        except Exception:
            log.exception("service_crashed", service=name)
        now = trio.current_time()
        delay = policy.on_crash(now, now - began)
        if delay is None:
            log.critical(
                "service_crash_budget_exceeded",
                service=name,
                crashes=policy.recent_crashes,
                window_s=policy.window,
            )
            raise CrashBudgetExceeded(name, policy.recent_crashes, policy.window)
        stats.service_restarts[name] += 1
        log.warning(
            "service_restarting",
            service=name,
            delay_s=round(delay, 3),
            recent_crashes=policy.recent_crashes,
        )
        await trio.sleep(delay)
