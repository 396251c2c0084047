"""permessage-deflate bombs: inflation is bounded by `server.max_message_size`.

Two halves. The bounded extension (`agentspoonsd.deflate.BoundedDeflate`, as `negotiate_deflate`
agrees it) driven through wsproto's real `Connection`, without sockets: bombs in one frame,
across continuation frames and across many reads, the exact limit, one byte over, large valid
messages, context takeover, frames declaring absurd lengths, many small frames, and nothing
inflated once the server is closing. Then the real daemon as a subprocess and raw sockets: a
256 KiB message inflating to 256 MiB gets close 1009 while a bystander keeps receiving every
update on time and the daemon's peak RSS barely moves; a peer that keeps sending compressed
messages after the server's close costs the daemon almost no CPU.
"""

from __future__ import annotations

import base64
import contextlib
import os
import statistics
import struct
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from pathlib import Path

import orjson
import pytest
import structlog
import trio
import trio.lowlevel
from trio_websocket import open_websocket_url
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, Event, Message, Ping, TextMessage

from agentspoonsd.auth import TokenStore, hash_token
from agentspoonsd.daemon import bind_listener
from agentspoonsd.deflate import BoundedDeflate, wire_limit
from agentspoonsd.frames import encode_text_frame
from agentspoonsd.history import History
from agentspoonsd.hub import Hub
from agentspoonsd.metrics import Stats
from agentspoonsd.settings import TokenSettings
from agentspoonsd.upgrade import UpgradeRequest, negotiate_deflate
from agentspoonsd.ws import WebSocketServer
from daemon_process import DaemonProcess, config_text, new_token
from server_limits import make_limits

LIMIT = 64 * 1024  # max_message_size of the unit tests (the daemon's default)
MIB = 1024 * 1024

TEXT, CONTINUATION, CLOSE, PING = 0x1, 0x0, 0x8, 0x9


# --------------------------------------------------------------------------- building input


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """One masked client frame (RFC 6455 §5.2); the length as declared by `payload`."""
    return frame_header(opcode, len(payload), fin=fin, rsv1=rsv1, key=b"\x01\x02\x03\x04") + (
        masked(payload, b"\x01\x02\x03\x04")
    )


def frame_header(
    opcode: int, length: int, *, fin: bool = True, rsv1: bool = False, key: bytes
) -> bytes:
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if length < 126:
        return bytes([first, 0x80 | length]) + key
    if length < 65536:
        return bytes([first, 0x80 | 126]) + struct.pack("!H", length) + key
    return bytes([first, 0x80 | 127]) + struct.pack("!Q", length) + key


def masked(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def deflated(data: bytes, compressor: zlib._Compress | None = None) -> bytes:
    """`data` as one permessage-deflate message body (RFC 7692 §7.2.1): sync-flushed, tail cut."""
    compressor = compressor or zlib.compressobj(wbits=-15)
    body = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    return body[:-4]


def bomb(inflated_size: int) -> bytes:
    """A message body of `inflated_size` spaces, deflated (about 1,030:1), built in 1 MiB steps."""
    compressor = zlib.compressobj(9, wbits=-15)
    chunk = b" " * MIB
    parts = [compressor.compress(chunk) for _ in range(inflated_size // MIB)]
    parts.append(compressor.compress(b" " * (inflated_size % MIB)))
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[:-4]


def fragments(body: bytes, size: int) -> bytes:
    """`body` as one compressed text message in frames of `size` bytes (RSV1 on the first)."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    out = []
    for i, piece in enumerate(pieces):
        opcode = TEXT if i == 0 else CONTINUATION
        out.append(frame(opcode, piece, fin=i == len(pieces) - 1, rsv1=i == 0))
    return b"".join(out)


def json_text(size: int) -> bytes:
    """A JSON request of exactly `size` bytes that compresses like real text (not a run)."""
    head, tail = b'{"type": "ping", "pad": "', b'"}'
    filler = base64.b64encode(os.urandom(size))[: size - len(head) - len(tail)]
    return head + filler + tail


# --------------------------------------------------------------------------- the server side


def server(limit: int = LIMIT, offer: bytes = b"permessage-deflate") -> Connection:
    """wsproto's server connection with the extension the daemon negotiates for `offer`."""
    request = UpgradeRequest("/", ((b"sec-websocket-extensions", offer),), b"k")
    agreed = negotiate_deflate(request, limit)
    assert agreed is not None
    return Connection(ConnectionType.SERVER, extensions=[agreed[0]])


def feed(conn: Connection, data: bytes, read_size: int = 65536) -> list[Event]:
    """Hand `data` to `conn` in reads of `read_size` bytes, as the dispatcher does; the events.

    Stops at the first close, like the daemon (which stops reading there)."""
    events: list[Event] = []
    for start in range(0, len(data), read_size):
        conn.receive_data(data[start : start + read_size])
        for event in conn.events():
            events.append(event)
            if isinstance(event, CloseConnection):
                return events
    return events


def texts(events: Iterable[Event]) -> list[str]:
    """The complete text messages among `events`."""
    done, parts = [], []
    for event in events:
        if isinstance(event, TextMessage):
            parts.append(event.data)
            if event.message_finished:
                done.append("".join(parts))
                parts = []
    return done


def close_code(events: list[Event]) -> int | None:
    closes = [e.code for e in events if isinstance(e, CloseConnection)]
    return closes[0] if closes else None


def peak_allocation(action) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    """`action()`'s result and the most memory Python held during it above the start."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = action()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def inflated_bytes(events: Iterable[Event]) -> int:
    return sum(len(e.data) for e in events if isinstance(e, Message))


# --------------------------------------------------------------------------- unit: bombs


def test_one_frame_bomb_is_refused_within_the_bound() -> None:
    """64 MiB of spaces in one 65 KB frame (within the wire bound): close 1009, and no more than
    `max_message_size` + 1 bytes were ever inflated."""
    body = bomb(64 * MIB)
    assert len(body) < wire_limit(LIMIT)
    conn = server()
    events, peak = peak_allocation(lambda: feed(conn, frame(TEXT, body, rsv1=True)))
    assert close_code(events) == 1009
    assert inflated_bytes(events) <= LIMIT
    assert peak < 1 * MIB, f"{peak} bytes allocated while refusing a bomb"


def test_bomb_across_continuation_frames_is_refused() -> None:
    """The count runs across fragments: 4 KiB frames, each inflating to about 4 MiB."""
    body = bomb(64 * MIB)
    conn = server()
    events, peak = peak_allocation(lambda: feed(conn, fragments(body, 4096)))
    assert close_code(events) == 1009
    assert inflated_bytes(events) <= LIMIT
    assert peak < 1 * MIB


def test_bomb_of_small_frames_is_refused_by_its_total() -> None:
    """Fragments that each inflate to well under the limit, but together pass it."""
    piece = deflated(b"x" * 1000)  # each frame a separate compressed piece of the same stream
    compressor = zlib.compressobj(wbits=-15)
    frames = [frame(TEXT, compressor.compress(b"x" * 1000), fin=False, rsv1=True)]
    for _ in range(200):
        chunk = compressor.compress(b"x" * 1000) + compressor.flush(zlib.Z_SYNC_FLUSH)
        frames.append(frame(CONTINUATION, chunk, fin=False))
    assert len(piece) < 100
    events = feed(server(), b"".join(frames))
    assert close_code(events) == 1009
    assert LIMIT - 1000 <= inflated_bytes(events) <= LIMIT


def test_bomb_split_across_many_reads_is_refused_at_the_first_read_past_the_bound() -> None:
    """Read by read (1,000 bytes each, about 1 MiB inflated each): the first read that passes
    the limit gets the close; the rest of the frame is never looked at."""
    body = bomb(64 * MIB)
    data = frame(TEXT, body, rsv1=True)
    conn = server()
    reads = 0
    events: list[Event] = []
    for start in range(0, len(data), 1000):
        reads += 1
        conn.receive_data(data[start : start + 1000])
        events += conn.events()
        if close_code(events) is not None:
            break
    assert close_code(events) == 1009
    assert reads == 1


@pytest.mark.parametrize("read_size", [65536, 7, 1])
def test_message_of_exactly_the_limit_is_accepted(read_size: int) -> None:
    text = json_text(LIMIT)
    data = frame(TEXT, deflated(text), rsv1=True)
    if read_size < 7:
        data = data[:3000]  # byte by byte: the head of the message is enough to check progress
        events = feed(server(), data, read_size)
        assert close_code(events) is None
        return
    events = feed(server(), data, read_size)
    assert close_code(events) is None
    assert texts(events) == [text.decode()]


def test_one_byte_over_the_limit_is_refused() -> None:
    events = feed(server(), frame(TEXT, deflated(json_text(LIMIT + 1)), rsv1=True))
    assert close_code(events) == 1009


def test_one_byte_over_the_limit_in_fragments_is_refused() -> None:
    events = feed(server(), fragments(deflated(json_text(LIMIT + 1)), 1000))
    assert close_code(events) == 1009


def test_large_allowed_message_in_fragments_and_small_reads_works() -> None:
    """60 KiB of JSON, compressed, in 5 fragments with a ping between two, read 1,500 bytes at
    a time: the message arrives whole and the ping is answered."""
    text = json_text(60 * 1024)
    body = deflated(text)
    size = len(body) // 5 + 1
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    data = frame(TEXT, pieces[0], fin=False, rsv1=True)
    data += frame(PING, b"hi")  # a control frame between fragments (RFC 6455 §5.4)
    for i, piece in enumerate(pieces[1:], 1):
        data += frame(CONTINUATION, piece, fin=i == len(pieces) - 1)
    events = feed(server(), data, 1500)
    assert close_code(events) is None
    assert texts(events) == [text.decode()]
    assert [e.payload for e in events if isinstance(e, Ping)] == [b"hi"]


def test_context_takeover_across_messages() -> None:
    """The client keeps its compression context (the daemon allows it): later messages refer
    back to earlier ones; each is bounded on its own, and each inflates right."""
    compressor = zlib.compressobj(wbits=-15)
    messages = [json_text(20 * 1024)] * 3 + [json_text(60 * 1024), b'{"type": "ping"}']
    bodies = [deflated(m, compressor) for m in messages]
    assert len(bodies[1]) < 1000  # the second refers back to the first: context taken over
    conn = server()
    events = feed(conn, b"".join(frame(TEXT, b, rsv1=True) for b in bodies))
    assert close_code(events) is None
    assert texts(events) == [m.decode() for m in messages]
    # A bomb after them is still refused, with the context of the earlier messages.
    events = feed(conn, frame(TEXT, deflated(b" " * (LIMIT + 1), compressor), rsv1=True))
    assert close_code(events) == 1009


def test_client_no_context_takeover_resets_between_messages() -> None:
    offer = b"permessage-deflate; client_no_context_takeover"
    messages = [json_text(1000), json_text(2000)]
    data = b"".join(frame(TEXT, deflated(m), rsv1=True) for m in messages)
    events = feed(server(offer=offer), data)
    assert texts(events) == [m.decode() for m in messages]


def test_uncompressed_messages_pass_through() -> None:
    big = json_text(LIMIT)
    events = feed(server(), frame(TEXT, b'{"type": "ping"}') + frame(TEXT, big))
    assert close_code(events) is None
    assert texts(events) == ['{"type": "ping"}', big.decode()]


# --------------------------------------------------------------------------- unit: wire bound


@pytest.mark.parametrize("rsv1", [True, False])
@pytest.mark.parametrize("length", [wire_limit(LIMIT) + 1, 2**40, 2**63 - 1])
def test_frame_declaring_too_much_is_refused_at_its_header(rsv1: bool, length: int) -> None:
    """Compressed or not, a frame longer than the wire bound is refused from its header alone:
    no payload is waited for."""
    events = feed(server(), frame_header(TEXT, length, rsv1=rsv1, key=b"abcd"))
    assert close_code(events) == 1009


def test_frame_at_the_wire_bound_is_read() -> None:
    events = feed(server(), frame_header(TEXT, wire_limit(LIMIT), key=b"abcd"))
    assert close_code(events) is None


def test_wire_bound_counts_across_fragments() -> None:
    """Many small frames of compressed input that inflates to nothing (empty stored blocks):
    the message's wire total is bounded even though nothing comes out."""
    limit = 256
    empty_block = b"\x00\x00\x00\xff\xff"  # a non-final stored block of length 0
    data = frame(TEXT, empty_block, fin=False, rsv1=True)
    sent = len(empty_block)
    while sent <= wire_limit(limit):
        data += frame(CONTINUATION, empty_block, fin=False)
        sent += len(empty_block)
    events = feed(server(limit), data)
    assert close_code(events) == 1009
    assert inflated_bytes(events) == 0


def test_many_small_messages_are_each_within_the_bound() -> None:
    """The bounds are per message: 1,000 small compressed messages in one read all arrive."""
    compressor = zlib.compressobj(wbits=-15)
    data = b"".join(
        frame(TEXT, deflated(b'{"type": "ping"}', compressor), rsv1=True) for _ in range(1000)
    )
    events = feed(server(), data, len(data))
    assert texts(events) == ['{"type": "ping"}'] * 1000


def test_corrupt_compressed_data_is_1007() -> None:
    events = feed(server(), frame(TEXT, b"\xff\xff\xff\xff", rsv1=True))
    assert close_code(events) == 1007


# --------------------------------------------------------------------------- unit: closing


def test_nothing_is_inflated_once_stopped_but_the_close_frame_is_read() -> None:
    conn = server()
    extension = conn._proto.extensions[0]
    assert isinstance(extension, BoundedDeflate)
    extension.stop_inflating()
    data = frame(TEXT, bomb(64 * MIB), rsv1=True) + frame(CLOSE, struct.pack("!H", 1000))
    events, peak = peak_allocation(lambda: feed(conn, data))
    assert inflated_bytes(events) == 0
    assert close_code(events) == 1000
    assert peak < 1 * MIB


def test_bomb_costs_little_time() -> None:
    """The spec's bomb (256 KiB compressed, 256 MiB inflated) through the dispatcher's code path
    (`receive_data` and `events` per 64 KiB read), with limits of 64 KiB and 1 MiB. Measured on
    an idle machine: see the module's commit; the bound here is generous."""
    body = bomb(256 * MIB)
    assert len(body) <= 256 * 1024
    for limit in (LIMIT, MIB):
        data = frame(TEXT, body, rsv1=True)
        conn = server(limit)
        started = time.process_time()
        events = feed(conn, data)
        spent = time.process_time() - started
        print(f"limit {limit}: bomb refused in {spent * 1000:.2f} ms of CPU")
        assert close_code(events) == 1009
        assert spent < 0.25


# --------------------------------------------------------------------------- live daemon

INTERVAL = 0.05
LIVE_LIMIT = MIB  # the live daemon's max_message_size: the 256 KiB bomb fits the wire bound
KEY = base64.b64encode(b"0123456789abcdef")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[DaemonProcess, str, int]]:
    token = new_token()
    text = config_text(tokens={"t": token}, interval=INTERVAL)
    text = text.replace(
        "shutdown_timeout = 3.0\n", f"shutdown_timeout = 3.0\nmax_message_size = {LIVE_LIMIT}\n"
    )
    path = tmp_path / "agentspoonsd.toml"
    path.write_text(text)
    process = DaemonProcess(path)
    process.start()
    try:
        ws_port, _ = await process.ports()
        yield process, token, ws_port
    finally:
        process.kill()


async def raw_upgrade(port: int, token: str) -> trio.SocketStream:
    """A raw connection past an upgrade that negotiated permessage-deflate."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        b"GET /?symbols= HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101") and b"permessage-deflate" in head, head
    return stream


async def close_code_from(stream: trio.SocketStream, within: float = 5.0) -> int | None:
    """Read server frames until a close frame; its code (None: connection ended without one)."""
    buffer = b""
    with trio.move_on_after(within):
        while True:
            while len(buffer) >= 2:
                length, offset = buffer[1] & 0x7F, 2
                if length == 126:
                    length, offset = struct.unpack("!H", buffer[2:4])[0], 4
                elif length == 127:
                    length, offset = struct.unpack("!Q", buffer[2:10])[0], 10
                if len(buffer) < offset + length:
                    break
                if buffer[0] & 0x0F == CLOSE:
                    return struct.unpack("!H", buffer[offset : offset + 2])[0]
                buffer = buffer[offset + length :]
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not chunk:
                return None
            buffer += chunk
    raise AssertionError("no close frame within the time")


async def send_ignoring_reset(stream: trio.SocketStream, data: bytes) -> None:
    """Send `data`; a server that stopped reading and closed may reset the connection."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def reset_peak_rss(pid: int) -> None:
    """VmHWM := VmRSS from now on (proc(5), clear_refs), so VmHWM is the peak from here."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bystander:
    """A well-behaved client: how late each update arrived (after its bar's close), and whether
    any `seq` was skipped."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, float]] = []  # (time.time(), latency in seconds)
        self.last_seq: dict[str, int] = {}
        self.gaps: list[str] = []

    async def run(self, port: int, token: str, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        url = f"ws://127.0.0.1:{port}/?access_token={token}"
        async with open_websocket_url(url) as ws:
            task_status.started()
            while True:
                message = orjson.loads(await ws.get_message())
                if message.get("type") != "volatility_update":
                    continue
                now = time.time()
                # Against the bar's close time (its schedule), not the publication: a stalled
                # loop delays the publication too.
                closed = datetime.fromisoformat(message["data"]["timestamp"]).timestamp()
                self.arrivals.append((now, now - closed))
                symbol, seq = message["data"]["symbol"], message["data"]["seq"]
                previous = self.last_seq.get(symbol)
                if previous is not None and seq != previous + 1:
                    self.gaps.append(f"{symbol}: {previous} then {seq}")
                self.last_seq[symbol] = seq

    def latencies(self, since: float, until: float) -> list[float]:
        return [latency for t, latency in self.arrivals if since <= t <= until]


async def test_live_bombs_cost_the_daemon_almost_nothing(
    daemon: tuple[DaemonProcess, str, int],
) -> None:
    """The spec's bomb (256 KiB compressed, 256 MiB inflated) in one frame, the same in 16 KiB
    fragments, and a frame declaring 2^40 bytes, each on its own connection: each gets close
    1009; the daemon's peak RSS rises by less than the spec's 5 MiB (measured: 1.2-1.7 MiB;
    206 MiB before the bound); a bystander gets every update, none late by more than a generous
    half second."""
    process, token, port = daemon
    assert process.proc is not None
    pid = process.proc.pid
    body = bomb(256 * MIB)
    assert len(body) <= 256 * 1024
    attacks = {
        "one frame": frame(TEXT, body, rsv1=True),
        "fragments": fragments(body, 16 * 1024),
        "declared 2^40": frame_header(TEXT, 2**40, rsv1=True, key=b"abcd") + body[:65536],
    }
    bystander = Bystander()
    async with trio.open_nursery() as nursery:
        await nursery.start(bystander.run, port, token)
        await trio.sleep(1.0)  # warm: the bystander's stream and the daemon's buffers settle
        rss_before = proc_status(pid, "VmRSS")
        reset_peak_rss(pid)
        cpu_before, quiet_start = cpu_seconds(pid), time.time()
        await trio.sleep(1.0)  # a baseline second: the daemon's own CPU without any bomb
        cpu_baseline = cpu_seconds(pid) - cpu_before
        bombs_start = time.time()
        cpu_before_bombs = cpu_seconds(pid)
        for name, data in attacks.items():
            stream = await raw_upgrade(port, token)
            async with trio.open_nursery() as sending:
                sending.start_soon(send_ignoring_reset, stream, data)
                code = await close_code_from(stream)
                sending.cancel_scope.cancel()
            assert code == 1009, f"{name}: closed with {code}"
            await stream.aclose()
        bombs_cpu = cpu_seconds(pid) - cpu_before_bombs
        bombs_end = time.time()
        await trio.sleep(1.0)
        peak = proc_status(pid, "VmHWM")
        rss_after = proc_status(pid, "VmRSS")
        nursery.cancel_scope.cancel()
    quiet = bystander.latencies(quiet_start, bombs_start)
    during = bystander.latencies(bombs_start, bombs_end + 0.2)
    print(
        f"RSS before {rss_before / MIB:.1f} MiB, peak during bombs +{(peak - rss_before) / MIB:.2f}"
        f" MiB, after +{(rss_after - rss_before) / MIB:.2f} MiB; daemon CPU for 3 bombs"
        f" {bombs_cpu * 1000:.0f} ms (10 ms ticks) in {(bombs_end - bombs_start) * 1000:.0f} ms"
        f" (idle: {cpu_baseline * 1000:.0f} ms/s); bystander latency median"
        f" {statistics.median(quiet) * 1000:.1f} ms before, worst {max(quiet) * 1000:.1f} ms;"
        f" during the bombs ({len(during)} updates) worst {max(during, default=0) * 1000:.1f} ms"
    )
    assert not bystander.gaps, bystander.gaps
    assert peak - rss_before < 5 * MIB
    refused = [
        e
        for e in process.events
        if e.get("event") == "client_disconnected" and e.get("reason") == "message_too_large"
    ]
    assert len(refused) == len(attacks)
    assert max(during, default=0.0) < statistics.median(quiet) + 0.5


async def test_live_peer_sending_after_the_close_costs_nothing(
    daemon: tuple[DaemonProcess, str, int],
) -> None:
    """After the server's close (here 1009 for an uncompressed message over the limit), a peer
    that keeps sending compressed messages, each inflating to just under the limit, gets
    nothing inflated and is read no more once past what it may have had in flight."""
    process, token, port = daemon
    assert process.proc is not None
    pid = process.proc.pid
    stream = await raw_upgrade(port, token)
    compressor = zlib.compressobj(9, wbits=-15)
    just_under = frame(TEXT, deflated(b" " * (LIVE_LIMIT - 1), compressor), rsv1=True)
    flood = just_under * 2000  # about 2 MB on the wire, 2 GiB inflated
    too_big = frame(TEXT, b" " * (LIVE_LIMIT + 1))
    await stream.send_all(too_big)
    await trio.sleep(0.3)  # the server has answered with its close: the flood comes after
    cpu_before = cpu_seconds(pid)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_ignoring_reset, stream, flood)
        code = await close_code_from(stream)
        await trio.sleep(3.0)  # the flood keeps coming for as long as the server would linger
        nursery.cancel_scope.cancel()
    spent = cpu_seconds(pid) - cpu_before
    elapsed = time.monotonic() - started
    gone = await process.wait_for("client_disconnected", reason="message_too_large")
    print(
        f"daemon CPU while flooded after its close: {spent * 1000:.0f} ms in {elapsed:.1f} s;"
        f" connection ended after {gone['duration_s']} s"
    )
    assert code == 1009
    # Cut once past its allowance, not left to the 2 s grace (connection.CLOSE_GRACE) for an answer.
    assert gone["duration_s"] < 0.3 + 1.5
    # The daemon's idle work for these seconds is ~50 ms (generator and fan-out at 20/s);
    # inflating the flood would be hundreds of milliseconds.
    assert spent < 0.3


# --------------------------------------------------------------------------- in-process: loop time


class DispatcherSteps(trio.abc.Instrument):
    """How long the server's dispatcher task ran, step by step: the loop time it takes."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self._started: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("._dispatch_loop"):
            self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is not None and task.name.endswith("._dispatch_loop"):
            step = time.perf_counter() - self._started
            self.total += step
            self.longest = max(self.longest, step)
            self._started = None


async def test_in_process_bomb_costs_the_loop_little_time() -> None:
    """The spec's bomb against an in-process server (max_message_size 1 MiB, so the frame is
    within the wire bound and inflation is what refuses it): the dispatcher's steps while it is
    read and refused add up to well under the spec's 50 ms (asserted: 250 ms, for a shared CPU)."""
    token = new_token()
    limits = make_limits(
        max_connections=10,
        max_backlog_bytes=MIB,
        max_message_size=MIB,
        handshake_timeout=2.0,
    )
    listener = bind_listener("127.0.0.1", 0, 16)
    stats = Stats()
    _, receive = trio.open_memory_channel[list](1)
    history = History(["BTC/USD"], 10, decode_frame=encode_text_frame, start_seq=1)
    hub = Hub(["BTC/USD"], receive, stats, history=history)
    store = TokenStore([TokenSettings(name="t", sha256=hash_token(token))])
    server = WebSocketServer(listener, hub, store, limits, stats, structlog.get_logger())
    data = frame(TEXT, bomb(256 * MIB), rsv1=True)
    steps = DispatcherSteps()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            stream = await raw_upgrade(listener.getsockname()[1], token)
            trio.lowlevel.add_instrument(steps)
            async with trio.open_nursery() as sending:
                sending.start_soon(send_ignoring_reset, stream, data)
                code = await close_code_from(stream)
                sending.cancel_scope.cancel()
            trio.lowlevel.remove_instrument(steps)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
    print(
        f"dispatcher: {steps.total * 1000:.2f} ms in all, longest step"
        f" {steps.longest * 1000:.2f} ms, for the 256 KiB / 256 MiB bomb"
    )
    assert code == 1009
    assert steps.total < 0.25
