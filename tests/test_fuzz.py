"""Robustness: random and mutated input thrown at one live daemon, which must not harm anyone else.

One daemon subprocess serves the whole module, with a fast generator (0.05 s), generous message
and error limits, and auth on. A *witness* client connects at the start, in its own thread and
Trio loop, and reads every update for the whole module, checking that `seq` rises by exactly one
per symbol. Hypothesis then throws at the daemon, one connection per example:

- upgrade requests: a valid one mutated (header names and values, missing and duplicated
  headers, bad Sec-WebSocket-Key / Version, huge and numerous headers, odd targets and query
  strings, bare LF line ends, flipped bytes), pure garbage, and requests cut short and then
  stalled or closed, delivered in random pieces;
- frames after a valid upgrade: every opcode, RSV bits with and without permessage-deflate,
  unmasked frames, non-minimal and absurd 64-bit lengths, fragmented messages with control
  frames in between (valid and not), control frames over 125 bytes, invalid UTF-8, close frames
  with bad codes and reasons, compressed garbage, random bytes;
- JSON messages: random values and structures, each request type with its fields of the wrong
  type, huge numbers, deep nesting, binary messages, all within `max_message_size`.

After every example: the witness is still connected and received an update within the last three
seconds with no `seq` gap, the process is alive, /healthz answers 200, and the daemon's log has
no traceback, `service_crashed` or error-level entry. The fuzz connection itself may be refused
or closed: that is the server defending itself. What the server does send back is checked too
(well-formed HTTP answers; unmasked, well-formed frames; exactly one reply per JSON request).

Bugs it found are pinned by regression tests at the end, each against its own daemon.

About 1,000 examples in 20-30 s; `FUZZ_EXAMPLES=N` multiplies the examples of each test (a
longer hunt), `--hypothesis-seed=S` replays a run, `--hypothesis-show-statistics` shows how far
the examples got (the server's answers and close codes are recorded as Hypothesis events).
No example database (`.hypothesis/` is not ignored by git); a failure prints its reproduction
blob.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from daemon_process import DaemonProcess, http_get, new_token, token_block
from helpers import bearer

SYMBOLS = ("BTC/USD", "ETH/USD")
INTERVAL = 0.05
MAX_MESSAGE_SIZE = 64 * 1024
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's nonce: valid, 16 bytes base64-encoded
WITNESS_SILENCE = 3.0  # seconds without an update before the witness counts as starved
REPLY_TIMEOUT = 5.0  # seconds for the server to answer a barrier
QUIET = 0.3  # seconds of silence after which a connection that said nothing is given up on

SCALE = max(1, int(os.environ.get("FUZZ_EXAMPLES", "1")))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def daemon_config(token: str) -> str:
    """Fast ticks, generous per-client limits (the fuzz connections should get far), auth on."""
    symbols = ", ".join(json.dumps(s) for s in SYMBOLS)
    # auth.max_failures_per_minute answers 429 past it, per address: the fuzzer fails
    # authentication on purpose, from 127.0.0.1, thousands of times.
    auth_extra = "max_failures_per_minute = 1000000\n"
    return (
        '[server]\nhost = "127.0.0.1"\nport = 0\nshutdown_timeout = 3.0\n'
        "handshake_timeout = 2.0\n"
        f"max_message_size = {MAX_MESSAGE_SIZE}\n"
        "max_client_messages_per_second = 10000\nmax_client_errors = 10000\n"
        "max_backlog_bytes = 16777216\n\n"
        f"[generator]\ninterval = {INTERVAL}\nsymbols = [{symbols}]\nseed = 7\n\n"
        '[health]\nhost = "127.0.0.1"\nport = 0\n\n'
        '[log]\nlevel = "info"\n\n'
        f"[auth]\nenabled = true\n{auth_extra}" + token_block("fuzz", token)
    )


# ---------------------------------------------------------------------------- the witness


class Witness:
    """A well-behaved client in its own thread and Trio loop, for the whole module.

    It must never be disconnected, and its stream must never skip a `seq`.
    """

    def __init__(self, port: int, token: str) -> None:
        self.url = f"ws://127.0.0.1:{port}/"
        self.token = token
        self.updates = 0
        self.last_update = 0.0  # time.monotonic() of the newest update
        self.last_seq: dict[str, int] = {}
        self.problems: list[str] = []
        self.ended: str | None = None  # why the connection ended, if it did
        self._stopping = False
        self._connected = threading.Event()
        self._scope: trio.CancelScope | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._connected.wait(10) or self.ended is not None:
            raise AssertionError(f"the witness could not connect: {self.ended}")

    def stop(self) -> None:
        self._stopping = True
        if self._scope is not None and self._trio_token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._trio_token)
        self._thread.join(5)

    async def _main(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            try:
                headers = bearer(self.token)
                async with open_websocket_url(self.url, extra_headers=headers) as ws:
                    greeting = json.loads(await ws.get_message())
                    if greeting.get("type") != "connected":
                        self.problems.append(f"greeting: {greeting}")
                    self.last_update = time.monotonic()  # the clock starts at the greeting
                    self._connected.set()
                    while True:
                        self._on_message(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                self.ended = f"closed by the server: {exc.reason}"
            except Exception as exc:  # anything at all ends the witness: record it
                self.ended = f"{type(exc).__name__}: {exc}"
            finally:
                self._connected.set()
        if self._stopping and self.ended is None:
            self.ended = "stopped"

    def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") != "volatility_update":
            self.problems.append(f"unexpected message: {str(message)[:200]}")
            return
        data = message["data"]
        symbol, seq = data["symbol"], data["seq"]
        last = self.last_seq.get(symbol)
        if last is not None and seq != last + 1:
            self.problems.append(f"{symbol}: seq {last} then {seq}")
        self.last_seq[symbol] = seq
        self.updates += 1
        self.last_update = time.monotonic()

    def check(self) -> None:
        assert self.ended is None, f"the witness was disconnected: {self.ended}"
        assert not self.problems, f"the witness saw: {self.problems[:5]}"
        silence = time.monotonic() - self.last_update
        assert silence < WITNESS_SILENCE, f"the witness had no update for {silence:.2f} s"


# ---------------------------------------------------------------------------- the live daemon


LOG_PROBLEM = re.compile(r"Traceback|service_crashed|service_exited|crash_budget")


@dataclass
class Live:
    process: DaemonProcess
    ws_port: int
    http_port: int
    token: str
    witness: Witness
    log_seen: int = 0
    examples: dict[str, int] = field(default_factory=dict)

    def log_problems(self) -> list[str]:
        """Error-level or crash lines logged since the last call."""
        lines = self.process.raw_lines[self.log_seen :]
        self.log_seen += len(lines)
        bad = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                bad.append(line)  # not a JSON log line: stderr, e.g. a bare traceback
                continue
            if (
                not isinstance(entry, dict)
                or entry.get("level") in ("error", "critical")
                or "exception" in entry
                or LOG_PROBLEM.search(line)
            ):
                bad.append(line)
        return bad

    async def assert_unharmed(self, kind: str) -> None:
        """The checks run after every example."""
        self.examples[kind] = self.examples.get(kind, 0) + 1
        assert self.process.proc is not None
        assert self.process.proc.poll() is None, "the daemon exited:\n" + tail(self.process)
        status, _, body = await http_get(self.http_port, "/healthz")
        assert status == 200, f"/healthz answered {status}: {body[:200]!r}"
        self.witness.check()
        problems = self.log_problems()
        assert not problems, "the daemon logged:\n" + "\n".join(p[:2000] for p in problems[:5])


def tail(process: DaemonProcess, lines: int = 20) -> str:
    return "\n".join(process.raw_lines[-lines:])


def launch(directory: Path, token: str) -> DaemonProcess:
    path = directory / "agentspoonsd.toml"
    path.write_text(daemon_config(token))
    process = DaemonProcess(path)
    process.start()
    return process


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    token = new_token()
    process = launch(tmp_path_factory.mktemp("fuzz"), token)
    try:
        ws_port, http_port = trio.run(process.ports)
        witness = Witness(ws_port, token)
    except BaseException:
        process.kill()
        raise
    try:
        witness.start()
        state = Live(process, ws_port, http_port, token, witness)
        yield state
        witness.check()
        assert witness.updates > 0
    finally:
        witness.stop()
        process.kill()


# ---------------------------------------------------------------------------- raw connections


async def open_raw(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def send_in_pieces(stream: trio.SocketStream, data: bytes, cuts: list[int], pause: float):
    """Send `data` split at `cuts` (offsets), pausing between pieces; stops if the peer is gone."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        try:
            await stream.send_all(data[start:end])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if pause:
            await trio.sleep(pause)


async def read_until(
    stream: trio.SocketStream, done: Any, quiet: float = QUIET, limit: float = REPLY_TIMEOUT
) -> tuple[bytes, bool]:
    """Read until `done(buffer)`, EOF, `quiet` seconds of silence or `limit`; (bytes, at EOF)."""
    buffer = b""
    with trio.move_on_after(limit):
        while not done(buffer):
            with trio.move_on_after(quiet) as idle:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return buffer, True  # a reset: the server aborted this connection
            if idle.cancelled_caught:
                break
            if not chunk:
                return buffer, True
            buffer += chunk
    return buffer, False


async def close_quietly(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()


# ---------------------------------------------------------------------------- upgrade requests


def upgrade_request(
    token: str | None, target: str = "/", extra: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    headers = [
        (b"Host", b"127.0.0.1"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    if token is not None:
        headers.append((b"Authorization", b"Bearer " + token.encode()))
    headers += extra or []
    lines = [b"GET " + target.encode("latin-1") + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


HTTP_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

header_names = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"Upgrade",
            b"Connection",
            b"Sec-WebSocket-Key",
            b"Sec-WebSocket-Version",
            b"Sec-WebSocket-Extensions",
            b"Sec-WebSocket-Protocol",
            b"Authorization",
            b"Origin",
            b"Content-Length",
            b"Transfer-Encoding",
            b"X-Forwarded-For",
        ]
    ),
    st.text(HTTP_TOKEN_CHARS, min_size=1, max_size=30).map(str.encode),
    st.binary(max_size=30),
)

bad_keys = st.one_of(
    st.sampled_from(
        [
            b"",
            b"x",
            b"dGhlIHNhbXBsZSBub25jZQ",  # no padding
            b"dGhlIHNhbXBsZSBub25jZQ==dGhl",
            b"dGhlIHNhbXBsZSBub25jZQ== x",
            base64.b64encode(b"fifteen bytes!!"),
            base64.b64encode(b"seventeen bytes!!"),
            b"!!!!!!!!!!!!!!!!!!!!!!==",
            b"\x00" * 24,
        ]
    ),
    st.binary(min_size=16, max_size=16).map(base64.b64encode),  # valid: any 16 bytes
    st.binary(max_size=40),
)

bad_versions = st.one_of(
    st.sampled_from([b"", b"8", b"12", b"13, 8", b"13 ", b" 13", b"013", b"1" * 40, b"-13"]),
    st.binary(max_size=10),
)

extension_offers = st.one_of(
    st.sampled_from(
        [
            b"permessage-deflate",
            b"permessage-deflate; client_max_window_bits",
            b"permessage-deflate; server_max_window_bits=8",
            b"permessage-deflate; server_max_window_bits=15",
            b"permessage-deflate; server_max_window_bits=",
            b"permessage-deflate; server_max_window_bits=99999999999999999999",
            b"permessage-deflate; client_max_window_bits=abc",
            b"permessage-deflate; client_max_window_bits=7",
            b"permessage-deflate; server_no_context_takeover=1",
            b"permessage-deflate; unknown_param",
            b"permessage-deflate;;;",
            b"permessage-deflate, permessage-deflate; server_max_window_bits=9",
            b"x-webkit-deflate-frame",
            b";",
            b",,,",
        ]
    ),
    st.lists(
        st.sampled_from(
            [
                "permessage-deflate",
                "server_no_context_takeover",
                "client_no_context_takeover",
                "server_max_window_bits",
                "client_max_window_bits",
                "=",
                "15",
                "8",
                "0",
                ";",
                ",",
                " ",
                '"',
            ]
        ),
        max_size=12,
    ).map(lambda parts: "".join(parts).encode()),
)

header_values = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda s: s.encode("utf-8")),
    st.sampled_from([b"websocket", b"Upgrade", b"upgrade, keep-alive", b"13", b"Bearer", b""]),
    bad_keys,
    bad_versions,
    extension_offers,
)

query_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            ",",
            "BTC/USD",
            "BTC%2FUSD",
            "*",
            "BTC/USD:0",
            "BTC/USD:1,ETH/USD:99999999999999999999",
            "BTC/USD:-1",
            "BTC/USD:",
            ":5",
            "NOPE:3",
            "BTC/USD:1.5",
            "BTC/USD:%C2%B2",  # a superscript two: str.isdigit() says yes, int() says no
            "BTC/USD:" + "9" * 5000,  # int() refuses more than 4300 digits
        ]
    ),
)

query_strings = st.lists(
    st.tuples(
        st.sampled_from(["symbols", "resume", "access_token", "x", ""]) | st.text(max_size=8),
        query_values,
        st.booleans(),  # percent-encode the value
    ),
    max_size=4,
).map(
    lambda pairs: "&".join(
        f"{quote(k)}={quote(v, safe='/:,') if encode else v}" for k, v, encode in pairs
    )
)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `choices`, each picked in proportion to its weight."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def chance(percent: int) -> st.SearchStrategy[bool]:
    return st.integers(0, 99).map(lambda n: n < percent)


targets = weighted(
    (5, st.just("/")),
    (3, query_strings.map(lambda q: "/?" + q)),
    (
        1,
        st.sampled_from(
            [
                "*",
                "//[x",
                "http://[::1/",
                "http://127.0.0.1/?symbols=BTC%2FUSD",
                "/%",
                "/%zz",
                "/?" + "a" * 5000,
                "/#frag",
                "/../../etc/passwd",
                "?",
                "",
            ]
        ),
    ),
    (1, st.text(max_size=60)),
)


@dataclass
class Mutation:
    """One change to a valid upgrade request."""

    op: str
    index: int = 0
    name: bytes = b""
    value: bytes = b""
    size: int = 0


mutations = st.one_of(
    st.builds(Mutation, st.just("drop"), st.integers(0, 10)),
    st.builds(Mutation, st.just("duplicate"), st.integers(0, 10), value=header_values),
    st.builds(Mutation, st.just("rename"), st.integers(0, 10), name=header_names),
    st.builds(Mutation, st.just("set"), st.integers(0, 10), value=header_values),
    st.builds(Mutation, st.just("add"), name=header_names, value=header_values),
    st.builds(Mutation, st.just("key"), value=bad_keys),
    st.builds(Mutation, st.just("version"), value=bad_versions),
    st.builds(Mutation, st.just("extensions"), value=extension_offers),
    st.builds(Mutation, st.just("token"), value=st.binary(max_size=60)),
    st.builds(Mutation, st.just("method"), value=st.sampled_from([b"POST", b"get", b"", b"GET "])),
    st.builds(
        Mutation,
        st.just("http_version"),
        value=st.sampled_from([b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 ", b"HTTP/9.9", b"http/1.1"]),
    ),
    st.builds(Mutation, st.just("huge_value"), st.integers(0, 10), size=st.integers(1, 20_000)),
    st.builds(Mutation, st.just("many_headers"), size=st.integers(1, 2_000)),
    st.builds(Mutation, st.just("lf_only")),
    st.builds(Mutation, st.just("fold")),  # obsolete line folding
    st.builds(Mutation, st.just("nul"), st.integers(0, 10)),
)


@st.composite
def upgrade_requests(draw: st.DrawFn, token: str) -> bytes:
    """A valid upgrade request, mutated; or garbage; possibly cut short."""
    if draw(chance(8)):
        return draw(st.binary(min_size=1, max_size=2000))
    method, target, version = b"GET", draw(targets).encode("utf-8"), b"HTTP/1.1"
    headers = [
        [b"Host", b"127.0.0.1"],
        [b"Upgrade", b"websocket"],
        [b"Connection", b"Upgrade"],
        [b"Sec-WebSocket-Key", KEY],
        [b"Sec-WebSocket-Version", b"13"],
    ]
    if draw(chance(70)):
        headers.append([b"Authorization", b"Bearer " + token.encode()])
    separator = b"\r\n"
    count = draw(st.sampled_from([0, 0, 0, 1, 1, 1, 2, 2, 3, 4]))  # mostly near-valid: get far in
    for m in draw(st.lists(mutations, min_size=count, max_size=count)):
        i = m.index % len(headers) if headers else 0
        if m.op == "drop" and headers:
            del headers[i]
        elif m.op == "duplicate" and headers:
            headers.insert(i, [headers[i][0], m.value])
        elif m.op == "rename" and headers:
            headers[i][0] = m.name
        elif m.op == "set" and headers:
            headers[i][1] = m.value
        elif m.op == "add":
            headers.append([m.name, m.value])
        elif m.op in ("key", "version", "extensions", "token"):
            name = {
                "key": b"Sec-WebSocket-Key",
                "version": b"Sec-WebSocket-Version",
                "extensions": b"Sec-WebSocket-Extensions",
                "token": b"Authorization",
            }[m.op]
            value = b"Bearer " + m.value if m.op == "token" else m.value
            headers = [h for h in headers if h[0] != name] + [[name, value]]
        elif m.op == "method":
            method = m.value
        elif m.op == "http_version":
            version = m.value
        elif m.op == "huge_value" and headers:
            headers[i][1] = b"v" * m.size
        elif m.op == "many_headers":
            headers += [[b"X-Filler-%d" % n, b"x"] for n in range(m.size)]
        elif m.op == "lf_only":
            separator = b"\n"
        elif m.op == "fold" and headers:
            headers[i][1] += b"\r\n folded"
        elif m.op == "nul" and headers:
            headers[i][1] += b"\x00"
    lines = [method + b" " + target + b" " + version, *(n + b": " + v for n, v in headers)]
    raw = separator.join(lines) + separator + separator
    if draw(st.integers(0, 4)) == 0:  # cut short: the server must wait, then time out
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif draw(st.integers(0, 9)) == 0:  # a few flipped bytes
        flipped = bytearray(raw)
        for position, byte in draw(
            st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4)
        ):
            flipped[position] = byte
        raw = bytes(flipped)
    return raw


STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]*\r\n")


def check_http_answer(answer: bytes) -> int | None:
    """The status of a well-formed answer (None when nothing came back); fails on anything else."""
    if not answer:
        return None
    match = STATUS_LINE.match(answer)
    assert match, f"not an HTTP answer: {answer[:200]!r}"
    head, found, body = answer.partition(b"\r\n\r\n")
    assert found, f"an HTTP answer without its end: {answer[:300]!r}"
    status = int(match.group(1))
    if status != 101:
        lengths = re.findall(rb"\r\nContent-Length: *(\d+)", head, re.IGNORECASE)
        assert lengths and int(lengths[0]) == len(body), f"body does not match: {answer[:300]!r}"
    return status


@given(data=st.data())
@fuzz_settings(300)
async def test_fuzz_upgrade_requests(live: Live, data: st.DataObject) -> None:
    raw = data.draw(upgrade_requests(live.token), label="request")
    cuts = data.draw(st.lists(st.integers(0, 1 << 16), max_size=4), label="cuts")
    pause = data.draw(st.sampled_from([0.0, 0.0, 0.005]), label="pause")
    stall = data.draw(st.sampled_from([0.0, 0.05, QUIET]), label="stall then close")
    stream = await open_raw(live.ws_port)
    try:
        await send_in_pieces(stream, raw, cuts, pause)
        if stall:
            # A refusal is read to its end (the server closes after it); a 101 up to its head.
            answer, at_eof = await read_until(
                stream,
                lambda b: b.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in b,
                quiet=stall,
            )
            status = check_http_answer(answer)
            event(f"answer: {status or 'none'}")
            if status is not None and status != 101 and stall >= QUIET:
                assert at_eof, f"a refusal must end the connection: {answer[:300]!r}"
    finally:
        await close_quietly(stream)
    await live.assert_unharmed("upgrade")


# ---------------------------------------------------------------------------- frames


def mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    width: str = "minimal",
) -> bytes:
    """A client frame, well-formed or not: `length` may lie, `width` may be non-minimal."""
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    mask_bit = 0x80 if masked else 0
    if width == "64" or declared >= 1 << 16:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", declared & (1 << 64) - 1)
    elif width == "16" or declared >= 126:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", declared)
    else:
        head = bytes([first, mask_bit | declared])
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + mask(payload, key)


def deflated(data: bytes) -> bytes:
    """`data` compressed as one permessage-deflate message (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(wbits=-15)
    body = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return body[:-4] if body.endswith(b"\x00\x00\xff\xff") else body


CLOSE_CODES = [0, 1, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010]
CLOSE_CODES += [1011, 1012, 1013, 1014, 1015, 1016, 2000, 2999, 3000, 3999, 4000, 4001, 4999]
CLOSE_CODES += [5000, 65535]

texts = st.one_of(
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),  # may be invalid
    st.sampled_from(
        [
            b'{"type": "ping"}',
            b'{"type": "subscribe", "symbols": ["*"]}',
            b'{"type": "history", "symbol": "BTC/USD", "limit": 3}',
            b"\xff\xfe",
            b"\xc0\xaf",  # overlong '/'
            b"\xed\xa0\x80",  # a UTF-16 surrogate, encoded
            b"\xf4\x90\x80\x80",  # above U+10FFFF
            b"caf\xc3",  # cut in the middle of a character
        ]
    ),
    st.binary(max_size=200),
)

fillers = st.sampled_from([b"a", b" ", b"\x00"]) | st.binary(min_size=1, max_size=8)

close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),  # a lone byte: no room for a code
    st.tuples(st.sampled_from(CLOSE_CODES) | st.integers(0, 65535), texts).map(
        lambda cr: struct.pack("!H", cr[0]) + cr[1][:123]
    ),
    st.binary(min_size=126, max_size=300),  # too long for a control frame
)


@st.composite
def frames(draw: st.DrawFn, deflate: bool) -> bytes:
    """One frame, or a small fragmented message with control frames in between."""
    # Mostly valid frames, so that a sequence gets past its first frame; then every error.
    kind = draw(
        st.sampled_from(
            ["data"] * 4
            + ["fragmented"] * 3
            + ["control"] * 2
            + ["compressed"] * (2 if deflate else 1)
            + ["close", "bad_opcode", "absurd_length", "garbage"]
        )
    )
    masked = draw(chance(95))  # unmasked is one error among many
    rsv = 0 if draw(chance(85)) else draw(st.integers(1, 7))
    if kind == "data":
        opcode = draw(st.sampled_from([0x1] * 6 + [0x2, 0x0]))
        size = draw(st.sampled_from([None, None, 126, 65535, 65536, 70_000]))
        payload = draw(texts) if size is None else draw(fillers) * size
        width = "minimal" if draw(chance(90)) else draw(st.sampled_from(["16", "64"]))
        return frame(
            opcode,
            payload[: size or None],
            fin=draw(chance(90)),
            rsv=rsv,
            masked=masked,
            width=width,
        )
    if kind == "control":
        opcode = draw(st.sampled_from([0x9, 0xA]))
        payload = draw(st.binary(max_size=125) | st.binary(min_size=126, max_size=300))
        return frame(opcode, payload, fin=draw(chance(80)), rsv=rsv, masked=masked)
    if kind == "close":
        return frame(0x8, draw(close_payloads), fin=draw(st.booleans()), rsv=rsv, masked=masked)
    if kind == "bad_opcode":
        opcode = draw(st.sampled_from([0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF]))
        return frame(opcode, draw(st.binary(max_size=50)), rsv=rsv, masked=masked)
    if kind == "fragmented":
        parts = draw(st.lists(texts, min_size=2, max_size=4))
        opcode = draw(st.sampled_from([0x1, 0x2]))
        out = b""
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            out += frame(opcode if n == 0 else 0x0, part, fin=last, masked=masked)
            if not last and draw(st.booleans()):  # a control frame in between: allowed...
                control = draw(st.sampled_from([0x9, 0xA, 0x8]))
                payload = draw(st.binary(max_size=125) | st.binary(min_size=126, max_size=200))
                # ...unless it is itself fragmented or too long
                out += frame(control, payload, fin=draw(st.booleans()), masked=masked)
            if not last and draw(st.integers(0, 5)) == 0:  # another data frame interleaved
                out += frame(0x1, b'{"type": "ping"}', masked=masked)
        return out
    if kind == "compressed":
        plain = draw(texts)
        payload = deflated(plain) if draw(st.booleans()) else draw(st.binary(max_size=100))
        opcode = draw(st.sampled_from([0x1, 0x2, 0x0, 0x9]))
        return frame(opcode, payload, rsv=4 | (rsv & 3), masked=masked)
    if kind == "absurd_length":
        length = draw(
            st.sampled_from([1 << 63, (1 << 63) - 1, (1 << 64) - 1, 1 << 32, 10**18])
            | st.integers(MAX_MESSAGE_SIZE + 1, (1 << 64) - 1)
        )
        opcode = draw(st.sampled_from([0x1, 0x2, 0x0, 0x9, 0x8]))
        return frame(opcode, draw(st.binary(max_size=64)), length=length, masked=masked)
    return draw(st.binary(min_size=1, max_size=300))


@dataclass
class ServerFrames:
    """What the server sent after its 101, parsed strictly."""

    deflate: bool
    frames: list[tuple[int, bytes]] = field(default_factory=list)  # (first byte, payload)
    closed: bool = False
    rest: bytes = b""

    def feed(self, data: bytes) -> None:
        buffer = self.rest + data
        while True:
            if len(buffer) < 2:
                break
            first, second = buffer[0], buffer[1]
            assert not second & 0x80, "a server frame must not be masked"
            size, offset = second & 0x7F, 2
            if size == 126:
                if len(buffer) < 4:
                    break
                size, offset = struct.unpack("!H", buffer[2:4])[0], 4
            elif size == 127:
                if len(buffer) < 10:
                    break
                size, offset = struct.unpack("!Q", buffer[2:10])[0], 10
            if len(buffer) < offset + size:
                break
            payload = buffer[offset : offset + size]
            buffer = buffer[offset + size :]
            self._check(first, payload)
            self.frames.append((first, payload))
        self.rest = buffer

    def _check(self, first: int, payload: bytes) -> None:
        assert not self.closed, "the server sent a frame after its close frame"
        opcode, rsv = first & 0x0F, first & 0x70
        assert opcode in (0x1, 0x8, 0x9, 0xA), f"unexpected server opcode {opcode:#x}"
        if opcode >= 0x8:
            assert first & 0x80 and not rsv and len(payload) <= 125, "a malformed control frame"
        else:
            assert rsv in ((0, 0x40) if self.deflate else (0,)), f"server RSV bits {rsv:#x}"
        if opcode == 0x8:
            self.closed = True
            if payload:
                assert len(payload) >= 2, "a close payload of one byte"
                code = struct.unpack("!H", payload[:2])[0]
                assert 1000 <= code <= 1015 or 3000 <= code <= 4999, f"close code {code}"
                assert code not in (1004, 1005, 1006, 1015), f"close code {code} is not for wire"
                payload[2:].decode("utf-8")  # the reason must be valid UTF-8

    def outcome(self, barrier: bytes) -> str:
        for first, data in self.frames:
            if first & 0x0F == 0x8:
                return f"closed {struct.unpack('!H', data[:2])[0] if data else 'without code'}"
        return "barrier answered" if self.pong(barrier) else "no answer (frame unfinished)"

    def pong(self, payload: bytes) -> bool:
        return any(first & 0x0F == 0xA and data == payload for first, data in self.frames)


async def upgraded(
    live: Live, *, deflate: bool, target: str = "/?symbols="
) -> tuple[trio.SocketStream, bytes]:
    """A raw connection past a valid upgrade; the bytes that followed the 101."""
    extra = [(b"Sec-WebSocket-Extensions", b"permessage-deflate")] if deflate else []
    stream = await open_raw(live.ws_port)
    await stream.send_all(upgrade_request(live.token, target, extra))
    answer, _ = await read_until(stream, lambda b: b"\r\n\r\n" in b, quiet=REPLY_TIMEOUT)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), f"a valid upgrade was refused: {answer[:300]!r}"
    assert (b"permessage-deflate" in head) == deflate
    return stream, rest


@given(data=st.data())
@fuzz_settings(400)
async def test_fuzz_frames(live: Live, data: st.DataObject) -> None:
    deflate = data.draw(st.booleans(), label="deflate")
    sent = data.draw(st.lists(frames(deflate), min_size=1, max_size=5), label="frames")
    cuts = data.draw(st.lists(st.integers(0, 1 << 20), max_size=3), label="cuts")
    stream, after_101 = await upgraded(live, deflate=deflate)
    server = ServerFrames(deflate)
    try:
        server.feed(after_101)  # the greeting
        await send_in_pieces(stream, b"".join(sent), cuts, 0.0)
        # A barrier: a valid ping with a fresh payload. Its pong means the server has handled
        # everything before it; an unfinished frame swallows it, and silence ends the example.
        barrier = os.urandom(8)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(frame(0x9, barrier))

        with trio.move_on_after(REPLY_TIMEOUT):
            while not (server.closed or server.pong(barrier)):
                with trio.move_on_after(QUIET) as idle:
                    try:
                        chunk = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break  # reset: the server aborted the connection
                if idle.cancelled_caught or not chunk:
                    break
                server.feed(chunk)
    finally:
        await close_quietly(stream)
    event(f"outcome: {server.outcome(barrier)}")
    await live.assert_unharmed("frames")


# ---------------------------------------------------------------------------- JSON messages


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)

json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=3)

symbol_like = st.one_of(
    st.sampled_from([*SYMBOLS, "*", "", "NOPE/USD", "btc/usd", "BTC/USD ", "\x00"]),
    st.text(max_size=20),
)

TEMPLATES: list[dict[str, Any]] = [
    {"type": "ping"},
    {"type": "subscribe", "symbols": ["BTC/USD"]},
    {"type": "unsubscribe", "symbols": ["*"]},
    {"type": "history", "symbol": "BTC/USD", "limit": 5},
    {"type": "resume", "from": {"BTC/USD": 0}},
]


def huge_number(digits: int, negative: bool, exponent: int | None) -> str:
    text = ("-" if negative else "") + "9" * digits
    return text if exponent is None else f"{text}e{exponent}"


def nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@st.composite
def requests(draw: st.DrawFn) -> str | bytes:
    """One client message, as sent: JSON text (valid or not) or a binary message."""
    kind = draw(
        st.sampled_from(
            [
                *("random", "template", "template", "wrong_field", "extra_fields"),
                *("unknown_type", "number", "deep", "text", "bytes"),
            ]
        )
    )
    if kind == "random":
        return json.dumps(draw(json_values))
    if kind == "unknown_type":
        return json.dumps({"type": draw(st.text(max_size=80)), **draw(st.just({}) | json_objects)})
    if kind == "template":
        message = dict(draw(st.sampled_from(TEMPLATES)))
        if "symbols" in message:
            message["symbols"] = draw(st.lists(symbol_like, max_size=5))
        if "symbol" in message:
            message["symbol"] = draw(symbol_like)
        if "from" in message:
            message["from"] = draw(
                st.dictionaries(
                    symbol_like,
                    st.integers(-1, 1 << 64) | st.sampled_from([2**53, 2**63 - 1]),
                    max_size=3,
                )
            )
        if "limit" in message:
            message["limit"] = draw(st.integers(-5, 5000))
        return json.dumps(message)
    if kind == "wrong_field":
        message = dict(draw(st.sampled_from(TEMPLATES)))
        key = draw(st.sampled_from(sorted(message)))
        message[key] = draw(json_values)
        return json.dumps(message)
    if kind == "extra_fields":
        message = dict(draw(st.sampled_from(TEMPLATES)))
        message.update(draw(json_objects))
        return json.dumps(message)
    if kind == "number":
        number = huge_number(
            draw(st.integers(1, 6000)),
            draw(st.booleans()),
            draw(st.none() | st.integers(-400, 400)),
        )
        template = draw(
            st.sampled_from(
                [
                    '{"type": "history", "symbol": "BTC/USD", "limit": %s}',
                    '{"type": "resume", "from": {"BTC/USD": %s}}',
                    '{"type": %s}',
                    "%s",
                ]
            )
        )
        return template % number
    if kind == "deep":
        depth = draw(st.integers(1, 20_000))
        inner = nested(depth, draw(st.sampled_from(["list", "object"])))
        template = draw(
            st.sampled_from(
                [
                    '{"type": "resume", "from": %s}',
                    '{"type": "subscribe", "symbols": %s}',
                    '{"type": "ping", "x": %s}',
                    "%s",
                ]
            )
        )
        return template % inner
    if kind == "text":
        return draw(st.text(max_size=300))
    return draw(st.binary(max_size=300))


REPLY_TYPES = {"pong", "subscribed", "unsubscribed", "history", "error"}
EXTRA_TYPES = {"volatility_update", "reset"}  # what subscribe and resume may bring along
ERROR_CODES = {
    "invalid_json",
    "invalid_message",
    "unknown_type",
    "binary_unsupported",
    "unknown_symbol",
    "forbidden_symbol",
    "no_symbols",
    "already_subscribed",
    "rate_limited",
    "message_too_large",
}


@given(data=st.data())
@fuzz_settings(300)
async def test_fuzz_json_messages(live: Live, data: st.DataObject) -> None:
    messages = data.draw(st.lists(requests(), min_size=1, max_size=4), label="messages")
    for message in messages:
        size = len(message.encode("utf-8") if isinstance(message, str) else message)
        assume(size <= MAX_MESSAGE_SIZE)
    url = f"ws://127.0.0.1:{live.ws_port}/?symbols="
    headers = bearer(live.token)
    replies: list[dict[str, Any]] = []
    with trio.fail_after(REPLY_TIMEOUT * 2):
        async with open_websocket_url(url, extra_headers=headers, max_message_size=1 << 24) as ws:
            assert json.loads(await ws.get_message())["type"] == "connected"
            for message in messages:
                await ws.send_message(message)
            await ws.send_message('{"type": "ping"}')  # the barrier: its pong comes last
            while True:
                reply = json.loads(await ws.get_message())
                assert isinstance(reply, dict) and isinstance(reply.get("type"), str), reply
                assert reply["type"] in REPLY_TYPES | EXTRA_TYPES, reply
                if reply["type"] == "error":
                    assert reply["code"] in ERROR_CODES, reply
                    assert isinstance(reply["message"], str), reply
                if reply["type"] in REPLY_TYPES:
                    event(f"reply: {reply.get('code', reply['type'])}")
                    replies.append(reply)
                    if len(replies) == len(messages) + 1:
                        break
    # One reply per message, in order, and the barrier's pong last.
    assert replies[-1]["type"] == "pong", replies
    for message, reply in zip(messages, replies, strict=False):
        if isinstance(message, bytes):
            assert reply.get("code") == "binary_unsupported", reply
    await live.assert_unharmed("json")


# ---------------------------------------------------------------------------- the module's end


async def test_the_witness_was_served_throughout(live: Live) -> None:
    """The module's last test: the witness lived through every example, with no gap."""
    await trio.sleep(3 * INTERVAL)
    await live.assert_unharmed("final")
    assert live.witness.updates >= 20, live.witness.updates
    fuzzed = {k: v for k, v in live.examples.items() if k != "final"}
    assert sum(fuzzed.values()) > 0, "no example ran"


# ---------------------------------------------------------------------------- bugs it found


@pytest.mark.parametrize(
    ("target", "authorized"),
    [
        ("//[x", False),  # presented_token: urlsplit before looking for ?access_token
        ("//[x", True),  # parse_connect_target: urlsplit after a valid bearer token
        ("/?resume=BTC/USD:%C2%B2", True),  # '²'.isdigit() is True, int('²') raises
        ("/?resume=BTC/USD:" + "9" * 4301, True),  # int() refuses more than 4300 digits
    ],
)
async def test_unsplittable_targets_and_odd_resume_seqs_harm_no_one(
    tmp_path: Path, target: str, authorized: bool
) -> None:
    token = new_token()
    process = launch(tmp_path, token)
    try:
        ws_port, _ = await process.ports()
        headers = bearer(token)
        async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/", extra_headers=headers) as ws:
            assert json.loads(await ws.get_message())["type"] == "connected"
            stream = await open_raw(ws_port)
            await stream.send_all(upgrade_request(token if authorized else None, target))
            # Its answer (or the end of the connection) shows the request was handled; an
            # accepted one streams on, so waiting for silence would wait out the whole limit.
            await read_until(stream, lambda b: b"\r\n\r\n" in b, quiet=1.0)
            await close_quietly(stream)
            with trio.fail_after(5):
                for _ in range(5):  # the bystander keeps receiving
                    assert json.loads(await ws.get_message())["type"] == "volatility_update"
        assert not [line for line in process.raw_lines if "service_crashed" in line]
    finally:
        process.kill()
