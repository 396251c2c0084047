"""supervisor: the pure restart policy, and `supervise` driving real services on a fake clock.

The async tests use pytest-trio's `autojump_clock`: backoff sleeps cost no wall time, and
`trio.current_time()` tells exactly how long the supervisor waited.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import structlog
import trio
from structlog.testing import CapturingLogger, LogCapture

from agentspoonsd.metrics import Stats
from agentspoonsd.supervisor import CrashBudgetExceeded, RestartPolicy, supervise

# --- RestartPolicy (pure) -------------------------------------------------------------------------


def policy(**kwargs: Any) -> RestartPolicy:
    defaults: dict[str, Any] = {
        "initial_backoff": 0.1,
        "max_backoff": 1.0,
        "max_crashes": 100,
        "window": 60.0,
        "stable_after": 30.0,
    }
    return RestartPolicy(**(defaults | kwargs))


def test_backoff_doubles_up_to_the_cap() -> None:
    p = policy()
    delays = [p.on_crash(now=float(i), ran_for=0.0) for i in range(7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_defaults_are_sane() -> None:
    p = RestartPolicy()
    assert p.on_crash(0.0, 0.0) == pytest.approx(p.initial_backoff)
    assert 0 < p.initial_backoff <= p.max_backoff
    assert p.max_crashes >= 1 and p.window > 0 and p.stable_after > 0


def test_backoff_resets_after_a_stable_run() -> None:
    p = policy()
    for i in range(4):
        p.on_crash(now=float(i), ran_for=0.0)
    assert p.on_crash(now=100.0, ran_for=30.0) == pytest.approx(0.1)  # ran stable_after: reset
    assert p.on_crash(now=101.0, ran_for=1.0) == pytest.approx(0.2)  # then doubles again
    assert p.on_crash(now=200.0, ran_for=29.9) == pytest.approx(0.4)  # just short: no reset


def test_budget_exhausted_within_the_window() -> None:
    p = policy(max_crashes=3, window=10.0)
    assert p.on_crash(0.0, 0.0) is not None
    assert p.on_crash(1.0, 0.0) is not None
    assert p.on_crash(2.0, 0.0) is not None
    assert p.recent_crashes == 3
    assert p.on_crash(3.0, 0.0) is None  # the 4th crash within 10 s
    assert p.recent_crashes == 4


def test_old_crashes_age_out_of_the_window() -> None:
    p = policy(max_crashes=3, window=10.0)
    for t in (0.0, 1.0, 2.0):
        assert p.on_crash(t, 0.0) is not None
    assert p.on_crash(10.0, 0.0) is not None  # the crash at t=0 is exactly one window old
    assert p.recent_crashes == 3
    assert p.on_crash(11.5, 0.0) is not None  # t=1 gone too
    assert p.recent_crashes == 3
    assert p.on_crash(11.6, 0.0) is None  # 2, 10, 11.5, 11.6: four within 10 s
    # long after, a single crash is well within budget again
    fresh = policy(max_crashes=1, window=5.0)
    assert fresh.on_crash(0.0, 0.0) is not None
    assert fresh.on_crash(100.0, 0.0) is not None
    assert fresh.recent_crashes == 1


def test_zero_crash_budget_gives_up_at_once() -> None:
    assert policy(max_crashes=0).on_crash(0.0, 0.0) is None


# --- supervise (async, real service objects, fake clock) ------------------------------------------


def capturing() -> tuple[LogCapture, Any]:
    capture = LogCapture()
    log = structlog.wrap_logger(
        CapturingLogger(),
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    return capture, log


def events(capture: LogCapture, name: str) -> list[dict[str, Any]]:
    return [e for e in capture.entries if e["event"] == name]


class FlakyService:
    """Crashes `crashes` times (after `run_for` seconds each), then serves until cancelled."""

    def __init__(
        self,
        crashes: int,
        *,
        run_for: float = 0.0,
        start_delay: float = 0.0,
        start_early: bool = False,
    ) -> None:
        self.crashes_left = crashes
        self.run_for = run_for
        self.start_delay = start_delay
        self.start_early = start_early  # call started() before crashing, as a real server would
        self.runs = 0
        self.run_times: list[float] = []
        self.cancelled = 0
        self.serving = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        self.run_times.append(trio.current_time())
        try:
            if self.crashes_left:
                self.crashes_left -= 1
                if self.start_early:
                    task_status.started()
                await trio.sleep(self.run_for)
                raise RuntimeError(f"crash #{self.runs}")
            await trio.sleep(self.start_delay)
            task_status.started()
            self.serving.set()
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise


class ReturningService:
    """Returns normally `returns` times, then serves."""

    def __init__(self, returns: int) -> None:
        self.returns_left = returns
        self.runs = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        if self.returns_left:
            self.returns_left -= 1
            return
        task_status.started()
        await trio.sleep_forever()


async def test_crashing_service_is_restarted_with_backoff(autojump_clock: trio.abc.Clock) -> None:
    capture, log = capturing()
    stats = Stats()
    service = FlakyService(3)
    p = policy(initial_backoff=1.0, max_backoff=3.0, max_crashes=5)
    begin = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "hub", service, p, stats, log)
        # start() returned: the service is serving now, after three crashes and their backoff
        assert service.serving.is_set()
        assert service.runs == 4
        assert stats.service_restarts["hub"] == 3
        assert trio.current_time() - begin == pytest.approx(1.0 + 2.0 + 3.0)
        gaps = [b - a for a, b in zip(service.run_times, service.run_times[1:], strict=False)]
        assert gaps == pytest.approx([1.0, 2.0, 3.0])
        nursery.cancel_scope.cancel()

    crashed = events(capture, "service_crashed")
    assert len(crashed) == 3
    assert all(e["service"] == "hub" and e["exc_info"] is True for e in crashed)
    assert all(e["log_level"] == "error" for e in crashed)
    restarting = events(capture, "service_restarting")
    assert [e["delay_s"] for e in restarting] == [1.0, 2.0, 3.0]
    assert [e["recent_crashes"] for e in restarting] == [1, 2, 3]
    assert all(e["log_level"] == "warning" for e in restarting)
    assert not events(capture, "service_crash_budget_exceeded")


async def test_start_returns_when_the_service_reports_started(
    autojump_clock: trio.abc.Clock,
) -> None:
    _, log = capturing()
    service = FlakyService(0, start_delay=5.0)
    begin = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "http", service, policy(), Stats(), log)
        assert trio.current_time() - begin == pytest.approx(5.0)
        assert service.serving.is_set()
        nursery.cancel_scope.cancel()


async def test_restarts_after_started_do_not_report_started_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A server that reports started, then crashes: its later `started()` calls are swallowed."""
    _, log = capturing()
    stats = Stats()
    service = FlakyService(2, run_for=10.0, start_early=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "websocket", service, policy(), stats, log)
        assert service.runs == 1 and not service.serving.is_set()  # started, not yet crashed
        await service.serving.wait()
        assert service.runs == 3
        assert stats.service_restarts["websocket"] == 2
        nursery.cancel_scope.cancel()


async def test_restart_counts_are_per_service(autojump_clock: trio.abc.Clock) -> None:
    _, log = capturing()
    stats = Stats()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "a", FlakyService(1), policy(), stats, log)
        await nursery.start(supervise, "b", FlakyService(2), policy(), stats, log)
        await nursery.start(supervise, "c", FlakyService(0), policy(), stats, log)
        nursery.cancel_scope.cancel()
    assert stats.service_restarts == {"a": 1, "b": 2}


async def test_always_crashing_before_start_raises_from_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    capture, log = capturing()
    stats = Stats()
    service = FlakyService(1_000)
    async with trio.open_nursery() as nursery:
        with pytest.raises(CrashBudgetExceeded) as info:
            await nursery.start(
                supervise, "generator", service, policy(max_crashes=3, window=60.0), stats, log
            )
    assert info.value.service == "generator"
    assert "generator" in str(info.value) and "4 times" in str(info.value)
    assert service.runs == 4
    assert stats.service_restarts["generator"] == 3
    (critical,) = events(capture, "service_crash_budget_exceeded")
    assert critical["log_level"] == "critical"
    assert critical["service"] == "generator" and critical["crashes"] == 4


async def test_crash_budget_ends_the_nursery_after_start(autojump_clock: trio.abc.Clock) -> None:
    """The daemon's case: started once, then crashing for good takes the whole tree down."""
    _, log = capturing()
    bystander = FlakyService(0)
    service = FlakyService(1_000, run_for=0.5, start_early=True)
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "other", bystander, policy(), Stats(), log)
            await nursery.start(supervise, "hub", service, policy(max_crashes=2), Stats(), log)
            await trio.sleep_forever()
    matched = info.value.subgroup(CrashBudgetExceeded)
    assert matched is not None
    assert matched.exceptions[0].service == "hub"  # type: ignore[attr-defined]
    assert bystander.cancelled == 1  # the sibling service was cancelled, not left running
    assert service.runs == 3


async def test_cancelling_supervise_cancels_the_service_without_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    capture, log = capturing()
    stats = Stats()
    service = FlakyService(0)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "hub", service, policy(), stats, log)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert service.cancelled == 1
    assert service.runs == 1
    assert stats.service_restarts["hub"] == 0
    assert not events(capture, "service_crashed")
    assert not events(capture, "service_exited")
    assert not events(capture, "service_restarting")


async def test_cancelling_during_backoff_does_not_restart(autojump_clock: trio.abc.Clock) -> None:
    _, log = capturing()
    service = FlakyService(1, start_early=True)
    with trio.move_on_after(0.5):  # the crash is at t=0; the restart would be at t=1
        async with trio.open_nursery() as nursery:
            await nursery.start(
                supervise, "hub", service, policy(initial_backoff=1.0), Stats(), log
            )
            await trio.sleep_forever()
    await trio.sleep(10)
    assert service.runs == 1


async def test_outer_cancel_scope_reaches_a_supervised_service(
    autojump_clock: trio.abc.Clock,
) -> None:
    _, log = capturing()
    service = FlakyService(0)
    with trio.move_on_after(3) as scope:
        await supervise("hub", service, policy(), Stats(), log)
    assert scope.cancelled_caught
    assert service.cancelled == 1 and service.runs == 1


async def test_a_service_that_returns_is_restarted_too(autojump_clock: trio.abc.Clock) -> None:
    capture, log = capturing()
    stats = Stats()
    service = ReturningService(2)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "generator", service, policy(), stats, log)
        assert service.runs == 3
        nursery.cancel_scope.cancel()
    assert stats.service_restarts["generator"] == 2
    exited = events(capture, "service_exited")
    assert len(exited) == 2 and exited[0]["service"] == "generator"
    assert not events(capture, "service_crashed")


async def test_returning_forever_exhausts_the_budget(autojump_clock: trio.abc.Clock) -> None:
    _, log = capturing()
    service = ReturningService(1_000)
    async with trio.open_nursery() as nursery:
        with pytest.raises(CrashBudgetExceeded):
            await nursery.start(supervise, "gen", service, policy(max_crashes=2), Stats(), log)
    assert service.runs == 3


async def test_a_stable_run_resets_the_backoff(autojump_clock: trio.abc.Clock) -> None:
    _, log = capturing()
    service = FlakyService(4, run_for=0.0, start_early=True)
    p = policy(initial_backoff=1.0, max_backoff=100.0, stable_after=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "hub", service, p, Stats(), log)
        await trio.sleep(2.5)  # crash at 0, restart at 1, crash, restart at 3
        assert service.runs == 2
        service.run_for = 40.0  # the next run is stable
        await service.serving.wait()
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(service.run_times, service.run_times[1:], strict=False)]
    # 1, 2 (doubling), then runs of 40 s each followed by the initial 1 s backoff again
    assert gaps[:2] == pytest.approx([1.0, 2.0])
    assert gaps[2:] == pytest.approx([41.0, 41.0])


async def test_base_exceptions_are_not_swallowed(autojump_clock: trio.abc.Clock) -> None:
    class Interrupted:
        runs = 0

        async def run(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            self.runs += 1
            raise KeyboardInterrupt

    _, log = capturing()
    service = Interrupted()
    stats = Stats()
    with pytest.raises(KeyboardInterrupt):
        await supervise("x", service, policy(), stats, log)
    assert service.runs == 1 and stats.service_restarts["x"] == 0


async def test_cancelling_a_service_with_its_own_nursery_does_not_restart_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Cancellation inside a service's nursery arrives as a group: still not a crash."""

    class WithWorkers:
        runs = 0

        async def run(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            self.runs += 1
            async with trio.open_nursery() as workers:
                workers.start_soon(trio.sleep_forever)
                workers.start_soon(trio.sleep_forever)
                task_status.started()

    capture, log = capturing()
    stats = Stats()
    service = WithWorkers()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "ws", service, policy(), stats, log)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert service.runs == 1 and stats.service_restarts["ws"] == 0
    assert not events(capture, "service_crashed")
