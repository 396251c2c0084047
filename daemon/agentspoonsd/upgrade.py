"""The WebSocket opening handshake (RFC 6455 §4.2), sans-IO: request bytes in, a verdict out.

The request head is parsed by httptools (llhttp, in C): a reconnect storm of thousands of upgrades
is the one time HTTP parsing is on the daemon's critical path, and a pure-Python parser (h11) takes
several times as long per request (bench/micro.py). What RFC 6455 asks of the request is checked
here; the `Sec-WebSocket-Accept` token comes from wsproto, which also takes over the connection
afterwards.

Guarantees: `UpgradeParser.feed` either returns None (need more bytes), returns a complete,
validated `UpgradeRequest`, or raises `HandshakeError` carrying the HTTP status to answer with.
A request head larger than `MAX_REQUEST_HEAD` is refused (431) however its bytes arrive.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

import httptools
from wsproto.utilities import generate_accept_token

from .deflate import BoundedDeflate

MAX_REQUEST_HEAD = 16 * 1024

Headers = tuple[tuple[bytes, bytes], ...]


class HandshakeError(Exception):
    """The upgrade cannot be accepted; answer `status` with `headers` and close."""

    def __init__(self, status: int, message: str, headers: Headers = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request."""

    target: str  # path and query, as sent
    headers: Headers  # names lower-cased, in the order received
    key: bytes  # Sec-WebSocket-Key, as sent


class _RequestHead:
    """What httptools reports of a request head (its callbacks). A separate object from the
    parser's owner, so parser and callbacks form no reference cycle: a connection's handshake
    state is freed by reference counting the moment it is dropped, never left to the cyclic
    collector."""

    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True


class UpgradeParser:
    """Accumulates one request head, fed in pieces of any size."""

    __slots__ = ("_head", "_parser", "_size")

    def __init__(self) -> None:
        self._head = _RequestHead()
        self._size = 0
        self._parser = httptools.HttpRequestParser(self._head)

    def feed(self, data: bytes) -> UpgradeRequest | None:
        """Take the next bytes; the request once its head is complete, else None."""
        head = self._head
        if head.complete:
            return None  # bytes after the head: the client must wait for our answer (§4.1)
        self._size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # llhttp stops at the end of an upgrade request's head: what we want
        except httptools.HttpParserError:
            raise HandshakeError(400, "malformed HTTP request") from None
        head_size = self._head_size() if head.complete else self._size
        if head_size > MAX_REQUEST_HEAD:
            raise HandshakeError(431, "request head too large")
        if not head.complete:
            return None
        return validate(
            self._parser.get_method(),
            self._parser.get_http_version(),
            head.url,
            head.headers,
        )

    def _head_size(self) -> int:
        """The head's size, near enough (request line and header lines, without spacing)."""
        head = self._head
        return len(head.url) + sum(len(n) + len(v) + 4 for n, v in head.headers)


def validate(
    method: bytes, http_version: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> UpgradeRequest:
    """Check an HTTP request against RFC 6455 §4.2.1; raise HandshakeError when it falls short."""
    headers = tuple(headers)
    if method != b"GET":
        raise HandshakeError(405, "a WebSocket upgrade is a GET", ((b"Allow", b"GET"),))
    if http_version != "1.1":
        raise HandshakeError(400, "a WebSocket upgrade needs HTTP/1.1")
    if _value(headers, b"host") is None:
        raise HandshakeError(400, "missing Host header")
    if _value(headers, b"transfer-encoding") is not None or _value(
        headers, b"content-length"
    ) not in (None, b"0"):
        # What follows the head is WebSocket frames: a body would be read as frames, and a
        # request framed two ways is how smuggling starts. Refused, and the connection closes.
        raise HandshakeError(400, "a WebSocket upgrade has no body")
    if b"websocket" not in _tokens(headers, b"upgrade"):
        raise HandshakeError(
            426, "this endpoint speaks WebSocket only", ((b"Upgrade", b"websocket"),)
        )
    if b"upgrade" not in _tokens(headers, b"connection"):
        raise HandshakeError(400, "Connection header must include 'Upgrade'")
    if _value(headers, b"sec-websocket-version") != b"13":
        raise HandshakeError(
            426, "unsupported WebSocket version", ((b"Sec-WebSocket-Version", b"13"),)
        )
    key = _value(headers, b"sec-websocket-key")
    if key is None or not _is_nonce(key):
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes, base64-encoded")
    return UpgradeRequest(target.decode("latin-1"), headers, key)


def accept_response(request: UpgradeRequest, extensions: bytes | None = None) -> bytes:
    """The 101 answer completing the upgrade (no subprotocol; `extensions`, when given, is the
    negotiated Sec-WebSocket-Extensions value)."""
    extension_line = b"Sec-WebSocket-Extensions: " + extensions + b"\r\n" if extensions else b""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: "
        + generate_accept_token(request.key)
        + b"\r\n"
        + extension_line
        + b"\r\n"
    )


def negotiate_deflate(
    request: UpgradeRequest, max_message_size: int
) -> tuple[BoundedDeflate, bytes] | None:
    """Accept the client's first permessage-deflate offer (RFC 7692) in the mode that lets one
    compressed frame serve every client: ``server_no_context_takeover`` and the full 15-bit
    window. An offer limiting the server's window is declined (the connection is then simply
    uncompressed). Returns the enabled extension (for wsproto's inbound side), which never
    inflates a client message past `max_message_size` (see `BoundedDeflate`), and the
    Sec-WebSocket-Extensions value to answer with; None when nothing was agreed."""
    for name, value in request.headers:
        if name != b"sec-websocket-extensions":
            continue
        for offer in value.decode("latin-1").split(","):
            if offer.split(";", 1)[0].strip().lower() != "permessage-deflate":
                continue
            if "server_max_window_bits" in offer:
                bits = offer.split("server_max_window_bits", 1)[1].lstrip(" =").split(";")[0]
                if bits.strip() and bits.strip() != "15":
                    continue
            extension = BoundedDeflate(max_message_size, server_no_context_takeover=True)
            try:
                agreed = extension.accept(offer)
            except ValueError:  # malformed parameters: decline this offer
                continue
            if agreed is None:
                continue
            return extension, b"permessage-deflate; " + str(agreed).encode()
    return None


def reject_response(status: int, body: bytes, content_type: bytes, headers: Headers = ()) -> bytes:
    """A complete HTTP/1.1 answer refusing the upgrade; the connection closes after it."""
    lines = [
        b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode()),
        b"Content-Type: " + content_type,
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        b"Server: agentspoonsd",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _value(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value.strip()
    return None


def _tokens(headers: Headers, name: bytes) -> set[bytes]:
    """The comma-separated tokens of every `name` header, lower-cased."""
    return {
        token.strip().lower()
        for key, value in headers
        if key == name
        for token in value.split(b",")
    }


def _is_nonce(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
