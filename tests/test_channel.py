"""The master ↔ worker channel's framing and parser (pure), and its SCM_RIGHTS handoff."""

from __future__ import annotations

import random
import socket
import struct

import orjson
import pytest
import trio

from agentspoonsd import channel
from agentspoonsd.channel import ChannelError, ChannelParser, encode, encode_update, update_parts
from agentspoonsd.channelio import ACCEPTED, UPGRADE, hand_over, take_over


def test_a_message_round_trips_with_its_parts_as_given() -> None:
    parts = [b"\x81\x05hello", b"", bytes(range(256))]
    [message] = ChannelParser().feed(encode("update", parts, s="BTC/USD", q=7))
    assert message.kind == "update"
    assert message.parts == parts
    assert message.header["s"] == "BTC/USD" and message.header["q"] == 7


def test_messages_come_out_whole_whatever_the_pieces_they_arrive_in() -> None:
    rng = random.Random(5)
    sent = [
        encode("update", [rng.randbytes(rng.randrange(0, 3000)) for _ in range(rng.randrange(4))])
        for _ in range(50)
    ]
    stream = b"".join(sent)
    parser = ChannelParser()
    received = []
    position = 0
    while position < len(stream):
        step = rng.randrange(1, 700)
        received += parser.feed(stream[position : position + step])
        position += step
    assert parser.pending == 0
    assert [encode(m.kind, m.parts) for m in received] == sent


def test_an_update_carries_frames_then_their_compressed_frames() -> None:
    frames, deflated = [b"f1", b"f2"], [b"d1", b"d2"]
    [message] = ChannelParser().feed(encode_update("ETH/USD", 41, frames, deflated))
    assert update_parts(message) == (frames, deflated)
    [plain] = ChannelParser().feed(encode_update("ETH/USD", 41, frames))
    assert update_parts(plain) == (frames, [None, None])
    with pytest.raises(ValueError):
        encode_update("ETH/USD", 41, frames, [b"d1"])


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">II", channel.MAX_MESSAGE_BYTES + 1, 2),  # too long
        struct.pack(">II", 2, 3) + b"{}",  # header longer than the body
        struct.pack(">II", 2, 2) + b"[]",  # not an object naming its kind
        struct.pack(">II", 4, 4) + b"nope",  # not JSON
    ],
)
def test_bytes_that_are_no_message_are_refused(raw: bytes) -> None:
    with pytest.raises(ChannelError):
        ChannelParser().feed(raw)


def test_parts_that_do_not_add_up_to_the_body_are_refused() -> None:
    header = orjson.dumps({"t": "update", "n": [5]})
    raw = struct.pack(">II", len(header) + 3, len(header)) + header + b"abc"
    with pytest.raises(ChannelError):
        ChannelParser().feed(raw)


async def test_a_connection_is_handed_over_with_the_bytes_already_read() -> None:
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master.setblocking(False)
    worker.setblocking(False)
    client, served = socket.socketpair()
    with master, worker, client, served:
        assert hand_over(master, served, ACCEPTED)
        assert hand_over(master, served, UPGRADE, b"GET /ws HTTP/1.1\r\n\r\n")
        first = await take_over(worker)
        assert first is not None and first[1:] == (ACCEPTED, b"")
        first[0].close()
        taken = await take_over(worker)
        assert taken is not None
        sock, kind, received = taken
        with sock:
            assert (kind, received) == (UPGRADE, b"GET /ws HTTP/1.1\r\n\r\n")
            sock.send(b"answer")  # the worker's copy writes to the same connection
            assert client.recv(10) == b"answer"
        master.close()
        with trio.fail_after(2):
            assert await take_over(worker) is None  # the master's end closed
