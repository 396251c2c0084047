"""`VolatilityClient`'s connection task: connect, read, keep alive and reconnect (anyio)."""

from __future__ import annotations

import logging
import ssl
import time
from collections import deque
from collections.abc import (
    Callable,
)
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.lowlevel

from ..wscore import Accepted, ClientCore, Closed, Message, PongReceived, Refused
from ..wscore import Event as WsEvent
from .errors import (
    AuthenticationError,
    ClientError,
    ConnectFailed,
    ConnectionLost,
    ProtocolViolation,
    StreamReset,
)
from .link import (
    FATAL_CLOSE_CODES,
    FATAL_STATUSES,
    MAX_MESSAGE,
    REPLY_TYPES,
    Connection,
    Link,
    Pending,
    ResetItem,
    Resync,
    Signal,
    Status,
    describe_connect_error,
    parse_message,
    refusal_reason,
    retry_after,
    ssl_reason,
)
from .tracker import StreamTracker, Update, Verdict, backoff_delay

_log = logging.getLogger("agentspoonsd.client")


class ConnectionTask:
    """The half of `VolatilityClient` that runs in its connection task: connect (with backoff
    and the handshake), open a session (`connected`, resume, the barrier ping), read, keep it
    alive, and hand each update to the consumer's buffer, until closed or a fatal error.

    A base class of `VolatilityClient` only: the state below is made by its ``__init__``, and
    `_send_request`, `disconnect` and `_step_timeout` are its own."""

    url: str
    display_url: str
    reconnect: bool
    backoff_initial: float
    backoff_max: float
    buffer_size: int
    connect_timeout: float | None
    close_timeout: float
    keepalive: float | None
    on_status: Callable[[Status], None] | None
    ssl_context: ssl.SSLContext | None
    tracker: StreamTracker
    connections: int
    duplicates: int
    server_info: dict[str, Any] | None
    last_error: ConnectFailed | None
    _headers: list[tuple[bytes, bytes]]
    _failures: int
    _items: deque[Update | ResetItem]
    _recent: deque[Update]
    _latest: dict[str, Update]
    _latest_any: Update | None
    _arrived: Signal
    _space: Signal
    _conn: Connection | None
    _failure: BaseException | None
    _closed: bool
    _scope: anyio.CancelScope | None
    _guard_scope: anyio.CancelScope | None
    _stopped: anyio.Event

    @property
    def _step_timeout(self) -> float:
        raise NotImplementedError

    async def disconnect(self) -> None:
        raise NotImplementedError

    async def _send_request(
        self,
        conn: Connection,
        message: Any,
        expected: str,
        *,
        waited: bool,
        internal: bool = False,
    ) -> Pending | None:
        raise NotImplementedError

    def _status(
        self, kind: Any, message: str, /, *, level: int = logging.INFO, **detail: Any
    ) -> None:
        _log.log(level, "client_%s url=%s message=%s", kind, self.display_url, message)
        if self.on_status is not None:
            self.on_status(Status(kind, message, detail))

    async def _run(self) -> None:
        """Connect, read, reconnect with backoff, until closed or a fatal error. Never raises
        (the failure is handed to the consumer): it runs in the caller's nursery."""
        assert self._scope is not None
        attempt = 0
        try:
            with self._scope:
                if self._closed:
                    return
                deadline = (
                    None
                    if self.connect_timeout is None
                    else anyio.current_time() + self.connect_timeout
                )
                while True:
                    timeout = self._step_timeout
                    if deadline is not None and self.connections == 0:
                        # Bounded by the time left, but the last attempt, made at the
                        # deadline, still gets up to a second: time enough to be accepted.
                        left = deadline - anyio.current_time()
                        timeout = max(min(1.0, timeout), min(timeout, left))
                    retry_after, delivered = await self._connect_once(timeout)
                    if self._closed or self._failure is not None or not self.reconnect:
                        return
                    if delivered:
                        attempt = 0
                    delay = max(
                        backoff_delay(attempt, self.backoff_initial, self.backoff_max),
                        min(retry_after, self.backoff_max),
                    )
                    attempt += 1
                    if deadline is not None and self.connections == 0:
                        # Keep trying until the deadline, not only while a whole backoff fits
                        # before it: a daemon that comes up late in the window is still found.
                        left = deadline - anyio.current_time()
                        if left <= 0:
                            self._give_up()
                            return
                        delay = min(delay, left)
                    self._status("retrying", f"reconnecting in {delay:.2f} s", delay=delay)
                    await anyio.sleep(delay)
        except Exception as exc:  # a bug: surface it to the consumer instead of the nursery
            _log.exception("client connection task failed")
            self._failure = exc
        finally:
            self._conn = None
            self._stopped.set()
            self._arrived.notify()

    def _give_up(self) -> None:
        """No first connection within connect_timeout: raise the last cause to the consumer."""
        last = self.last_error
        cause = str(last) if last is not None else "no connection"
        error = ConnectFailed(
            f"{cause} (no connection within {self.connect_timeout:g} s, "
            f"{self._failures} attempt{'s' if self._failures != 1 else ''})",
            refused=last.refused if last else False,
            timeout=last.timeout if last else True,
            reason=last.reason if last else "timeout",
            status=last.status if last else None,
        )
        self._fail(error)

    async def _guard(self) -> None:
        """Until `disconnect`: if the nursery is cancelled first, disconnect (cleanly)."""
        assert self._guard_scope is not None
        with self._guard_scope:
            try:
                await anyio.sleep_forever()
            finally:
                if not self._closed:
                    await self.disconnect()

    def _fail(self, error: ClientError) -> None:
        self._failure = error
        self._status("failed", str(error), level=logging.WARNING, error=error)
        self._arrived.notify()

    async def _connect_once(self, within: float) -> tuple[float, bool]:
        """One connection, from the handshake until it ends. Returns (a server-asked minimum
        delay before retrying, whether it delivered updates). A fatal error sets _failure."""
        url = self.tracker.target(self.url)
        link, retry_after = await self._handshake(url, within)
        if link is None:
            return retry_after, False
        conn: Connection | None = None
        try:
            conn = await self._open_session(link, within)
            if conn is not None:
                await self._session(conn)
        finally:
            self._end_connection(conn)
            # Close (if nobody did yet), then read the daemon's close frame and the end of
            # the TCP stream before closing the socket; shielded and bounded.
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self.close_timeout):
                    await link.finish()
                await anyio.aclose_forcefully(link.stream)
        return self._after_connection(conn)

    async def _handshake(self, url: str, within: float) -> tuple[Link | None, float]:
        """TCP (and TLS) connect and the WebSocket handshake. Returns the link, or None and
        a server-asked minimum delay when that failed (reported, or made fatal)."""
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        target = self.display_url
        stream: anyio.abc.ByteStream | None = None
        link: Link | None = None
        event: WsEvent | None = None
        try:
            with anyio.fail_after(within):
                if secure:
                    stream = await anyio.connect_tcp(
                        host,
                        port,
                        tls=True,
                        ssl_context=self.ssl_context or ssl.create_default_context(),
                        tls_standard_compatible=False,
                    )
                else:
                    stream = await anyio.connect_tcp(host, port)
                core = ClientCore(host_header, resource, self._headers, max_message=MAX_MESSAGE)
                link = Link(stream, core)
                await link.flush()
                event = await link.next_event()
                while isinstance(event, PongReceived | Message):  # not before Accepted; safe
                    event = await link.next_event()
        except TimeoutError:
            error = ConnectFailed(f"timed out connecting to {target}", timeout=True)
        except ssl.SSLError as exc:
            error = ConnectFailed(
                f"TLS handshake failed: {ssl_reason(exc)}: {target}", reason="tls"
            )
        except OSError as exc:
            error = describe_connect_error(exc, target)
        else:
            assert link is not None
            if isinstance(event, Accepted):
                return link, 0.0
            if isinstance(event, Refused):
                await anyio.aclose_forcefully(link.stream)
                return None, self._refused(event)
            if isinstance(link.error, ssl.SSLError):  # TLS can fail on the first read, too
                reason = ssl_reason(link.error)
                error = ConnectFailed(f"TLS handshake failed: {reason}: {target}", reason="tls")
            else:
                error = ConnectFailed(
                    f"the connection closed during the handshake: {target}", reason="closed"
                )
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        self._connect_error(error)
        return None, 0.0

    def _refused(self, refusal: Refused) -> float:
        """An HTTP answer to the upgrade: fatal for 401/403, else retried (after Retry-After)."""
        said = refusal_reason(refusal.body)
        status = refusal.status
        if status in FATAL_STATUSES:
            text = FATAL_STATUSES[status] + (f": {said}" if said else "")
            self._fail(AuthenticationError(text, status))
            return 0.0
        text = f"the daemon refused the connection: HTTP {status}" + (f": {said}" if said else "")
        self._connect_error(ConnectFailed(text, reason="http", status=status))
        return retry_after(refusal.headers)

    def _connect_error(self, error: ConnectFailed) -> None:
        self.last_error = error
        first = self._failures == 0
        self._failures += 1
        if not self.reconnect:
            self._fail(error)
            return
        self._status(
            "connect_failed",
            str(error),
            level=logging.WARNING if first else logging.INFO,
            reason=error.reason,
            status=error.status,
            first=first,
        )

    def _after_connection(self, conn: Connection | None) -> tuple[float, bool]:
        if conn is None:
            return 0.0, False
        reason = conn.link.core.closed
        code = reason.code if reason is not None else None
        said = f" {reason.reason}" if reason is not None and reason.reason else ""
        text = f"connection closed ({code}{said})"
        if code in FATAL_CLOSE_CODES:
            said = reason.reason if reason is not None and reason.reason else ""
            self._fail(AuthenticationError(f"{said or FATAL_CLOSE_CODES[code]} ({code})"))
        elif self._closed:
            pass
        elif not self.reconnect:
            self._fail(ConnectionLost(text, code))
        else:
            self._status("disconnected", text, level=logging.WARNING, code=code)
        return 0.0, conn.delivered

    async def _open_session(self, link: Link, within: float) -> Connection | None:
        message: dict[str, Any] | None = None
        problem = "the first message was not `connected`"
        with anyio.move_on_after(within) as waited:
            while True:
                event = await link.next_event()
                if isinstance(event, Message):
                    message = parse_message(event.data)
                    break
                if isinstance(event, Closed):
                    problem = "the connection closed before `connected`"
                    break
        if waited.cancelled_caught:
            problem = "timed out waiting for `connected`"
        if message is None or message.get("type") != "connected":
            if self.reconnect:
                self._connect_error(
                    ConnectFailed(f"{problem}: {self.display_url}", reason="closed")
                )
            else:
                self._fail(
                    ConnectionLost(problem) if message is None else ProtocolViolation(problem)
                )
            return None
        conn = Connection(link, message)
        self.server_info = message
        # A ping first: errors before its pong are about the URL (unknown_symbol ...), so the
        # replies to the user's requests line up after it.
        await self._send_request(conn, {"type": "ping"}, "pong", waited=False, internal=True)
        if self.tracker.needs_subscribe_all():
            await self._send_request(
                conn,
                {"type": "subscribe", "symbols": ["*"]},
                "subscribed",
                waited=False,
                internal=True,
            )
        self.connections += 1
        self._failures = 0
        self._conn = conn
        self._arrived.notify()
        listed = ", ".join(message.get("symbols") or []) or "-"
        self._status(
            "connected",
            f"connected to {self.display_url} (symbols: {listed})",
            symbols=message.get("symbols"),
        )
        return conn

    async def _session(self, conn: Connection) -> None:
        """Read until the connection ends; a seq gap closes it (to resume on the next one)."""
        async with anyio.create_task_group() as group:
            if self.keepalive:
                group.start_soon(self._keepalive, conn, group.cancel_scope)
            try:
                await self._read(conn)
            except Resync as gap:
                if self.reconnect:
                    self._status("resync", str(gap))
                else:
                    self._fail(ProtocolViolation(f"seq gap without reconnect: {gap}"))
            finally:
                group.cancel_scope.cancel()

    async def _read(self, conn: Connection) -> None:
        link = conn.link
        while True:
            while len(self._items) >= self.buffer_size and not conn.pending and not self._closed:
                conn.blocked = True
                await self._space.wait()
            conn.blocked = False
            event = await link.next_event()
            if isinstance(event, Message):
                message = parse_message(event.data)
                if message is not None:
                    self._dispatch(conn, message)
            elif isinstance(event, PongReceived):
                if conn.pong is not None:
                    conn.pong.set()
            elif isinstance(event, Closed):
                return

    async def _keepalive(self, conn: Connection, session: anyio.CancelScope) -> None:
        assert self.keepalive is not None
        while True:
            await anyio.sleep(self.keepalive)
            if conn.blocked:  # the reader is not reading: the pong could not be seen
                continue
            conn.pong = pong = anyio.Event()
            conn.link.core.ping(b"agentspoonsd-client")
            with anyio.move_on_after(self.keepalive):
                await conn.link.flush()
                await pong.wait()
            if pong.is_set() or conn.blocked or conn.link.core.closed is not None:
                continue
            self._status(
                "disconnected", "no answer to a ping: the connection is dead", level=logging.WARNING
            )
            with anyio.move_on_after(self.close_timeout):
                await conn.link.close(1001, "keepalive timeout")
            session.cancel()
            return

    def _end_connection(self, conn: Connection | None) -> None:
        self._conn = None
        if conn is not None:
            for pending in conn.pending:
                pending.lost = True
                pending.done.set()
            conn.pending.clear()
        self._arrived.notify()

    def _dispatch(self, conn: Connection, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "volatility_update":
            self._on_update(conn, message)
        elif kind == "reset":
            symbol = str(message.get("symbol"))
            oldest, latest = int(message["oldest_seq"]), int(message.get("latest_seq", -1))
            previous = self.tracker.reset(symbol, oldest)
            self._push(ResetItem(StreamReset(symbol, previous, oldest, latest)))
        elif kind == "error" or kind in REPLY_TYPES.values():
            self._on_reply(conn, message)
        else:  # `connected` again, or a type added later: ignored, as the protocol asks
            _log.debug("ignored message type %r", kind)

    def _on_update(self, conn: Connection, message: dict[str, Any]) -> None:
        data = message.get("data")
        if not isinstance(data, dict) or "symbol" not in data or "seq" not in data:
            _log.warning("update without data.symbol/seq ignored")
            return
        update = Update(data, str(message.get("timestamp")), time.time())
        verdict = self.tracker.accept(update.symbol, update.seq)
        if verdict is Verdict.DUPLICATE:
            self.duplicates += 1
            return
        if verdict is Verdict.GAP:
            last = self.tracker.last_seq.get(update.symbol)
            raise Resync(f"{update.symbol}: seq {update.seq} after {last}; resuming")
        conn.delivered = True
        self._latest[update.symbol] = update
        self._latest_any = update
        self._recent.append(update)
        self._push(update)

    def _on_reply(self, conn: Connection, message: dict[str, Any]) -> None:
        kind = message.get("type")
        head = conn.pending[0] if conn.pending else None
        if kind == "error" and (head is None or (conn.barrier and head.internal)):
            # Not a reply: about the connect URL (unknown_symbol ...), or unsolicited.
            self._status(
                "server_error", f"{message.get('code')}: {message.get('message')}", **message
            )
            return
        if head is None or (kind != "error" and kind != head.expected):
            _log.debug("unmatched reply %r", kind)
            return
        conn.pending.popleft()
        if head.internal and kind == "pong":
            conn.barrier = False
        if kind == "error" and (head.internal or not head.waited):  # nobody else will see it
            self._status(
                "server_error", f"{message.get('code')}: {message.get('message')}", **message
            )
        if kind in ("subscribed", "unsubscribed"):
            conn.info["symbols"] = list(message.get("symbols") or [])
            if not head.internal:
                self.tracker.subscription_changed(conn.info["symbols"])
        head.reply = message
        head.done.set()

    def _push(self, item: Update | ResetItem) -> None:
        self._items.append(item)
        self._arrived.notify()
