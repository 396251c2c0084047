"""HTTP/1.1 messages as values: the handler's `HttpResponse`, and turning it into h11 events.

Pure (no sockets, no clock but the Date header): `httpserver` drives these from its Trio loop,
the handlers (`health`, `dashboard`) build `HttpResponse`s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

import h11

__all__ = [
    "SERVER_NAME",
    "HttpResponse",
    "content_length",
    "head_size",
    "log_path",
    "protocol_error_reason",
    "reason",
    "render",
    "request_head",
    "status_response",
]

SERVER_NAME = "agentspoonsd"
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a handler answers. `headers` replace the server's defaults of the same name."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def status_response(status: int, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    """A plain-text response whose body is the status line's reason phrase, e.g. `Not Found`."""
    return HttpResponse(status, f"{reason(status) or status}\n".encode(), headers=headers)


def log_path(target: str) -> str:
    """The part of a request target that may be logged: the path, without any query string."""
    return target.partition("?")[0]


def request_head(
    method: str, target: str, http_version: str, headers: tuple[tuple[bytes, bytes], ...]
) -> bytes:
    """A parsed request's head as HTTP/1.1 bytes again: request line, header lines, blank line.

    h11 keeps no raw bytes; this writes what it parsed (names lower-cased, values as received
    without surrounding whitespace, in the order received), which any HTTP parser reads back as
    the same method, target, version and headers.
    """
    lines = [f"{method} {target} HTTP/{http_version}".encode("ascii")]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def reason(status: int) -> str:
    """The reason phrase of `status` (`Not Found`); empty for a code HTTPStatus lacks."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def render(response: HttpResponse, *, head: bool, close: bool) -> tuple[h11.Response, bytes]:
    """The h11 response event and the body bytes to send for `response`.

    Raises (TypeError, ValueError, h11.LocalProtocolError...) when the response cannot be sent:
    a bad status, a non-ASCII or multi-line header. Callers answer 500 instead.
    """
    if not isinstance(response, HttpResponse):
        raise TypeError(f"handler returned {type(response).__name__}, not HttpResponse")
    own = [
        (name, value) for name, value in response.headers if name.lower() not in _FRAMING_HEADERS
    ]
    overridden = {name.lower() for name, _ in own}
    defaults = [
        ("Content-Type", response.content_type),
        ("Server", SERVER_NAME),
        ("Date", formatdate(usegmt=True)),
        ("Cache-Control", "no-store"),
    ]
    headers = [(name, value) for name, value in defaults if name.lower() not in overridden]
    headers += own
    body_allowed = response.status not in _NO_BODY_STATUSES
    if body_allowed:
        headers.append(("Content-Length", str(len(response.body))))
    if close:
        headers.append(("Connection", "close"))
    event = h11.Response(
        status_code=response.status, headers=headers, reason=reason(response.status).encode()
    )
    return event, (response.body if body_allowed and not head else b"")


def protocol_error_reason(exc: h11.RemoteProtocolError) -> str:
    """What may be logged of why h11 refused a request."""
    # h11 quotes the offending bytes after a colon ("illegal header line: b'...'"); they may hold a
    # credential, so only the description before it is logged.
    return str(exc).partition(":")[0][:100]


def head_size(request: h11.Request) -> int:
    """The size of a parsed request head, as received give or take stripped whitespace."""
    # h11 enforces max_incomplete_event_size only while a head is incomplete: a larger head that
    # arrives whole within one read is parsed anyway. Its size is recomputed here (give or take
    # the whitespace h11 strips) so the limit holds however the bytes were split.
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The declared Content-Length of a request h11 parsed; None without one."""
    # h11 has already rejected malformed or conflicting Content-Length values.
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None
