"""`VolatilityClient`: connect, read, reconnect and resume, under asyncio or Trio (anyio)."""

from __future__ import annotations

import inspect
import logging
import os
import ssl
from collections import deque
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
)
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio
import anyio.abc
import anyio.lowlevel
import orjson
from wsproto.utilities import LocalProtocolError

from .connection_task import ConnectionTask
from .errors import (
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    ServerError,
    StreamReset,
)
from .link import (
    DEFAULT_URL,
    REPLY_TYPES,
    STEP_TIMEOUT,
    Connection,
    Pending,
    ResetCallback,
    ResetItem,
    Signal,
    Status,
    TaskStarter,
    UpdateCallback,
    spawn_detached,
)
from .tracker import StreamTracker, Update

_log = logging.getLogger("agentspoonsd.client")


class VolatilityClient(ConnectionTask):
    """A reconnecting, resuming agentspoonsd client. See the module docstring for guarantees.

    Parameters:
        url: ``ws://`` or ``wss://`` URL of the daemon (default ``ws://127.0.0.1:8765/``).
        token: bearer token, sent as ``Authorization: Bearer`` (None: no header).
        symbols: the subscription; None means every symbol the token may see.
        reconnect: reconnect (and resume) after losing the connection; False makes losing it,
            or failing to connect, an error (`ConnectionLost`, `ConnectFailed`).
        backoff_initial, backoff_max: see `backoff_delay`.
        history_limit: the default `limit` of `fetch_history`.
        buffer_size: updates buffered before the client stops reading the socket.
        keep_recent: how many received updates `recent` keeps (the local history).
        connect_timeout: seconds within which the first connection must be made (retrying with
            backoff meanwhile, a last attempt at the deadline), else `ConnectFailed`, raised at
            most min(1 s, connect_timeout) after it; also bounds each attempt (TCP, TLS, the
            WebSocket handshake and the ``connected`` message). None: keep trying until
            connected (each attempt then bounded by 10 s).
        close_timeout: seconds to wait for the daemon's close answer when disconnecting.
        keepalive: seconds between WebSocket pings from the client; a ping not answered within
            the same time closes the connection (then reconnects). None disables.
        on_status: called (synchronously) with a `Status` on connect, a failed connect,
            disconnect, retry, and for errors the daemon reports about the connection URL (e.g.
            ``unknown_symbol``).
        ssl_context: for ``wss://`` (default: the system's trust store, or `cafile`).
        cafile: a PEM file of CA certificates to trust for ``wss://`` (instead of the system's).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        symbols: Iterable[str] | None = None,
        *,
        reconnect: bool = True,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        history_limit: int = 100,
        buffer_size: int = 10_000,
        keep_recent: int = 1000,
        connect_timeout: float | None = 10.0,
        close_timeout: float = 2.0,
        keepalive: float | None = 20.0,
        on_status: Callable[[Status], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | os.PathLike[str] | None = None,
    ) -> None:
        if backoff_initial < 0 or backoff_max < 0 or buffer_size < 1 or history_limit < 1:
            raise ValueError("backoff values must be >= 0, buffer_size and history_limit >= 1")
        if keep_recent < 1 or (connect_timeout is not None and connect_timeout <= 0):
            raise ValueError("keep_recent must be >= 1 and connect_timeout > 0 (or None)")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        if symbols is None:  # symbols in the URL count as the subscription
            query = parse_qsl(parts.query, keep_blank_values=True)
            listed = [value for key, value in query if key == "symbols"]
            if listed:
                symbols = [s for s in listed[-1].split(",") if s]
        self.url = url
        # For messages: without the query (it may hold an access_token) or any user:password.
        host = parts.netloc.rpartition("@")[2]
        self.display_url = urlunsplit((parts.scheme, host, parts.path or "/", "", ""))
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.history_limit = history_limit
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.keepalive = keepalive
        self.on_status = on_status
        if ssl_context is None and cafile is not None:
            ssl_context = ssl.create_default_context(cafile=os.fspath(cafile))
        self.ssl_context = ssl_context
        self._headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
        self.tracker = StreamTracker(symbols)
        self.connections = 0  # connections established so far
        self.duplicates = 0  # updates dropped as already delivered
        self.server_info: dict[str, Any] | None = None  # the latest `connected` message
        self.last_error: ConnectFailed | None = None  # the latest failed connect attempt
        self._failures = 0  # failed connect attempts since the last connection
        self._items: deque[Update | ResetItem] = deque()
        self._recent: deque[Update] = deque(maxlen=keep_recent)
        self._latest: dict[str, Update] = {}
        self._latest_any: Update | None = None
        self._arrived = Signal()  # items, a connection, a failure or closing
        self._space = Signal()  # buffer space, or a request waiting for a reply
        self._conn: Connection | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._started = False
        # Made in `connect`, on the event loop (anyio's scopes need one). The connection task
        # runs in `_scope`; with a nursery it is shielded, so that a cancelled nursery cannot
        # cut its close handshake short, and `_guard`, unshielded in the same nursery, turns
        # that cancellation into a `disconnect`.
        self._scope: anyio.CancelScope | None = None
        self._guard_scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._closing: anyio.Event | None = None  # set once disconnect() has finished
        self._stack: AsyncExitStack | None = None
        self._task: Any = None  # the detached task (asyncio), kept from the garbage collector

    @property
    def _step_timeout(self) -> float:
        return STEP_TIMEOUT if self.connect_timeout is None else self.connect_timeout

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self, nursery: TaskStarter | None = None) -> None:
        """Start the connection task and return once connected.

        With `nursery` (a Trio nursery or an anyio task group) the task runs there; call
        `disconnect` before the nursery must end (cancelling the nursery disconnects too).
        Without it the task runs on its own in the current event loop (see the module
        docstring), until `disconnect`.

        Raises `AuthenticationError`; `ConnectFailed` when no connection was made within
        ``connect_timeout`` (or at the first failure with ``reconnect=False``). Cancelling it
        stops the connection task too.
        """
        if self._started:
            raise RuntimeError("connect() may be called once per client")
        self._started = True
        self._scope = anyio.CancelScope(shield=nursery is not None)
        self._guard_scope = anyio.CancelScope()
        if nursery is None:
            self._task = spawn_detached(self._run)
        else:
            nursery.start_soon(self._run)
            nursery.start_soon(self._guard)
        try:
            await self._wait_connection()
        except BaseException:
            self._stop_nowait()
            raise

    async def disconnect(self) -> None:
        """Close the connection (code 1000) and stop reconnecting; idempotent.

        Safe in a cancelled scope: the close is shielded and bounded by ``close_timeout``.
        Afterwards the iteration ends and `listen` returns; requests raise `ClientClosed`.
        """
        with anyio.CancelScope(shield=True):
            if self._closing is not None:  # another task is at it: wait for it to finish
                await self._closing.wait()
                return
            self._closing = anyio.Event()
            self._closed = True
            conn = self._conn
            try:
                if conn is not None:
                    # The reading task reads the daemon's answer: wait for it, bounded.
                    self._space.notify()
                    with anyio.move_on_after(self.close_timeout):
                        await conn.link.close(1000)
                        await conn.link.peer_closed.wait()
                self._stop_nowait()
                if self._started:
                    with anyio.move_on_after(self.close_timeout + 1):
                        await self._stopped.wait()
            finally:
                self._closing.set()

    def _stop_nowait(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        if self._guard_scope is not None:
            self._guard_scope.cancel()
        self._arrived.notify()
        self._space.notify()

    async def __aenter__(self) -> VolatilityClient:
        stack = AsyncExitStack()
        await stack.enter_async_context(self._lifetime())
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(*exc_info)  # type: ignore[arg-type]

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[VolatilityClient]:
        # The body's exception is re-raised outside the task group, unwrapped: a caller's
        # `except StreamReset` must not need `except*`. The connection task never raises.
        error: BaseException | None = None
        async with anyio.create_task_group() as group:
            try:
                await self.connect(group)
            except BaseException as exc:  # re-raised below, after the task group
                error = exc
            else:
                try:
                    yield self
                except BaseException as exc:  # re-raised below, after the task group
                    error = exc
                finally:
                    await self.disconnect()
        if error is not None:
            raise error

    # -- consuming ------------------------------------------------------------------------

    def __aiter__(self) -> VolatilityClient:
        return self

    async def __anext__(self) -> dict[str, Any]:
        """The next update's `data` (see `receive`); ends after `disconnect`."""
        try:
            return (await self.receive()).data
        except ClientClosed:
            raise StopAsyncIteration from None

    async def receive(self) -> Update:
        """The next update, with its envelope (publish time, receive time).

        Raises `StreamReset` in stream order; `ClientClosed` after `disconnect` (RuntimeError
        before `connect`); the connection task's fatal error (`AuthenticationError`, and with
        ``reconnect=False`` `ConnectionLost` or `ConnectFailed`) once the updates received
        before it have been returned.
        Cancellation-safe: an update is removed from the buffer only when returned. Always a
        cancel point, even when an update is already buffered.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            if not self._started:
                raise RuntimeError("not connected: use open_client(), or connect() first")
            if self._closed:
                raise ClientClosed("the client was disconnected")
            if self._items:
                item = self._items.popleft()
                self._space.notify()
                if isinstance(item, ResetItem):
                    raise item.error
                return item
            if self._failure is not None:
                raise self._failure
            await self._arrived.wait()

    async def listen(
        self, callback: UpdateCallback, *, on_reset: ResetCallback | None = None
    ) -> None:
        """Call `callback(data)` for every update (awaited if it returns an awaitable) until
        `disconnect`; then return. A `StreamReset` goes to `on_reset` when given, else it is
        raised. Other errors are those of `receive`."""
        while True:
            try:
                update = await self.receive()
            except StreamReset as reset:
                if on_reset is None:
                    raise
                result = on_reset(reset)
                if inspect.isawaitable(result):
                    await result
                continue
            except ClientClosed:
                return
            result = callback(update.data)
            if inspect.isawaitable(result):
                await result

    @property
    def buffered(self) -> int:
        """Updates received and not yet returned by the iteration."""
        return sum(1 for item in self._items if isinstance(item, Update))

    @property
    def connected(self) -> bool:
        """True while a connection is established."""
        return self._conn is not None

    def get_latest_data(self, symbol: str | None = None) -> dict[str, Any] | None:
        """The newest update received (of `symbol`, if given), or None. No I/O, not async."""
        update = self._latest_any if symbol is None else self._latest.get(symbol)
        return None if update is None else update.data

    def recent(self, limit: int | None = None, symbol: str | None = None) -> list[Update]:
        """The last `limit` updates received (of `symbol`, if given), oldest first: the local
        history of at most ``keep_recent`` updates. No I/O, not async."""
        kept = [u for u in self._recent if symbol is None or u.symbol == symbol]
        return kept if limit is None else kept[-limit:] if limit > 0 else []

    # -- requests -------------------------------------------------------------------------

    async def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send a request and return its reply (docs/PROTOCOL.md, "Replies").

        Any message may be sent: one the protocol does not know (any JSON value, not only an
        object) gets the daemon's ``error`` reply (``unknown_type``, ``invalid_message``).
        Raises `ServerError` for an ``error`` reply. If the connection is lost first and
        ``reconnect=True``, the request is sent again on the next connection (every request of
        the protocol is idempotent). A ``resume`` adds its symbols to the subscription, like a
        ``subscribe``; its replay arrives as updates, judged by seq like any other (a symbol
        the connection already receives gets ``already_subscribed``).
        """
        expected = self._expected_reply(message)
        while True:
            conn = await self._wait_connection()
            pending = await self._send_request(conn, message, expected, waited=True)
            if pending is not None:
                await pending.done.wait()
                if not pending.lost:
                    assert pending.reply is not None
                    if pending.reply.get("type") == "error":
                        raise ServerError(pending.reply)
                    return pending.reply
            if not self.reconnect:
                raise ConnectionLost("the connection ended before the reply")

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send a request without waiting for its reply (an ``error`` reply goes to
        ``on_status`` as ``server_error``).

        Waits for a connection if there is none. A subscribe/unsubscribe still updates the
        subscription the client re-establishes after a reconnect.
        """
        expected = self._expected_reply(message)
        while True:
            conn = await self._wait_connection()
            if await self._send_request(conn, message, expected, waited=False) is not None:
                return

    async def subscribe(self, symbols: Iterable[str]) -> list[str]:
        """Add symbols (``"*"``: all allowed); returns the new subscription."""
        reply = await self.request({"type": "subscribe", "symbols": list(symbols)})
        return list(reply["symbols"])

    async def unsubscribe(self, symbols: Iterable[str]) -> list[str]:
        """Remove symbols (``"*"``: all); returns the new subscription."""
        reply = await self.request({"type": "unsubscribe", "symbols": list(symbols)})
        return list(reply["symbols"])

    async def fetch_history(
        self, limit: int | None = None, symbol: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest `limit` (default ``history_limit``) updates the *daemon* retains, oldest
        first, as `data` objects: ``history`` requests (for the updates this client received,
        see `recent`).

        With `symbol` None: every symbol of the current subscription (one request each),
        merged by bar time (then symbol), the newest `limit` of them. The limit is capped at
        the daemon's ``history_size``.
        """
        limit = self.history_limit if limit is None else limit
        conn = await self._wait_connection()
        limit = min(limit, int(conn.info.get("history_size") or limit))  # the daemon's maximum
        symbols = [symbol] if symbol is not None else list(conn.info.get("symbols") or [])
        rows: list[dict[str, Any]] = []
        for name in symbols:
            rows.extend(await self._history_pages(name, limit))
        if len(symbols) > 1:
            rows.sort(key=lambda d: (str(d.get("timestamp")), str(d.get("symbol"))))
            rows = rows[-limit:]
        return rows

    async def _history_pages(self, symbol: str, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` updates of `symbol`, oldest first, following the daemon's pages
        (a reply holds at most 256 KiB: `more` and `before_seq` lead to the older ones)."""
        request: dict[str, Any] = {"type": "history", "symbol": symbol, "limit": limit}
        pages: list[list[dict[str, Any]]] = []
        wanted = limit
        while wanted > 0:
            reply = await self.request(request)
            updates = list(reply.get("updates") or [])
            pages.append(updates)
            wanted -= len(updates)
            if not reply.get("more") or not updates or "before_seq" not in reply:
                break  # a daemon without pages, or nothing older retained
            request = {**request, "limit": wanted, "before_seq": reply["before_seq"]}
        return [row for page in reversed(pages) for row in page]

    @staticmethod
    def _expected_reply(message: Any) -> str:
        # Not an object: the daemon answers invalid_message; the client does not judge it.
        kind = message.get("type") if isinstance(message, Mapping) else None
        return REPLY_TYPES.get(kind, "error") if isinstance(kind, str) else "error"

    async def _send_request(
        self,
        conn: Connection,
        message: Any,
        expected: str,
        *,
        waited: bool,
        internal: bool = False,
    ) -> Pending | None:
        """Queue the reply slot and the frame, then send. None when the connection is gone."""
        pending = Pending(expected, internal=internal, waited=waited)
        text = orjson.dumps(dict(message) if isinstance(message, Mapping) else message).decode()
        # The slot and the frame are queued together, synchronously: replies come in the
        # order the frames leave (`Link` sends queued frames in order).
        try:
            conn.link.core.send_text(text)
        except LocalProtocolError:
            return None  # closing: the request goes on the next connection
        conn.pending.append(pending)
        self._space.notify()  # a reply is due: the reader must read even with a full buffer
        # Shielded: a send cancelled half-way would leave a torn frame. Bounded: a send that
        # cannot finish means a dead connection.
        sent = False
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._step_timeout):
                sent = await conn.link.flush()
            if not sent:
                with anyio.move_on_after(self.close_timeout):
                    await conn.link.close(1001, "send failed")
                pending.lost = True
                pending.done.set()
                return None
        return pending

    async def _wait_connection(self) -> Connection:
        while True:
            if self._closed:
                raise ClientClosed("the client was disconnected")
            if self._failure is not None:
                raise self._failure
            if self._conn is not None:
                return self._conn
            await self._arrived.wait()


def open_client(
    url: str = DEFAULT_URL,
    token: str | None = None,
    symbols: Iterable[str] | None = None,
    **options: Any,
) -> AbstractAsyncContextManager[VolatilityClient]:
    """``async with open_client(url, token) as client: async for update in client: ...``

    Connects before the body runs (see `VolatilityClient.connect`: `ConnectFailed` when no
    connection is made within ``connect_timeout``, 10 s by default; ``connect_timeout=None``
    keeps trying) and disconnects cleanly when it ends, however it ends. Keyword options are
    those of `VolatilityClient`. An exception from the body propagates unchanged (not wrapped
    in an ExceptionGroup). Runs under asyncio and Trio alike.
    """
    return VolatilityClient(url, token, symbols, **options)
