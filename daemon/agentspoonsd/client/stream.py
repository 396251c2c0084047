"""`VolatilityClient`: the public face of the client (connect, iterate, request), under asyncio
or Trio (anyio). The work is done by its parts: `ClientConfig` (the options), `StreamTracker`
and `Session` (pure protocol state), `ConnectionLoop` (the connection task), `TaskLifetime`
(where that task runs and how it ends), `UpdateBuffer` (what the consumer gets)."""

from __future__ import annotations

import inspect
import os
import ssl
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from .buffer import ResetItem
from .config import DEFAULT_URL, ClientConfig
from .connection_task import ClientState, ConnectionLoop
from .errors import ClientClosed, ConnectFailed, ConnectionLost, ServerError, StreamReset
from .lifetime import TaskLifetime, in_task_group
from .link import ResetCallback, Status, TaskStarter, UpdateCallback
from .paging import history_pages, merge_newest
from .session import Pending, expected_reply
from .tracker import StreamTracker, Update


class VolatilityClient:
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
        config = ClientConfig.build(
            url,
            token,
            symbols,
            reconnect=reconnect,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            history_limit=history_limit,
            buffer_size=buffer_size,
            keep_recent=keep_recent,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
            keepalive=keepalive,
            ssl_context=ssl_context,
            cafile=cafile,
        )
        self.config = config
        self.url, self.display_url = config.url, config.display_url
        self.reconnect = config.reconnect
        self.backoff_initial, self.backoff_max = config.backoff_initial, config.backoff_max
        self.history_limit, self.buffer_size = config.history_limit, config.buffer_size
        self.connect_timeout, self.close_timeout = config.connect_timeout, config.close_timeout
        self.keepalive, self.ssl_context = config.keepalive, config.ssl_context
        self.on_status = on_status
        self.tracker = StreamTracker(config.symbols)
        self._state = ClientState(config.keep_recent)
        self._loop = ConnectionLoop(config, self.tracker, self._state, on_status)
        self._lifetime = TaskLifetime(self._loop.run, self._state, config.close_timeout)
        self._stack: AsyncExitStack | None = None

    # -- what the connection task found out -------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections established so far."""
        return self._state.connections

    @property
    def duplicates(self) -> int:
        """Updates dropped as already delivered."""
        return self._state.duplicates

    @property
    def server_info(self) -> dict[str, Any] | None:
        """The latest ``connected`` message."""
        return self._state.server_info

    @property
    def last_error(self) -> ConnectFailed | None:
        """The latest failed connect attempt."""
        return self._state.last_error

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
        self._lifetime.start(nursery)
        try:
            await self._state.wait_connection()
        except BaseException:
            self._lifetime.stop_nowait()
            raise

    async def disconnect(self) -> None:
        """Close the connection (code 1000) and stop reconnecting; idempotent.

        Safe in a cancelled scope: the close is shielded and bounded by ``close_timeout``.
        Afterwards the iteration ends and `listen` returns; requests raise `ClientClosed`.
        """
        await self._lifetime.close()

    async def __aenter__(self) -> VolatilityClient:
        stack = AsyncExitStack()
        await stack.enter_async_context(in_task_group(self.connect, self.disconnect))
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(exc_type, exc, tb)

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
        state = self._state
        while True:
            if not self._lifetime.started:
                raise RuntimeError("not connected: use open_client(), or connect() first")
            if state.closed:
                raise ClientClosed("the client was disconnected")
            item = state.buffer.pop()
            if item is not None:
                state.space.notify()
                if isinstance(item, ResetItem):
                    raise item.error
                return item
            if state.failure is not None:
                raise state.failure
            await state.arrived.wait()

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
        return self._state.buffer.buffered

    @property
    def connected(self) -> bool:
        """True while a connection is established."""
        return self._state.conn is not None

    def get_latest_data(self, symbol: str | None = None) -> dict[str, Any] | None:
        """The newest update received (of `symbol`, if given), or None. No I/O, not async."""
        update = self._state.buffer.latest(symbol)
        return None if update is None else update.data

    def recent(self, limit: int | None = None, symbol: str | None = None) -> list[Update]:
        """The last `limit` updates received (of `symbol`, if given), oldest first: the local
        history of at most ``keep_recent`` updates. No I/O, not async."""
        return self._state.buffer.recent(limit, symbol)

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
        expected = expected_reply(message)
        while True:
            conn = await self._state.wait_connection()
            answered = anyio.Event()
            pending = Pending(expected, done=answered)
            if await self._loop.send_request(conn, message, pending):
                await answered.wait()
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
        expected = expected_reply(message)
        while True:
            conn = await self._state.wait_connection()
            if await self._loop.send_request(conn, message, Pending(expected, waited=False)):
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
        conn = await self._state.wait_connection()
        limit = min(limit, int(conn.info.get("history_size") or limit))  # the daemon's maximum
        symbols = [symbol] if symbol is not None else list(conn.info.get("symbols") or [])
        rows: list[dict[str, Any]] = []
        for name in symbols:
            rows.extend(await history_pages(self.request, name, limit))
        return merge_newest(rows, limit) if len(symbols) > 1 else rows


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
