"""A Trio client for agentspoonsd that a consumer can rely on: every update once, in order.

Two ways to use it (both on the same class, `VolatilityClient`):

**Iteration** (recommended)::

    async with open_client("ws://127.0.0.1:8765/", token=TOKEN) as client:
        async for update in client:          # each `data` object of a volatility_update
            print(update["symbol"], update["seq"], update["volatility"])

**The prototype's callback style**, mapped onto Trio. Every method that does I/O is ``async``;
the connection lives in a task of a nursery you pass (Trio's rule: no task outlives its nursery)::

    client = VolatilityClient(url, token=TOKEN)
    async with trio.open_nursery() as nursery:
        await client.connect(nursery)              # returns once connected
        nursery.start_soon(client.listen, on_update)   # calls on_update(data) per update
        rows = await client.get_data_history(50)   # a `history` request to the daemon
        latest = client.get_latest_data()          # no I/O: a plain method
        await client.send({"type": "subscribe", "symbols": ["ETH/USD"]})
        await client.disconnect()                  # closes with 1000; listen() returns

Guarantees (docs/PROTOCOL.md is the contract they rest on):

- **No gap, no duplicate, in order.** The client remembers the last seq it accepted per symbol.
  An update whose seq is not above it is dropped (a duplicate); one more than one above it means
  something was missed, so the client reconnects and resumes from the last seq it has rather than
  deliver it. A reconnect (after any loss of the connection, a daemon restart included) resumes
  every symbol it has seen with ``?symbols=...&resume=SYMBOL:SEQ,...``, so the daemon replays
  what was missed before anything live, atomically.
- **Unless the daemon cannot fill the gap.** It then sends ``reset`` (the missed updates are no
  longer retained, or belong to another history: a restart without ``[history] persist``). The
  client raises `StreamReset` from the iteration, *in stream order*: every update before it has
  been delivered, and the next one is the first of the new sequence (``oldest_seq``). Catch it
  and iterate again; the client stays connected.
- **Reconnection** uses exponential backoff with full jitter (`backoff_delay`): attempt n waits a
  uniformly random time in [0, min(backoff_max, backoff_initial × 2ⁿ)). The attempt counter
  starts over once a connection has delivered an update. HTTP 401/403 on the upgrade (and close
  code 4001) are not retried: `AuthenticationError`.
- **Cancellation.** Cancelling an iteration (or a `receive`) loses nothing: an update is removed
  from the buffer only when it is returned. Leaving ``open_client`` (or `disconnect`), even
  because of a cancellation, sends a WebSocket close (1000) and waits up to ``close_timeout`` for
  the daemon's answer before the TCP connection is closed.
- **Backpressure.** Updates wait in a buffer of ``buffer_size``; when it is full the client stops
  reading the socket (unless a request is waiting for its reply), so a slow consumer slows the
  connection down instead of growing memory. The daemon may then close the connection (1013);
  the client reconnects and resumes, losing nothing.

`get_latest_data` reflects the newest update *received*, which can be ahead of what the
iteration has returned. A client nobody iterates or listens to stops reading once its buffer is
full: use `listen` (or iterate) with the callback style.
"""

from __future__ import annotations

import inspect
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

__all__ = [
    "DEFAULT_URL",
    "AuthenticationError",
    "ClientClosed",
    "ClientError",
    "ConnectFailed",
    "ConnectionLost",
    "ProtocolViolation",
    "ServerError",
    "Status",
    "StreamReset",
    "StreamTracker",
    "Update",
    "Verdict",
    "VolatilityClient",
    "backoff_delay",
    "open_client",
]

DEFAULT_URL = "ws://127.0.0.1:8765/"

_log = logging.getLogger("agentspoonsd.client")
E = TypeVar("E", bound=BaseException)
_MAX_MESSAGE = 64 * 1024 * 1024  # a `history` reply of 1000 updates is about 1.2 MB

# Server close codes after which reconnecting cannot help (the token is no longer valid).
_FATAL_CLOSE_CODES = {4001: "the token was revoked"}
# Refused upgrades that retrying cannot fix.
_FATAL_STATUSES = {
    401: "the daemon refused the token (401)",
    403: "the daemon refused the connection (403: origin not allowed)",
}
# The reply each request type gets (docs/PROTOCOL.md, "Replies"); an `error` may come instead.
_REPLY_TYPES = {
    "ping": "pong",
    "subscribe": "subscribed",
    "unsubscribe": "unsubscribed",
    "history": "history",
}


# --- errors ---------------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of everything this module raises on purpose."""


class AuthenticationError(ClientError):
    """The daemon refused the token (HTTP 401/403 on the upgrade, or close code 4001).

    Never retried: a new token is needed.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectFailed(ClientError):
    """No connection could be made (refused, unreachable, handshake timeout, 503, 400 ...).

    Raised only when ``reconnect=False``; otherwise the client keeps trying. `timeout` is true
    when the TCP connection or the handshake timed out; `refused` when the TCP connection was
    actively refused (nothing listens there).
    """

    def __init__(self, message: str, *, refused: bool = False, timeout: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.timeout = timeout


class ConnectionLost(ClientError):
    """An established connection ended (raised only when ``reconnect=False``)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ProtocolViolation(ClientError):
    """The daemon sent something docs/PROTOCOL.md does not allow (e.g. no `connected` first)."""


class ClientClosed(ClientError):
    """The client was disconnected (`disconnect`, or leaving ``open_client``)."""


class ServerError(ClientError):
    """The daemon answered a request with ``{"type": "error", ...}``; `code` is the stable code."""

    def __init__(self, reply: Mapping[str, Any]) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.reply = dict(reply)
        self.code = str(reply.get("code"))
        self.symbol: str | None = reply.get("symbol")


class StreamReset(ClientError):
    """The daemon could not replay what this client missed of `symbol`: there is a gap.

    Raised by the iteration in stream order. `last_seq` is the last seq the consumer got;
    updates of `symbol` continue at `oldest_seq`. The client is still usable: iterate again.
    """

    def __init__(self, symbol: str, last_seq: int | None, oldest_seq: int, latest_seq: int) -> None:
        super().__init__(
            f"{symbol}: cannot resume after seq {last_seq}; the stream continues at "
            f"seq {oldest_seq} (latest {latest_seq})"
        )
        self.symbol = symbol
        self.last_seq = last_seq
        self.oldest_seq = oldest_seq
        self.latest_seq = latest_seq


# --- pure parts: backoff, the stream tracker --------------------------------------------------


def backoff_delay(
    attempt: int,
    initial: float = 0.5,
    maximum: float = 30.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 for the first retry).

    Exponential backoff with full jitter: uniform in [0, min(maximum, initial × 2**attempt)).
    `rand` returns a float in [0, 1) (``random.random`` by default; injectable for tests).
    """
    if attempt < 0 or initial < 0 or maximum < 0:
        raise ValueError("attempt, initial and maximum must be >= 0")
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 64))
    return rand() * ceiling


@dataclass(frozen=True, slots=True)
class Update:
    """One `volatility_update` as received: its `data`, the outer (publish) timestamp, and the
    wall-clock time (seconds since the epoch) at which the client read it."""

    data: dict[str, Any]
    published: str
    received: float

    @property
    def symbol(self) -> str:
        return str(self.data["symbol"])

    @property
    def seq(self) -> int:
        return int(self.data["seq"])

    @property
    def latency(self) -> float | None:
        """Seconds from the daemon publishing the update to the client reading it (None when
        the timestamp is missing or unreadable). Includes any clock offset between hosts."""
        try:
            return self.received - datetime.fromisoformat(self.published).timestamp()
        except (TypeError, ValueError):
            return None


class Verdict(Enum):
    """What to do with a received update."""

    DELIVER = "deliver"
    DUPLICATE = "duplicate"  # seq not above the last one accepted: drop it
    GAP = "gap"  # seq more than one above the last one: missed updates, resume instead


class StreamTracker:
    """Sans-IO: what a client knows of its stream, and what to ask for on (re)connect.

    `want_all` (no `symbols` given) means "every symbol the token may see", re-established on
    every connection; otherwise `symbols` is the explicit subscription. `last_seq` holds the last
    seq accepted per symbol.
    """

    def __init__(self, symbols: Iterable[str] | None = None) -> None:
        self.want_all = symbols is None
        self.symbols: list[str] = list(dict.fromkeys(symbols or ()))
        self.last_seq: dict[str, int] = {}

    def resume_positions(self) -> dict[str, int]:
        """The symbols to resume and the last seq of each: those subscribed that were seen."""
        if self.want_all:
            return dict(self.last_seq)
        return {s: self.last_seq[s] for s in self.symbols if s in self.last_seq}

    def target(self, base_url: str) -> str:
        """The URL to connect to: `base_url` with ``symbols`` and ``resume`` set for this state.

        Other query parameters (``access_token``) are kept. With `want_all` and nothing to
        resume, neither is set (the daemon's default: everything allowed).
        """
        parts = urlsplit(base_url)
        query = [
            f"{quote(key, safe='')}={quote(value, safe='')}"
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
            if key not in ("symbols", "resume")
        ]
        positions = self.resume_positions()
        if not self.want_all:
            fresh = [s for s in self.symbols if s not in positions]
            query.append("symbols=" + ",".join(quote(s, safe="") for s in fresh))
        if positions:
            query.append(
                "resume=" + ",".join(f"{quote(s, safe='')}:{seq}" for s, seq in positions.items())
            )
        path = parts.path or "/"
        return urlunsplit((parts.scheme, parts.netloc, path, "&".join(query), parts.fragment))

    def needs_subscribe_all(self) -> bool:
        """True when the connection URL resumes some symbols and `want_all` holds: the daemon
        then subscribes only the resumed ones, so the client must ``subscribe ["*"]``."""
        return self.want_all and bool(self.last_seq)

    def accept(self, symbol: str, seq: int) -> Verdict:
        """Judge an update; DELIVER records `seq` as the last one of `symbol`."""
        last = self.last_seq.get(symbol)
        if last is not None:
            if seq <= last:
                return Verdict.DUPLICATE
            if seq != last + 1:
                return Verdict.GAP
        self.last_seq[symbol] = seq
        return Verdict.DELIVER

    def reset(self, symbol: str, oldest_seq: int) -> int | None:
        """A `reset`: the next update of `symbol` will be `oldest_seq`. Returns the previous
        last seq (what the consumer had)."""
        previous = self.last_seq.get(symbol)
        self.last_seq[symbol] = oldest_seq - 1
        return previous

    def subscription_changed(self, symbols: Sequence[str]) -> None:
        """The daemon's answer to a subscribe/unsubscribe the *user* sent: the new explicit
        subscription. Symbols no longer subscribed are forgotten, so subscribing them again
        later starts from the live stream instead of replaying the time in between."""
        self.want_all = False
        self.symbols = list(symbols)
        for symbol in [s for s in self.last_seq if s not in self.symbols]:
            del self.last_seq[symbol]


# --- the Trio layer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """A connection event, for `on_status` (the CLI prints these to stderr)."""

    kind: Literal["connected", "disconnected", "retrying", "server_error", "resync"]
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    """A request waiting for its reply; replies come in request order (one per request)."""

    expected: str
    internal: bool = False  # the client's own (barrier ping, subscribe "*"): not the user's
    waited: bool = True  # False for `send()`: nobody awaits the reply
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | None = None
    lost: bool = False  # the connection ended first


@dataclass(slots=True)
class _Connection:
    ws: WebSocketConnection
    info: dict[str, Any]
    pending: deque[_Pending] = field(default_factory=deque)
    barrier: bool = True  # until the first pong: errors are about the connect URL
    blocked: bool = False  # the reader waits for buffer space
    delivered: bool = False


@dataclass(frozen=True, slots=True)
class _ResetItem:
    error: StreamReset


class _Signal:
    """Wake every task waiting on it (an Event that re-arms)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()


class _Resync(Exception):
    """A seq gap: close this connection and resume on a new one."""


UpdateCallback = Callable[[dict[str, Any]], Awaitable[None] | None]
ResetCallback = Callable[[StreamReset], Awaitable[None] | None]


class VolatilityClient:
    """A reconnecting, resuming agentspoonsd client. See the module docstring for guarantees.

    Parameters:
        url: ``ws://`` or ``wss://`` URL of the daemon (default ``ws://127.0.0.1:8765/``).
        token: bearer token, sent as ``Authorization: Bearer`` (None: no header).
        symbols: the subscription; None means every symbol the token may see.
        reconnect: reconnect (and resume) after losing the connection; False makes losing it,
            or failing to connect, an error (`ConnectionLost`, `ConnectFailed`).
        backoff_initial, backoff_max: see `backoff_delay`.
        history_limit: the default `limit` of `get_data_history`.
        buffer_size: updates buffered before the client stops reading the socket.
        connect_timeout: seconds for TCP connect plus the WebSocket handshake.
        close_timeout: seconds to wait for the daemon's close answer when disconnecting.
        keepalive: seconds between WebSocket pings from the client; a ping not answered within
            the same time closes the connection (then reconnects). None disables.
        on_status: called (synchronously) with a `Status` on connect, disconnect, retry, and
            for errors the daemon reports about the connection URL (e.g. ``unknown_symbol``).
        ssl_context: for ``wss://`` (default: the system's trust store).
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
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        keepalive: float | None = 20.0,
        on_status: Callable[[Status], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if backoff_initial < 0 or backoff_max < 0 or buffer_size < 1 or history_limit < 1:
            raise ValueError("backoff values must be >= 0, buffer_size and history_limit >= 1")
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
        self.ssl_context = ssl_context
        self._headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
        self.tracker = StreamTracker(symbols)
        self.connections = 0  # connections established so far
        self.duplicates = 0  # updates dropped as already delivered
        self.server_info: dict[str, Any] | None = None  # the latest `connected` message
        self._items: deque[Update | _ResetItem] = deque()
        self._latest: dict[str, Update] = {}
        self._latest_any: Update | None = None
        self._arrived = _Signal()  # items, a connection, a failure or closing
        self._space = _Signal()  # buffer space, or a request waiting for a reply
        self._conn: _Connection | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._started = False
        # The connection task runs shielded, so that a cancelled nursery cannot cut its close
        # handshake short; `_guard`, unshielded in the same nursery, turns that cancellation
        # into a `disconnect`.
        self._scope = trio.CancelScope(shield=True)
        self._guard_scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._closing: trio.Event | None = None  # set once disconnect() has finished
        self._stack: AsyncExitStack | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self, nursery: trio.Nursery) -> None:
        """Start the connection task in `nursery` and return once connected.

        With ``reconnect=True`` it keeps trying (bound it with `trio.fail_after` if needed);
        raises `AuthenticationError`, or with ``reconnect=False`` `ConnectFailed`. Cancelling
        it stops the connection task too. Call `disconnect` before the nursery must end.
        """
        if self._started:
            raise RuntimeError("connect() may be called once per client")
        self._started = True
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
        with trio.CancelScope(shield=True):
            if self._closing is not None:  # another task is at it: wait for it to finish
                await self._closing.wait()
                return
            self._closing = trio.Event()
            self._closed = True
            conn = self._conn
            try:
                if conn is not None:
                    with trio.move_on_after(self.close_timeout):
                        await conn.ws.aclose(1000)
                self._stop_nowait()
                if self._started:
                    with trio.move_on_after(self.close_timeout + 1):
                        await self._stopped.wait()
            finally:
                self._closing.set()

    def _stop_nowait(self) -> None:
        self._closed = True
        self._scope.cancel()
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
        # The body's exception is re-raised outside the nursery, unwrapped: a caller's
        # `except StreamReset` must not need `except*`. The connection task never raises.
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self.connect(nursery)
            except BaseException as exc:  # re-raised below, after the nursery
                error = exc
            else:
                try:
                    yield self
                except BaseException as exc:  # re-raised below, after the nursery
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
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if not self._started:
                raise RuntimeError("not connected: use open_client(), or connect() first")
            if self._closed:
                raise ClientClosed("the client was disconnected")
            if self._items:
                item = self._items.popleft()
                self._space.notify()
                if isinstance(item, _ResetItem):
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

    def get_latest_data(self, symbol: str | None = None) -> dict[str, Any] | None:
        """The newest update received (of `symbol`, if given), or None. No I/O, not async."""
        update = self._latest_any if symbol is None else self._latest.get(symbol)
        return None if update is None else update.data

    # -- requests -------------------------------------------------------------------------

    async def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send a request and return its reply (docs/PROTOCOL.md, "Replies").

        Raises `ServerError` for an ``error`` reply. If the connection is lost first and
        ``reconnect=True``, the request is sent again on the next connection (every request
        of the protocol is idempotent). ``resume`` is the client's own business: ValueError.
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
        """Send a request without waiting for its reply (the prototype's ``send``).

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

    async def get_data_history(
        self, limit: int | None = None, symbol: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest `limit` (default ``history_limit``) updates the daemon retains, oldest
        first, as `data` objects: a ``history`` request.

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
    def _expected_reply(message: Mapping[str, Any]) -> str:
        kind = message.get("type")
        if kind == "resume":
            raise ValueError("the client resumes by itself; resume cannot be sent")
        if kind not in _REPLY_TYPES:
            raise ValueError(f"not a request type of the protocol: {kind!r}")
        return _REPLY_TYPES[kind]

    async def _send_request(
        self,
        conn: _Connection,
        message: Mapping[str, Any],
        expected: str,
        *,
        waited: bool,
        internal: bool = False,
    ) -> _Pending | None:
        """Queue the reply slot, then send. None when the connection is already gone."""
        pending = _Pending(expected, internal=internal, waited=waited)
        # The slot is queued before the bytes go out: sends on one connection leave in call
        # order (trio-websocket encodes synchronously, then takes a FIFO lock).
        conn.pending.append(pending)
        self._space.notify()  # a reply is due: the reader must read even with a full buffer
        text = orjson.dumps(dict(message)).decode()
        # Shielded: a send cancelled half-way would leave a reply slot with no request (or a
        # torn frame). Bounded: a send that cannot finish means a dead connection.
        sent = False
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.connect_timeout):
                try:
                    await conn.ws.send_message(text)
                    sent = True
                except ConnectionClosed:
                    pass
            if not sent:
                with trio.move_on_after(self.close_timeout):
                    await conn.ws.aclose(1001, "send failed")
                pending.lost = True
                pending.done.set()
                return None
        return pending

    async def _wait_connection(self) -> _Connection:
        while True:
            if self._closed:
                raise ClientClosed("the client was disconnected")
            if self._failure is not None:
                raise self._failure
            if self._conn is not None:
                return self._conn
            await self._arrived.wait()

    # -- the connection task --------------------------------------------------------------

    def _status(self, kind: Any, message: str, /, **detail: Any) -> None:
        _log.info("%s: %s", kind, message)
        if self.on_status is not None:
            self.on_status(Status(kind, message, detail))

    async def _run(self) -> None:
        """Connect, read, reconnect with backoff, until closed or a fatal error. Never raises
        (the failure is handed to the consumer): it runs in the caller's nursery."""
        attempt = 0
        try:
            with self._scope:
                if self._closed:
                    return
                while True:
                    retry_after, delivered = await self._connect_once()
                    if self._closed or self._failure is not None or not self.reconnect:
                        return
                    if delivered:
                        attempt = 0
                    delay = max(
                        backoff_delay(attempt, self.backoff_initial, self.backoff_max),
                        min(retry_after, self.backoff_max),
                    )
                    attempt += 1
                    self._status("retrying", f"reconnecting in {delay:.2f} s", delay=delay)
                    await trio.sleep(delay)
        except Exception as exc:  # a bug: surface it to the consumer instead of the nursery
            _log.exception("client connection task failed")
            self._failure = exc
        finally:
            self._conn = None
            self._stopped.set()
            self._arrived.notify()

    async def _guard(self) -> None:
        """Until `disconnect`: if the nursery is cancelled first, disconnect (cleanly)."""
        with self._guard_scope:
            try:
                await trio.sleep_forever()
            finally:
                if not self._closed:
                    await self.disconnect()

    def _fail(self, error: ClientError) -> None:
        self._failure = error
        self._arrived.notify()

    async def _connect_once(self) -> tuple[float, bool]:
        """One connection, from the handshake until it ends. Returns (a server-asked minimum
        delay before retrying, whether it delivered updates). A fatal error sets _failure."""
        url = self.tracker.target(self.url)
        conn: _Connection | None = None
        try:
            # The nursery hosts trio-websocket's reader task for this connection.
            async with trio.open_nursery() as nursery:
                opened = await self._handshake(nursery, url)
                if opened is not None:
                    ws, stream = opened
                    try:
                        conn = await self._open_session(ws)
                        if conn is not None:
                            await self._session(conn)
                    finally:
                        self._end_connection(conn)
                        # Close (if nobody did yet), then let the reader task see the daemon's
                        # close frame and the end of the TCP stream before it is cancelled.
                        with trio.CancelScope(shield=True), trio.move_on_after(self.close_timeout):
                            await ws.aclose(1000)
                            await stream.ended.wait()
                nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:  # raised by the reader task: an HTTP answer
            rejected: ConnectionRejected | None = _first(group, ConnectionRejected)
        else:
            rejected = None
        if rejected is None:
            return self._after_connection(conn)
        status = rejected.status_code
        if status in _FATAL_STATUSES:
            self._fail(AuthenticationError(_FATAL_STATUSES[status], status))
            return 0.0, False
        self._connect_error(ConnectFailed(f"the daemon refused the connection: HTTP {status}"))
        return _retry_after(rejected.headers), False

    async def _handshake(
        self, nursery: trio.Nursery, url: str
    ) -> tuple[WebSocketConnection, _WatchedStream] | None:
        """TCP (and TLS) connect and the WebSocket handshake; None when that failed (reported).

        Done here rather than with `open_websocket_url`, which waits for the whole
        `connect_timeout` when the peer closes the TCP connection during the handshake (a
        daemon going down, a proxy with no backend): this races the handshake with the end
        of the stream, so such a failure is reported at once and retried with backoff.
        """
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        target = self.display_url
        ws: WebSocketConnection | None = None
        stream: _WatchedStream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                if secure:
                    context = self.ssl_context or ssl.create_default_context()
                    raw: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                        host, port, ssl_context=context, https_compatible=True
                    )
                else:
                    raw = await trio.open_tcp_stream(host, port)
                stream = _WatchedStream(raw)
                async with trio.open_nursery() as race:

                    async def shake() -> None:
                        nonlocal ws
                        ws = await wrap_client_stream(
                            nursery,
                            stream,  # type: ignore[arg-type]
                            host_header,
                            resource,
                            extra_headers=self._headers,
                            max_message_size=_MAX_MESSAGE,
                        )
                        race.cancel_scope.cancel()

                    async def ended() -> None:
                        assert stream is not None
                        await stream.ended.wait()
                        race.cancel_scope.cancel()

                    race.start_soon(shake)
                    race.start_soon(ended)
        except trio.TooSlowError:
            error = ConnectFailed(f"timed out connecting to {target}", timeout=True)
        except OSError as exc:
            error = _describe_connect_error(exc, target)
        else:
            if ws is not None and stream is not None:
                return ws, stream
            cause = stream.error.__cause__ if stream is not None and stream.error else None
            if isinstance(cause, ssl.SSLError):  # TLS fails on the first write, in the handshake
                error = ConnectFailed(f"TLS handshake failed: {cause.reason or cause}: {target}")
            else:
                error = ConnectFailed(f"the connection closed during the handshake: {target}")
        if stream is not None:
            await trio.aclose_forcefully(stream)
        self._connect_error(error)
        return None

    def _connect_error(self, error: ConnectFailed) -> None:
        if not self.reconnect:
            self._fail(error)
        else:
            self._status("disconnected", str(error))

    def _after_connection(self, conn: _Connection | None) -> tuple[float, bool]:
        if conn is None:
            return 0.0, False
        reason = conn.ws.closed
        code = reason.code if reason is not None else None
        said = f" {reason.reason}" if reason is not None and reason.reason else ""
        text = f"connection closed ({code}{said})"
        if code in _FATAL_CLOSE_CODES:
            said = reason.reason if reason is not None and reason.reason else ""
            self._fail(AuthenticationError(f"{said or _FATAL_CLOSE_CODES[code]} ({code})"))
        elif self._closed:
            pass
        elif not self.reconnect:
            self._fail(ConnectionLost(text, code))
        else:
            self._status("disconnected", text, code=code)
        return 0.0, conn.delivered

    async def _open_session(self, ws: WebSocketConnection) -> _Connection | None:
        message: dict[str, Any] | None = None
        problem = "the first message was not `connected`"
        with trio.move_on_after(self.connect_timeout) as waited:
            try:
                message = _parse(await ws.get_message())
            except ConnectionClosed:
                problem = "the connection closed before `connected`"
        if waited.cancelled_caught:
            problem = "timed out waiting for `connected`"
        if message is None or message.get("type") != "connected":
            if self.reconnect:
                self._status("disconnected", problem)
            else:
                self._fail(
                    ConnectionLost(problem) if message is None else ProtocolViolation(problem)
                )
            return None
        conn = _Connection(ws, message)
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
        self._conn = conn
        self._arrived.notify()
        listed = ", ".join(message.get("symbols") or []) or "-"
        self._status(
            "connected",
            f"connected to {self.display_url} (symbols: {listed})",
            symbols=message.get("symbols"),
        )
        return conn

    async def _session(self, conn: _Connection) -> None:
        """Read until the connection ends; a seq gap closes it (to resume on the next one)."""
        async with trio.open_nursery() as nursery:
            if self.keepalive:
                nursery.start_soon(self._keepalive, conn)
            try:
                await self._read(conn)
            except ConnectionClosed:
                pass
            except _Resync as gap:
                if self.reconnect:
                    self._status("resync", str(gap))
                else:
                    self._fail(ProtocolViolation(f"seq gap without reconnect: {gap}"))
            finally:
                nursery.cancel_scope.cancel()

    async def _read(self, conn: _Connection) -> None:
        ws = conn.ws
        while True:
            while len(self._items) >= self.buffer_size and not conn.pending and not self._closed:
                conn.blocked = True
                await self._space.wait()
            conn.blocked = False
            raw = await ws.get_message()
            message = _parse(raw)
            if message is not None:
                self._dispatch(conn, message)

    async def _keepalive(self, conn: _Connection) -> None:
        assert self.keepalive is not None
        while True:
            await trio.sleep(self.keepalive)
            if conn.blocked:  # the reader is not reading: the pong could not be seen
                continue
            with trio.move_on_after(self.keepalive) as waited:
                try:
                    await conn.ws.ping()
                except ConnectionClosed:
                    return
            if waited.cancelled_caught and not conn.blocked:
                self._status("disconnected", "no answer to a ping: the connection is dead")
                with trio.move_on_after(self.close_timeout):
                    await conn.ws.aclose(1001, "keepalive timeout")
                return

    def _end_connection(self, conn: _Connection | None) -> None:
        self._conn = None
        if conn is not None:
            for pending in conn.pending:
                pending.lost = True
                pending.done.set()
            conn.pending.clear()
        self._arrived.notify()

    def _dispatch(self, conn: _Connection, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "volatility_update":
            self._on_update(conn, message)
        elif kind == "reset":
            symbol = str(message.get("symbol"))
            oldest, latest = int(message["oldest_seq"]), int(message.get("latest_seq", -1))
            previous = self.tracker.reset(symbol, oldest)
            self._push(_ResetItem(StreamReset(symbol, previous, oldest, latest)))
        elif kind == "error" or kind in _REPLY_TYPES.values():
            self._on_reply(conn, message)
        else:  # `connected` again, or a type added later: ignored, as the protocol asks
            _log.debug("ignored message type %r", kind)

    def _on_update(self, conn: _Connection, message: dict[str, Any]) -> None:
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
            raise _Resync(f"{update.symbol}: seq {update.seq} after {last}; resuming")
        conn.delivered = True
        self._latest[update.symbol] = update
        self._latest_any = update
        self._push(update)

    def _on_reply(self, conn: _Connection, message: dict[str, Any]) -> None:
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

    def _push(self, item: Update | _ResetItem) -> None:
        self._items.append(item)
        self._arrived.notify()


def open_client(
    url: str = DEFAULT_URL,
    token: str | None = None,
    symbols: Iterable[str] | None = None,
    **options: Any,
) -> AbstractAsyncContextManager[VolatilityClient]:
    """``async with open_client(url, token) as client: async for update in client: ...``

    Connects before the body runs (see `VolatilityClient.connect`) and disconnects cleanly when
    it ends, however it ends. Keyword options are those of `VolatilityClient`. An exception
    from the body propagates unchanged (not wrapped in an ExceptionGroup).
    """
    return VolatilityClient(url, token, symbols, **options)


# --- helpers ----------------------------------------------------------------------------------


def _parse(raw: str | bytes) -> dict[str, Any] | None:
    if isinstance(raw, bytes):
        _log.warning("binary message ignored")
        return None
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        _log.warning("a message that is not JSON was ignored")
        return None
    return message if isinstance(message, dict) else None


def _retry_after(headers: Sequence[tuple[bytes, bytes]] | None) -> float:
    for name, value in headers or ():
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value.decode()))
            except ValueError:
                return 0.0
    return 0.0


def _describe_connect_error(exc: OSError, target: str) -> ConnectFailed:
    leaves = _os_errors(exc)
    if leaves and all(isinstance(e, ConnectionRefusedError) for e in leaves):
        return ConnectFailed(f"connection refused: {target}", refused=True)
    last = leaves[-1] if leaves else exc
    return ConnectFailed(f"cannot connect to {target}: {last.strerror or last}")


def _first(group: BaseExceptionGroup[Any], kind: type[E]) -> E:
    """The first exception of type `kind` in a (nested) exception group."""
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc, kind)
    raise LookupError(kind)


class _WatchedStream(trio.abc.Stream):
    """A stream that says when it ended (EOF, error or closed): see `_handshake`."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.ended = trio.Event()
        self.error: BaseException | None = None  # what ended it, if not EOF or aclose

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.error = exc
            self.ended.set()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.error = exc
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def aclose(self) -> None:
        self.ended.set()
        await self.inner.aclose()


def _os_errors(exc: BaseException | None) -> list[OSError]:
    """The individual OSErrors behind a failed connect (trio groups one per address tried)."""
    if exc is None:
        return []
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _os_errors(sub)]
    inner = _os_errors(exc.__cause__)
    if inner:
        return inner
    return [exc] if isinstance(exc, OSError) else []
