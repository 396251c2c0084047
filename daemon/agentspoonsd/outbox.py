"""A connection's single write path: non-blocking writes with a bounded backlog.

Everything written to a client goes through its `Outbox`: broadcast frames, replies, pongs and
close frames alike, so frames never interleave. `write` is synchronous: it sends what the socket
takes right now and queues the rest in order. Only while a backlog exists does a drain task run
(spawned on demand, ended when the backlog is empty), so a connection that keeps up costs no task
and no buffer.

Past `max_bytes` of backlog the outbox stops accepting writes and calls `on_overflow` once; the
owner decides how to end the connection. A socket error calls `on_failure` once. Neither callback
may block or raise.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Awaitable, Callable

import trio

Spawn = Callable[[Callable[[], Awaitable[None]]], None]


class Outbox:
    __slots__ = (
        "_draining",
        "_flushed",
        "_head_started",
        "_on_failure",
        "_on_overflow",
        "_queue",
        "_send",
        "_sock",
        "_spawn",
        "failed",
        "max_bytes",
        "queued_bytes",
        "sealed",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_bytes: int,
        spawn: Spawn,
        on_overflow: Callable[[], None],
        on_failure: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._send = sock.send
        # Created on first need: most connections keep up and never queue anything.
        self._queue: deque[memoryview] | None = None
        self._head_started = False  # some bytes of _queue[0] are already on the wire
        self._spawn = spawn
        self._on_overflow = on_overflow
        self._on_failure = on_failure
        self._draining = False
        self._flushed: trio.Event | None = None
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.sealed = False  # no further writes accepted
        self.failed = False  # the socket is unusable

    def write(self, data: bytes) -> None:
        """Send `data` now or queue it behind what is already queued. Never blocks.

        Ignored once the outbox is sealed or failed. Crossing `max_bytes` seals the outbox and
        calls `on_overflow`.
        """
        if self.sealed or self.failed:
            return
        self._enqueue(data)
        if self.queued_bytes > self.max_bytes and not self.failed:
            self.sealed = True
            self._on_overflow()

    def seal(self, final: bytes, *, discard_unsent: bool = False) -> None:
        """Queue `final` (a close frame) as the last write, past the cap, and accept no more.

        With `discard_unsent`, queued data not yet started is dropped first, so a slow client's
        close frame is not stuck behind the backlog that got it closed; a partly sent frame is
        kept, so the stream stays well-formed.
        """
        if self.failed:
            return
        if discard_unsent:
            keep = 1 if self._head_started else 0
            while self._queue and len(self._queue) > keep:
                self.queued_bytes -= len(self._queue.pop())
        self.sealed = True
        self._enqueue(final)

    @property
    def busy(self) -> bool:
        """True while queued bytes wait for the socket (a drain task is running)."""
        return self._draining

    async def flushed(self) -> None:
        """Return once nothing is queued, or the socket failed."""
        if not self._draining:
            return
        if self._flushed is None:
            self._flushed = trio.Event()
        await self._flushed.wait()

    def _enqueue(self, data: bytes) -> None:
        if self._queue:
            self._queue_rest(memoryview(data), started=self._head_started)
            return
        # The hot path of every broadcast: one non-blocking send of the whole frame.
        try:
            sent = self._send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail()
            return
        if sent != len(data):
            self._queue_rest(memoryview(data)[sent:], started=sent > 0)

    def _queue_rest(self, view: memoryview, *, started: bool) -> None:
        if self._queue is None:
            self._queue = deque()
        if not self._queue:
            self._head_started = started
        self._queue.append(view)
        self.queued_bytes += len(view)
        if not self._draining:
            self._draining = True
            self._spawn(self._drain)

    async def _drain(self) -> None:
        try:
            while self._queue:
                await trio.lowlevel.wait_writable(self._sock)
                self._send_queued()
        except (trio.ClosedResourceError, OSError):
            self._fail()
        finally:
            self._draining = False
            if not self._queue:
                self._queue = None  # a client that caught up holds no buffer
            if self._flushed is not None:
                self._flushed.set()
                self._flushed = None

    def _send_queued(self) -> None:
        queue = self._queue
        while queue:
            head = queue[0]
            try:
                sent = self._sock.send(head)
            except BlockingIOError:
                return
            self.queued_bytes -= sent
            if sent == len(head):
                queue.popleft()
                self._head_started = False
            else:
                queue[0] = head[sent:]
                self._head_started = True
                return

    def detach(self) -> None:
        """The owner is closing the socket: drop everything, call nothing, write nothing more."""
        self.failed = True
        self._queue = None
        self.queued_bytes = 0

    def _fail(self) -> None:
        if self.failed:
            return
        self.failed = True
        self._queue = None
        self.queued_bytes = 0
        self._on_failure()
