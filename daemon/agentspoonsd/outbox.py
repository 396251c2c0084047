"""A connection's single write path: non-blocking writes with a bounded backlog.

Everything written to a client goes through its `Outbox`: broadcast frames, replies, pongs and
close frames alike, so frames never interleave. `write` is synchronous: it sends what the socket
takes right now and queues the rest in order. Only while a backlog exists does a drain task run
(spawned on demand, ended when the backlog is empty), so a connection that keeps up costs no task
and no buffer.

Past `max_bytes` of backlog the outbox stops accepting writes and calls `on_overflow` once; the
owner decides how to end the connection. A reply the client asked for (`write_reply`: a history
page, a resume replay) is exempt from that cap up to its own size while it is queued, so a valid
request never gets its client cut as a slow consumer; everything else stays under `max_bytes`.
A socket error calls `on_failure` once. Neither callback may block or raise.

`TlsOutbox` is the same write path for a wss:// client: what is written is plaintext, encrypted
as the socket takes it (see its docstring). A plain client's `Outbox` pays nothing for TLS.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import trio

from .tls import TlsError, TlsSession

Spawn = Callable[[Callable[[], Awaitable[None]]], None]

# Queued writes handed to the kernel by one sendmsg (a replay queues one write per update);
# well under Linux's IOV_MAX (1024).
SEND_PARTS = 64


def _nothing() -> None:
    """The callbacks of a detached outbox."""


class Outbox:
    __slots__ = (
        "_draining",
        "_flushed",
        "_head_started",
        "_on_failure",
        "_on_overflow",
        "_queue",
        "_replies",
        "_send",
        "_sent_from_queue",
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
        # Whole writes are queued as the bytes given (the broadcast's frame is one object shared
        # by every client that lags: a queued update costs a client 8 bytes, not a copy or a
        # view); only a partly sent head becomes a memoryview of its rest.
        self._queue: deque[bytes | memoryview] | None = None
        self._head_started = False  # some bytes of _queue[0] are already on the wire
        self._spawn = spawn
        self._on_overflow = on_overflow
        self._on_failure = on_failure
        self._draining = False
        self._flushed: trio.Event | None = None
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        # Where queued replies lie in the stream of queued bytes: (start, end) positions counted
        # like `_sent_from_queue` (bytes ever sent from the queue), so a position is before the
        # head once that count passes it. None until the first reply is queued.
        self._replies: deque[tuple[int, int]] | None = None
        self._sent_from_queue = 0
        self.sealed = False  # no further writes accepted
        self.failed = False  # the socket is unusable

    def write(self, data: bytes) -> None:
        """Send `data` now or queue it behind what is already queued. Never blocks.

        Ignored once the outbox is sealed or failed. Crossing `max_bytes` seals the outbox and
        calls `on_overflow`.
        """
        if self._queue or self.sealed or self.failed:
            self._write_behind(data)
            return
        # The hot path of every broadcast, once per client per update: one non-blocking send of
        # the whole frame, inlined (no further call) because the call overhead is a tenth of
        # the delivery's cost.
        try:
            sent = self._send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail()
            return
        if sent != len(data):
            self._queue_rest(memoryview(data)[sent:] if sent else data, started=sent > 0)
            if self.queued_bytes > self.max_bytes and self._over_cap():
                self.sealed = True
                self._on_overflow()

    def write_reply(self, parts: Sequence[bytes]) -> None:
        """Write one reply, `parts` back to back (whole frames), exempt from `max_bytes`.

        While queued, the reply's unsent bytes do not count against `max_bytes`; everything
        else (broadcast frames before or after it, other replies) does, exactly as for `write`.
        Only the largest reply queued is exempt at a time, so a client that never reads cannot
        grow its backlog by asking again and again. The parts are queued as the objects given
        (a replay's frames are the history's own bytes: a lagging client holds references, not
        copies). Never blocks; ignored once sealed or failed.
        """
        if self.sealed or self.failed or not parts:
            return
        before = self.queued_bytes
        self._enqueue_parts(parts)
        added = self.queued_bytes - before
        if added > 0 and not self.failed:
            if self._replies is None:
                self._replies = deque()
            end = self._sent_from_queue + self.queued_bytes
            self._replies.append((end - added, end))
        if self.queued_bytes > self.max_bytes and not self.failed and self._over_cap():
            self.sealed = True
            self._on_overflow()

    def _enqueue_parts(self, parts: Sequence[bytes]) -> None:
        """Send what the socket takes of `parts` now (one sendmsg), queue the rest in order."""
        if self._queue:
            for part in parts:
                self._queue_rest(part, started=self._head_started)
            return
        try:
            sent = self._sock.sendmsg(parts[:SEND_PARTS])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail()
            return
        for index, part in enumerate(parts):
            if sent >= len(part):
                sent -= len(part)
                continue
            self._queue_rest(memoryview(part)[sent:] if sent else part, started=sent > 0)
            sent = 0
            for rest in itertools.islice(parts, index + 1, None):
                self._queue_rest(rest, started=self._head_started)
            return

    def reply_allowance(self) -> int:
        """Queued bytes exempt from `max_bytes`: the unsent part of the largest queued reply."""
        replies = self._replies
        if not replies:
            return 0
        head = self._sent_from_queue
        while replies and replies[0][1] <= head:
            replies.popleft()  # sent in full
        return max((end - max(start, head) for start, end in replies), default=0)

    def _over_cap(self) -> bool:
        """True when the backlog, less the reply allowance, exceeds `max_bytes` (called only
        once `queued_bytes` does: the broadcast's path pays nothing for replies)."""
        return self.queued_bytes - self.reply_allowance() > self.max_bytes

    def _write_behind(self, data: bytes) -> None:
        """`write` in general: behind a backlog, or refused once sealed or failed."""
        if self.sealed or self.failed:
            return
        self._enqueue(data)
        if self.queued_bytes > self.max_bytes and not self.failed and self._over_cap():
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
            self._queue_rest(data, started=self._head_started)
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
            self._queue_rest(memoryview(data)[sent:] if sent else data, started=sent > 0)

    def _queue_rest(self, view: bytes | memoryview, *, started: bool) -> None:
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
        """Send queued writes until the socket is full: up to SEND_PARTS of them per sendmsg."""
        queue = self._queue
        while queue:
            if len(queue) == 1:
                parts: list[bytes | memoryview] = [queue[0]]
            else:
                parts = list(itertools.islice(queue, SEND_PARTS))
            try:
                sent = self._sock.sendmsg(parts)
            except BlockingIOError:
                return
            self.queued_bytes -= sent
            self._sent_from_queue += sent
            for head in parts:
                if sent < len(head):
                    if sent:
                        queue[0] = memoryview(head)[sent:]  # no copy of the rest
                        self._head_started = True
                    return  # the socket took no more
                sent -= len(head)
                queue.popleft()
                self._head_started = False

    def detach(self) -> None:
        """The owner is closing the socket: drop everything, call nothing, write nothing more.

        The callbacks are dropped too: they are the owner's bound methods, and an owner that
        holds its outbox would otherwise stay in a reference cycle with it, left for the cyclic
        collector instead of freed when the owner lets go.
        """
        self.failed = True
        self._queue = None
        self.queued_bytes = 0
        self._on_overflow = self._on_failure = _nothing

    def _fail(self) -> None:
        if self.failed:
            return
        self.failed = True
        self._queue = None
        self.queued_bytes = 0
        self._on_failure()


class TlsOutbox(Outbox):
    """An `Outbox` whose writes are plaintext, encrypted by the client's `TlsSession` at send time.

    TLS records cannot be dropped from the middle of the stream (each one's MAC covers its
    sequence number), so a backlog is kept as plaintext: `_plain` holds whole writes not yet
    encrypted, and `_queue` (the base class's) only ciphertext already produced, in stream order:
    at most one batch being sent, plus whatever the session produced on its own (handshake
    records, session tickets, alerts). So `seal(final, discard_unsent=True)` still drops every
    unsent write and the stream stays well-formed: the peer reads some whole writes, then `final`.

    Invariant: `_plain` is empty whenever `_queue` is (a write with nothing queued is encrypted
    and sent at once; the drain encrypts the next batch as soon as `_queue` empties), so the base
    class's drain loop and fast-path test apply unchanged. `queued_bytes` counts both.
    """

    __slots__ = ("_ciphertext", "_encrypt", "_plain", "_tls")

    BATCH = 16384  # plaintext encrypted at once by the drain: one full TLS record

    def __init__(
        self,
        sock: socket.socket,
        tls: TlsSession,
        *,
        max_bytes: int,
        spawn: Spawn,
        on_overflow: Callable[[], None],
        on_failure: Callable[[], None],
    ) -> None:
        super().__init__(
            sock, max_bytes=max_bytes, spawn=spawn, on_overflow=on_overflow, on_failure=on_failure
        )
        self._tls = tls
        self._encrypt, self._ciphertext = tls.encryptor()
        self._plain: deque[bytes] = deque()

    def write(self, data: bytes) -> None:
        """As `Outbox.write`; `data` is plaintext, encrypted when it is sent."""
        self._write_behind(data)

    def _enqueue_parts(self, parts: Sequence[bytes]) -> None:
        """The parts joined into batches of up to BATCH bytes: each batch one TLS record."""
        batch: list[bytes] = []
        size = 0
        for part in parts:
            if batch and size + len(part) > self.BATCH:
                self._enqueue(b"".join(batch))
                batch, size = [], 0
            batch.append(part)
            size += len(part)
        if batch:
            self._enqueue(batch[0] if len(batch) == 1 else b"".join(batch))

    def _enqueue(self, data: bytes) -> None:
        if self._queue:  # a backlog: keep the write as plaintext until the socket has room
            self._plain.append(data)
            self.queued_bytes += len(data)
            return
        # The broadcast's path for a TLS client: encrypt, one non-blocking send. Inlined (the
        # session's `encrypt`, the base `_enqueue`): it runs once per client per update.
        try:
            self._encrypt(data)
        except ssl.SSLError:
            self._fail()
            return
        ciphertext = self._ciphertext()
        try:
            sent = self._send(ciphertext)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail()
            return
        if sent != len(ciphertext):
            self._queue_rest(memoryview(ciphertext)[sent:], started=sent > 0)

    def send_tls_output(self) -> None:
        """Send the records the session produced by itself (after a `receive`), in order.

        Sealing does not stop them: a record once produced must reach the peer. They count
        against `max_bytes` like any write (a peer that provokes records and never reads them).
        """
        ciphertext = self._tls.outgoing()
        if ciphertext and not self.failed:
            Outbox._enqueue(self, ciphertext)
            if (
                self.queued_bytes > self.max_bytes
                and not self.sealed
                and not self.failed
                and self._over_cap()
            ):
                self.sealed = True
                self._on_overflow()

    def write_raw(self, data: bytes) -> None:
        """Send `data` unencrypted, then accept nothing more: the plain HTTP error a client gets
        when it sends plain HTTP to the TLS port (nothing of TLS was sent to it)."""
        if not self.failed:
            self.sealed = True
            Outbox._enqueue(self, data)

    def seal(self, final: bytes, *, discard_unsent: bool = False) -> None:
        """As `Outbox.seal`; `discard_unsent` drops the plaintext backlog, never ciphertext."""
        if self.failed:
            return
        if discard_unsent and self._plain:
            self.queued_bytes -= sum(map(len, self._plain))
            self._plain.clear()
        self.sealed = True
        self._enqueue(final)

    def close_notify(self) -> None:
        """Best effort, just before the owner closes the socket: send TLS close_notify if the
        stream is idle (nothing queued). Calls nothing, raises nothing."""
        if self.failed or self._queue:
            return
        ciphertext = self._tls.close()
        if ciphertext:
            with contextlib.suppress(OSError):
                self._sock.send(ciphertext)

    def _send_queued(self) -> None:
        queue = self._queue
        plain = self._plain
        while queue is not None:
            if not queue:
                if not plain:
                    return
                self._encrypt_batch()
                if self.failed:
                    return
            head = queue[0]
            try:
                sent = self._sock.send(head)
            except BlockingIOError:
                return
            self.queued_bytes -= sent
            self._sent_from_queue += sent
            if sent == len(head):
                queue.popleft()
            else:
                queue[0] = memoryview(head)[sent:]  # no copy of the rest
                return

    def _encrypt_batch(self) -> None:
        """Encrypt queued writes, up to BATCH bytes (at least one write), into `_queue`."""
        plain = self._plain
        batch = [plain.popleft()]
        size = len(batch[0])
        while plain and size + len(plain[0]) <= self.BATCH:
            batch.append(plain.popleft())
            size += len(batch[-1])
        try:
            ciphertext = self._tls.encrypt(batch[0] if len(batch) == 1 else b"".join(batch))
        except TlsError:
            self._fail()
            return
        assert self._queue is not None
        self._queue.append(memoryview(ciphertext))
        self.queued_bytes += len(ciphertext) - size
        # The batch was at the head of the stream (`_queue` was empty): what follows it moves
        # back by the records' overhead, so the head's position moves back by as much.
        self._sent_from_queue -= len(ciphertext) - size

    def detach(self) -> None:
        super().detach()
        self._plain.clear()

    def _fail(self) -> None:
        self._plain.clear()
        super()._fail()
