"""`TaskLifetime`: where a client's connection task runs, and how it ends.

In the caller's nursery (or task group) the task runs in a shielded scope, so that a cancelled
nursery cannot cut its close handshake short, and a guard task, unshielded in the same
nursery, turns that cancellation into a clean close. Without a nursery it runs on its own in
the running loop (`spawn_detached`) until closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from .connection_task import ClientState
from .link import TaskStarter, spawn_detached

Runner = Callable[[anyio.CancelScope, anyio.Event], Awaitable[None]]


class TaskLifetime:
    """Starts the task `run(scope, stopped)` once, and stops it: at once (`stop_nowait`), or
    cleanly (`close`: a WebSocket close, bounded by `close_timeout`, then the task's end).

    Made on or off the event loop; `start` must run on it (anyio's scopes need one)."""

    def __init__(self, run: Runner, state: ClientState, close_timeout: float) -> None:
        self._run = run
        self._state = state
        self._close_timeout = close_timeout
        self.started = False
        self._scope: anyio.CancelScope | None = None
        self._guard_scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._closing: anyio.Event | None = None  # set once close() has finished
        self._task: Any = None  # the detached task (asyncio), kept from the garbage collector

    def start(self, nursery: TaskStarter | None) -> None:
        """Start the task in `nursery` (with its guard), or detached when None. Once only:
        RuntimeError the second time."""
        if self.started:
            raise RuntimeError("connect() may be called once per client")
        self.started = True
        self._scope = anyio.CancelScope(shield=nursery is not None)
        self._guard_scope = anyio.CancelScope()
        if nursery is None:
            self._task = spawn_detached(self._run_task)
        else:
            nursery.start_soon(self._run_task)
            nursery.start_soon(self._guard)

    async def _run_task(self) -> None:
        assert self._scope is not None
        await self._run(self._scope, self._stopped)

    def stop_nowait(self) -> None:
        """Mark the client closed and cancel the task and its guard; wake every waiter."""
        self._state.closed = True
        if self._scope is not None:
            self._scope.cancel()
        if self._guard_scope is not None:
            self._guard_scope.cancel()
        self._state.arrived.notify()
        self._state.space.notify()

    async def close(self) -> None:
        """Close the connection (code 1000) and stop the task; idempotent, and concurrent
        calls wait for the first. Shielded: safe in a cancelled scope; bounded by
        ``close_timeout`` for the daemon's answer and one second more for the task's end."""
        with anyio.CancelScope(shield=True):
            if self._closing is not None:  # another task is at it: wait for it to finish
                await self._closing.wait()
                return
            self._closing = anyio.Event()
            self._state.closed = True
            conn = self._state.conn
            try:
                if conn is not None:
                    # The reading task reads the daemon's answer: wait for it, bounded.
                    self._state.space.notify()
                    with anyio.move_on_after(self._close_timeout):
                        await conn.link.close(1000)
                        await conn.link.peer_closed.wait()
                self.stop_nowait()
                if self.started:
                    with anyio.move_on_after(self._close_timeout + 1):
                        await self._stopped.wait()
            finally:
                self._closing.set()

    async def _guard(self) -> None:
        """Until `close`: if the nursery is cancelled first, close (cleanly)."""
        assert self._guard_scope is not None
        with self._guard_scope:
            try:
                await anyio.sleep_forever()
            finally:
                if not self._state.closed:
                    await self.close()


@asynccontextmanager
async def in_task_group(
    connect: Callable[[TaskStarter], Awaitable[None]], disconnect: Callable[[], Awaitable[None]]
) -> AsyncIterator[None]:
    """``async with``: `connect` with a task group of its own, then the body, then `disconnect`
    however the body ends. The body's exception is re-raised outside the task group,
    unwrapped: a caller's ``except StreamReset`` must not need ``except*`` (the connection
    task never raises)."""
    error: BaseException | None = None
    async with anyio.create_task_group() as group:
        try:
            await connect(group)
        except BaseException as exc:  # re-raised below, after the task group
            error = exc
        else:
            try:
                yield
            except BaseException as exc:  # re-raised below, after the task group
                error = exc
            finally:
                await disconnect()
    if error is not None:
        raise error
