"""outbox: a connection's single write path, on a real non-blocking socketpair inside Trio.

The writer's send buffer is shrunk to a few KiB so a peer that does not read fills it at once.
"""

from __future__ import annotations

import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agentspoonsd.outbox import Outbox, TlsOutbox
from agentspoonsd.tls import TlsSession, server_context

TIMEOUT = 2.0  # no step of these tests should come near it


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    writer, reader = socket.socketpair()
    for sock in (writer, reader):
        sock.setblocking(False)
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield writer, reader
    writer.close()
    reader.close()


class Harness:
    """An Outbox plus counters of what it did to its owner."""

    def __init__(self, nursery: trio.Nursery, sock: socket.socket, max_bytes: int) -> None:
        self.nursery = nursery
        self.spawned = 0
        self.overflows = 0
        self.failures = 0
        self.outbox = Outbox(
            sock,
            max_bytes=max_bytes,
            spawn=self.spawn,
            on_overflow=self.overflow,
            on_failure=self.failure,
        )

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.spawned += 1
        self.nursery.start_soon(fn)

    def overflow(self) -> None:
        self.overflows += 1

    def failure(self) -> None:
        self.failures += 1


# --- the two wires: plain, and TLS (TlsOutbox) ----------------------------------------------------
#
# A real TLS session (server side: agentspoonsd.tls; client side: an ssl.SSLObject in memory)
# is established first, then the outbox writes through it on the socketpair and the reader
# decrypts what arrives. TLS records cannot be dropped, so a backlog must stay plaintext. The tests
# that hold for both wires take `wire`; those of one wire only, `pair` alone.


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    directory = tmp_path_factory.mktemp("pki")
    cert, key = directory / "tls.crt", directory / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    return ca, cert, key


class TlsPeer:
    """The client end of an established session: decrypts what the reader socket receives."""

    def __init__(self, tls_files: tuple[Any, Path, Path]) -> None:
        ca, cert, key = tls_files
        context = ssl.create_default_context()
        ca.configure_trust(context)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_hostname="localhost")
        self.session = TlsSession(server_context(cert, key))
        for _ in range(10):
            try:
                self.ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if data := self._out.read():
                self.session.receive(data)
            self._in.write(self.session.outgoing())
            if done and self.session.established:
                break
        assert self.session.established
        self.closed = False  # close_notify seen

    def decrypt(self, ciphertext: bytes) -> bytes:
        self._in.write(ciphertext)
        out = bytearray()
        while True:
            try:
                chunk = self.ssl.read(65536)
            except ssl.SSLWantReadError:
                return bytes(out)
            if not chunk:
                self.closed = True
                return bytes(out)
            out += chunk


class Wire:
    """Plain (`peer` None) or TLS: builds the outbox for a writer socket, and reads what a
    reader socket receives as the peer's application sees it (decrypted over TLS)."""

    def __init__(self, peer: TlsPeer | None) -> None:
        self.peer = peer

    def outbox_on(self, sock: socket.socket, max_bytes: int = 1 << 30) -> Any:
        return outbox_on(sock, max_bytes, self.peer)

    def decrypt(self, data: bytes) -> bytes:
        return data if self.peer is None else self.peer.decrypt(data)

    async def read_exactly(self, sock: socket.socket, n: int) -> bytes:
        return await read_exactly(sock, n, self.decrypt)

    async def read_available(self, sock: socket.socket) -> bytes:
        return self.decrypt(await read_available(sock))


@pytest.fixture(params=["plain", "tls"])
def wire(request: pytest.FixtureRequest, tls_files: tuple[Any, Path, Path]) -> Wire:
    return Wire(TlsPeer(tls_files) if request.param == "tls" else None)


@asynccontextmanager
async def outbox_on(
    sock: socket.socket, max_bytes: int = 1 << 30, peer: TlsPeer | None = None
) -> AsyncIterator[Harness]:
    """An Outbox on `sock`; a TlsOutbox through `peer`'s established session when given."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            h = Harness(nursery, sock, max_bytes)
            if peer is not None:
                h.outbox = TlsOutbox(
                    sock,
                    peer.session,
                    max_bytes=max_bytes,
                    spawn=h.spawn,
                    on_overflow=h.overflow,
                    on_failure=h.failure,
                )
            yield h
            # A test that leaves a drain task waiting on a peer that never reads ends it here.
            nursery.cancel_scope.cancel()


async def read_exactly(
    sock: socket.socket, n: int, decrypt: Callable[[bytes], bytes] = bytes
) -> bytes:
    """`n` bytes as the peer's application sees them (`decrypt` applied to what arrives)."""
    buf = bytearray()
    with trio.fail_after(TIMEOUT):
        while len(buf) < n:
            await trio.lowlevel.wait_readable(sock)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            assert chunk, f"EOF after {len(buf)} of {n} bytes"
            buf += decrypt(chunk)
    assert len(buf) == n, f"read {len(buf)} bytes, expected {n}"
    return bytes(buf)


async def read_available(sock: socket.socket) -> bytes:
    """Everything that arrives until the writer side goes quiet."""
    buf = bytearray()
    while True:
        await trio.testing.wait_all_tasks_blocked()
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return bytes(buf)
        if not chunk:
            return bytes(buf)
        buf += chunk


def nothing_pending(sock: socket.socket) -> bool:
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    return False


def chunk(i: int, size: int = 1000) -> bytes:
    """A recognisable write: its index, padded; no two writes are equal."""
    head = f"<{i}:".encode()
    return head + bytes([65 + i % 26]) * (size - len(head) - 1) + b">"


def fill(h: Harness, start: int = 0, size: int = 1000) -> list[bytes]:
    """Write chunks until the socket refuses and something is queued."""
    written = []
    i = start
    while h.outbox.queued_bytes == 0:
        written.append(chunk(i, size))
        h.outbox.write(written[-1])
        i += 1
        assert i < start + 10_000, "the socket never filled up"
    return written


# --- the fast path --------------------------------------------------------------------------------


async def test_writes_that_fit_are_sent_at_once_in_order(
    pair: tuple[socket.socket, socket.socket], wire: Wire
) -> None:
    writer, reader = pair
    # Room for all 20 (a Unix socket charges each small send a whole buffer's overhead).
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    async with wire.outbox_on(writer) as h:
        writes = [f"message {i};".encode() for i in range(20)]
        for data in writes:
            h.outbox.write(data)
            assert h.outbox.queued_bytes == 0
        h.outbox.write(b"")
        assert h.spawned == 0  # a client that keeps up costs no task
        total = b"".join(writes)
        assert await wire.read_exactly(reader, len(total)) == total
        await h.outbox.flushed()  # nothing queued: returns at once
    assert (h.overflows, h.failures) == (0, 0)
    assert not h.outbox.sealed and not h.outbox.failed


async def test_empty_write_is_harmless(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    async with outbox_on(writer) as h:
        h.outbox.write(b"")
        h.outbox.write(b"x")
        assert await read_exactly(reader, 1) == b"x"
        assert h.spawned == 0


# --- backlog and drain ----------------------------------------------------------------------------


async def test_backlog_is_queued_then_drained_intact(
    pair: tuple[socket.socket, socket.socket], wire: Wire
) -> None:
    writer, reader = pair
    async with wire.outbox_on(writer) as h:
        writes = fill(h)
        assert h.spawned == 1
        queued = [h.outbox.queued_bytes]
        for i in range(len(writes), len(writes) + 200):
            writes.append(chunk(i))
            h.outbox.write(writes[-1])
            queued.append(h.outbox.queued_bytes)
        # Grows write by write, by the write's plaintext size (over TLS too: a backlog is kept
        # as plaintext, on top of the one chunk already encrypted and partly sent).
        assert queued == [queued[0] + 1000 * k for k in range(201)]
        assert h.spawned == 1  # one drain task, however long the backlog

        # The peer does not read: the drain task waits; nothing is lost, nothing moves.
        await trio.testing.wait_all_tasks_blocked()
        assert h.outbox.queued_bytes == queued[-1]

        total = b"".join(writes)
        assert await wire.read_exactly(reader, len(total)) == total
        await h.outbox.flushed()
        assert h.outbox.queued_bytes == 0
        assert nothing_pending(reader)
    assert h.spawned == 1 and (h.overflows, h.failures) == (0, 0)


async def test_flushed_waits_for_the_drain(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    async with outbox_on(writer) as h:
        writes = fill(h)
        writes += [chunk(i) for i in range(1000, 1020)]
        for data in writes[-20:]:
            h.outbox.write(data)
        total = b"".join(writes)

        with trio.move_on_after(0.05) as scope:
            await h.outbox.flushed()
        assert scope.cancelled_caught  # the peer has not read: not flushed

        flushed_at: list[int] = []

        async def wait_flushed() -> None:
            await h.outbox.flushed()
            flushed_at.append(h.outbox.queued_bytes)

        async with trio.open_nursery() as waiters:
            waiters.start_soon(wait_flushed)
            waiters.start_soon(wait_flushed)  # several waiters share one event
            received = await read_exactly(reader, len(total))
        assert received == total
        assert flushed_at == [0, 0]


async def test_a_new_backlog_spawns_a_new_drain(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    async with outbox_on(writer) as h:
        first = fill(h)
        assert await read_exactly(reader, sum(map(len, first))) == b"".join(first)
        await h.outbox.flushed()
        assert h.spawned == 1
        await trio.testing.wait_all_tasks_blocked()  # the first drain task has ended
        second = fill(h, start=len(first))
        assert h.spawned == 2
        assert await read_exactly(reader, sum(map(len, second))) == b"".join(second)
        await h.outbox.flushed()
        assert h.outbox.queued_bytes == 0


async def test_interleaved_reads_and_writes_keep_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    rng = random.Random(7)
    async with outbox_on(writer) as h:
        writes = []
        received = bytearray()
        for i in range(300):
            writes.append(chunk(i, rng.choice([10, 100, 3000, 20_000])))
            h.outbox.write(writes[-1])
            if rng.random() < 0.3:
                received += await read_available(reader)
        total = b"".join(writes)
        received += await read_exactly(reader, len(total) - len(received))
        assert bytes(received) == total
        await h.outbox.flushed()
        assert h.outbox.queued_bytes == 0


# --- overflow -------------------------------------------------------------------------------------


async def test_crossing_max_bytes_overflows_once_and_seals(
    pair: tuple[socket.socket, socket.socket], wire: Wire
) -> None:
    writer, reader = pair
    async with wire.outbox_on(writer, max_bytes=10_000) as h:
        writes = fill(h)
        while h.overflows == 0:
            assert h.outbox.queued_bytes <= 10_000
            writes.append(chunk(len(writes)))
            h.outbox.write(writes[-1])
        assert h.overflows == 1
        assert h.outbox.sealed and not h.outbox.failed
        assert h.outbox.queued_bytes > 10_000  # the write that crossed the cap is kept whole
        queued = h.outbox.queued_bytes

        for i in range(50):
            h.outbox.write(chunk(10_000 + i))  # ignored: sealed
        assert h.outbox.queued_bytes == queued
        assert h.overflows == 1 and h.failures == 0

        total = b"".join(writes)
        assert await wire.read_exactly(reader, len(total)) == total
        await h.outbox.flushed()
        assert await wire.read_available(reader) == b""  # the ignored writes never went out


async def test_overflow_on_a_single_huge_write(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    async with outbox_on(writer, max_bytes=2048) as h:
        big = chunk(0, 100_000)
        h.outbox.write(big)
        assert h.overflows == 1 and h.outbox.sealed
        h.outbox.write(b"ignored")
        assert await read_exactly(reader, len(big)) == big


# --- seal -----------------------------------------------------------------------------------------


FINAL = b"\x88\x02\x03\xe9"  # a WebSocket close frame, code 1001


async def test_seal_queues_final_after_everything(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    async with outbox_on(writer) as h:
        writes = fill(h)
        h.outbox.seal(FINAL)
        assert h.outbox.sealed
        h.outbox.write(b"after seal")  # ignored
        total = b"".join(writes) + FINAL
        assert await read_exactly(reader, len(total)) == total
        await h.outbox.flushed()
        assert await read_available(reader) == b""
    assert h.overflows == 0


async def test_seal_with_nothing_queued_sends_final_now(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    async with outbox_on(writer) as h:
        h.outbox.write(b"hello")
        h.outbox.seal(FINAL, discard_unsent=True)
        assert h.spawned == 0
        assert await read_exactly(reader, 5 + len(FINAL)) == b"hello" + FINAL


async def test_seal_discard_keeps_a_partially_sent_head(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    async with outbox_on(writer) as h:
        big = chunk(0, 100_000)
        h.outbox.write(big)  # the socket takes a few KiB of it: the head is partly on the wire
        assert 0 < h.outbox.queued_bytes < len(big)
        for i in range(1, 20):
            h.outbox.write(chunk(i))  # queued, not started
        h.outbox.seal(FINAL, discard_unsent=True)
        assert h.outbox.queued_bytes < len(big) + len(FINAL)
        expected = big + FINAL
        assert await read_exactly(reader, len(expected)) == expected
        await h.outbox.flushed()
        assert await read_available(reader) == b""


async def test_seal_discard_drops_an_unstarted_backlog(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    # Fill the socket behind the outbox's back, so that nothing the outbox writes can start.
    prefill = 0
    while True:
        try:
            prefill += writer.send(b"p" * 1000)
        except BlockingIOError:
            break
    async with outbox_on(writer) as h:
        for i in range(10):
            h.outbox.write(chunk(i))
        assert h.outbox.queued_bytes == 10 * 1000
        h.outbox.seal(FINAL, discard_unsent=True)
        assert h.outbox.queued_bytes == len(FINAL)
        expected = b"p" * prefill + FINAL
        assert await read_exactly(reader, len(expected)) == expected
        await h.outbox.flushed()
        assert await read_available(reader) == b""


@pytest.mark.parametrize("seed", range(8))
async def test_seal_discard_leaves_whole_writes_then_final(
    pair: tuple[socket.socket, socket.socket], wire: Wire, seed: int
) -> None:
    """Whatever the timing, the peer sees some whole writes, in order, then `final`: never a
    torn write (a torn frame would corrupt the WebSocket stream). Over TLS, unsent writes are
    dropped as plaintext, so the peer decrypts well-formed records only."""
    writer, reader = pair
    rng = random.Random(seed)
    async with wire.outbox_on(writer) as h:
        writes = []
        received = bytearray()
        for i in range(rng.randint(5, 60)):
            writes.append(chunk(i, rng.choice([50, 700, 5000, 30_000])))
            h.outbox.write(writes[-1])
            if rng.random() < 0.2:
                received += await wire.read_available(reader)
        h.outbox.seal(FINAL, discard_unsent=True)
        received += await wire.read_available(reader)
        await h.outbox.flushed()
        received += await wire.read_available(reader)
    stream = bytes(received)
    assert stream.endswith(FINAL)
    body = stream[: -len(FINAL)]
    prefixes = [b"".join(writes[:k]) for k in range(len(writes) + 1)]
    assert body in prefixes, f"torn stream of {len(body)} bytes"


async def test_seal_on_a_failed_outbox_does_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    async with outbox_on(writer) as h:
        h.outbox.detach()
        h.outbox.seal(FINAL)
        assert await read_available(reader) == b""
        assert h.outbox.queued_bytes == 0


# --- failure and detach ---------------------------------------------------------------------------


async def test_write_to_a_closed_peer_fails_once(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    async with outbox_on(writer) as h:
        reader.close()
        h.outbox.write(b"into the void")
        assert h.failures == 1 and h.outbox.failed
        h.outbox.write(b"again")
        h.outbox.seal(FINAL)
        assert h.failures == 1
        assert h.outbox.queued_bytes == 0
        await h.outbox.flushed()
    assert h.overflows == 0


async def test_peer_closing_during_the_drain_fails_once(
    pair: tuple[socket.socket, socket.socket], wire: Wire
) -> None:
    writer, reader = pair
    async with wire.outbox_on(writer) as h:
        fill(h)
        for i in range(100):
            h.outbox.write(chunk(1000 + i))
        await trio.testing.wait_all_tasks_blocked()
        assert h.failures == 0
        reader.close()
        await h.outbox.flushed()  # returns: the socket failed
        assert h.failures == 1 and h.outbox.failed
        assert h.outbox.queued_bytes == 0
        h.outbox.write(b"ignored")
        if wire.peer is not None:
            h.outbox.close_notify()  # failed: nothing, no error
        assert h.failures == 1
    assert h.overflows == 0


async def test_detach_stops_everything_silently(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    async with outbox_on(writer, max_bytes=50_000) as h:
        writes = fill(h)
        for i in range(20):
            h.outbox.write(chunk(1000 + i))
        h.outbox.detach()
        assert h.outbox.failed and h.outbox.queued_bytes == 0
        h.outbox.write(chunk(9999, 100_000))  # would overflow, if it were not ignored
        h.outbox.seal(FINAL)
        # The peer reads what was already in the kernel; the drain task wakes, finds nothing.
        received = await read_available(reader)
        assert len(received) < sum(map(len, writes))
        assert b"".join(writes).startswith(received)
        await h.outbox.flushed()
        assert await read_available(reader) == b""
    assert (h.overflows, h.failures) == (0, 0)


async def test_detach_then_close_ends_the_drain_task_silently(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, _reader = pair
    async with outbox_on(writer) as h:
        fill(h)
        await trio.testing.wait_all_tasks_blocked()  # the drain task waits for writability
        h.outbox.detach()
        trio.lowlevel.notify_closing(writer)  # what an owner does before closing the socket
        writer.close()
        await h.outbox.flushed()  # the drain task ended
    assert (h.overflows, h.failures) == (0, 0)


async def test_tls_seal_discard_drops_the_plaintext_backlog(
    pair: tuple[socket.socket, socket.socket], tls_files: tuple[Any, Path, Path]
) -> None:
    writer, reader = pair
    wire = Wire(TlsPeer(tls_files))
    async with wire.outbox_on(writer) as h:
        writes = fill(h)  # the last write's ciphertext is partly on the wire: it must stay
        in_flight = h.outbox.queued_bytes
        for i in range(50):
            h.outbox.write(chunk(1000 + i))
        h.outbox.seal(FINAL, discard_unsent=True)
        assert h.outbox.queued_bytes == in_flight + len(FINAL)  # FINAL waits as plaintext
        expected = b"".join(writes) + FINAL
        assert await wire.read_exactly(reader, len(expected)) == expected
        await h.outbox.flushed()
        assert await wire.read_available(reader) == b""


async def test_tls_close_notify_and_raw_write(
    pair: tuple[socket.socket, socket.socket], tls_files: tuple[Any, Path, Path]
) -> None:
    writer, reader = pair
    peer = TlsPeer(tls_files)
    async with outbox_on(writer, peer=peer) as h:
        h.outbox.write(b"bye")
        h.outbox.close_notify()
        assert Wire(peer).decrypt(await read_available(reader)) == b"bye" and peer.closed
    writer2, reader2 = socket.socketpair()
    writer2.setblocking(False)
    reader2.setblocking(False)
    try:
        async with outbox_on(writer2, peer=TlsPeer(tls_files)) as h:
            h.outbox.write_raw(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # to a plain-HTTP peer
            assert h.outbox.sealed
            h.outbox.write(b"ignored")
            assert await read_available(reader2) == b"HTTP/1.1 400 Bad Request\r\n\r\n"
    finally:
        writer2.close()
        reader2.close()


# --- replies: exempt from the cap up to their size ------------------------------------------------


async def test_a_reply_larger_than_the_cap_is_delivered_whole(
    pair: tuple[socket.socket, socket.socket], wire: Wire
) -> None:
    writer, reader = pair
    async with wire.outbox_on(writer, max_bytes=10_000) as h:
        parts = [chunk(i) for i in range(200)]  # 200 KB against a 10 KB cap
        h.outbox.write_reply(parts)
        assert h.overflows == 0 and not h.outbox.sealed
        assert h.outbox.queued_bytes > 10_000
        assert h.outbox.reply_allowance() == h.outbox.queued_bytes
        total = b"".join(parts)
        assert await wire.read_exactly(reader, len(total)) == total
        await h.outbox.flushed()
        assert h.outbox.reply_allowance() == 0


async def test_the_broadcast_cap_stays_as_strict_behind_and_before_a_reply(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Writes other than the reply still overflow at exactly `max_bytes` of their own."""
    writer, reader = pair
    async with outbox_on(writer, max_bytes=10_000) as h:
        before = fill(h)  # a broadcast backlog, then the reply behind it
        backlog = h.outbox.queued_bytes
        reply = [chunk(1000 + i) for i in range(100)]
        h.outbox.write_reply(reply)
        assert h.overflows == 0
        others, later = backlog, []
        while h.overflows == 0:
            later.append(chunk(2000 + len(later)))
            h.outbox.write(later[-1])
            others += 1000
            assert others <= 10_000 + 1000
        assert others > 10_000  # cut only once the non-reply bytes passed the cap
        assert h.outbox.sealed
        total = b"".join(before + reply + later)
        assert await read_exactly(reader, len(total)) == total


async def test_only_one_reply_at_a_time_is_exempt(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A client that asks again and again without reading cannot grow its backlog forever."""
    writer, _reader = pair
    async with outbox_on(writer, max_bytes=10_000) as h:
        for i in range(5):
            h.outbox.write_reply([chunk(100 * i + j) for j in range(8)])  # 8 KB each
        assert h.overflows == 1 and h.outbox.sealed


async def test_a_reply_drains_with_few_sends_as_references(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The parts are queued as the objects given (no copy); the drain keeps them in order."""
    writer, reader = pair
    async with outbox_on(writer, max_bytes=1000) as h:
        parts = [chunk(i, 300) for i in range(1000)]
        h.outbox.write_reply(parts)
        queue = h.outbox._queue
        assert queue is not None and queue[-1] is parts[-1]
        total = b"".join(parts)
        assert await read_exactly(reader, len(total)) == total
        await h.outbox.flushed()
        assert h.overflows == 0 and h.outbox.queued_bytes == 0
