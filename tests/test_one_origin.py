"""One origin: the WebSocket on the HTTP port too (`/ws`), end to end.

The real daemon in a subprocess and real WebSocket clients (trio-websocket): a client of the HTTP
port's /ws is served by the same WebSocket server as one of the WebSocket port (same admission,
authentication, limits and fan-out), so the two see the same updates; `[server] public_url` says
where a reverse proxy serves the HTTP port. nginx in front of it: tests/test_one_origin_proxy.py.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trustme
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from agentspoonsd.auth import TokenStore, hash_token
from agentspoonsd.daemon import bind_listener
from agentspoonsd.frames import encode_text_frame
from agentspoonsd.history import History
from agentspoonsd.httppolicy import PublicUrl
from agentspoonsd.hub import Hub
from agentspoonsd.market.bar import Bar
from agentspoonsd.metrics import Stats
from agentspoonsd.settings import TokenSettings
from agentspoonsd.ws import WebSocketServer
from daemon_process import DaemonProcess, config_text, http_get, new_token
from helpers import bearer
from server_limits import make_limits

TIMEOUT = 10.0

Start = Callable[..., DaemonProcess]


@pytest.fixture
def start(daemon_factory: Start) -> Start:
    return daemon_factory  # conftest.py


def server_keys(text: str, keys: str) -> str:
    """`text` (a config_text) with `keys` added to its [server] table."""
    head = "[server]\n"
    assert text.count(head) == 1
    return text.replace(head, head + keys, 1)


async def message(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        return json.loads(await ws.get_message())


async def updates(ws: WebSocketConnection, count: int) -> dict[tuple[str, int], dict[str, Any]]:
    """The next `count` updates, by (symbol, seq)."""
    seen = {}
    while len(seen) < count:
        reply = await message(ws)
        if reply["type"] == "volatility_update":
            data = reply["data"]
            seen[data["symbol"], data["seq"]] = data
    return seen


async def test_http_ports_ws_is_the_same_stream_as_the_websocket_port(start: Start) -> None:
    token = new_token()
    daemon = start(config_text(tokens={"both": token}))
    ws_port, http_port = await daemon.ports()
    headers = bearer(token)
    async with (
        open_websocket_url(f"ws://127.0.0.1:{ws_port}/", extra_headers=headers) as direct,
        open_websocket_url(f"ws://127.0.0.1:{http_port}/ws?access_token={token}") as same_origin,
    ):
        greetings = [await message(direct), await message(same_origin)]
        assert [g["type"] for g in greetings] == ["connected", "connected"]
        assert greetings[0]["symbols"] == greetings[1]["symbols"] == ["BTC/USD", "ETH/USD"]
        assert greetings[1]["token"] == "both"
        first, second = await updates(direct, 8), await updates(same_origin, 8)
        # One fan-out: the updates both saw are the same, field for field (seq included).
        common = first.keys() & second.keys()
        assert common, (sorted(first), sorted(second))
        assert all(first[key] == second[key] for key in common)
        _, _, metrics = await http_get(http_port, "/metrics")
        assert b"agentspoonsd_clients_connected 2.0" in metrics
    connected = [e for e in daemon.events if e.get("event") == "client_connected"]
    assert len(connected) == 2 and {e["token"] for e in connected} == {"both"}
    assert token not in daemon.log_text


async def test_http_ports_ws_refuses_as_the_websocket_port_does(start: Start) -> None:
    token = new_token()
    daemon = start(config_text(tokens={"t": token}))
    _, http_port = await daemon.ports()
    base = f"ws://127.0.0.1:{http_port}/ws"
    for target, headers in [
        (base, []),
        (f"{base}?access_token=not-a-token", []),
        (base, [(b"Authorization", b"Bearer not-a-token")]),
    ]:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(target, extra_headers=headers):
                pass
        assert rejected.value.status_code == 401
        assert dict(rejected.value.headers)[b"www-authenticate"].startswith(b"Bearer ")
    # A browser page of another site (cross-site WebSocket hijacking): 403, as on the port.
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(
            f"{base}?access_token={token}", extra_headers=[(b"Origin", b"https://evil.example")]
        ):
            pass
    assert rejected.value.status_code == 403
    # A plain GET of /ws is the WebSocket server's answer too (426), not the HTTP port's 404.
    status, headers, _ = await http_get(http_port, "/ws")
    assert status == 426 and headers["Upgrade"] == "websocket"
    refused = [e["reason"] for e in daemon.events if e.get("event") == "auth_failed"]
    assert refused == ["missing_token", "invalid_token", "invalid_token"]


async def test_per_address_limits_count_both_ports(start: Start) -> None:
    token = new_token()
    daemon = start(server_keys(config_text(tokens={"t": token}), "max_connections_per_ip = 2\n"))
    ws_port, http_port = await daemon.ports()
    query = f"?access_token={token}"
    async with (
        open_websocket_url(f"ws://127.0.0.1:{ws_port}/{query}") as a,
        open_websocket_url(f"ws://127.0.0.1:{http_port}/ws{query}") as b,
    ):
        await message(a)
        await message(b)
        for url in (f"ws://127.0.0.1:{ws_port}/{query}", f"ws://127.0.0.1:{http_port}/ws{query}"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(url):
                    pass
            assert rejected.value.status_code == 429
    # Both gone: the address may connect again, by either port.
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                async with open_websocket_url(f"ws://127.0.0.1:{http_port}/ws{query}") as c:
                    assert (await message(c))["type"] == "connected"
                    break
            except ConnectionRejected:
                await trio.sleep(0.05)  # the server sees the closes asynchronously


async def test_sigterm_closes_http_port_clients_like_the_others(start: Start) -> None:
    token = new_token()
    daemon = start(config_text(tokens={"t": token}))
    _, http_port = await daemon.ports()
    async with open_websocket_url(f"ws://127.0.0.1:{http_port}/ws?access_token={token}") as ws:
        await updates(ws, 1)
        daemon.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(TIMEOUT):
            while True:
                await ws.get_message()
        assert closed.value.reason.code == 1001
    assert await daemon.wait_exit() == 0


async def test_public_url_names_the_page_websocket_and_its_origin(start: Start) -> None:
    token = new_token()
    public = 'public_url = "https://Example.com:443/market"\n'
    daemon = start(server_keys(config_text(tokens={"t": token}), public))
    _, http_port = await daemon.ports()
    status, headers, body = await http_get(http_port, "/dashboard/config.json")
    assert status == 200
    config = json.loads(body)
    assert config["websocket"]["url"] == "wss://example.com/market/ws"
    assert "https://example.com" in config["allowed_origins"]
    assert "wss://example.com" in headers["Content-Security-Policy"]
    # A page served there may connect (the proxy passes the browser's Origin through).
    origin = [(b"Origin", b"https://example.com")]
    url = f"ws://127.0.0.1:{http_port}/ws?access_token={token}"
    async with open_websocket_url(url, extra_headers=origin) as ws:
        assert (await message(ws))["type"] == "connected"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("example.com/market/", "https://"),
        ("wss://example.com/", "https://"),
        ("https://user@example.com/", "user info"),
        ("https://example.com/?a=1", "query"),
        ("https:///market/", "host"),
    ],
)
def test_a_bad_public_url_names_the_key_and_exits_78(
    tmp_path: Path, value: str, problem: str
) -> None:
    import subprocess
    import sys

    path = tmp_path / "bad.toml"
    path.write_text(server_keys(config_text(), f"public_url = {json.dumps(value)}\n"))
    result = subprocess.run(
        [sys.executable, "-m", "agentspoonsd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert "server.public_url" in result.stderr + result.stdout
    assert problem in result.stderr + result.stdout


def test_public_url_is_normalised_as_browsers_write_origins() -> None:
    url = PublicUrl.parse("HTTPS://Example.COM:443/market")
    assert (url.url, url.origin, url.websocket_url) == (
        "https://example.com/market/",
        "https://example.com",
        "wss://example.com/market/ws",
    )
    plain = PublicUrl.parse("http://10.0.0.1:8080")
    assert (plain.origin, plain.websocket_url) == ("http://10.0.0.1:8080", "ws://10.0.0.1:8080/ws")
    v6 = PublicUrl.parse("https://[2001:DB8::1]:8443/")
    assert v6.websocket_url == "wss://[2001:db8::1]:8443/ws"
    for bad in ("ftp://x/", "https://x:99999/", "https://x/a b", "https://x/%zz", "https://x/#f"):
        with pytest.raises(ValueError):
            PublicUrl.parse(bad)


async def test_ws_on_the_http_port_stays_plain_when_the_websocket_port_serves_wss(
    start: Start, tmp_path: Path
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    token = new_token()
    tls = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
    daemon = start(server_keys(config_text(tokens={"t": token}), tls))
    ws_port, http_port = await daemon.ports()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with (
        open_websocket_url(f"wss://127.0.0.1:{ws_port}/?access_token={token}", context) as wss,
        open_websocket_url(f"ws://127.0.0.1:{http_port}/ws?access_token={token}") as ws,
    ):
        assert (await message(wss))["type"] == (await message(ws))["type"] == "connected"


# --- WebSocketServer.adopt_upgrade in-process: a real server and real TCP sockets ----------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (the client's end, the server's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


def upgrade_request(token: str) -> bytes:
    return (
        f"GET /ws?access_token={token} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def received_until(sock: socket.socket, marker: bytes) -> bytes:
    sock.setblocking(False)
    data = b""
    with trio.fail_after(TIMEOUT):
        while marker not in data:
            await trio.lowlevel.wait_readable(sock)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


async def test_adopted_connections_are_served_only_while_the_server_accepts() -> None:
    token = new_token()
    listener = bind_listener("127.0.0.1", 0, 16)
    stats = Stats()
    _, receive = trio.open_memory_channel[list[Bar]](1)
    history = History(("A",), 10, decode_frame=encode_text_frame)
    hub = Hub(("A",), receive, stats, history=history)
    store = TokenStore([TokenSettings(name="t", sha256=hash_token(token))])
    limits = make_limits(
        max_connections=10, max_backlog_bytes=65536, max_message_size=4096, handshake_timeout=2.0
    )
    server = WebSocketServer(listener, hub, store, limits, stats, structlog.get_logger())

    async def refused() -> bytes:
        client, accepted = tcp_pair()
        with client:
            server.adopt_upgrade(accepted, upgrade_request(token))
            return await received_until(client, b"\r\n\r\n")

    assert (await refused()).startswith(b"HTTP/1.1 503 ")  # not started
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client, accepted = tcp_pair()
        with client:
            server.adopt_upgrade(accepted, upgrade_request(token))
            answer = await received_until(client, b'"connected"')
            assert answer.startswith(b"HTTP/1.1 101 ") and b'"connected"' in answer
            assert server.client_count == 1
            with trio.move_on_after(0.2):
                await server.drain()  # the listener closes; the client is asked to close
            assert (await refused()).startswith(b"HTTP/1.1 503 ")  # draining
        nursery.cancel_scope.cancel()
    assert stats.rejected_upgrades["unavailable"] == 2
