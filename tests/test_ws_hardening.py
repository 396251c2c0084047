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
import trio.testing
from trio_websocket import open_websocket_url

import test_ws
from test_ws import TOKEN, Running, bar, upgrade_status

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


@pytest.mark.parametrize("query", ["resume=BTC/USD:0,ETH/USD:0", "symbols=BTC/USD,ETH/USD"])
async def test_an_upgrade_that_subscribes_then_resets_leaves_nothing_in_the_hub(
    running: Running, query: str
) -> None:
    for _ in range(3):
        running.hub.publish([bar("BTC/USD"), bar("ETH/USD")])
    for _ in range(20):
        sock = await raw_connect(running.port)
        sock.send(upgrade_bytes(f"/?{query}&access_token={TOKEN}"))
        reset(sock)
        await trio.lowlevel.checkpoint()
    await wait_until(lambda: running.server.client_count == 0)
    assert running.hub.subscriber_count() == 0
    assert running.stats.clients_connected == 0


# --- 4. frame floods -----------------------------------------------------------------------------


def parse_server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole unmasked frames at the start of `data` as (opcode, payload), and the rest."""
    frames = []
    while len(data) >= 2:
        length, offset = data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                break
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            if len(data) < 10:
                break
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < offset + length:
            break
        frames.append((data[0] & 0x0F, data[offset : offset + length]))
        data = data[offset + length :]
    return frames, data


async def read_until_closed(sock: socket.socket, within: float = 5.0) -> list[tuple[int, bytes]]:
    """Every frame the server sends (after the greeting) up to its close frame, or until it
    closes the connection."""
    frames: list[tuple[int, bytes]] = []
    pending = b""
    with trio.fail_after(within):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return frames
            parsed, pending = parse_server_frames(pending + chunk)
            frames.extend(parsed)
            if close_code(parsed) is not None:
                return frames


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    closes = [payload for opcode, payload in frames if opcode == 0x8]
    return struct.unpack("!H", closes[0][:2])[0] if closes else None


FLOODS = {
    # Past the budget a flooder is drained (not parsed) up to max_message_size + 64 KiB, then
    # its socket is closed: whatever it sent past that is reset, its close frame with it.
    "pings": masked_frame(0x9, b"x" * 100) * 1500,
    "pongs": masked_frame(0xA, b"") * 3000,
    "empty fragments": masked_frame(0x1, b"", fin=False) + masked_frame(0x0, b"", fin=False) * 3000,
    "empty messages": masked_frame(0x1, b"") * 3000,
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
@pytest.mark.parametrize("running", [{"max_client_frames_per_second": 1000}], indirect=True)
async def test_a_frame_flood_is_closed_1008_and_a_bystander_is_served(
    running: Running, kind: str
) -> None:
    async with open_websocket_url(running.url) as bystander:
        await bystander.get_message()
        sock = await raw_upgrade(running.port, f"/?access_token={TOKEN}")
        sock.setblocking(True)
        sock.sendall(FLOODS[kind])  # well within the socket buffers: no checkpoint needed
        sock.setblocking(False)
        frames = await read_until_closed(sock)
        sock.close()
        assert close_code(frames) == 1008, (len(frames), frames[-3:])
        pongs = sum(1 for opcode, _ in frames if opcode == 0xA)
        assert pongs <= 1000  # nothing was answered past the budget
        assert running.stats.floods["frames"] == 1 or kind == "empty messages"
        running.hub.publish([bar("BTC/USD")])
        with trio.fail_after(2):
            message = json.loads(await bystander.get_message())
        assert message["type"] == "volatility_update"
    await wait_until(lambda: running.server.client_count == 0)
    # Empty messages are invalid requests too: their error budget may close the flood first.
    reasons = ("flood", "too_many_errors") if kind == "empty messages" else ("flood",)
    assert sum(running.stats.disconnects[r] for r in reasons) == 1


@pytest.mark.parametrize(
    "running", [{"max_client_bytes_per_second": 2048, "max_message_size": 8192}], indirect=True
)
async def test_a_byte_flood_is_closed_1008_before_it_is_parsed(running: Running) -> None:
    sock = await raw_upgrade(running.port, f"/?access_token={TOKEN}")
    sock.send(masked_frame(0x1, b" " * 4000))  # one message, under max_message_size
    frames = await read_until_closed(sock)
    sock.close()
    assert close_code(frames) == 1008
    assert running.stats.floods["bytes"] == 1
    assert running.stats.client_errors == 0  # closed before the message was parsed


async def test_a_client_within_the_budget_is_untouched(running: Running) -> None:
    sock = await raw_upgrade(running.port, f"/?access_token={TOKEN}")
    sock.send(masked_frame(0x9, b"hi") * 50 + masked_frame(0xA, b"") * 50)
    pending = b""
    pongs = 0
    with trio.fail_after(5):
        while pongs < 50:
            await trio.lowlevel.wait_readable(sock)
            frames, pending = parse_server_frames(pending + sock.recv(65536))
            pongs += sum(1 for opcode, _ in frames if opcode == 0xA)
            assert close_code(frames) is None
    sock.close()
    assert not running.stats.floods


async def test_only_the_pong_to_our_ping_moves_a_client_forward(running: Running) -> None:
    """Unsolicited pongs are allowed (RFC 6455 §5.5.3) but cost nothing: the broadcast order
    changes at most once per ping the server sent."""
    first = await raw_upgrade(running.port, f"/?access_token={TOKEN}")
    second = await raw_upgrade(running.port, f"/?access_token={TOKEN}")
    clients = {c.sock.getpeername(): c for c in running.server._clients.values()}
    a, b = clients[first.getsockname()], clients[second.getsockname()]
    for sock in (first, second):  # each answers the ping sent with the 101, in this order
        sock.send(masked_frame(0xA, b""))
        await wait_until(lambda s=sock: not clients[s.getsockname()].ping_outstanding)
    assert running.hub.broadcast_order("BTC/USD") == [b, a]
    first.send(masked_frame(0xA, b"") * 20)  # unsolicited
    await trio.sleep(0.1)
    assert running.hub.broadcast_order("BTC/USD") == [b, a]
    first.close()
    second.close()


# --- 5. the failed-authentication limit refuses failing attempts only ----------------------------


@pytest.mark.parametrize("running", [{"max_auth_failures_per_minute": 3}], indirect=True)
async def test_a_guesser_cannot_lock_out_a_valid_token_from_its_address(
    running: Running,
) -> None:
    for _ in range(10):
        await upgrade_status(running.port, "/?access_token=wrong")
    # The guesser is slowed: its failing attempts get 429 with a Retry-After.
    status, head = await upgrade_status(running.port, "/?access_token=wrong")
    assert status == 429 and b"Retry-After:" in head
    status, _ = await upgrade_status(running.port, "/")  # no token at all: failing too
    assert status == 429
    # Everyone with a valid token from the same address is let in, in the header or the URL.
    status, _ = await upgrade_status(running.port, f"/?access_token={TOKEN}")
    assert status == 101
    status, _ = await upgrade_status(running.port, "/", f"Authorization: Bearer {TOKEN}".encode())
    assert status == 101
    assert running.stats.auth_failures["invalid_token"] == 3  # only the attempts counted


async def test_an_expired_token_gets_the_same_answer_as_an_unknown_one(running: Running) -> None:
    from datetime import UTC, datetime, timedelta

    from agentspoonsd.auth import TokenStore, hash_token, new_token
    from agentspoonsd.settings import TokenSettings

    expired = new_token()
    running.server.auth = TokenStore(
        [
            TokenSettings(name="test", sha256=hash_token(TOKEN)),
            TokenSettings(
                name="old",
                sha256=hash_token(expired),
                expires=datetime.now(UTC) - timedelta(days=1),
            ),
        ]
    )
    answers = []
    for token in (expired, new_token()):
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        await stream.send_all(upgrade_bytes(f"/?access_token={token}"))
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
        await stream.aclose()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
        answers.append((lines, body))
    assert answers[0] == answers[1]
    assert answers[0][0][0].startswith(b"HTTP/1.1 401")
    assert running.stats.auth_failures["expired"] == 1  # the reason is the operator's to see


@pytest.mark.parametrize("running", [{"max_auth_failures_per_minute": 1000}], indirect=True)
async def test_refusals_from_one_address_are_logged_a_few_times_then_summarised(
    running: Running,
) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        for _ in range(40):
            await upgrade_status(running.port, "/?access_token=wrong")
        running.server._summarise_suppressed_logs(trio.current_time() + 3600)
    failed = [e for e in logs if e["event"] == "auth_failed"]
    summaries = [e for e in logs if e["event"] == "log_suppressed"]
    assert len(failed) == 5
    assert [(s["client"], s["count"]) for s in summaries] == [("127.0.0.1", 35)]
    assert running.stats.auth_failures["invalid_token"] == 40  # the metrics count every one


# --- 6. handshakes count from accept on ----------------------------------------------------------


async def half_open(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """`count` connections that send half an upgrade request and stall."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        await trio.lowlevel.wait_writable(sock)
        sock.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        sockets.append(sock)
    await trio.sleep(0.05)  # accepted
    return sockets


async def status_from(port: int, source: str, target: str = f"/?access_token={TOKEN}") -> int:
    """The HTTP status of a complete upgrade request from `source`; 0 if closed unanswered."""
    sock = socket.socket()
    sock.bind((source, 0))
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    await stream.socket.connect(("127.0.0.1", port))
    try:
        await stream.send_all(upgrade_bytes(target))
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                head += chunk
    except (trio.BrokenResourceError, ConnectionResetError):
        head = b""
    await stream.aclose()
    return int(head.split(b" ", 2)[1]) if head else 0


@pytest.mark.parametrize("running", [{"max_handshakes_per_ip": 20}], indirect=True)
async def test_stalled_handshakes_from_one_address_are_capped_and_others_served(
    running: Running,
) -> None:
    held = await half_open(running.port, 30)
    try:
        assert running.server.client_count == 20  # the other ten were answered and closed
        assert running.stats.rejected_upgrades["handshakes_per_ip"] == 10
        assert await status_from(running.port, "127.0.0.1") in (0, 429)
        assert await status_from(running.port, "127.0.0.2") == 101  # another address
    finally:
        for sock in held:
            sock.close()
    await wait_until(lambda: running.server.client_count == 0)
    assert running.server.policy.admission.handshaking == {}
    assert await status_from(running.port, "127.0.0.1") == 101  # its count went back down


@pytest.mark.parametrize(
    "running",
    [{"max_connections": 10, "max_handshakes_per_ip": None, "max_connections_per_ip": 8}],
    indirect=True,
)
async def test_handshakes_count_against_max_connections_and_per_address(
    running: Running,
) -> None:
    held = await half_open(running.port, 8)
    try:
        assert await status_from(running.port, "127.0.0.1") in (0, 429)  # per address: 8
        assert running.stats.rejected_upgrades["per_ip"] == 1
        held += await half_open(running.port, 2, "127.0.0.2")
        assert await status_from(running.port, "127.0.0.3") in (0, 503)  # capacity: 10
        assert running.stats.rejected_upgrades["capacity"] == 1
    finally:
        for sock in held:
            sock.close()
    await wait_until(lambda: running.server.client_count == 0)
    assert await status_from(running.port, "127.0.0.3") == 101


async def test_accept_failures_are_logged_once_a_second(
    running: Running, autojump_clock: trio.testing.MockClock
) -> None:
    """Out of file descriptors, accept() fails every 0.1 s until one is free: one log line a
    second, with the count; with descriptors back, connections are served at once. The server
    backs off and throttles on Trio's clock: the 2.5 s pass at once."""
    import resource

    from structlog.testing import capture_logs

    waiting = [socket.socket() for _ in range(5)]  # their descriptors exist before the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself used
    try:
        with capture_logs() as logs:
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))
            for sock in waiting:
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", running.port))
            await trio.sleep(2.5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    failures = [e for e in logs if e["event"] == "accept_failed"]
    assert 2 <= len(failures) <= 3
    assert sum(e["failures"] for e in failures) >= 15
    for sock in waiting:
        sock.close()
    assert await status_from(running.port, "127.0.0.1") == 101  # served again at once


# --- 8. replays weigh what they carry ------------------------------------------------------------


@pytest.mark.parametrize(
    "running", [{"max_client_messages_per_second": 5, "max_backlog_bytes": 1 << 20}], indirect=True
)
async def test_a_large_replay_is_charged_against_the_message_budget(running: Running) -> None:
    """A `history` page of n updates costs 1 + n // 50 requests: one full page spends seconds
    of a 5-per-second budget, so the next requests are `rate_limited` for a while."""
    for i in range(1000):
        running.hub.publish([bar("BTC/USD", 100 + i)])
    async with open_websocket_url(running.url + "&symbols=") as ws:
        await ws.get_message()
        page = await test_ws.request(ws, {"type": "history", "symbol": "BTC/USD", "limit": 1000})
        assert page["type"] == "history" and len(page["updates"]) >= 250
        reply = await test_ws.request(ws, {"type": "ping"})
        assert reply["type"] == "error" and reply["code"] == "rate_limited"
        # A single ping costs 1: an ordinary client, with the same budget, is never limited.
        async with open_websocket_url(running.url + "&symbols=") as other:
            await other.get_message()
            for _ in range(4):
                assert (await test_ws.request(other, {"type": "ping"}))["type"] == "pong"
