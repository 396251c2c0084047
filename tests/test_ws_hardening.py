"""Peers that misbehave on purpose, against the in-process WebSocket server: each class of abuse
costs the abuser its connection and no one else anything.

Regression tests for the hardening defects: finished connections re-entering the hub, frame
floods, the failed-authentication lockout, handshakes that never complete and the addresses seen
behind a trusted proxy.
"""

from __future__ import annotations

import json
import os
import socket
import struct

import pytest
import trio
import trio.lowlevel
from trio_websocket import open_websocket_url

import test_ws
from test_ws import TOKEN, Running, bar

running = test_ws.running  # the in-process server fixture, shared

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_bytes(target: str, *headers: bytes) -> bytes:
    return (
        b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One client frame (masked, as RFC 6455 requires of clients)."""
    key = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text_frame(message: dict) -> bytes:
    return masked_frame(0x1, json.dumps(message).encode())


async def raw_connect(port: int) -> socket.socket:
    """A plain non-blocking socket, connected: its small sends and its close take no checkpoint,
    so the in-process server sees what they leave in one piece."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    await trio.lowlevel.wait_writable(sock)
    return sock


async def raw_upgrade(port: int, target: str) -> socket.socket:
    """`raw_connect`, upgraded by hand; returns once the greeting has arrived."""
    sock = await raw_connect(port)
    sock.send(upgrade_bytes(target))
    received = b""
    while b'"connected"' not in received:
        await trio.lowlevel.wait_readable(sock)
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: the server's next send fails."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def wait_until(predicate, within: float = 5.0) -> None:
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 (server state, no event to wait on)
            await trio.sleep(0.01)


# --- 1. a finished connection never re-enters the hub -------------------------------------------

REQUESTS_THAT_SUBSCRIBE = {
    "resume": {"type": "resume", "from": {"BTC/USD": 0, "ETH/USD": 0}},
    "subscribe": {"type": "subscribe", "symbols": ["BTC/USD", "ETH/USD"]},
    "history": {"type": "history", "symbol": "BTC/USD", "limit": 5},
}


@pytest.mark.parametrize("kind", sorted(REQUESTS_THAT_SUBSCRIBE))
async def test_a_request_then_a_reset_leaves_nothing_in_the_hub(
    running: Running, kind: str
) -> None:
    """The request is read together with the peer's RST: the reply's send fails and finishes
    the client, and nothing after that may put it back into the hub."""
    for _ in range(3):
        running.hub.publish([bar("BTC/USD"), bar("ETH/USD")])
    request = text_frame(REQUESTS_THAT_SUBSCRIBE[kind])
    async with open_websocket_url(running.url) as bystander:
        await bystander.get_message()
        for _ in range(20):
            # symbols= (empty): connected with no subscription, so resume is allowed.
            sock = await raw_upgrade(running.port, f"/?symbols=&access_token={TOKEN}")
            sock.send(request)
            reset(sock)  # no checkpoint in between: the server reads data and RST together
            await trio.lowlevel.checkpoint()
        await wait_until(lambda: running.server.client_count == 1)
        assert running.hub.subscriber_count() == 1  # the bystander alone
        assert running.stats.clients_connected == 1


async def test_an_upgrade_that_resumes_then_resets_leaves_nothing_in_the_hub(
    running: Running,
) -> None:
    for _ in range(3):
        running.hub.publish([bar("BTC/USD"), bar("ETH/USD")])
    for _ in range(20):
        sock = await raw_connect(running.port)
        sock.send(upgrade_bytes(f"/?resume=BTC/USD:0,ETH/USD:0&access_token={TOKEN}"))
        reset(sock)
        await trio.lowlevel.checkpoint()
    await wait_until(lambda: running.server.client_count == 0)
    assert running.hub.subscriber_count() == 0
    assert running.stats.clients_connected == 0
