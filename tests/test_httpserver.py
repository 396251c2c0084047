"""httpserver: a real serve_http on a loopback socket, real clients (raw bytes, h11)."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import h11
import pytest
import structlog
import trio
from structlog.testing import LogCapture

from agentspoonsd.httpserver import HttpResponse, log_path, request_head, serve_http
from agentspoonsd.upgrade import UpgradeParser

TIMEOUT = 2.0  # no single step of a test should come close to this


def routes(method: str, target: str) -> HttpResponse:
    path = log_path(target)
    if path == "/healthz":
        return HttpResponse(200, b"ok\n", headers=(("X-Extra", "1"),))
    if path == "/json":
        return HttpResponse(200, b'{"a":1}', content_type="application/json")
    if path == "/boom":
        raise RuntimeError("handler bug")
    if path == "/bad-type":
        return "not a response"  # type: ignore[return-value]
    if path == "/empty":
        return HttpResponse(204, b"ignored")
    return HttpResponse(404, b"not found\n")


@dataclass
class Server:
    port: int
    logs: list[dict[str, Any]]
    scope: trio.CancelScope
    calls: list[tuple[str, str]] = field(default_factory=list)
    streams: list[trio.SocketStream] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs if entry["event"] == name]


@pytest.fixture
async def listener() -> AsyncIterator[trio.SocketListener]:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    lst = trio.SocketListener(sock)
    yield lst
    await lst.aclose()


def capturing_logger() -> tuple[LogCapture, Any]:
    capture = LogCapture()
    log = structlog.wrap_logger(
        structlog.testing.CapturingLogger(),
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    return capture, log


@asynccontextmanager
async def serving(
    listener: trio.SocketListener,
    handler: Callable[[str, str], HttpResponse] = routes,
    **kwargs: Any,
) -> AsyncIterator[Server]:
    capture, log = capturing_logger()
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()
        server = Server(port, capture.entries, scope)

        def recording(method: str, target: str) -> HttpResponse:
            server.calls.append((method, target))
            return handler(method, target)

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await serve_http(listener, recording, log, task_status=task_status, **kwargs)

        await nursery.start(run)
        try:
            yield server
        finally:
            scope.cancel()
            for stream in server.streams:
                await stream.aclose()
    # Every failure a test provokes must be an expected, handled one.
    assert not server.events("http_connection_failed")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """An HTTP/1.1 client on a trio stream, with h11 doing the parsing."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str = "GET", target: str = "/healthz", headers: tuple = (), body: bytes = b""
    ) -> Reply:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("Host", "test"), *headers]
        if body:
            all_headers.append(("Content-Length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> Reply:
        status, headers, body = 0, {}, b""
        with trio.fail_after(TIMEOUT):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return Reply(status, headers, body)
                else:
                    raise AssertionError(f"unexpected {event!r}")


async def connect(server: Server) -> Client:
    """A client connection, closed when `serving` exits."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    server.streams.append(stream)
    return Client(stream)


async def read_until_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends before closing; a reset also counts as closed."""
    data = b""
    with trio.fail_after(TIMEOUT):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data


async def raw_exchange(server: Server, payload: bytes) -> bytes:
    async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
        await stream.send_all(payload)
        return await read_until_eof(stream)


async def test_get_returns_body_and_standard_headers(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        reply = await (await connect(server)).request("GET", "/healthz")
    assert reply.status == 200
    assert reply.body == b"ok\n"
    assert reply.headers["content-length"] == "3"
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert reply.headers["server"] == "agentspoonsd"
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["x-extra"] == "1"
    assert parsedate_to_datetime(reply.headers["date"]).tzinfo is not None
    assert server.calls == [("GET", "/healthz")]
    (entry,) = server.events("http_request")
    assert entry["log_level"] == "debug"
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/healthz", 200)
    assert entry["duration_ms"] >= 0


async def test_handler_content_type(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        reply = await (await connect(server)).request("GET", "/json")
    assert reply.headers["content-type"] == "application/json"
    assert reply.body == b'{"a":1}'


async def test_head_has_get_headers_and_no_body(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        # Raw bytes: any body bytes after the head would show up before the second response.
        payload = (
            b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            await stream.send_all(payload)
            data = b""
            with trio.fail_after(TIMEOUT):
                while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"ok\n"):
                    data += await stream.receive_some(65536)
    head, get = data.split(b"HTTP/1.1 ")[1:]
    assert head.startswith(b"200 OK\r\n")
    assert b"Content-Length: 3\r\n" in head
    assert head.endswith(b"\r\n\r\n")
    assert get.startswith(b"200 OK\r\n") and get.endswith(b"\r\n\r\nok\n")
    assert server.calls == [("HEAD", "/healthz"), ("GET", "/healthz")]


async def test_handler_404(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        reply = await (await connect(server)).request("GET", "/nope")
    assert reply.status == 404
    assert reply.body == b"not found\n"


async def test_204_has_no_body_or_length(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        client = await connect(server)
        reply = await client.request("GET", "/empty")
        again = await client.request("GET", "/healthz")
    assert reply.status == 204
    assert reply.body == b""
    assert "content-length" not in reply.headers
    assert again.status == 200


async def test_post_is_405_and_connection_stays_usable(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        client = await connect(server)
        reply = await client.request("POST", "/healthz", body=b"a=1")
        after = await client.request("GET", "/healthz")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert after.status == 200
    assert server.calls == [("GET", "/healthz")]


async def test_oversized_body_is_413_and_closed(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        payload = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
        data = await raw_exchange(server, payload)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close\r\n" in data


async def test_garbage_is_400_and_closed(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        data = await raw_exchange(server, b"\x00\x01 this is not http\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close\r\n" in data
    assert data.endswith(b"Bad Request\n")
    assert server.events("http_bad_request")[0]["status"] == 400
    assert server.calls == []


@pytest.mark.parametrize("complete", [True, False], ids=["whole-head", "unterminated-head"])
async def test_oversized_headers_are_431_and_closed(
    listener: trio.SocketListener, complete: bool
) -> None:
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000
    async with serving(listener) as server:
        data = await raw_exchange(server, head + (b"\r\n\r\n" if complete else b""))
    assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Connection: close\r\n" in data
    assert server.calls == []


async def test_headers_just_under_the_limit_are_served(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        reply = await (await connect(server)).request(headers=(("X-Big", "a" * 15_000),))
    assert reply.status == 200


async def test_keep_alive_serves_several_requests_on_one_connection(
    listener: trio.SocketListener,
) -> None:
    async with serving(listener) as server:
        client = await connect(server)
        first = await client.request("GET", "/healthz")
        second = await client.request("GET", "/nope")
        third = await client.request("HEAD", "/healthz")
    assert [first.status, second.status, third.status] == [200, 404, 200]
    assert third.body == b""
    assert len(server.calls) == 3


async def test_connection_close_request_is_honoured(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        client = await connect(server)
        reply = await client.request("GET", "/healthz", headers=(("Connection", "close"),))
        rest = await read_until_eof(client.stream)
    assert reply.status == 200
    assert reply.headers["connection"] == "close"
    assert rest == b""


@pytest.mark.parametrize("target", ["/boom", "/bad-type"])
async def test_handler_failure_is_500_logged_and_server_keeps_serving(
    listener: trio.SocketListener, target: str
) -> None:
    async with serving(listener) as server:
        client = await connect(server)
        failed = await client.request("GET", target)
        after = await client.request("GET", "/healthz")
    assert failed.status == 500
    assert failed.body == b"Internal Server Error\n"
    assert after.status == 200
    (entry,) = server.events("http_handler_failed")
    assert entry["exc_info"] is True
    assert entry["log_level"] == "error"
    assert entry["path"] == target


async def test_query_string_never_logged(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        client = await connect(server)
        ok = await client.request("GET", "/healthz?access_token=SECRET123")
        await client.request("GET", "/boom?access_token=SECRET123")
    assert ok.status == 200
    assert server.calls[0] == ("GET", "/healthz?access_token=SECRET123")
    assert [e["path"] for e in server.events("http_request")] == ["/healthz", "/boom"]
    assert "SECRET123" not in repr(server.logs)


async def test_half_sent_request_is_closed_after_timeout(listener: trio.SocketListener) -> None:
    async with serving(listener, request_timeout=0.2) as server:
        stream = (await connect(server)).stream
        started = trio.current_time()
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        data = await read_until_eof(stream)
        elapsed = trio.current_time() - started
    assert data == b""
    assert 0.15 <= elapsed < 1.0
    assert server.events("http_request_timeout")
    assert server.calls == []


async def test_idle_keep_alive_connection_is_closed_after_timeout(
    listener: trio.SocketListener,
) -> None:
    async with serving(listener, request_timeout=0.2) as server:
        client = await connect(server)
        assert (await client.request()).status == 200
        assert await read_until_eof(client.stream) == b""
    assert server.events("http_connection_idle")


async def test_slow_drip_cannot_extend_the_deadline(listener: trio.SocketListener) -> None:
    async with serving(listener, request_timeout=0.3) as server:
        stream = (await connect(server)).stream
        started = trio.current_time()
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(TIMEOUT):
            await stream.send_all(b"GET / HTTP/1.1\r\n")
            while True:
                await trio.sleep(0.05)
                await stream.send_all(b"X: y\r\n")
        assert trio.current_time() - started < 1.0


async def test_cancelling_serve_http_closes_clients_and_keeps_listener(
    listener: trio.SocketListener,
) -> None:
    async with serving(listener) as server:
        client = await connect(server)
        assert (await client.request()).status == 200
        idle = await trio.open_tcp_stream("127.0.0.1", server.port)
        await idle.send_all(b"GET / HTT")  # a half-sent request
        await trio.testing.wait_all_tasks_blocked()
        server.scope.cancel()
        assert await read_until_eof(client.stream) == b""
        assert await read_until_eof(idle) == b""
        await idle.aclose()
    assert listener.socket.fileno() != -1

    async with serving(listener) as again:
        reply = await (await connect(again)).request()
    assert reply.status == 200


async def test_max_connections_answers_503(listener: trio.SocketListener) -> None:
    async with serving(listener, max_connections=1) as server:
        first = await connect(server)
        assert (await first.request()).status == 200

        second = await connect(server)
        refused = await second.request()
        assert refused.status == 503
        assert refused.headers["connection"] == "close"
        assert await read_until_eof(second.stream) == b""
        assert server.events("http_connections_saturated")[0]["max_connections"] == 1

        await first.stream.aclose()
        with trio.fail_after(TIMEOUT):
            while True:  # the server notices the close asynchronously
                third = await connect(server)
                if (reply := await third.request()).status == 200:
                    break
                await trio.sleep(0.01)
        assert reply.body == b"ok\n"


async def test_reset_by_client_does_not_disturb_server(listener: trio.SocketListener) -> None:
    async with serving(listener) as server:
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            # SO_LINGER 0: close sends RST, possibly while the server is writing.
            stream.setsockopt(
                trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            await stream.aclose()
        reply = await (await connect(server)).request()
    assert reply.status == 200
    assert not server.events("http_connection_failed")


def test_log_path_strips_query() -> None:
    assert log_path("/ws?access_token=abc&x=1") == "/ws"
    assert log_path("/healthz") == "/healthz"
    assert log_path("/?") == "/"


# --- upgrades: a path whose connections another server takes over -------------------------------


@dataclass
class Taker:
    """An `Upgrade` that keeps what it is given and answers on the socket itself, then closes."""

    taken: list[tuple[bytes, int]] = field(default_factory=list)

    def __call__(self, sock: socket.socket, data: bytes) -> None:
        self.taken.append((data, sock.fileno()))
        sock.setblocking(True)
        sock.sendall(b"taken over\n")
        sock.close()


UPGRADE_REQUEST = (
    b"GET /ws?access_token=secret&symbols=A HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
# The same, for the cases answered by the HTTP server: closed after the answer, not kept alive.
ONE_SHOT = UPGRADE_REQUEST.replace(b"Connection: Upgrade", b"Connection: Upgrade, close")


async def test_upgrade_path_hands_the_socket_and_the_request_over(
    listener: trio.SocketListener,
) -> None:
    taker = Taker()
    async with serving(listener, max_connections=1, upgrades={"/ws": taker}) as server:
        early = b"\x81\x00"  # a client that did not wait for the answer: follows the head
        answer = await raw_exchange(server, UPGRADE_REQUEST + early)
        assert answer == b"taken over\n"  # nothing from the HTTP server before or after
        [(data, fd)] = taker.taken
        assert fd >= 0
        head, rest = data.split(b"\r\n\r\n", 1)
        assert rest == early
        # The same request again for whoever parses it next: the WebSocket's own parser.
        request = UpgradeParser().feed(head + b"\r\n\r\n")
        assert request is not None and request.target == "/ws?access_token=secret&symbols=A"
        assert dict(request.headers)[b"sec-websocket-key"] == b"dGhlIHNhbXBsZSBub25jZQ=="
        assert server.calls == []
        # Only the exact path, any query.
        other_path = ONE_SHOT.replace(b"/ws?", b"/ws/?")
        assert (await raw_exchange(server, other_path)).startswith(b"HTTP/1.1 404 ")
        # The connection left this server's count (max_connections = 1): the next is served.
        assert (await (await connect(server)).request()).status == 200
    assert [e["path"] for e in server.events("http_upgrade")] == ["/ws"]
    assert "secret" not in repr(server.logs)


async def test_upgrade_path_keeps_the_http_ports_admission_and_policy(
    listener: trio.SocketListener,
) -> None:
    taker = Taker()
    options: dict[str, Any] = {
        "max_connections_per_ip": 1,
        "allowed_hosts": frozenset({"test"}),
        "upgrades": {"/ws": taker},
    }
    async with serving(listener, **options) as server:
        held = await connect(server)
        assert (await held.request()).status == 200
        # Past the HTTP port's per-address cap: refused here, never handed over.
        assert (await raw_exchange(server, UPGRADE_REQUEST)).startswith(b"HTTP/1.1 429 ")
        await held.stream.aclose()
        with trio.fail_after(TIMEOUT):
            while True:  # the server notices the close asynchronously
                if (await raw_exchange(server, UPGRADE_REQUEST)).startswith(b"taken"):
                    break
                await trio.sleep(0.01)
        other_host = ONE_SHOT.replace(b"Host: test", b"Host: elsewhere")
        assert (await raw_exchange(server, other_host)).startswith(b"HTTP/1.1 421 ")
        head = ONE_SHOT.replace(b"GET ", b"HEAD ", 1)
        assert (await raw_exchange(server, head)).startswith(b"HTTP/1.1 404 ")
        post = ONE_SHOT.replace(b"GET ", b"POST ", 1)
        assert (await raw_exchange(server, post)).startswith(b"HTTP/1.1 405 ")
    assert len(taker.taken) == 1


async def test_a_failing_upgrade_is_logged_and_the_server_keeps_serving(
    listener: trio.SocketListener,
) -> None:
    def broken(sock: socket.socket, data: bytes) -> None:
        raise RuntimeError("upgrade bug")

    async with serving(listener, upgrades={"/ws": broken}) as server:
        assert await raw_exchange(server, UPGRADE_REQUEST) == b""  # closed, not leaked
        assert (await (await connect(server)).request()).status == 200
    assert server.events("http_upgrade_failed")


@pytest.mark.parametrize(
    "raw",
    [
        UPGRADE_REQUEST,
        b"GET /ws HTTP/1.0\r\nHost: h\r\nX-Odd:   spaced value \r\nx-dup: 1\r\nX-Dup: 2\r\n\r\n",
    ],
)
def test_request_head_reads_back_as_the_same_request(raw: bytes) -> None:
    parsed = h11.Connection(h11.SERVER)
    parsed.receive_data(raw)
    event = parsed.next_event()
    assert isinstance(event, h11.Request)
    head = request_head(
        event.method.decode(),
        event.target.decode(),
        event.http_version.decode(),
        tuple(event.headers),
    )
    again = h11.Connection(h11.SERVER)
    again.receive_data(head)
    reread = again.next_event()
    assert isinstance(reread, h11.Request)
    assert (reread.method, reread.target, reread.http_version) == (
        event.method,
        event.target,
        event.http_version,
    )
    assert list(reread.headers) == list(event.headers)
