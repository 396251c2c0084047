"""One fan-out worker position of the master (`workerpool`): its process, started, fed,
listened to and started again for as long as the pool runs.

A slot's worker is the daemon's own executable started again (``agentspoonsd _worker``; a frozen
binary runs itself) with two descriptors: its channel (`channelio.ChannelEnd`) and its handoff
socket. A worker that exits, is killed, stops reporting for WORKER_SILENT_AFTER seconds or falls
CHANNEL_MAX_BYTES behind the stream is started again with capped backoff
(`supervisor.RestartPolicy`); past its crash budget the slot raises CrashBudgetExceeded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any, Protocol

import trio

from . import channel
from .channelio import ChannelEnd
from .metrics import Stats
from .supervisor import CrashBudgetExceeded, RestartPolicy

WORKER_SILENT_AFTER = 10.0  # seconds without a message before a worker counts as wedged
CHANNEL_MAX_BYTES = 64 << 20  # a worker this far behind the stream is restarted
# Not passed to workers: systemd's notifications are the master's alone.
_MASTER_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def worker_command(index: int, channel_fd: int, handoff_fd: int) -> list[str]:
    """The command line of worker `index`: this executable again (a frozen binary is its own
    interpreter), with the hidden `_worker` command."""
    frozen = getattr(sys, "frozen", False)
    program = [sys.executable] if frozen else [sys.executable, "-m", "agentspoonsd"]
    return [
        *program,
        "_worker",
        f"--index={index}",
        f"--channel-fd={channel_fd}",
        f"--handoff-fd={handoff_fd}",
    ]


class Master(Protocol):
    """What a slot needs of its pool."""

    draining: bool
    stats: Stats
    log: Any

    def start_messages(self) -> list[bytes]:
        """A new worker's first messages: its config, the history, `start`."""

    def joined(self, slot: WorkerSlot) -> None:
        """`slot`'s worker has its start messages: the stream goes to it from now on."""

    def left(self, slot: WorkerSlot) -> None:
        """`slot`'s worker is gone."""

    def reported(self, slot: WorkerSlot, header: dict[str, Any]) -> None:
        """`slot`'s worker sent its counters."""


class WorkerSlot:
    """One worker position; `process`, `link` and `handoff` are its current worker's."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: trio.Process | None = None
        self.link: ChannelEnd | None = None
        self.handoff: socket.socket | None = None
        self.ready = False  # the current worker said `ready` and has not exited

    async def keep_running(self, master: Master) -> None:
        """Run a worker in this slot, and another each time one ends, until the pool drains.
        Raises CrashBudgetExceeded past the restart policy's budget."""
        policy = RestartPolicy()
        while not master.draining:
            began = trio.current_time()
            await self._run_once(master)
            if master.draining:
                return
            now = trio.current_time()
            delay = policy.on_crash(now, now - began)
            if delay is None:
                name = f"worker {self.index}"
                raise CrashBudgetExceeded(name, policy.recent_crashes, policy.window)
            master.stats.service_restarts["worker"] += 1
            master.log.warning("worker_restarting", worker=self.index, delay_s=round(delay, 3))
            await trio.sleep(delay)

    async def _run_once(self, master: Master) -> None:
        """Start a worker, feed it, and return once it has exited."""
        parent_link, child_link = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent_handoff, child_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (child_link.fileno(), child_handoff.fileno())
        env = {k: v for k, v in os.environ.items() if k not in _MASTER_ONLY_ENV}
        try:
            process = await trio.lowlevel.open_process(
                worker_command(self.index, *fds), pass_fds=fds, stdin=subprocess.DEVNULL, env=env
            )
        except BaseException:
            parent_link.close()
            parent_handoff.close()
            raise
        finally:
            child_link.close()
            child_handoff.close()
        parent_handoff.setblocking(False)
        async with trio.open_nursery() as nursery:
            link = ChannelEnd(
                parent_link,
                nursery.start_soon,
                max_bytes=CHANNEL_MAX_BYTES,
                on_overflow=lambda: self._lagging(master),
                on_failure=lambda: None,
            )
            self.process, self.link, self.handoff = process, link, parent_handoff
            # Synchronous from here to `joined`: no update can fall between the snapshot and
            # the stream that follows it.
            link.send_many(master.start_messages())
            master.joined(self)
            master.log.info("worker_started", worker=self.index, pid=process.pid)
            try:
                nursery.start_soon(self._listen, master, link, process)
                await process.wait()
                nursery.cancel_scope.cancel()
            finally:
                self.ready = False
                master.left(self)
                link.close()
                trio.lowlevel.notify_closing(parent_handoff)  # wakes a master waiting to hand
                parent_handoff.close()
                self.link = self.handoff = None
                if process.returncode is None:
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
        level = "info" if master.draining and process.returncode == 0 else "warning"
        getattr(master.log, level)(
            "worker_exited", worker=self.index, pid=process.pid, status=process.returncode
        )

    async def _listen(self, master: Master, link: ChannelEnd, process: trio.Process) -> None:
        """The worker's messages, until EOF; a worker silent too long, or speaking nonsense, is
        killed (the caller's `process.wait()` then returns)."""
        log = master.log
        while True:
            message = None
            with trio.move_on_after(WORKER_SILENT_AFTER) as silent:
                try:
                    message = await link.receive()
                except channel.ChannelError as exc:
                    log.error("worker_channel_error", worker=self.index, error=str(exc))
                    process.kill()
                    return
            if silent.cancelled_caught:
                log.error("worker_unresponsive", worker=self.index, silent_s=WORKER_SILENT_AFTER)
                process.kill()
                return
            if message is None:
                return
            if message.kind == "ready":
                self.ready = True
                log.info("worker_ready", worker=self.index, pid=process.pid)
            elif message.kind == "stats":
                master.reported(self, message.header)

    def _lagging(self, master: Master) -> None:
        """The worker's channel backlog passed CHANNEL_MAX_BYTES: it cannot keep up; restart it
        (its clients resume on the others) rather than hold the stream for it."""
        master.log.error("worker_lagging", worker=self.index, queued_bytes=CHANNEL_MAX_BYTES)
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
