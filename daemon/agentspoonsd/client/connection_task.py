"""The client's connection task (`ConnectionLoop`): connect with backoff, open a session, read,
keep it alive, reconnect; and the state it shares with the consumer side (`ClientState`).

The decisions are made by pure objects: `RetryPlan` (when to try again, when to give up),
`Session` (what each message means), `StreamTracker` (seqs, the resume URL), `UpdateBuffer`
(what the consumer gets). This module carries them out over anyio.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import orjson
from wsproto.utilities import LocalProtocolError

from ..wscore import Closed, Message, PongReceived, Refused
from .buffer import UpdateBuffer
from .config import ClientConfig
from .dial import dial
from .errors import (
    AuthenticationError,
    ClientClosed,
    ClientError,
    ConnectFailed,
    ConnectionLost,
    ProtocolViolation,
)
from .link import (
    FATAL_CLOSE_CODES,
    FATAL_STATUSES,
    Connection,
    Link,
    Resync,
    Signal,
    Status,
    parse_message,
    refusal_reason,
    retry_after,
)
from .retry import RetryPlan
from .session import Deliver, Duplicate, Gap, Pending, Report, Reset, Session
from .tracker import StreamTracker

_log = logging.getLogger("agentspoonsd.client")


class ClientState:
    """What the consumer side and the connection task share, on one event loop (no locks):
    the buffer, the current connection, the fatal failure, the counters, and two signals."""

    def __init__(self, keep_recent: int) -> None:
        self.buffer = UpdateBuffer(keep_recent)
        self.arrived = Signal()  # items, a connection, a failure or closing
        self.space = Signal()  # buffer space, or a request waiting for a reply
        self.conn: Connection | None = None
        self.failure: BaseException | None = None
        self.closed = False
        self.connections = 0  # connections established so far
        self.duplicates = 0  # updates dropped as already delivered
        self.server_info: dict[str, Any] | None = None  # the latest `connected` message
        self.last_error: ConnectFailed | None = None  # the latest failed connect attempt

    async def wait_connection(self) -> Connection:
        """The current connection, once there is one. Raises `ClientClosed` once closed, the
        connection task's fatal error once it failed."""
        while True:
            if self.closed:
                raise ClientClosed("the client was disconnected")
            if self.failure is not None:
                raise self.failure
            if self.conn is not None:
                return self.conn
            await self.arrived.wait()


async def first_message(link: Link, within: float) -> tuple[dict[str, Any] | None, str]:
    """The daemon's first message (None if there was none within `within` seconds, or it was
    not JSON), and what to say if it is not ``connected``."""
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
    return message, problem


class ConnectionLoop:
    """Runs the connection task of one client until it is closed or fails fatally: connect
    (`dial`), open a session (``connected``, the barrier ping, ``subscribe ["*"]`` when
    resuming with everything wanted), read into the buffer, keep alive, and reconnect.

    It never raises into its nursery: a fatal error goes to `state.failure` (and
    ``on_status`` as ``failed``), a bug too (logged with its traceback)."""

    def __init__(
        self,
        config: ClientConfig,
        tracker: StreamTracker,
        state: ClientState,
        on_status: Callable[[Status], None] | None = None,
    ) -> None:
        self.config = config
        self.tracker = tracker
        self.state = state
        self.on_status = on_status
        self.retry = RetryPlan(
            connect_timeout=config.connect_timeout,
            step_timeout=config.step_timeout,
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
        )

    def status(
        self, kind: Any, message: str, /, *, level: int = logging.INFO, **detail: Any
    ) -> None:
        """Log a connection event and hand it to ``on_status``."""
        _log.log(level, "client_%s url=%s message=%s", kind, self.config.display_url, message)
        if self.on_status is not None:
            self.on_status(Status(kind, message, detail))

    def fail(self, error: ClientError) -> None:
        """A fatal error: the consumer raises it next."""
        self.state.failure = error
        self.status("failed", str(error), level=logging.WARNING, error=error)
        self.state.arrived.notify()

    async def run(self, scope: anyio.CancelScope, stopped: anyio.Event) -> None:
        """Connect, read, reconnect with backoff, until closed or a fatal error; runs in
        `scope` and sets `stopped` at the end. Never raises."""
        state, config, retry = self.state, self.config, self.retry
        try:
            with scope:
                if state.closed:
                    return
                retry.start(anyio.current_time())
                while True:
                    first = state.connections == 0
                    within = retry.attempt_timeout(anyio.current_time(), connected_before=not first)
                    asked, delivered = await self._connect_once(within)
                    if state.closed or state.failure is not None or not config.reconnect:
                        return
                    delay = retry.next_delay(
                        anyio.current_time(),
                        connected_before=state.connections > 0,
                        delivered=delivered,
                        retry_after=asked,
                    )
                    if delay is None:
                        self.fail(retry.give_up_error(state.last_error))
                        return
                    self.status("retrying", f"reconnecting in {delay:.2f} s", delay=delay)
                    await anyio.sleep(delay)
        except Exception as exc:  # a bug: surface it to the consumer instead of the nursery
            _log.exception("client connection task failed")
            state.failure = exc
        finally:
            state.conn = None
            stopped.set()
            state.arrived.notify()

    async def _connect_once(self, within: float) -> tuple[float, bool]:
        """One connection, from the handshake until it ends. Returns (a server-asked minimum
        delay before retrying, whether it delivered updates). A fatal error calls `fail`."""
        outcome = await dial(
            self.tracker.target(self.config.url),
            headers=self.config.headers,
            ssl_context=self.config.ssl_context,
            display_url=self.config.display_url,
            within=within,
        )
        if isinstance(outcome, Refused):
            return self._refused(outcome), False
        if isinstance(outcome, ConnectFailed):
            self._connect_error(outcome)
            return 0.0, False
        link = outcome
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
                with anyio.move_on_after(self.config.close_timeout):
                    await link.finish()
                await anyio.aclose_forcefully(link.stream)
        return self._after_connection(conn)

    def _refused(self, refusal: Refused) -> float:
        """An HTTP answer to the upgrade: fatal for 401/403, else retried (after Retry-After)."""
        said = refusal_reason(refusal.body)
        status = refusal.status
        if status in FATAL_STATUSES:
            text = FATAL_STATUSES[status] + (f": {said}" if said else "")
            self.fail(AuthenticationError(text, status))
            return 0.0
        text = f"the daemon refused the connection: HTTP {status}" + (f": {said}" if said else "")
        self._connect_error(ConnectFailed(text, reason="http", status=status))
        return retry_after(refusal.headers)

    def _connect_error(self, error: ConnectFailed) -> None:
        self.state.last_error = error
        first = self.retry.failed()
        if not self.config.reconnect:
            self.fail(error)
            return
        self.status(
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
        said = reason.reason if reason is not None and reason.reason else ""
        text = f"connection closed ({code}{' ' + said if said else ''})"
        if code in FATAL_CLOSE_CODES:
            self.fail(AuthenticationError(f"{said or FATAL_CLOSE_CODES[code]} ({code})"))
        elif self.state.closed:
            pass
        elif not self.config.reconnect:
            self.fail(ConnectionLost(text, code))
        else:
            self.status("disconnected", text, level=logging.WARNING, code=code)
        return 0.0, conn.session.delivered

    async def _open_session(self, link: Link, within: float) -> Connection | None:
        message, problem = await first_message(link, within)
        if message is None or message.get("type") != "connected":
            if self.config.reconnect:
                text = f"{problem}: {self.config.display_url}"
                self._connect_error(ConnectFailed(text, reason="closed"))
            else:
                self.fail(
                    ConnectionLost(problem) if message is None else ProtocolViolation(problem)
                )
            return None
        conn = Connection(link, Session(self.tracker, message))
        self.state.server_info = message
        # A ping first: errors before its pong are about the URL (unknown_symbol ...), so the
        # replies to the user's requests line up after it.
        await self.send_request(
            conn, {"type": "ping"}, Pending("pong", internal=True, waited=False)
        )
        if self.tracker.needs_subscribe_all():
            everything = {"type": "subscribe", "symbols": ["*"]}
            await self.send_request(
                conn, everything, Pending("subscribed", internal=True, waited=False)
            )
        self.state.connections += 1
        self.retry.connected()
        self.state.conn = conn
        self.state.arrived.notify()
        listed = ", ".join(message.get("symbols") or []) or "-"
        self.status(
            "connected",
            f"connected to {self.config.display_url} (symbols: {listed})",
            symbols=message.get("symbols"),
        )
        return conn

    async def _session(self, conn: Connection) -> None:
        """Read until the connection ends; a seq gap closes it (to resume on the next one)."""
        async with anyio.create_task_group() as group:
            if self.config.keepalive:
                group.start_soon(self._keepalive, conn, group.cancel_scope)
            try:
                await self._read(conn)
            except Resync as gap:
                if self.config.reconnect:
                    self.status("resync", str(gap))
                else:
                    self.fail(ProtocolViolation(f"seq gap without reconnect: {gap}"))
            finally:
                group.cancel_scope.cancel()

    async def _read(self, conn: Connection) -> None:
        state, link = self.state, conn.link
        while True:
            while (
                len(state.buffer) >= self.config.buffer_size
                and not conn.session.pending
                and not state.closed
            ):
                conn.blocked = True
                await state.space.wait()
            conn.blocked = False
            event = await link.next_event()
            if isinstance(event, Message):
                message = parse_message(event.data)
                if message is not None:
                    self._carry_out(conn.session.receive(message, time.time()))
            elif isinstance(event, PongReceived):
                if conn.pong is not None:
                    conn.pong.set()
            elif isinstance(event, Closed):
                return

    def _carry_out(self, action: Deliver | Duplicate | Gap | Reset | Report | None) -> None:
        """Do what the session decided about one message."""
        state = self.state
        if isinstance(action, Deliver):
            state.buffer.push_update(action.update)
            state.arrived.notify()
        elif isinstance(action, Duplicate):
            state.duplicates += 1
        elif isinstance(action, Gap):
            raise Resync(action.text)
        elif isinstance(action, Reset):
            state.buffer.push_reset(action.error)
            state.arrived.notify()
        elif isinstance(action, Report):
            message = action.message
            text = f"{message.get('code')}: {message.get('message')}"
            self.status("server_error", text, **message)

    async def _keepalive(self, conn: Connection, session: anyio.CancelScope) -> None:
        interval = self.config.keepalive
        assert interval is not None
        while True:
            await anyio.sleep(interval)
            if conn.blocked:  # the reader is not reading: the pong could not be seen
                continue
            conn.pong = pong = anyio.Event()
            conn.link.core.ping(b"agentspoonsd-client")
            with anyio.move_on_after(interval):
                await conn.link.flush()
                await pong.wait()
            if pong.is_set() or conn.blocked or conn.link.core.closed is not None:
                continue
            self.status(
                "disconnected", "no answer to a ping: the connection is dead", level=logging.WARNING
            )
            with anyio.move_on_after(self.config.close_timeout):
                await conn.link.close(1001, "keepalive timeout")
            session.cancel()
            return

    def _end_connection(self, conn: Connection | None) -> None:
        self.state.conn = None
        if conn is not None:
            conn.session.lose_all()
        self.state.arrived.notify()

    async def send_request(self, conn: Connection, message: Any, pending: Pending) -> bool:
        """Queue `pending` and the frame of `message`, then send. False (and `pending` lost)
        when the connection is closing or the send failed (the connection is then closed).

        Shielded: a send cancelled half-way would leave a torn frame. Bounded by the step
        timeout: a send that cannot finish means a dead connection."""
        text = orjson.dumps(dict(message) if isinstance(message, Mapping) else message).decode()
        # The slot and the frame are queued together, synchronously: replies come in the
        # order the frames leave (`Link` sends queued frames in order).
        try:
            conn.link.core.send_text(text)
        except LocalProtocolError:
            return False  # closing: the request goes on the next connection
        conn.session.expect(pending)
        self.state.space.notify()  # a reply is due: the reader must read even when full
        sent = False
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.config.step_timeout):
                sent = await conn.link.flush()
            if not sent:
                with anyio.move_on_after(self.config.close_timeout):
                    await conn.link.close(1001, "send failed")
                pending.settle(None)
        return sent
