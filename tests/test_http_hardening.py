"""The HTTP port under abuse: slowloris, bad targets, request smuggling, Host and /metrics guards.

Pure policy first (httppolicy, logthrottle: no sockets, no clocks), then a real `serve_http` on a
loopback socket with real clients (helpers from test_httpserver), then the real daemon as a
subprocess held by 1,000 half-sent requests from one address while a load balancer probes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from agentspoonsd.httppolicy import (
    MAX_TARGET_BYTES,
    Admission,
    ConnectionTable,
    RequestRefused,
    Target,
    bearer_matches,
    check_host,
    client_key,
    format_address,
    normalise_host,
    parse_target,
)
from agentspoonsd.logthrottle import OVERFLOW_KEY, LogThrottle, Verdict
from agentspoonsd.settings import ConfigError, load_settings
from daemon_process import DaemonProcess, http_get
from test_httpserver import (
    TIMEOUT,
    Client,
    Server,
    connect,
    raw_exchange,
    read_until_eof,
    serving,
)
from test_httpserver import listener as listener  # the fixture, re-exported for these tests

METRICS_TOKEN = "metrics-secret-token-value"
METRICS_DIGEST = hashlib.sha256(METRICS_TOKEN.encode()).digest()
ABUSER = "127.0.0.2"  # another loopback address: the abuser is not the load balancer


# --- request targets (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/healthz", Target("/healthz")),
        ("/dashboard/app.js?v=1f&x=%41", Target("/dashboard/app.js?v=1f&x=%41")),
        ("/a/%2e%2e/b", Target("/a/%2e%2e/b")),
        ("//etc/passwd", Target("//etc/passwd")),
        ("http://Example.COM:8766/readyz?x=1", Target("/readyz?x=1", "example.com")),
        ("HTTPS://[::1]:443", Target("/", "::1")),
        ("http://127.0.0.1?q", Target("/?q", "127.0.0.1")),
    ],
)
def test_valid_targets_parse_to_origin_form(target: str, expected: Target) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/caf\u00e9", 400),  # non-ASCII
        ("/a b", 400),
        ("/\x00", 400),
        ("/%zz", 400),
        ("/%4", 400),
        ("/100%", 400),
        ("/x#frag", 400),
        ("*", 400),  # only for OPTIONS, which is 405 anyway
        ("example.com:443", 400),  # authority-form: only for CONNECT
        ("healthz", 400),
        ("", 400),
        ("ftp://example.com/healthz", 400),
        ("javascript:alert(1)", 400),
        ("file:///etc/passwd", 400),
        ("http:/healthz", 400),
        ("http://[/healthz", 400),  # urlsplit raises on this one
        ("http://[zz::1]/", 400),
        ("http://host:99999/", 400),
        ("http://host:x/", 400),
        ("http:///healthz", 400),
        ("http://user:pw@host/healthz", 400),
        ("http://host\\/", 400),
        ("/" + "a" * MAX_TARGET_BYTES, 414),
    ],
)
def test_bad_targets_are_refused_with_a_status(target: str, status: int) -> None:
    with pytest.raises(RequestRefused) as info:
        parse_target(target)
    assert info.value.status == status


def test_target_just_at_the_length_limit_is_accepted() -> None:
    target = "/" + "a" * (MAX_TARGET_BYTES - 1)
    assert parse_target(target).origin == target


# --- Host allow-list and bearer tokens (pure) ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("LocalHost:8766", "localhost"),
        ("example.com.", "example.com"),
        ("[::1]:8766", "::1"),
        ("[0:0::1]", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("a:b", None),
        ("::1", None),  # an IPv6 literal needs brackets in a Host header
        ("[::1", None),
        ("", None),
        ("a/b", None),
        ("host:65536", None),
    ],
)
def test_normalise_host(value: str, host: str | None) -> None:
    assert normalise_host(value) == host


ALLOWED = frozenset({"localhost", "127.0.0.1", "::1"})


@pytest.mark.parametrize("values", [["localhost:8766"], ["127.0.0.1"], ["[::1]:1"], ["LOCALHOST"]])
def test_allowed_hosts_pass(values: list[str]) -> None:
    check_host(values, Target("/"), ALLOWED)


@pytest.mark.parametrize(
    ("values", "target", "status"),
    [
        (["evil.example:8766"], Target("/"), 421),  # a DNS-rebinding name
        (["localhost.evil.example"], Target("/"), 421),
        (["localhost"], Target("/", "evil.example"), 421),  # absolute-form wins over Host
        ([], Target("/"), 400),
        (["localhost", "localhost"], Target("/"), 400),
        (["bad host"], Target("/"), 400),
    ],
)
def test_other_hosts_are_refused(values: list[str], target: Target, status: int) -> None:
    with pytest.raises(RequestRefused) as info:
        check_host(values, target, ALLOWED)
    assert info.value.status == status


def test_no_allow_list_allows_any_host() -> None:
    check_host(["anything.example"], Target("/"), None)
    check_host([], Target("/"), None)


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        ([f"Bearer {METRICS_TOKEN}"], True),
        ([f"bearer   {METRICS_TOKEN} "], True),
        ([f"Bearer {METRICS_TOKEN}x"], False),
        ([f"Basic {METRICS_TOKEN}"], False),
        (["Bearer"], False),
        ([], False),
        ([f"Bearer {METRICS_TOKEN}", f"Bearer {METRICS_TOKEN}"], False),
        (["Bearer \udcff"], False),  # undecodable bytes are compared, never raised on
    ],
)
def test_bearer_matches(values: list[str], ok: bool) -> None:
    assert bearer_matches(values, METRICS_DIGEST) is ok


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unknown", "unknown"),
    ],
)
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key


# --- connection admission (pure) ----------------------------------------------------------------


def test_per_address_cap_refuses_429_and_leaves_room_for_others() -> None:
    table = ConnectionTable(max_connections=4, max_per_ip=2, max_refusing=1)
    assert [table.admit("a") for _ in range(2)] == [Admission.SERVE] * 2
    assert table.admit("a") is Admission.OVER_IP
    assert Admission.OVER_IP.status == 429
    assert table.admit("a") is Admission.DROP  # one refusal in progress already
    assert table.admit("b") is Admission.SERVE  # another address is unaffected
    assert (table.active, table.open_from("a"), table.refusing) == (3, 2, 1)
    table.release("a", Admission.OVER_IP)
    table.release("a", Admission.DROP)
    table.release("a", Admission.SERVE)
    assert table.admit("a") is Admission.SERVE  # a freed slot is reusable


def test_total_cap_refuses_503_and_never_evicts() -> None:
    table = ConnectionTable(max_connections=2, max_per_ip=1, max_refusing=8)
    assert table.admit("a") is Admission.SERVE
    assert table.admit("b") is Admission.SERVE
    assert table.admit("c") is Admission.OVER_TOTAL
    assert Admission.OVER_TOTAL.status == 503
    assert table.admit("a") is Admission.OVER_IP  # its own cap first
    assert (table.open_from("a"), table.open_from("b"), table.active) == (1, 1, 2)


def test_no_per_address_cap() -> None:
    table = ConnectionTable(max_connections=2, max_per_ip=None)
    assert [table.admit("a") for _ in range(3)] == [
        Admission.SERVE,
        Admission.SERVE,
        Admission.OVER_TOTAL,
    ]


def test_table_forgets_addresses_without_connections() -> None:
    table = ConnectionTable(max_connections=10_000, max_per_ip=1)
    for n in range(1000):
        key = f"10.0.{n // 256}.{n % 256}"
        assert table.admit(key) is Admission.SERVE
        table.release(key, Admission.SERVE)
    assert (table.keys, table.active, table.refusing) == (0, 0, 0)


# --- per-key log throttle (pure, time injected) -------------------------------------------------


def test_throttle_lets_n_through_then_summarises_once() -> None:
    throttle = LogThrottle(limit=3, interval=10.0)
    verdicts = [throttle.admit("peer", now=float(t)) for t in range(8)]
    assert [v.emit for v in verdicts] == [True] * 3 + [False] * 5
    assert all(v.suppressed == 0 for v in verdicts)
    assert throttle.flush(9.9) == []  # the window is still open
    assert throttle.flush(10.0) == [("peer", 5)]
    assert throttle.flush(100.0) == []  # reported once
    assert len(throttle) == 0


def test_throttle_summary_comes_with_the_next_event_after_the_window() -> None:
    throttle = LogThrottle(limit=1, interval=5.0)
    throttle.admit("peer", 0.0)
    throttle.admit("peer", 1.0)
    throttle.admit("peer", 2.0)
    assert throttle.admit("peer", 5.0) == Verdict(True, suppressed=2)
    assert throttle.flush(1000.0) == []


def test_throttle_keys_are_independent() -> None:
    throttle = LogThrottle(limit=1, interval=10.0)
    assert throttle.admit("a", 0.0).emit
    assert not throttle.admit("a", 0.1).emit
    assert throttle.admit("b", 0.2).emit  # b is not silenced by a's flood
    assert throttle.flush(0.0, everything=True) == [("a", 1)]


def test_throttle_memory_is_bounded_under_many_keys() -> None:
    throttle = LogThrottle(limit=1, interval=10.0, max_keys=4)
    emitted = [throttle.admit(f"k{n}", 0.0).emit for n in range(100)]
    assert emitted == [True] * 4 + [False] * 96
    assert len(throttle) == 5  # four keys and the overflow
    assert (OVERFLOW_KEY, 96) in throttle.flush(10.0)
    assert len(throttle) == 0


# --- a real serve_http --------------------------------------------------------------------------


async def connect_from(server: Server, address: str) -> Client:
    """A client connection from `address` (a loopback alias), closed when `serving` exits."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((address, 0))
    await sock.connect(("127.0.0.1", server.port))
    stream = trio.SocketStream(sock)
    server.streams.append(stream)
    return Client(stream)


BAD_WIRE_TARGETS = [
    b"/%zz",
    b"http://[/healthz",
    b"ftp://example.com/healthz",
    b"*",
    b"example.com:80",
    b"http://user@host/healthz",
    b"/" + b"a" * (MAX_TARGET_BYTES + 10),
]


@pytest.mark.parametrize("target", BAD_WIRE_TARGETS, ids=lambda t: t[:24].decode())
async def test_bad_target_is_400_never_500(listener: trio.SocketListener, target: bytes) -> None:
    async with serving(listener) as server:
        data = await raw_exchange(server, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    expected = b"414" if len(target) > MAX_TARGET_BYTES else b"400"
    assert data.startswith(b"HTTP/1.1 " + expected + b" ")
    assert b"Connection: close\r\n" in data
    assert server.calls == []
    assert not server.events("http_handler_failed")


async def test_non_ascii_target_is_400(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        data = await raw_exchange(server, b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")
    assert server.calls == []


async def test_absolute_form_reaches_the_handler_as_origin_form(
    listener: trio.SocketListener,
) -> None:
    async with serving(listener) as server:
        reply = await (await connect(server)).request("GET", "http://t:1/healthz?x=1")
    assert reply.status == 200
    assert server.calls == [("GET", "/healthz?x=1")]


@pytest.mark.parametrize("order", ["cl-first", "te-first"])
async def test_content_length_with_transfer_encoding_is_answered_then_closed(
    listener: trio.SocketListener, order: str
) -> None:
    framing = [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"]
    if order == "te-first":
        framing.reverse()
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    payload = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"".join(framing) + b"\r\n"
    payload += b"0\r\n\r\n" + smuggled
    async with serving(listener) as server:
        data = await raw_exchange(server, payload)  # fails unless the server closes
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close\r\n" in data
    assert data.count(b"HTTP/1.1 ") == 1  # the bytes after the chunked body were never served
    assert server.calls == [("GET", "/healthz")]


async def test_host_allow_list(listener: trio.SocketListener) -> None:
    async with serving(listener, allowed_hosts=frozenset({"localhost"})) as server:
        ok = await raw_exchange(
            server, b"GET /healthz HTTP/1.1\r\nHost: LocalHost:8766\r\nConnection: close\r\n\r\n"
        )
        rebinding = await raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        malformed = await raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n")
        http10 = await raw_exchange(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ")
    assert rebinding.startswith(b"HTTP/1.1 421 Misdirected Request\r\n")
    assert malformed.startswith(b"HTTP/1.1 400 ")
    assert http10.startswith(b"HTTP/1.1 400 ")
    assert server.calls == [("GET", "/healthz")]


async def test_bearer_protected_path(listener: trio.SocketListener) -> None:
    guard = {"/json": METRICS_DIGEST}
    async with serving(listener, bearer_digests=guard) as server:
        client = await connect(server)
        missing = await client.request("GET", "/json")
        wrong = await client.request("GET", "/json", (("Authorization", "Bearer nope"),))
        right = await client.request(
            "GET", "/json?x", (("Authorization", f"Bearer {METRICS_TOKEN}"),)
        )
        open_path = await client.request("GET", "/healthz")
    assert (missing.status, wrong.status) == (401, 401)
    assert missing.headers["www-authenticate"] == 'Bearer realm="agentspoonsd"'
    assert right.status == 200 and right.body == b'{"a":1}'
    assert open_path.status == 200  # on the same connection: a 401 does not close it
    assert server.calls == [("GET", "/json?x"), ("GET", "/healthz")]
    assert METRICS_TOKEN not in repr(server.logs) and "nope" not in repr(server.logs)


async def test_per_address_cap_refuses_others_and_answers_probes(
    listener: trio.SocketListener,
) -> None:
    options = {"max_connections": 10, "max_connections_per_ip": 2}
    async with serving(listener, probe_paths=frozenset({"/healthz"}), **options) as server:
        held = [await connect_from(server, ABUSER) for _ in range(2)]
        for client in held:
            await client.stream.send_all(b"GET /healthz HTTP/1.1\r\n")  # half-sent
        await trio.testing.wait_all_tasks_blocked()

        refused = await (await connect_from(server, ABUSER)).request("GET", "/json")
        posted = await (await connect_from(server, ABUSER)).request("POST", "/healthz", body=b"x")
        probe = await connect_from(server, ABUSER)
        probed = await probe.request("GET", "/healthz")
        assert await read_until_eof(probe.stream) == b""  # a probe past the cap is closed after
        other = await (await connect(server)).request("GET", "/json")

        # Nothing was evicted: the held requests complete and are served.
        for client in held:
            await client.stream.send_all(b"Host: t\r\n\r\n")
            assert (await client.response()).status == 200
    assert refused.status == 429 and refused.headers["connection"] == "close"
    assert posted.status == 429
    assert probed.status == 200 and probed.headers["connection"] == "close"
    assert other.status == 200
    events = server.events("http_connections_per_ip_exceeded")
    assert [(e["client"], e["max_connections_per_ip"]) for e in events] == [(ABUSER, 2)] * 3


async def test_connection_past_the_cap_that_sends_nothing_gets_429_after_the_grace(
    listener: trio.SocketListener,
) -> None:
    async with serving(listener, max_connections=10, max_connections_per_ip=1) as server:
        await connect_from(server, ABUSER)
        silent = await connect_from(server, ABUSER)
        started = trio.current_time()
        data = await read_until_eof(silent.stream)
        elapsed = trio.current_time() - started
    assert data.startswith(b"HTTP/1.1 429 ")
    assert 0.8 <= elapsed < 1.8


async def test_idle_timeout_and_request_timeout_are_separate(
    listener: trio.SocketListener,
) -> None:
    async with serving(listener, request_timeout=1.0, idle_timeout=0.2) as server:
        idle = await connect(server)
        started = trio.current_time()
        assert await read_until_eof(idle.stream) == b""
        idle_closed = trio.current_time() - started

        # A request begun just before the idle deadline has the whole request_timeout from its
        # first byte; its later bytes never move that deadline.
        slow = await connect(server)
        await trio.sleep(0.15)
        first_byte = trio.current_time()
        await slow.stream.send_all(b"GET /healthz HTTP/1.1\r\n")
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(TIMEOUT):
            while True:
                await trio.sleep(0.05)
                await slow.stream.send_all(b"X: y\r\n")
        slow_closed = trio.current_time() - first_byte
    assert 0.15 <= idle_closed < 0.6
    assert 0.9 <= slow_closed < 1.5
    assert server.events("http_connection_idle")
    assert server.events("http_request_timeout")


async def test_error_logs_per_peer_are_rate_limited_and_summarised(
    listener: trio.SocketListener,
) -> None:
    async with serving(listener) as server:
        client = await connect(server)
        for _ in range(20):
            assert (await client.request("GET", "/boom")).status == 500
        other = await connect_from(server, ABUSER)
        assert (await other.request("GET", "/boom")).status == 500
        # Cancelling the server (and its summary loop) logs the pending summary.
    failures = server.events("http_handler_failed")
    assert len(failures) == 6  # 5 from the flooding peer, 1 from the other one
    assert sum(1 for e in failures if e["peer"].startswith(ABUSER)) == 1
    (summary,) = server.events("log_suppressed")
    assert (summary["client"], summary["count"]) == ("127.0.0.1", 15)


async def test_accept_failures_are_logged_once_a_second(listener: trio.SocketListener) -> None:
    """Out of file descriptors, accept() fails every 0.1 s until one is free: one log line a
    second with the count (as on the WebSocket port), not ten; served again once they are back."""
    import resource
    import socket

    waiting = [socket.socket() for _ in range(5)]  # their descriptors exist before the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with serving(listener) as server:
        in_use = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself used
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))
            for sock in waiting:
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", server.port))
            await trio.sleep(2.5)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for sock in waiting:
            sock.close()
        assert (await (await connect(server)).request("GET", "/healthz")).status == 200
    failures = server.events("http_accept_failed")
    assert 2 <= len(failures) <= 3, [e.get("failures") for e in failures]
    assert sum(e["failures"] for e in failures) >= 15
    assert all(e["error"] == "EMFILE" for e in failures)


# --- the daemon, held by 1,000 half-sent requests -----------------------------------------------


ABUSERS = 1000
REQUEST_TIMEOUT = 4.0
PER_IP = 64


def hardened_config(tmp_path: Path, health: str) -> Path:
    path = tmp_path / "agentspoonsd.toml"
    path.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\nshutdown_timeout = 3.0\n\n'
        '[generator]\ninterval = 0.2\nsymbols = ["BTC/USD"]\nseed = 7\n\n'
        f'[health]\nhost = "127.0.0.1"\nport = 0\n{health}\n'
        "[auth]\nenabled = false\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
async def daemon(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> tuple[DaemonProcess, int]:
    health = f"request_timeout = {REQUEST_TIMEOUT}\nmax_connections_per_ip = {PER_IP}\n"
    process = daemon_factory(hardened_config(tmp_path, health))
    _, http_port = await process.ports()
    with trio.fail_after(10):
        while (await http_get(http_port, "/readyz"))[0] != 200:  # noqa: ASYNC110
            await trio.sleep(0.05)
    return process, http_port


async def until(condition: Callable[[], bool], within: float) -> None:
    """Return once `condition()` holds; fail after `within` seconds."""
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.05)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def probe(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, float]:
    """(status, seconds) of GET `path` from `source`; status 0 when closed unanswered."""
    started = trio.current_time()
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    with trio.fail_after(5):
        await sock.connect(("127.0.0.1", port))
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = await read_until_eof_or_response(stream)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, trio.current_time() - started


async def read_until_eof_or_response(stream: trio.SocketStream) -> bytes:
    data = b""
    try:
        while b"\r\n\r\n" not in data and (chunk := await stream.receive_some(65536)):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def test_slowloris_from_one_address_leaves_probes_answered(
    daemon: tuple[DaemonProcess, int],
) -> None:
    process, port = daemon
    assert process.proc is not None
    baseline = open_fds(process.proc.pid)
    closed_at: dict[int, float] = {}
    abusers: list[trio.SocketStream] = []

    async def hold(n: int, stream: trio.SocketStream) -> None:
        # Whatever the server does (answer 429, close, reset), note when the socket ends.
        try:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        closed_at[n] = trio.current_time()
        await stream.aclose()  # as any client does when the server closes

    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        for n in range(ABUSERS):
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            await sock.bind((ABUSER, 0))
            await sock.connect(("127.0.0.1", port))
            abusers.append(trio.SocketStream(sock))
            nursery.start_soon(hold, n, abusers[-1])
        opened = trio.current_time() - started

        # While the abuser holds its connections, a load balancer on another address...
        probes = [await probe(port, path) for path in ("/healthz", "/readyz") * 3]
        assert [status for status, _ in probes] == [200] * 6
        # ...and, once the abuser's surplus connections are refused, one on the same address.
        await until(lambda: len(closed_at) >= ABUSERS - PER_IP, within=5)
        same_address = [await probe(port, path, ABUSER) for path in ("/healthz", "/readyz")]
        refused_same_address = await probe(port, "/metrics", ABUSER)
        held = ABUSERS - len(closed_at)

        # The held requests are closed by the request timeout, not before.
        await until(lambda: len(closed_at) == ABUSERS, within=REQUEST_TIMEOUT + 5)
        last_closed = max(closed_at.values()) - started
    for stream in abusers:
        await stream.aclose()

    print(
        f"\nslowloris: {ABUSERS} opened in {opened:.2f} s; probes from another address "
        f"{[round(t * 1000) for _, t in probes]} ms; same address "
        f"{[round(t * 1000) for _, t in same_address]} ms; "
        f"last abuser closed at {last_closed:.2f} s"
    )
    assert max(t for _, t in probes) < 1.0  # generous: measured at 1-8 ms
    assert [status for status, _ in same_address] == [200, 200]
    assert refused_same_address[0] == 429
    assert held == PER_IP  # exactly the cap, none evicted
    assert REQUEST_TIMEOUT - 1 <= last_closed < REQUEST_TIMEOUT + 3

    pid = process.proc.pid
    await until(lambda: open_fds(pid) <= baseline, within=5)  # descriptors back to baseline
    await process.wait_for("http_connections_per_ip_exceeded", client=ABUSER)
    assert len(process.events) < 500  # the flood did not flood the log


# --- config ------------------------------------------------------------------------------------


async def test_metrics_token_and_allowed_hosts_in_the_daemon(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    digest = hashlib.sha256(METRICS_TOKEN.encode()).hexdigest()
    health = f'metrics_token_sha256 = "{digest}"\nallowed_hosts = ["127.0.0.1", "localhost"]\n'
    process = daemon_factory(hardened_config(tmp_path, health))
    _, port = await process.ports()
    assert (await http_get(port, "/metrics"))[0] == 401
    assert (await http_get(port, "/healthz"))[0] == 200  # Host: 127.0.0.1:port

    auth = f"Authorization: Bearer {METRICS_TOKEN}\r\n"
    status, authorised = await probe_host(port, "localhost", "/metrics", auth)
    assert status == 200 and b"agentspoonsd_" in authorised
    assert (await probe_host(port, "rebind.evil.test", "/metrics", auth))[0] == 421
    assert (await probe_host(port, "rebind.evil.test"))[0] == 421
    assert METRICS_TOKEN not in process.log_text


async def probe_host(
    port: int, host: str, path: str = "/healthz", headers: str = ""
) -> tuple[int, bytes]:
    """(status, whole answer) of one request with `Host: host` and Connection: close."""
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{headers}\r\n"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(head.encode())
        data = await read_until_eof(stream)
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            "max_connections = 10\nmax_connections_per_ip = 11",
            "health.max_connections_per_ip",
            "(10)",
        ),
        ("max_connections = 0", "health.max_connections", "1"),
        ("request_timeout = 0", "health.request_timeout", "greater than 0"),
        ("idle_timeout = -1", "health.idle_timeout", "greater than 0"),
        ('allowed_hosts = ["example.com:80"]', "health.allowed_hosts", "without port"),
        ('allowed_hosts = ["a b"]', "health.allowed_hosts", "not a host"),
        ('metrics_token_sha256 = "secret"', "health.metrics_token_sha256", "64 hexadecimal"),
    ],
)
def test_bad_health_values_name_the_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = tmp_path / "conf.toml"
    path.write_text(f"[health]\n{text}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert f"{path}: {key}: " in str(info.value)
    assert reason in str(info.value)


def test_health_defaults() -> None:
    health = load_settings(None).health
    assert (health.max_connections, health.max_connections_per_ip) == (512, 64)
    assert (health.request_timeout, health.idle_timeout) == (10.0, 5.0)
    assert health.allowed_hosts is None and health.metrics_token_sha256 is None


def test_format_address_brackets_ipv6_and_passes_other_addresses_through() -> None:
    assert format_address(("127.0.0.1", 8765)) == "127.0.0.1:8765"
    assert format_address(("::1", 8765, 0, 0)) == "[::1]:8765"  # AF_INET6's 4-tuple
    assert format_address(("fe80::1%eth0", 80, 0, 2)) == "[fe80::1%eth0]:80"
    assert format_address("/run/agentspoonsd.sock") == "/run/agentspoonsd.sock"
