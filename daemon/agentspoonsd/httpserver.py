"""A small, generic HTTP/1.1 server: h11 for the protocol, a thin Trio loop for the I/O.

The messages themselves (`HttpResponse`, rendering it for h11) are values in `httpmessages`.

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
  So does a request target that does not parse (`httppolicy.parse_target`: 400, or 414 past
  8 KiB); the handler only ever sees an origin-form target (an absolute-form one is reduced to
  its path and query). A declared or chunked request body over 64 KiB gets 413 and the
  connection closes; smaller bodies are read and discarded.
- A request with both Content-Length and Transfer-Encoding (a request-smuggling signature) is
  answered, then the connection is closed (RFC 9112 §6.3).
- With `allowed_hosts`, a request naming another host gets 421 (a missing or malformed Host: 400)
  and the connection closes. A path in `bearer_digests` needs `Authorization: Bearer <token>`
  whose SHA-256 is the path's digest; otherwise 401 with `WWW-Authenticate: Bearer`.
- A handler that raises (or returns something other than an `HttpResponse`) yields 500; the
  failure is logged as `http_handler_failed` with its traceback and the connection stays usable.
- Deadlines: the first byte of a request must arrive within `idle_timeout` (after accept, or
  after the previous response: the keep-alive idle time); from that byte, the whole request
  (head and body) must arrive within `request_timeout`, however slowly it trickles. A client
  that misses either is closed without an answer. Writing one response has `request_timeout`.
- Connections: at most `max_connections` served at once, at most `max_connections_per_ip` from
  one address (`httppolicy.client_key`). A connection past a cap is never served like the
  others and never evicts anyone: it is given 1 s to send one request; a
  GET or HEAD of a `probe_paths` path (/healthz, /readyz: cheap, and what a load balancer
  sends) is answered normally, anything else, or nothing, is answered 429 (per-address cap) or
  503 (total cap); then the connection closes. Beyond 64 such refusals at once, further
  connections past a cap are closed unanswered.
- Upgrades: a GET of a path in `upgrades` (any query), from an allowed host, on a connection
  served within the caps, is not answered here: the connection leaves this server (and its
  connection counts) and its socket goes, with the request, to that path's `Upgrade`. A HEAD or
  any other method there is answered like any path the handler does not know.
- Per-peer log events above debug are rate-limited per address (`logthrottle.LogThrottle`:
  5 per 10 s), the rest summarised as one `log_suppressed count=N` per address and window.

Logs never contain a query string (where `access_token` lives) nor request header contents.
"""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import h11
import trio
from structlog.typing import FilteringBoundLogger

from .httpmessages import (
    SERVER_NAME,
    HttpResponse,
    content_length,
    head_size,
    log_path,
    protocol_error_reason,
    render,
    request_head,
    status_response,
)
from .httppolicy import (
    Admission,
    ConnectionTable,
    RequestRefused,
    bearer_matches,
    check_host,
    client_key,
    format_address,
    parse_target,
)
from .logthrottle import LogThrottle

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "Handler",
    "HttpResponse",
    "Upgrade",
    "log_path",
    "request_head",
    "serve_http",
    "status_response",
]

ALLOWED_METHODS = ("GET", "HEAD")
MAX_HEADER_BYTES = 16 * 1024
"""The largest request head (request line + headers) accepted; past it the answer is 431."""
MAX_BODY_BYTES = 64 * 1024
"""The largest request body read and discarded; past it the answer is 413."""

_RECEIVE_SIZE = 16 * 1024
_LINGER_SECONDS = 1.0  # at most this long draining a client's input before a deliberate close
_MAX_REJECTING = 64  # connections being refused at once; beyond it they are closed unanswered
_REFUSAL_GRACE = 1.0  # a connection past a cap has this long to send its (probe) request
_PEER_LOG_LIMIT = 5  # per-peer events above debug, per address and interval
_PEER_LOG_INTERVAL = 10.0
_SATURATION_LOG_INTERVAL = 10.0
_ACCEPT_RETRY_SECONDS = 0.1
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_FRAMING_HEADERS_B = frozenset({b"content-length", b"transfer-encoding"})


Handler: TypeAlias = Callable[[str, str], HttpResponse]
"""(method, target including the query string) -> response. Synchronous; must not block."""

Upgrade: TypeAlias = Callable[[socket.socket, bytes], None]
"""Takes over a connection: its socket (plain TCP, blocking mode unspecified) and the request's
bytes (`request_head`, then whatever the client sent after it). Synchronous; must not block; owns
the socket from the call on, whatever happens (it must close it)."""


# --- the Trio layer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str
    started: float
    http_version: str = "1.1"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    refusal: int | None = None  # answered with this status (and closed) instead of the handler
    ambiguous_framing: bool = False  # both Content-Length and Transfer-Encoding: close after

    def header_values(self, name: bytes) -> list[str]:
        """The values of header `name` (lower-case), decoded as Latin-1 like HTTP/1.1 does."""
        return [value.decode("latin-1") for key, value in self.headers if key == name]


@dataclass(frozen=True, slots=True)
class _Policy:
    """What the server enforces on top of HTTP/1.1 itself; see `serve_http`."""

    request_timeout: float
    idle_timeout: float
    allowed_hosts: frozenset[str] | None
    bearer_digests: Mapping[str, bytes]
    probe_paths: frozenset[str]
    upgrades: Mapping[str, Upgrade]


@dataclass(slots=True)
class _Occupancy:
    """Server-wide connection state; only touched from the Trio thread."""

    table: ConnectionTable
    throttle: LogThrottle
    rejected_unlogged: int = 0
    next_saturation_log: float = float("-inf")


class _PeerLog:
    """A connection's logger: events above debug go through the per-address `LogThrottle`."""

    def __init__(self, log: FilteringBoundLogger, key: str, throttle: LogThrottle) -> None:
        self._log = log
        self._key = key
        self._throttle = throttle
        self.debug = log.debug

    def info(self, event: str, **fields: Any) -> None:
        self._throttled(self._log.info, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._throttled(self._log.warning, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._throttled(self._log.error, event, fields)

    def _throttled(self, emit: Callable[..., Any], event: str, fields: dict[str, Any]) -> None:
        verdict = self._throttle.admit(self._key, trio.current_time())
        if verdict.suppressed:
            _log_suppressed(self._log, self._key, verdict.suppressed, self._throttle.interval)
        if verdict.emit:
            emit(event, **fields)


def _log_suppressed(log: FilteringBoundLogger, key: str, count: int, interval: float) -> None:
    log.warning("log_suppressed", client=key, count=count, interval_s=interval)


async def serve_http(
    listener: trio.SocketListener,
    handler: Handler,
    log: FilteringBoundLogger,
    *,
    request_timeout: float = 10.0,
    idle_timeout: float | None = None,
    max_connections: int = 256,
    max_connections_per_ip: int | None = None,
    allowed_hosts: frozenset[str] | None = None,
    bearer_digests: Mapping[str, bytes] | None = None,
    probe_paths: frozenset[str] = frozenset(),
    upgrades: Mapping[str, Upgrade] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on `listener` and serve HTTP/1.1 on each until cancelled.

    Options (see the module docstring for what a client sees): `idle_timeout` defaults to
    `request_timeout`; `max_connections_per_ip` to `max_connections` (no per-address cap);
    `allowed_hosts` (normalised with `httppolicy.normalise_host`) to any host; `bearer_digests`
    maps a path to the SHA-256 digest of the bearer token it requires; `probe_paths` are answered
    even on a connection refused for capacity; `upgrades` maps a path to the `Upgrade` that takes
    over a connection whose GET names it.

    Guarantees:
    - `task_status.started()` is called once, when the accept loop is about to run.
    - The listener is never closed here (not on return, error or cancellation): its owner closes
      it, and may pass it to a new `serve_http` afterwards.
    - Each connection runs in a task of this function's own nursery; when this function is
      cancelled, every client stream is closed (forcefully, without waiting for peers) before it
      returns, and pending `log_suppressed` summaries are logged.
    - Errors of one connection (resets, broken pipes, protocol errors, a failing handler) are
      logged and never end the server. Only a failing `accept` (other than a transient
      out-of-descriptors/memory error, which is retried after 0.1 s) propagates.
    """
    if request_timeout <= 0 or (idle_timeout is not None and idle_timeout <= 0):
        raise ValueError("request_timeout and idle_timeout must be > 0")
    if max_connections < 1 or (max_connections_per_ip is not None and max_connections_per_ip < 1):
        raise ValueError("max_connections and max_connections_per_ip must be >= 1")
    policy = _Policy(
        request_timeout=request_timeout,
        idle_timeout=request_timeout if idle_timeout is None else idle_timeout,
        allowed_hosts=allowed_hosts,
        bearer_digests=dict(bearer_digests or {}),
        probe_paths=probe_paths,
        upgrades=dict(upgrades or {}),
    )
    table = ConnectionTable(max_connections, max_connections_per_ip, _MAX_REJECTING)
    occupancy = _Occupancy(table, LogThrottle(_PEER_LOG_LIMIT, _PEER_LOG_INTERVAL))
    log.info("http_listening", address=format_address(listener.socket.getsockname()))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_flush_log_summaries, occupancy.throttle, log)
            task_status.started()
            accept_failures = _AcceptFailures()
            while True:
                stream = await _accept(listener, log, accept_failures)
                key = client_key(_peer_ip(stream))
                admission = table.admit(key)
                if admission is not Admission.SERVE:
                    _note_refusal(occupancy, log, key, admission)
                if admission is Admission.DROP:
                    await trio.aclose_forcefully(stream)
                    continue
                nursery.start_soon(
                    _run_connection, stream, handler, log, occupancy, policy, key, admission
                )
    finally:
        for key, count in occupancy.throttle.flush(0.0, everything=True):
            _log_suppressed(log, key, count, occupancy.throttle.interval)


async def _flush_log_summaries(throttle: LogThrottle, log: FilteringBoundLogger) -> None:
    """Every throttle interval, log the summaries of the windows that ended; until cancelled."""
    while True:
        await trio.sleep(throttle.interval)
        for key, count in throttle.flush(trio.current_time()):
            _log_suppressed(log, key, count, throttle.interval)


@dataclass
class _AcceptFailures:
    """Failed accepts since the last `http_accept_failed` line, and when it was logged."""

    count: int = 0
    logged_at: float = -math.inf


async def _accept(
    listener: trio.SocketListener, log: FilteringBoundLogger, failures: _AcceptFailures
) -> trio.SocketStream:
    """The next connection. Out of descriptors (or memory), accept() is retried every 0.1 s and
    its failures are logged at most once a second with their count (`failures=`): the listener
    stays readable and would otherwise log ten lines a second until a connection ends."""
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            failures.count += 1
            now = trio.current_time()
            if now - failures.logged_at >= 1.0:
                error = errno.errorcode.get(exc.errno, str(exc.errno))
                log.error("http_accept_failed", error=error, failures=failures.count)
                failures.count, failures.logged_at = 0, now
            await trio.sleep(_ACCEPT_RETRY_SECONDS)


def _note_refusal(
    occupancy: _Occupancy, log: FilteringBoundLogger, key: str, admission: Admission
) -> None:
    table = occupancy.table
    if admission is Admission.OVER_IP or (
        admission is Admission.DROP
        and table.max_per_ip is not None
        and table.open_from(key) >= table.max_per_ip
    ):
        # One address at its cap: its own events, throttled per address.
        _PeerLog(log, key, occupancy.throttle).warning(
            "http_connections_per_ip_exceeded",
            client=key,
            max_connections_per_ip=table.max_per_ip,
            answered=admission is not Admission.DROP,
        )
        return
    occupancy.rejected_unlogged += 1
    now = trio.current_time()
    if now >= occupancy.next_saturation_log:
        log.warning(
            "http_connections_saturated",
            max_connections=table.max_connections,
            rejected=occupancy.rejected_unlogged,
        )
        occupancy.rejected_unlogged = 0
        occupancy.next_saturation_log = now + _SATURATION_LOG_INTERVAL


async def _run_connection(
    stream: trio.SocketStream,
    handler: Handler,
    log: FilteringBoundLogger,
    occupancy: _Occupancy,
    policy: _Policy,
    key: str,
    admission: Admission,
) -> None:
    """Serve one connection; whatever happens, release its slot and close the stream.

    A connection handed over to an `Upgrade` releases its slot all the same: from then on it
    counts where it went. Its stream no longer holds the socket, so closing it closes nothing.
    """
    clog = _PeerLog(log.bind(peer=_peer(stream)), key, occupancy.throttle)
    try:
        await _Connection(stream, handler, clog, policy).serve(refusal=admission.status)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        clog.debug("http_connection_lost", error=type(exc).__name__)
    except trio.TooSlowError:
        clog.debug("http_write_timeout")
    except Exception:
        clog.error("http_connection_failed", exc_info=True)
    finally:
        occupancy.table.release(key, admission)
        await trio.aclose_forcefully(stream)


class _Connection:
    """The read/respond loop of one connection, driving an h11 state machine."""

    def __init__(
        self, stream: trio.SocketStream, handler: Handler, log: _PeerLog, policy: _Policy
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._log = log
        self._policy = policy
        self._timeout = policy.request_timeout
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._method: str | None = None  # of the request being answered, once its head is parsed
        self._deadline: trio.CancelScope | None = None  # the read in progress, if any
        # Seconds the whole request has from its first byte; None: the first byte changes nothing.
        self._whole_request: float | None = policy.request_timeout

    async def serve(self, *, refusal: int | None = None) -> None:
        """Answer requests until the client or the protocol ends the connection.

        With `refusal` (429, 503: the connection is past a cap), only one request is read, within
        `_REFUSAL_GRACE`; a probe path is answered, anything else gets `refusal`; then the
        connection closes. Returns normally when the connection is over; I/O errors propagate.
        """
        while True:
            try:
                request = await self._read_within_deadlines(refused=refusal is not None)
            except trio.TooSlowError:
                if refusal is not None:
                    await self._answer_and_close(refusal)
                else:
                    self._log_timeout()
                return
            except h11.RemoteProtocolError as exc:
                await self._answer_protocol_error(exc)
                return
            if request is None:
                return
            upgrade = self._upgrade(request, refusal)
            if upgrade is not None:
                self._hand_over(request, *upgrade)
                return
            event, body, close = self._respond(request, refusal)
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

    def _respond(self, request: _Request, refusal: int | None) -> tuple[h11.Response, bytes, bool]:
        """The response event and body for `request`, and whether to close after it."""
        head = request.method == "HEAD"
        close = refusal is not None or request.ambiguous_framing
        if request.refusal is not None:
            status = request.refusal
        elif refusal is not None and request.method not in ALLOWED_METHODS:
            status = refusal  # past a cap only a probe (a GET or HEAD) is served
        elif request.method not in ALLOWED_METHODS:
            allow = (("Allow", ", ".join(ALLOWED_METHODS)),)
            event, body = render(status_response(405, allow), head=head, close=close)
            return event, body, close
        else:
            try:
                target = parse_target(request.target)
                check_host(request.header_values(b"host"), target, self._policy.allowed_hosts)
            except RequestRefused as exc:
                self._log.debug("http_request_refused", status=exc.status, reason=exc.reason)
                status = exc.status
            else:
                return self._route(request, target.origin, refusal, close)
        event, body = render(status_response(status), head=head, close=True)
        return event, body, True

    def _route(
        self, request: _Request, origin: str, refusal: int | None, close: bool
    ) -> tuple[h11.Response, bytes, bool]:
        """A parsed request from an allowed host: refused, unauthorised or the handler's."""
        head = request.method == "HEAD"
        path = urlsplit(origin).path  # the same split the handler's routes use
        if refusal is not None and path not in self._policy.probe_paths:
            event, body = render(status_response(refusal), head=head, close=True)
            return event, body, True
        digest = self._policy.bearer_digests.get(path)
        if digest is not None and not bearer_matches(
            request.header_values(b"authorization"), digest
        ):
            self._log.debug("http_unauthorized", path=path)
            challenge = (("WWW-Authenticate", f'Bearer realm="{SERVER_NAME}"'),)
            event, body = render(status_response(401, challenge), head=head, close=close)
            return event, body, close
        event, body = self._call_handler(replace(request, target=origin), close=close)
        return event, body, close

    def _upgrade(self, request: _Request, refusal: int | None) -> tuple[Upgrade, str] | None:
        """The `Upgrade` taking over after `request`, and its origin-form target; None when the
        request is answered here instead (another path or method, a refused connection, a target
        or host the policy refuses: `_respond` answers those as for any path)."""
        if not self._policy.upgrades or request.method != "GET" or request.refusal is not None:
            return None
        if refusal is not None or request.ambiguous_framing:
            return None
        try:
            target = parse_target(request.target)
            check_host(request.header_values(b"host"), target, self._policy.allowed_hosts)
        except RequestRefused:
            return None
        upgrade = self._policy.upgrades.get(urlsplit(target.origin).path)
        return None if upgrade is None else (upgrade, target.origin)

    def _hand_over(self, request: _Request, upgrade: Upgrade, target: str) -> None:
        """Give the socket and the request to `upgrade`; the stream is left holding nothing.

        The socket is detached, not duplicated: one descriptor, so the new owner's close is the
        only close. Bytes h11 received past the request (a client that did not wait for the
        answer) follow the head, as they would have on the new owner's own port.
        """
        pending, _ = self._conn.trailing_data
        data = request_head(request.method, target, request.http_version, request.headers)
        sock = socket.socket(fileno=self._stream.socket.detach())
        self._log.debug("http_upgrade", path=log_path(target))
        try:
            upgrade(sock, data + bytes(pending))
        except Exception:
            self._log.error("http_upgrade_failed", path=log_path(target), exc_info=True)
            sock.close()

    def _reusable(self) -> bool:
        # Both sides DONE: h11 has found no reason (Connection: close, HTTP/1.0) to close.
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def _read_within_deadlines(self, *, refused: bool) -> _Request | None:
        """`_read_request` under the idle and whole-request deadlines; TooSlowError past them.

        The read starts with `idle_timeout` to go; the first byte of the request (already
        buffered, for a pipelined one) moves the deadline to `request_timeout` from then, once:
        later bytes never move it. A refused connection has `_REFUSAL_GRACE` from accept for all
        of it.
        """
        if refused:
            idle = min(_REFUSAL_GRACE, self._policy.request_timeout)
            self._whole_request = None
        else:
            idle = self._policy.idle_timeout
            self._whole_request = self._policy.request_timeout
        with trio.CancelScope(deadline=trio.current_time() + idle) as scope:
            self._deadline = scope
            if self._whole_request is not None and self._request_begun():
                scope.deadline = trio.current_time() + self._whole_request
            try:
                return await self._read_request()
            finally:
                self._deadline = None
        raise trio.TooSlowError

    def _request_begun(self) -> bool:
        pending, _ = self._conn.trailing_data
        return bool(pending) or self._conn.their_state is not h11.IDLE

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
        names = {name for name, _ in event.headers}
        request = _Request(
            method=self._method,
            target=event.target.decode("ascii"),
            started=trio.current_time(),
            http_version=event.http_version.decode("ascii"),
            headers=tuple((name, value) for name, value in event.headers),
            ambiguous_framing=names >= _FRAMING_HEADERS_B,
        )
        if head_size(event) > MAX_HEADER_BYTES:
            return replace(request, refusal=431)
        declared = None if b"transfer-encoding" in names else content_length(event.headers)
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
            if isinstance(event, h11.Event) or event is h11.PAUSED:  # i.e. not NEED_DATA
                return event
            # b"" (end of stream) is how h11 learns that the peer closed.
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            if data and self._deadline and self._whole_request and not self._request_begun():
                # The request's first byte: from now on the whole-request deadline runs.
                self._deadline.deadline = trio.current_time() + self._whole_request
            self._conn.receive_data(data)

    def _call_handler(self, request: _Request, *, close: bool) -> tuple[h11.Response, bytes]:
        head = request.method == "HEAD"
        try:
            return render(self._handler(request.method, request.target), head=head, close=close)
        except Exception:
            self._log.error(
                "http_handler_failed",
                method=request.method,
                path=log_path(request.target),
                exc_info=True,
            )
            return render(status_response(500), head=head, close=close)

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
        self._log.debug("http_bad_request", status=status, reason=protocol_error_reason(exc))
        await self._answer_and_close(status)

    async def _answer_and_close(self, status: int) -> None:
        """Answer `status` with Connection: close, if h11 still allows an answer, and linger."""
        # h11 lets a server answer from IDLE (nothing parsed) or SEND_RESPONSE (head parsed).
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        event, body = render(status_response(status), head=self._method == "HEAD", close=True)
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
        if not self._request_begun():
            self._log.debug("http_connection_idle", timeout=self._policy.idle_timeout)
        else:
            self._log.info("http_request_timeout", timeout=self._policy.request_timeout)


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "unknown"


def _peer(stream: trio.SocketStream) -> str:
    try:
        return format_address(stream.socket.getpeername())
    except OSError:
        return "unknown"
