"""A small, generic HTTP/1.1 server: h11 for the protocol, a thin Trio loop for the I/O.

It has no routes of its own. The daemon passes a synchronous `Handler` that maps
`(method, target)` to an `HttpResponse`; this module owns everything else: framing, keep-alive,
limits, timeouts, error answers and cancellation.

What a client can rely on:
- Only GET and HEAD reach the handler. Other methods get 405 with `Allow: GET, HEAD`; HEAD gets the
  headers a GET would get (including its Content-Length) and no body.
- Every response carries Content-Length (except 204/304), Content-Type, Date, `Server: agentspoonsd`
  and `Cache-Control: no-store`. Handler headers of the same name replace these defaults; the
  server alone decides framing (Content-Length, Transfer-Encoding).
- A connection serves requests one after another (keep-alive, pipelining) until either side closes.
- A malformed request gets 400 (431 when the request head exceeds 16 KiB) and the connection closes.
  A declared or chunked request body over 64 KiB gets 413 and the connection closes; smaller bodies
  are read and discarded.
- A handler that raises (or returns something other than an `HttpResponse`) yields 500; the
  failure is logged as `http_handler_failed` with its traceback and the connection stays usable.
- Each request must arrive complete within `request_timeout` seconds of the server starting to wait
  for it, so an idle keep-alive connection is also closed after `request_timeout`. A slow sender is
  dropped without an answer. Writing one response has the same limit.
- Past `max_connections` open connections, a new connection is answered 503 and closed.

Logs never contain a query string (where `access_token` lives) nor request header contents.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, replace
from email.utils import formatdate
from http import HTTPStatus
from typing import TypeAlias

import h11
import trio
from structlog.typing import FilteringBoundLogger

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "Handler",
    "HttpResponse",
    "log_path",
    "serve_http",
    "status_response",
]

SERVER_NAME = "agentspoonsd"
ALLOWED_METHODS = ("GET", "HEAD")
MAX_HEADER_BYTES = 16 * 1024
"""The largest request head (request line + headers) accepted; past it the answer is 431."""
MAX_BODY_BYTES = 64 * 1024
"""The largest request body read and discarded; past it the answer is 413."""

_RECEIVE_SIZE = 16 * 1024
_LINGER_SECONDS = 1.0  # at most this long draining a client's input before a deliberate close
_MAX_REJECTING = 64  # connections being answered 503 at once; beyond it they are closed unanswered
_SATURATION_LOG_INTERVAL = 10.0
_ACCEPT_RETRY_SECONDS = 0.1
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a handler answers. `headers` replace the server's defaults of the same name."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler: TypeAlias = Callable[[str, str], HttpResponse]
"""(method, target including the query string) -> response. Synchronous; must not block."""


# --- pure helpers: no I/O, no clock except the Date header -----------------------------------


def status_response(status: int, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    """A plain-text response whose body is the status line's reason phrase, e.g. `Not Found`."""
    return HttpResponse(status, f"{_reason(status) or status}\n".encode(), headers=headers)


def log_path(target: str) -> str:
    """The part of a request target that may be logged: the path, without any query string."""
    return target.partition("?")[0]


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _render(response: HttpResponse, *, head: bool, close: bool) -> tuple[h11.Response, bytes]:
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
        status_code=response.status, headers=headers, reason=_reason(response.status).encode()
    )
    return event, (response.body if body_allowed and not head else b"")


def _protocol_error_reason(exc: h11.RemoteProtocolError) -> str:
    # h11 quotes the offending bytes after a colon ("illegal header line: b'...'"); they may hold a
    # credential, so only the description before it is logged.
    return str(exc).partition(":")[0][:100]


# --- the Trio layer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str
    started: float
    refusal: int | None = None  # answered with this status (and closed) instead of the handler


@dataclass(slots=True)
class _Occupancy:
    """Server-wide connection counts; only touched from the Trio thread."""

    active: int = 0
    rejecting: int = 0
    rejected_unlogged: int = 0
    next_saturation_log: float = float("-inf")


async def serve_http(
    listener: trio.SocketListener,
    handler: Handler,
    log: FilteringBoundLogger,
    *,
    request_timeout: float = 10.0,
    max_connections: int = 256,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on `listener` and serve HTTP/1.1 on each until cancelled.

    Guarantees:
    - `task_status.started()` is called once, when the accept loop is about to run.
    - The listener is never closed here (not on return, error or cancellation): its owner closes
      it, and may pass it to a new `serve_http` afterwards.
    - Each connection runs in a task of this function's own nursery; when this function is
      cancelled, every client stream is closed (forcefully, without waiting for peers) before it
      returns.
    - Errors of one connection (resets, broken pipes, protocol errors, a failing handler) are
      logged and never end the server. Only a failing `accept` (other than a transient
      out-of-descriptors/memory error, which is retried after 0.1 s) propagates.
    - At most `max_connections` connections are served at once; above that, up to 64 more are
      each answered 503 and closed, and any beyond those are closed at once.
    """
    if request_timeout <= 0:
        raise ValueError("request_timeout must be > 0")
    if max_connections < 1:
        raise ValueError("max_connections must be >= 1")
    occupancy = _Occupancy()
    log.info("http_listening", address=_address(listener.socket.getsockname()))
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await _accept(listener, log)
            if occupancy.active < max_connections:
                occupancy.active += 1
                reject = False
            else:
                _note_rejection(occupancy, log, max_connections)
                if occupancy.rejecting >= _MAX_REJECTING:
                    await trio.aclose_forcefully(stream)
                    continue
                occupancy.rejecting += 1
                reject = True
            nursery.start_soon(
                _run_connection, stream, handler, log, occupancy, request_timeout, reject
            )


async def _accept(listener: trio.SocketListener, log: FilteringBoundLogger) -> trio.SocketStream:
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error("http_accept_failed", error=errno.errorcode.get(exc.errno, str(exc.errno)))
            await trio.sleep(_ACCEPT_RETRY_SECONDS)


def _note_rejection(occupancy: _Occupancy, log: FilteringBoundLogger, limit: int) -> None:
    occupancy.rejected_unlogged += 1
    now = trio.current_time()
    if now >= occupancy.next_saturation_log:
        log.warning(
            "http_connections_saturated",
            max_connections=limit,
            rejected=occupancy.rejected_unlogged,
        )
        occupancy.rejected_unlogged = 0
        occupancy.next_saturation_log = now + _SATURATION_LOG_INTERVAL


async def _run_connection(
    stream: trio.SocketStream,
    handler: Handler,
    log: FilteringBoundLogger,
    occupancy: _Occupancy,
    request_timeout: float,
    reject: bool,
) -> None:
    """Serve one connection; whatever happens, release its slot and close the stream."""
    clog = log.bind(peer=_peer(stream))
    try:
        await _Connection(stream, handler, clog, request_timeout).serve(reject=reject)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        clog.debug("http_connection_lost", error=type(exc).__name__)
    except trio.TooSlowError:
        clog.debug("http_write_timeout")
    except Exception:
        clog.error("http_connection_failed", exc_info=True)
    finally:
        if reject:
            occupancy.rejecting -= 1
        else:
            occupancy.active -= 1
        await trio.aclose_forcefully(stream)


class _Connection:
    """The read/respond loop of one connection, driving an h11 state machine."""

    def __init__(
        self,
        stream: trio.SocketStream,
        handler: Handler,
        log: FilteringBoundLogger,
        timeout: float,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._log = log
        self._timeout = timeout
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._method: str | None = None  # of the request being answered, once its head is parsed

    async def serve(self, *, reject: bool) -> None:
        """Answer requests until the client or the protocol ends the connection.

        With `reject`, the first request is answered 503 and the connection closed.
        Returns normally when the connection is over; I/O errors propagate.
        """
        while True:
            try:
                with trio.fail_after(self._timeout):
                    request = await self._read_request()
            except trio.TooSlowError:
                self._log_timeout()
                return
            except h11.RemoteProtocolError as exc:
                await self._answer_protocol_error(exc)
                return
            if request is None:
                return

            head = request.method == "HEAD"
            close = True
            if reject:
                event, body = _render(status_response(503), head=head, close=True)
            elif request.refusal is not None:
                event, body = _render(status_response(request.refusal), head=head, close=True)
            elif request.method not in ALLOWED_METHODS:
                allow = (("Allow", ", ".join(ALLOWED_METHODS)),)
                event, body = _render(status_response(405, allow), head=head, close=False)
                close = False
            else:
                event, body = self._call_handler(request)
                close = False
            await self._send(event, body)
            self._log.debug(
                "http_request",
                method=request.method,
                path=log_path(request.target),
                status=event.status_code,
                duration_ms=round((trio.current_time() - request.started) * 1000, 3),
            )
            if close or not self._reusable():
                await self._linger()
                return
            self._conn.start_next_cycle()

    def _reusable(self) -> bool:
        # Both sides DONE: h11 has found no reason (Connection: close, HTTP/1.0) to close.
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def _read_request(self) -> _Request | None:
        """The next request, its body read and discarded; None if the client closed cleanly.

        A head over MAX_HEADER_BYTES or a body over MAX_BODY_BYTES is not read further; the
        request comes back with a `refusal` status (431, 413) instead.
        Raises h11.RemoteProtocolError for a malformed or truncated request.
        """
        self._method = None
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
        self._method = event.method.decode("ascii")
        request = _Request(
            method=self._method,
            target=event.target.decode("ascii"),
            started=trio.current_time(),
        )
        if _head_size(event) > MAX_HEADER_BYTES:
            return replace(request, refusal=431)
        declared = _content_length(event.headers)
        if declared is not None and declared > MAX_BODY_BYTES:
            return replace(request, refusal=413)
        received = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.EndOfMessage):
                return request
            if isinstance(event, h11.Data):
                received += len(event.data)
                if received > MAX_BODY_BYTES:
                    return replace(request, refusal=413)
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            # b"" (end of stream) is how h11 learns that the peer closed.
            self._conn.receive_data(await self._stream.receive_some(_RECEIVE_SIZE))

    def _call_handler(self, request: _Request) -> tuple[h11.Response, bytes]:
        head = request.method == "HEAD"
        try:
            return _render(self._handler(request.method, request.target), head=head, close=False)
        except Exception:
            self._log.error(
                "http_handler_failed",
                method=request.method,
                path=log_path(request.target),
                exc_info=True,
            )
            return _render(status_response(500), head=head, close=False)

    async def _send(self, event: h11.Response, body: bytes) -> None:
        """Write one whole response in one send; raises TooSlowError past the timeout."""
        data = self._conn.send(event) or b""
        if body:
            data += self._conn.send(h11.Data(data=body)) or b""
        data += self._conn.send(h11.EndOfMessage()) or b""
        with trio.fail_after(self._timeout):
            await self._stream.send_all(data)

    async def _answer_protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        self._log.debug("http_bad_request", status=status, reason=_protocol_error_reason(exc))
        # h11 lets a server answer from IDLE (nothing parsed) or SEND_RESPONSE (head parsed).
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        event, body = _render(status_response(status), head=self._method == "HEAD", close=True)
        await self._send(event, body)
        await self._linger()

    async def _linger(self) -> None:
        """Half-close, then drain the client's input briefly before the caller closes.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        response we just wrote before the client reads it (e.g. a 413 while the body streams in).
        """
        await self._stream.send_eof()
        with trio.move_on_after(min(_LINGER_SECONDS, self._timeout)):
            while await self._stream.receive_some(_RECEIVE_SIZE):
                pass

    def _log_timeout(self) -> None:
        pending, _ = self._conn.trailing_data
        if self._conn.their_state is h11.IDLE and not pending:
            self._log.debug("http_connection_idle", timeout=self._timeout)
        else:
            self._log.info("http_request_timeout", timeout=self._timeout)


def _head_size(request: h11.Request) -> int:
    # h11 enforces max_incomplete_event_size only while a head is incomplete: a larger head that
    # arrives whole within one read is parsed anyway. Its size is recomputed here (give or take
    # the whitespace h11 strips) so the limit holds however the bytes were split.
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    # h11 has already rejected malformed or conflicting Content-Length values.
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def _peer(stream: trio.SocketStream) -> str:
    try:
        return _address(stream.socket.getpeername())
    except OSError:
        return "unknown"


def _address(sockaddr: object) -> str:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = sockaddr[0], sockaddr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockaddr)
