"""The Trio side of the master ↔ worker channel: one end of it, and the socket handoff.

`ChannelEnd` writes through an `outbox.Outbox` (the clients' own write path: never blocks, a
bounded backlog, a drain task only while behind) and reads whole messages (`channel`). The
handoff is a second, SOCK_SEQPACKET socketpair per worker on which the master passes each
connection it accepted: one datagram per connection, a tag (and for the HTTP port's `/ws` the
request already read) as data, the descriptor as SCM_RIGHTS.
"""

from __future__ import annotations

import array
import os
import socket
from collections import deque
from collections.abc import Callable

import trio

from .channel import ChannelParser, Message
from .outbox import Outbox, Spawn

RECV_BYTES = 1 << 18  # also bounds the updates a worker behind takes in one batch
HANDOFF_MAX_BYTES = 1 << 17  # an upgrade request's head; the HTTP server reads at most 64 KiB


class ChannelEnd:
    """One end of a channel socket. `send` never blocks; `receive` returns None at EOF."""

    def __init__(
        self,
        sock: socket.socket,
        spawn: Spawn,
        *,
        max_bytes: int,
        on_overflow: Callable[[], None],
        on_failure: Callable[[], None],
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.outbox = Outbox(
            sock, max_bytes=max_bytes, spawn=spawn, on_overflow=on_overflow, on_failure=on_failure
        )
        self._parser = ChannelParser()
        self._ready: deque[Message] = deque()

    def send(self, message: bytes) -> None:
        """Write one encoded message (under the backlog cap)."""
        self.outbox.write(message)

    def send_many(self, messages: list[bytes]) -> None:
        """Write messages back to back, exempt from the cap while queued (a history snapshot)."""
        self.outbox.write_reply(messages)

    async def receive(self) -> Message | None:
        """The next message; None once the peer closed its end (or the socket failed). Raises
        `channel.ChannelError` on bytes that are no message."""
        while not self._ready:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not data:
                return None
            self._ready.extend(self._parser.feed(data))
        return self._ready.popleft()

    async def receive_all(self) -> list[Message] | None:
        """Every message received so far, at least one (waiting for it); None at EOF."""
        first = await self.receive()
        if first is None:
            return None
        batch = [first, *self._ready]
        self._ready.clear()
        return batch

    def close(self) -> None:
        self.outbox.detach()
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


ACCEPTED = b"A"  # a connection the master accepted: nothing read yet, TLS as the port has it
UPGRADE = b"U"  # the HTTP port's /ws: the request follows the tag, already read (always plain)


def hand_over(
    handoff: socket.socket, sock: socket.socket, kind: bytes, received: bytes = b""
) -> bool:
    """Pass `sock` (ACCEPTED, or an UPGRADE with the bytes already read from it) to the worker at
    the other end of `handoff`; False when the worker cannot take it now (its queue is full, it
    is gone). The caller still owns (and closes) its copy of `sock` either way."""
    fds = array.array("i", [sock.fileno()])
    try:
        handoff.sendmsg([kind + received], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    except OSError:
        return False
    return True


Taken = tuple[socket.socket, bytes, bytes]  # the connection, its kind, the bytes read so far


def take_now(handoff: socket.socket) -> Taken | bool:
    """The next connection passed on `handoff`, without waiting: True when none is there yet,
    False at EOF (the master's end closed)."""
    space = socket.CMSG_SPACE(array.array("i").itemsize)
    while True:
        try:
            data, ancillary, _, _ = handoff.recvmsg(
                HANDOFF_MAX_BYTES, space, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return True
        except OSError:
            return False
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not fds:
            if not data:
                return False
            continue  # bytes without a socket: nothing to serve
        for extra in fds[1:]:  # one socket per datagram; anything else is not ours to keep
            os.close(extra)
        return socket.socket(fileno=fds[0]), data[:1], data[1:]


async def take_over(handoff: socket.socket) -> Taken | None:
    """The next connection passed on `handoff`, waiting for it; None at EOF."""
    while True:
        await trio.lowlevel.wait_readable(handoff)
        taken = take_now(handoff)
        if taken is False:
            return None
        if taken is not True:
            return taken
