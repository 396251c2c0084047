"""Scaffolding the test modules share: bars, ports, headers, certificates, and the WebSocket
server in-process (plain or TLS) with the strict clients that read it.

The daemon as a subprocess is `daemon_process.py` (and conftest.py's `daemon_factory`).
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import trio
import trustme
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from agentspoonsd.auth import TokenStore, hash_token, new_token
from agentspoonsd.daemon import bind_listener
from agentspoonsd.frames import encode_text_frame
from agentspoonsd.history import History
from agentspoonsd.hub import Hub
from agentspoonsd.market.bar import Bar
from agentspoonsd.metrics import Stats
from agentspoonsd.settings import TokenSettings
from agentspoonsd.tls import server_context
from agentspoonsd.ws import WebSocketServer
from server_limits import make_limits

SYMBOLS = ["BTC/USD", "ETH/USD"]
#: The one token the in-process server accepts (named "test").
TOKEN = new_token()


def bar(symbol: str = "BTC/USD", close: float = 100.0, at: datetime | None = None) -> Bar:
    """A valid bar (low < open = close < high) closing at `at` (default: now)."""
    return Bar(
        symbol, at or datetime.now(UTC), close, close + 1, close - 1, close, 2.0, 0.001, 0.01
    )


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    """The Authorization header for `token`, as trio-websocket's `extra_headers` takes it."""
    return [(b"Authorization", f"Bearer {token}".encode())]


async def next_update(ws: WebSocketConnection) -> dict[str, Any]:
    """The next `volatility_update` message, skipping any other."""
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] == "volatility_update":
            return message


# --- certificates ---------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and a server certificate for 127.0.0.1/localhost, written as PEM files."""

    ca: trustme.CA
    leaf: trustme.LeafCert
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode())


def make_pki(directory: Path) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    write_pki(leaf, cert_file, key_file)
    return Pki(ca, leaf, cert_file, key_file)


def write_pki(leaf: trustme.LeafCert, cert_file: Path, key_file: Path) -> None:
    cert_file.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key_file.write_bytes(leaf.private_key_pem.bytes())


# --- the WebSocket server in-process --------------------------------------------------------------

#: The in-process server's limits unless a test overrides them. Tests send bursts, so the
#: per-client message rate is high; the rate limit has its own test.
LIMITS: dict[str, Any] = {
    "max_connections": 100,
    "max_backlog_bytes": 64 * 1024,
    "max_message_size": 4096,
    "handshake_timeout": 1.0,
    "max_client_messages_per_second": 1000,
}

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@dataclass
class Running:
    """A `WebSocketServer` on a loopback port, over TLS when `pki` is set."""

    server: WebSocketServer
    hub: Hub
    stats: Stats
    port: int
    pki: Pki | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.pki else "ws"
        return f"{scheme}://127.0.0.1:{self.port}/?access_token={TOKEN}"

    def connect(self, context: ssl.SSLContext | None = None) -> Any:
        """`open_websocket_url` to the server (trusting its certificate over TLS)."""
        if self.pki is None:
            return open_websocket_url(self.url)
        return open_websocket_url(self.url, context or self.pki.client_context())

    def publish(self, count: int = 1, close: float = 100.0, symbol: str = "BTC/USD") -> None:
        for _ in range(count):
            self.hub.publish([bar(symbol, close)])

    async def open_stream(self, rcvbuf: int | None = None) -> Stream:
        """A TCP connection (through TLS when the server has it), with SO_RCVBUF = `rcvbuf`."""
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", self.port))
        stream = trio.SocketStream(sock)
        if self.pki is None:
            return stream
        tls = trio.SSLStream(stream, self.pki.client_context(), server_hostname="127.0.0.1")
        await tls.do_handshake()
        return tls

    async def open_raw_client(self, rcvbuf: int) -> tuple[Stream, WSConnection]:
        """A WebSocket client with a tiny receive buffer, upgraded by hand with wsproto."""
        stream = await self.open_stream(rcvbuf)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="localhost", target=f"/?access_token={TOKEN}")))
        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
            ws.receive_data(await stream.receive_some(4096))
        return stream, ws


@asynccontextmanager
async def serving(pki: Pki | None = None, **limits: Any) -> AsyncIterator[Running]:
    """The server with `LIMITS` updated by `limits`, running until the block ends."""
    listener = bind_listener("127.0.0.1", 0, 128)
    stats = Stats()
    _, receive = trio.open_memory_channel[list[Bar]](1)
    history = History(SYMBOLS, 1000, decode_frame=encode_text_frame, start_seq=1)
    hub = Hub(SYMBOLS, receive, stats, history=history)
    store = TokenStore([TokenSettings(name="test", sha256=hash_token(TOKEN))])
    tls = server_context(pki.cert_file, pki.key_file) if pki else None
    server = WebSocketServer(
        listener,
        hub,
        store,
        make_limits(**{**LIMITS, **limits}),
        stats,
        structlog.get_logger(),
        tls=tls,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            yield Running(server, hub, stats, listener.getsockname()[1], pki)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()


async def read_to_close(
    stream: Stream, ws: WSConnection, *, answer: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """Every message until the close frame, parsed strictly; returns messages and close code.

    With `answer`, the close frame is answered as a browser does, so the server can drop the
    connection at once instead of after its close grace."""
    messages: list[dict[str, Any]] = []
    parts: list[str] = []
    while True:
        data = await stream.receive_some(65536)
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    messages.append(json.loads("".join(parts)))
                    parts.clear()
            elif isinstance(event, CloseConnection):
                if answer:
                    await stream.send_all(ws.send(event.response()))
                return messages, event.code
        assert data, "connection ended without a close frame"
