"""A worker slot's liveness check, on virtual time: a worker silent too long is killed, one
that reports is not, and what it says reaches the pool."""

from __future__ import annotations

import socket
from typing import Any

import trio

from agentspoonsd import channel
from agentspoonsd.channelio import ChannelEnd
from agentspoonsd.metrics import Stats
from agentspoonsd.workerslot import WORKER_SILENT_AFTER, WorkerSlot, worker_command


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.events.append(event)


class Pool:
    """The `workerslot.Master` a slot reports to."""

    def __init__(self) -> None:
        self.draining = False
        self.stats = Stats()
        self.log = Log()
        self.reports: list[dict[str, Any]] = []

    def reported(self, slot: WorkerSlot, header: dict[str, Any]) -> None:
        self.reports.append(header)


class Process:
    """The part of trio.Process the liveness check uses."""

    pid = 4242

    def __init__(self) -> None:
        self.killed_at: float | None = None

    def kill(self) -> None:
        self.killed_at = trio.current_time()


async def listen_to(
    worker: socket.socket, master: socket.socket, speak: Any
) -> tuple[Pool, Process, WorkerSlot]:
    pool, process, slot = Pool(), Process(), WorkerSlot(0)
    async with trio.open_nursery() as nursery:
        link = ChannelEnd(
            master, nursery.start_soon, max_bytes=1 << 20, on_overflow=print, on_failure=print
        )
        nursery.start_soon(speak, worker)
        await slot._listen(pool, link, process)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    return pool, process, slot


async def test_a_worker_silent_past_the_limit_is_killed(autojump_clock: trio.abc.Clock) -> None:
    worker, master = socket.socketpair()
    with worker, master:

        async def ready_then_silent(sock: socket.socket) -> None:
            sock.send(channel.encode("ready", pid=1))
            await trio.sleep_forever()  # a wedged event loop: no report ever again

        started = trio.current_time()
        pool, process, slot = await listen_to(worker, master, ready_then_silent)
    assert slot.ready
    assert process.killed_at is not None
    assert process.killed_at - started == WORKER_SILENT_AFTER
    assert pool.log.events == ["worker_ready", "worker_unresponsive"]


async def test_a_reporting_worker_is_left_alone_and_heard(autojump_clock: trio.abc.Clock) -> None:
    worker, master = socket.socketpair()
    with worker, master:

        async def report_then_leave(sock: socket.socket) -> None:
            for _ in range(30):  # 30 s of reports, a second apart
                sock.send(channel.encode("stats", stats={"messages_sent": 1}, subscribers=0))
                await trio.sleep(1.0)
            sock.shutdown(socket.SHUT_WR)  # the worker exits: EOF

        pool, process, _ = await listen_to(worker, master, report_then_leave)
    assert process.killed_at is None
    assert len(pool.reports) == 30


def test_a_worker_is_this_program_again_with_the_hidden_command() -> None:
    command = worker_command(3, 7, 8)
    assert command[-4:] == ["_worker", "--index=3", "--channel-fd=7", "--handoff-fd=8"]
    assert command[1:3] == ["-m", "agentspoonsd"]  # not frozen here
