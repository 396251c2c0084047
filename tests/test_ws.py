"""The WebSocket server in-process: real listening socket, real Hub, real WebSocket clients.

The tests that hold for both transports (ids `ws` and `wss`) run over plain TCP and over TLS;
the TLS-only ones are in test_tls.py.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Ping, Request, TextMessage

from agentspoonsd.auth import TokenStore, hash_token, new_token
from agentspoonsd.daemon import bind_listener
from agentspoonsd.hub import Hub
from agentspoonsd.market.bar import Bar
from agentspoonsd.metrics import Stats
from agentspoonsd.settings import TokenSettings
from agentspoonsd.ws import WebSocketServer
from helpers import (
    SYMBOLS,
    TOKEN,
    Running,
    bar,
    make_pki,
    next_update,
    read_to_close,
    serving,
)
from server_limits import make_limits


@pytest.fixture
async def running(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    """The server in-process; `request.param` overrides limits, and `"tls": True` serves wss."""
    limits = dict(getattr(request, "param", {}))
    pki = make_pki(tmp_path / "pki") if limits.pop("tls", False) else None
    async with serving(pki, **limits) as server:
        yield server


# The tests that hold for both transports: plain WebSocket and WebSocket over TLS.
BOTH = pytest.mark.parametrize("running", [{}, {"tls": True}], ids=["ws", "wss"], indirect=True)


@BOTH
async def test_every_client_gets_every_update_in_order(running: Running) -> None:
    clients = 20
    updates = 200
    received: dict[int, list[int]] = {}

    async def client(index: int, ready: trio.Event) -> None:
        async with running.connect() as ws:
            hello = json.loads(await ws.get_message())
            assert hello["type"] == "connected" and hello["symbols"] == SYMBOLS
            ready.set()
            seqs = received.setdefault(index, [])
            while len(seqs) < updates:
                message = json.loads(await ws.get_message())
                if message["data"]["symbol"] == "BTC/USD":
                    seqs.append(message["data"]["seq"])

    async with trio.open_nursery() as nursery:
        for index in range(clients):
            ready = trio.Event()
            nursery.start_soon(client, index, ready)
            await ready.wait()
        for i in range(updates):
            running.hub.publish([bar("BTC/USD", 100 + i), bar("ETH/USD", 10 + i)])
            await trio.lowlevel.checkpoint()
    assert all(seqs == list(range(1, updates + 1)) for seqs in received.values())
    assert len(received) == clients


@BOTH
async def test_frames_never_interleave_with_pings_and_replies(running: Running) -> None:
    """Control frames, replies and broadcasts share one write path; a strict client parses all."""
    async with running.connect() as ws:
        await ws.get_message()
        seqs: list[int] = []
        pongs = 0

        async def reader() -> None:
            nonlocal pongs
            while len(seqs) < 300 or pongs < 50:
                message = json.loads(await ws.get_message())
                if message["type"] == "pong":
                    pongs += 1
                else:
                    seqs.append(message["data"]["seq"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(300):
                running.publish(close=100 + i)
                if i % 6 == 0:
                    await ws.send_message('{"type": "ping"}')
                    await ws.ping(str(i).encode())  # waits for the WebSocket pong
                await trio.lowlevel.checkpoint()
        assert seqs == list(range(1, 301)) and pongs == 50


# The daemon's default SO_SNDBUF (settings: server.send_buffer_bytes), so the kernel holds a few
# hundred updates for the never-reading client instead of the megabytes autotuning gives it.
@pytest.mark.parametrize(
    "running",
    [{"send_buffer_bytes": 32 * 1024}, {"send_buffer_bytes": 32 * 1024, "tls": True}],
    ids=["ws", "wss"],
    indirect=True,
)
async def test_never_reading_client_is_cut_at_its_cap_alone(running: Running) -> None:
    good_seqs: list[int] = []
    slow_stream, slow_ws = await running.open_raw_client(rcvbuf=4096)
    async with running.connect() as good:
        await good.get_message()
        caught_up = trio.Event()

        async def read_good() -> None:
            while True:
                good_seqs.append((await next_update(good))["data"]["seq"])
                if len(good_seqs) == published and running.stats.backlog_overflows:
                    caught_up.set()

        published = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_good)
            # Paced so the reading client keeps up; the never-reading one fills its buffers.
            while not running.stats.backlog_overflows and published < 100_000:
                for _ in range(10):
                    running.publish(close=1e300)
                    published += 1
                await trio.sleep(0.001)
            if len(good_seqs) == published:
                caught_up.set()
            # The slow client, reading at last, finds a well-formed stream (decrypted, over TLS)
            # closed with 1013.
            with trio.fail_after(5):
                messages, code = await read_to_close(slow_stream, slow_ws, answer=True)
            assert code == 1013
            seqs = [m["data"]["seq"] for m in messages if m["type"] == "volatility_update"]
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < published
            with trio.fail_after(10):
                await caught_up.wait()
                # The server exposes no event for a client reaped: polled, bounded above.
                while running.server.client_count > 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert running.stats.disconnects["backlog_overflow"] == 1
        assert good_seqs == list(range(1, published + 1))
    await slow_stream.aclose()


@pytest.mark.parametrize("running", [{"max_connections": 2}], indirect=True)
async def test_capacity_is_an_http_503_before_upgrade(running: Running) -> None:
    async with open_websocket_url(running.url), open_websocket_url(running.url):
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(running.url):
                pass
        assert rejected.value.status_code == 503
        assert dict(rejected.value.headers)[b"retry-after"] == b"5"
    assert running.stats.rejected_upgrades["capacity"] == 1


async def test_oversized_message_closes_with_1009(running: Running) -> None:
    async with open_websocket_url(running.url) as ws:
        await ws.get_message()
        await ws.send_message("x" * 5000)
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(5):
            while True:
                await ws.get_message()
        assert closed.value.reason.code == 1009


@pytest.mark.parametrize("running", [{"handshake_timeout": 0.2}], indirect=True)
async def test_silent_connection_hits_the_handshake_timeout(running: Running) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    with trio.fail_after(3):
        assert await stream.receive_some() == b""  # closed by the server after 0.2 s
    await stream.aclose()
    assert running.stats.rejected_upgrades["handshake_timeout"] == 1


async def test_plain_http_request_gets_an_http_error(running: Running) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    response = b""
    with trio.fail_after(3):
        while chunk := await stream.receive_some():
            response += chunk
    assert response.startswith(b"HTTP/1.1 4")
    await stream.aclose()


async def test_drain_closes_every_client_with_1001(running: Running) -> None:
    async with open_websocket_url(running.url) as a, open_websocket_url(running.url) as b:
        await a.get_message()
        await b.get_message()
        with trio.fail_after(3):
            await running.server.drain()
        assert running.server.client_count == 0 and not running.server.listening
        for ws in (a, b):
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1001
    with pytest.raises(OSError):  # the listener is closed: refused at once
        await trio.open_tcp_stream("127.0.0.1", running.port)


async def test_cancelling_run_aborts_clients_and_keeps_the_listener() -> None:
    listener = bind_listener("127.0.0.1", 0, 8)
    stats = Stats()
    _, receive = trio.open_memory_channel[list[Bar]](1)
    hub = Hub(SYMBOLS, receive, stats)
    limits = make_limits(
        max_connections=10, max_backlog_bytes=65536, max_message_size=4096, handshake_timeout=1.0
    )
    server = WebSocketServer(
        listener, hub, TokenStore([], enabled=False), limits, stats, structlog.get_logger()
    )
    url = f"ws://127.0.0.1:{listener.getsockname()[1]}/"
    closed_seen = False
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with server_scope:
                await server.run(task_status=task_status)

        await outer.start(serve)
        async with open_websocket_url(url) as ws:
            await ws.get_message()
            server_scope.cancel()
            with pytest.raises(ConnectionClosed), trio.fail_after(2):
                await ws.get_message()
            closed_seen = True
    assert closed_seen
    assert server.client_count == 0 and stats.clients_connected == 0
    # The listening socket belongs to the caller: a restarted run() serves on it again.
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with open_websocket_url(url) as ws:
            assert json.loads(await ws.get_message())["type"] == "connected"
        nursery.cancel_scope.cancel()
    listener.close()


def test_bind_listener_refuses_a_taken_port() -> None:
    first = bind_listener("127.0.0.1", 0, 8)
    try:
        with pytest.raises(OSError):
            taken = socket.socket()
            taken.bind(("127.0.0.1", first.getsockname()[1]))
    finally:
        taken.close()
        first.close()


# --- the client protocol (docs/PROTOCOL.md) ------------------------------------------------------


async def request(ws, message: dict) -> dict:
    """Send one request; return the first reply that is not a broadcast update."""
    await ws.send_message(json.dumps(message))
    while True:
        reply = json.loads(await ws.get_message())
        if reply["type"] != "volatility_update":
            return reply


def publish(running: Running, count: int, symbol: str = "BTC/USD") -> None:
    for i in range(count):
        running.hub.publish([bar(symbol, 100 + i)])


async def test_connected_lists_subscription_and_limits(running: Running) -> None:
    async with open_websocket_url(running.url) as ws:
        hello = json.loads(await ws.get_message())
    assert hello["symbols"] == SYMBOLS and hello["available"] == SYMBOLS
    assert hello["history_size"] == 1000
    assert hello["ping_interval"] == 20.0 and hello["idle_timeout"] == 60.0


async def test_subscribe_and_unsubscribe(running: Running) -> None:
    async with open_websocket_url(running.url + "&symbols=") as ws:
        assert json.loads(await ws.get_message())["symbols"] == []
        publish(running, 1)  # not subscribed: not received
        reply = await request(ws, {"type": "subscribe", "symbols": ["ETH/USD"]})
        assert reply == {"type": "subscribed", "symbols": ["ETH/USD"]}
        reply = await request(ws, {"type": "subscribe", "symbols": ["*"]})
        assert reply == {"type": "subscribed", "symbols": SYMBOLS}
        reply = await request(ws, {"type": "unsubscribe", "symbols": ["BTC/USD"]})
        assert reply == {"type": "unsubscribed", "symbols": ["ETH/USD"]}
        publish(running, 1, "BTC/USD")
        publish(running, 1, "ETH/USD")
        assert (await next_update(ws))["data"]["symbol"] == "ETH/USD"
        reply = await request(ws, {"type": "unsubscribe", "symbols": ["*"]})
        assert reply == {"type": "unsubscribed", "symbols": []}


async def test_symbol_errors_change_nothing(running: Running) -> None:
    async with open_websocket_url(running.url + "&symbols=BTC/USD") as ws:
        await ws.get_message()
        reply = await request(ws, {"type": "subscribe", "symbols": ["ETH/USD", "DOGE/USD"]})
        assert reply["code"] == "unknown_symbol" and reply["symbol"] == "DOGE/USD"
        reply = await request(ws, {"type": "history", "symbol": "NOPE"})
        assert reply["code"] == "unknown_symbol"
        reply = await request(ws, {"type": "unsubscribe", "symbols": ["NOPE"]})
        assert reply["code"] == "unknown_symbol"
        reply = await request(ws, {"type": "resume", "from": {"BTC/USD": 0}})
        assert reply["code"] == "already_subscribed" and reply["symbol"] == "BTC/USD"
        reply = await request(ws, {"type": "unsubscribe", "symbols": ["ETH/USD"]})
        assert reply == {"type": "unsubscribed", "symbols": ["BTC/USD"]}  # still as before


async def test_forbidden_symbols(running: Running) -> None:
    token = new_token()
    running.server.auth = TokenStore(
        [TokenSettings(name="eth-only", sha256=hash_token(token), symbols=["ETH/USD"])]
    )
    url = f"ws://127.0.0.1:{running.port}/?access_token={token}&symbols=BTC/USD,ETH/USD"
    async with open_websocket_url(url) as ws:
        hello = json.loads(await ws.get_message())
        assert hello["symbols"] == ["ETH/USD"] and hello["available"] == ["ETH/USD"]
        error = json.loads(await ws.get_message())
        assert error["code"] == "forbidden_symbol" and error["symbol"] == "BTC/USD"
        reply = await request(ws, {"type": "history", "symbol": "BTC/USD"})
        assert reply["code"] == "forbidden_symbol"
        reply = await request(ws, {"type": "subscribe", "symbols": ["*"]})
        assert reply == {"type": "subscribed", "symbols": ["ETH/USD"]}


async def test_a_token_that_allows_no_published_symbol_is_told_so(running: Running) -> None:
    """Not a silent empty stream: `no_symbols` right after `connected`, whatever the URL asks
    (the default subscription, named symbols, resume); the connection stays usable."""
    token = new_token()
    running.server.auth = TokenStore(
        [TokenSettings(name="doge", sha256=hash_token(token), symbols=["DOGE/USD", "btc/usd"])]
    )
    base = f"ws://127.0.0.1:{running.port}/?access_token={token}"
    with trio.fail_after(10):
        await _each_told_no_symbols(base)


async def _each_told_no_symbols(base: str) -> None:
    for query, then in (
        ("", []),
        ("&symbols=", []),
        ("&symbols=BTC/USD", [("forbidden_symbol", "BTC/USD")]),
        ("&resume=ETH/USD:3", [("forbidden_symbol", "ETH/USD")]),
    ):
        async with open_websocket_url(base + query) as ws:
            hello = json.loads(await ws.get_message())
            assert hello["type"] == "connected", query
            assert hello["symbols"] == hello["available"] == []
            error = json.loads(await ws.get_message())
            assert error["type"] == "error" and error["code"] == "no_symbols", query
            assert "doge" in error["message"] and "BTC/USD" in error["message"]
            for code, symbol in then:
                error = json.loads(await ws.get_message())
                assert (error["code"], error["symbol"]) == (code, symbol)
            reply = await request(ws, {"type": "ping"})
            assert reply["type"] == "pong"


async def test_a_token_that_allows_a_published_symbol_gets_no_no_symbols_error(
    running: Running,
) -> None:
    token = new_token()
    running.server.auth = TokenStore(
        [TokenSettings(name="mixed", sha256=hash_token(token), symbols=["DOGE/USD", "ETH/USD"])]
    )
    url = f"ws://127.0.0.1:{running.port}/?access_token={token}"
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            hello = json.loads(await ws.get_message())
            assert hello["available"] == ["ETH/USD"]
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"  # nothing before it


async def test_history_is_the_newest_updates_oldest_first(running: Running) -> None:
    publish(running, 30)
    async with open_websocket_url(running.url + "&symbols=") as ws:
        await ws.get_message()
        reply = await request(ws, {"type": "history", "symbol": "BTC/USD", "limit": 5})
        assert reply["type"] == "history" and reply["symbol"] == "BTC/USD"
        assert [u["seq"] for u in reply["updates"]] == [26, 27, 28, 29, 30]
        assert reply["updates"][-1]["price"] == 129.0
        reply = await request(ws, {"type": "history", "symbol": "ETH/USD"})
        assert reply["updates"] == []


async def test_resume_is_gap_free_and_atomic(running: Running) -> None:
    publish(running, 50)
    async with open_websocket_url(running.url + "&symbols=") as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"type": "resume", "from": {"BTC/USD": 41}}))
        # Published while the request is in flight: it must come after the replay, once.
        publish(running, 5)
        assert json.loads(await ws.get_message()) == {
            "type": "subscribed",
            "symbols": ["BTC/USD"],
        }
        got = [(await next_update(ws))["data"]["seq"] for _ in range(14)]
        assert got == list(range(42, 56))


async def test_resume_in_the_url(running: Running) -> None:
    publish(running, 10)
    publish(running, 3, "ETH/USD")
    async with open_websocket_url(running.url + "&resume=BTC/USD:7") as ws:
        hello = json.loads(await ws.get_message())
        assert hello["symbols"] == ["BTC/USD"]  # resume alone: nothing else
        got = [(await next_update(ws))["data"]["seq"] for _ in range(3)]
        assert got == [8, 9, 10]
        publish(running, 1)
        publish(running, 1, "ETH/USD")
        assert (await next_update(ws))["data"] == {**running.hub.last_update["BTC/USD"]["data"]}


async def test_resume_past_the_history_starts_with_reset(running: Running) -> None:
    publish(running, 1005)  # the ring holds 1000: seq 6..1005
    async with open_websocket_url(running.url + "&symbols=") as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"type": "resume", "from": {"BTC/USD": 2}}))
        assert json.loads(await ws.get_message())["type"] == "subscribed"
        reset = json.loads(await ws.get_message())
        assert reset == {"type": "reset", "symbol": "BTC/USD", "oldest_seq": 6, "latest_seq": 1005}
        first = await next_update(ws)
        assert first["data"]["seq"] == 6


async def test_rate_limit_and_too_many_errors_close_1008(running: Running) -> None:
    running.server.limits = make_limits(
        max_connections=100,
        max_backlog_bytes=65536,
        max_message_size=4096,
        handshake_timeout=1.0,
        max_client_messages_per_second=5,
        max_client_errors=3,
    )
    async with open_websocket_url(running.url) as ws:
        await ws.get_message()
        for _ in range(10):
            await ws.send_message('{"type": "ping"}')
        replies = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                replies.append(json.loads(await ws.get_message()))
        codes = [r.get("code") for r in replies if r["type"] == "error"]
        assert [r["type"] for r in replies[:5]] == ["pong"] * 5
        assert codes[:4] == ["rate_limited"] * 4
        assert closed.value.reason.code == 1008
    assert running.stats.disconnects["too_many_errors"] == 1


async def test_first_ping_right_after_connecting_and_its_pong_moves_the_client_first(
    running: Running,
) -> None:
    """The server pings a new client at once, before `connected` (not after ping_interval, 20 s
    here); answering puts the client first in the broadcast order, ahead of one that connected
    later but has not answered."""

    async def connect() -> tuple[trio.SocketStream, WSConnection, list]:
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="x", target=f"/?access_token={TOKEN}")))
        events: list = []
        with trio.fail_after(3):
            while not any(isinstance(e, Ping) for e in events):
                ws.receive_data(await stream.receive_some() or None)
                events.extend(ws.events())
        return stream, ws, events

    first, first_ws, events = await connect()
    assert [type(e).__name__ for e in events[:2]] == ["AcceptConnection", "Ping"]
    with trio.fail_after(3):
        while not any(isinstance(e, TextMessage) for e in events):
            first_ws.receive_data(await first.receive_some())
            events.extend(first_ws.events())
    assert json.loads(events[2].data)["type"] == "connected"  # the first message
    second, _, _ = await connect()  # never answers
    clients = list(running.server._clients.values())
    early, late = sorted(clients, key=lambda c: c.connected_at)
    assert running.hub.broadcast_order("BTC/USD") == [late, early]  # nobody answered: newest
    await first.send_all(first_ws.send(events[1].response()))
    with trio.fail_after(3):
        while running.hub.broadcast_order("BTC/USD") != [early, late]:  # noqa: ASYNC110
            await trio.sleep(0.01)
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("running", [{"ping_interval": 0.1, "idle_timeout": 0.35}], indirect=True)
async def test_pings_and_idle_timeout(running: Running) -> None:
    # A raw client that reads but never answers anything: pings arrive, then the idle close.
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="x", target=f"/?access_token={TOKEN}")))
    pings, code = 0, None
    with trio.fail_after(3):
        while code is None:
            ws.receive_data(await stream.receive_some() or None)
            for event in ws.events():
                if type(event).__name__ == "Ping":
                    pings += 1  # deliberately not answered
                elif isinstance(event, CloseConnection):
                    code = event.code
    assert code == 1001 and pings >= 2
    await stream.aclose()
    # A client that answers the pings stays past idle_timeout. (Raw wsproto: trio-websocket 0.12
    # crashes when a ping, every 0.1 s here, arrives while it is closing; its issue #184.)
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="x", target=f"/?access_token={TOKEN}")))
    answered = 0
    started = trio.current_time()
    with trio.fail_after(3):
        while answered < 6:  # the first comes at once: six span 0.5 s, past idle_timeout
            ws.receive_data(await stream.receive_some() or None)
            for event in ws.events():
                assert not isinstance(event, CloseConnection)
                if isinstance(event, Ping):
                    await stream.send_all(ws.send(event.response()))
                    answered += 1
    assert trio.current_time() - started > 0.35 and running.server.client_count == 1
    await stream.aclose()


# --- permessage-deflate ------------------------------------------------------------------------


async def test_deflate_clients_get_one_shared_compressed_frame(running: Running) -> None:
    """A client offering permessage-deflate (RFC 7692) gets compressed frames that it inflates
    into exactly what an uncompressed client receives; the frame is made once per update."""
    import websockets.asyncio.client  # asyncio: run in a thread with its own loop

    def deflate_client(url: str, count: int) -> tuple[str | None, list[dict]]:
        import asyncio

        async def main() -> tuple[str | None, list[dict]]:
            async with websockets.asyncio.client.connect(url) as ws:  # offers deflate
                extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
                json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "history", "symbol": "BTC/USD", "limit": 3}))
                got = []
                while len(got) < count:
                    got.append(json.loads(await ws.recv()))
                return extensions, got

        return asyncio.run(main())

    publish(running, 5)
    async with open_websocket_url(running.url + "&symbols=BTC/USD") as plain:
        await plain.get_message()
        async with trio.open_nursery() as nursery:
            result: dict = {}

            async def run_deflate() -> None:
                result["value"] = await trio.to_thread.run_sync(
                    deflate_client, running.url + "&symbols=BTC/USD", 4
                )

            nursery.start_soon(run_deflate)
            while running.server.client_count < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
            await trio.sleep(0.2)  # the history request is answered
            publish(running, 3)
        extensions, got = result["value"]
        plain_updates = [await next_update(plain) for _ in range(3)]
    assert extensions is not None and extensions.startswith("permessage-deflate")
    assert "server_no_context_takeover" in extensions
    assert got[0]["type"] == "history" and [u["seq"] for u in got[0]["updates"]] == [3, 4, 5]
    assert got[1:] == plain_updates  # inflated, identical


async def test_deflate_can_be_switched_off(running: Running) -> None:
    running.server.limits = make_limits(
        max_connections=100,
        max_backlog_bytes=65536,
        max_message_size=4096,
        handshake_timeout=1.0,
        permessage_deflate=False,
    )
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    await stream.send_all(
        b"GET /?access_token=" + TOKEN.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some()
    assert head.startswith(b"HTTP/1.1 101") and b"permessage-deflate" not in head.lower()
    await stream.aclose()


# --- admission: origins and limits (before the upgrade) ------------------------------------------


async def upgrade_status(port: int, target: str, *headers: bytes) -> tuple[int, bytes]:
    """Send one upgrade request by hand; the HTTP status and the whole head of the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some()
        if not chunk:
            break
        head += chunk
    await stream.aclose()
    return int(head.split(b" ", 2)[1]), head


@pytest.mark.parametrize(
    "running",
    [{"allowed_origins": frozenset({"https://dash.example.com"})}],
    indirect=True,
)
async def test_foreign_origins_get_403_before_the_upgrade(running: Running) -> None:
    target = f"/?access_token={TOKEN}"
    status, _ = await upgrade_status(running.port, target, b"Origin: https://evil.example.net")
    assert status == 403
    status, _ = await upgrade_status(running.port, target, b"Origin: https://Dash.example.com/")
    assert status == 101
    status, _ = await upgrade_status(running.port, target)  # no Origin: not a browser
    assert status == 101
    assert running.stats.rejected_upgrades["origin"] == 1


@pytest.mark.parametrize("running", [{"max_connections_per_ip": 2}], indirect=True)
async def test_per_address_limit_is_429_with_retry_after(running: Running) -> None:
    async with open_websocket_url(running.url), open_websocket_url(running.url):
        status, head = await upgrade_status(running.port, f"/?access_token={TOKEN}")
        assert status == 429 and b"Retry-After:" in head
    assert running.stats.rejected_upgrades["per_ip"] == 1
    async with open_websocket_url(running.url) as ws:  # counts went back down
        assert json.loads(await ws.get_message())["type"] == "connected"


@pytest.mark.parametrize("running", [{"max_auth_failures_per_minute": 3}], indirect=True)
async def test_repeated_auth_failures_from_an_address_get_429(running: Running) -> None:
    for _ in range(3):
        status, _ = await upgrade_status(running.port, "/?access_token=wrong")
        assert status == 401
    status, head = await upgrade_status(running.port, "/?access_token=wrong")
    assert status == 429 and b"Retry-After:" in head
    status, _ = await upgrade_status(running.port, f"/?access_token={TOKEN}")
    assert status == 101  # a valid token is never locked out (tests/test_ws_hardening.py)
    assert running.stats.rejected_upgrades["auth_rate_limited"] == 1


async def test_revoked_token_connections_close_with_4001(running: Running) -> None:
    other = new_token()
    running.server.auth = TokenStore(
        [
            TokenSettings(name="test", sha256=hash_token(TOKEN)),
            TokenSettings(name="other", sha256=hash_token(other)),
        ]
    )
    other_url = f"ws://127.0.0.1:{running.port}/?access_token={other}"
    async with open_websocket_url(running.url) as revoked, open_websocket_url(other_url) as kept:
        await revoked.get_message()
        await kept.get_message()
        assert running.server.close_token_connections({"test", "unused"}) == {"test": 1}
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(3):
            while True:
                await revoked.get_message()
        assert closed.value.reason.code == 4001
        publish(running, 1)
        assert (await next_update(kept))["data"]["symbol"] == "BTC/USD"


def server_side_cycles(garbage: list[object]) -> list[str]:
    """The server's connection objects among `garbage` (the clients' are not ours)."""
    from wsproto.connection import Connection
    from wsproto.frame_protocol import FrameProtocol

    from agentspoonsd.outbox import Outbox
    from agentspoonsd.upgrade import UpgradeParser
    from agentspoonsd.ws import Peer

    found = []
    for obj in garbage:
        if isinstance(obj, Peer | Outbox | UpgradeParser):
            found.append(type(obj).__name__)
        elif isinstance(obj, FrameProtocol | Connection) and obj.client is False:
            found.append(f"server {type(obj).__name__}")
    return found


@pytest.mark.parametrize("running", [{"handshake_timeout": 0.2}], indirect=True)
async def test_a_finished_connection_leaves_no_reference_cycle(running: Running) -> None:
    """Freed by reference counting the moment it ends: nothing waits for the cyclic collector,
    whose full collections would pause every client (the daemon runs them rarely). Nor does
    anything the broadcast encodes."""
    import gc
    import weakref

    from wsproto.frame_protocol import FrameProtocol

    async def polite() -> None:
        stream, ws = await running.open_raw_client(65536)
        await stream.send_all(ws.send(CloseConnection(code=1000)))
        await read_to_close(stream, ws)
        await stream.aclose()

    async def abrupt() -> None:
        stream, _ = await running.open_raw_client(65536)
        publish(running, 1)
        await stream.aclose()

    async def answers_then_leaves() -> None:  # what nearly every client does: pong, a request
        stream, ws = await running.open_raw_client(65536)
        await stream.send_all(ws.send(Ping().response()) + ws.send(TextMessage('{"type":"ping"}')))
        replies: list[dict] = []
        with trio.fail_after(5):  # the server has read both once the request is answered
            while not any(r["type"] == "pong" for r in replies):
                ws.receive_data(await stream.receive_some(65536))
                replies += [json.loads(e.data) for e in ws.events() if isinstance(e, TextMessage)]
        await stream.aclose()

    async def refused() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        await stream.receive_some(4096)
        await stream.aclose()

    async def silent() -> None:  # cut by the handshake timeout
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        await stream.receive_some(4096)
        await stream.aclose()

    await polite()  # first use: imports and caches are not the connection's
    gc.collect()
    gc.disable()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(5):  # the silent ones wait out their timeout together
                nursery.start_soon(silent)
            for _ in range(5):
                for connect in (polite, abrupt, answers_then_leaves, refused):
                    await connect()
        with trio.fail_after(5):
            await running.server.wait_idle()
        # wsproto's parser is a generator holding its FrameProtocol: a cycle that a finalizer
        # breaks during the collection, so it never shows in gc.garbage. Watch it vanish.
        parsers = [
            weakref.ref(o)
            for o in gc.get_objects()
            if isinstance(o, FrameProtocol) and o.client is False
        ]
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        assert server_side_cycles(gc.garbage) == []
        assert [ref for ref in parsers if ref() is None] == [], "server frame parsers in cycles"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert running.stats.disconnects["close_1000"] >= 5


@pytest.mark.parametrize("running", [{"send_buffer_bytes": 65536}], indirect=True)
async def test_client_sockets_get_the_configured_send_buffer(running: Running) -> None:
    """What the kernel may hold for one client is bounded (Linux doubles the value asked)."""
    stream, _ = await running.open_raw_client(65536)
    (client,) = running.server._clients.values()
    assert client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536
    await stream.aclose()
