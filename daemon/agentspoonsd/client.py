"""The agentspoonsd client: every update once, in order, under asyncio, Trio or no event loop.

The same code runs on asyncio and Trio (anyio underneath; the WebSocket protocol is the sans-IO
`agentspoonsd.wscore` over anyio's TCP/TLS streams). Four ways to use it:

**Iteration** (recommended), under ``asyncio.run`` or ``trio.run``::

    async with open_client("ws://127.0.0.1:8765/", token=TOKEN) as client:
        async for update in client:          # each `data` object of a volatility_update
            print(update["symbol"], update["seq"], update["volatility"])

**The original system's API** (`WebSocketDashboardClient`): ``await client.connect()`` (no
nursery), ``await client.listen(callback)`` with messages in the original shape, synchronous
``get_latest_data()`` / ``get_data_history(limit)`` reading the local buffer of received data.

**No event loop** (scripts, Jupyter cells): ``with connect_sync(url, token) as c: for update in
c: ...``; the client's loop runs in a background thread (anyio's blocking portal).

**A nursery or task group of yours**: ``await client.connect(nursery)`` starts the connection
task there; leaving the nursery, even cancelled, disconnects cleanly.

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
  code 4001) are not retried: `AuthenticationError`, with the daemon's reason.
- **Visible failures.** Each failed connect is reported with its cause (connection refused, DNS,
  TLS, an HTTP refusal with the daemon's reason) to ``on_status`` (kind ``connect_failed``) and
  to the `logging` logger ``agentspoonsd.client`` (the first of a series at WARNING, the rest at
  INFO). The *first* connection must succeed within ``connect_timeout`` seconds, or `connect`
  (and ``open_client``) raises `ConnectFailed` with the last cause; ``connect_timeout=None``
  keeps trying until connected. Once connected, losing the connection is always retried (with
  ``reconnect=True``).
- **Cancellation.** Cancelling an iteration (or a `receive`) loses nothing: an update is removed
  from the buffer only when it is returned. Leaving ``open_client`` (or `disconnect`), even
  because of a cancellation, sends a WebSocket close (1000) and waits up to ``close_timeout`` for
  the daemon's answer before the TCP connection is closed.
- **Backpressure.** Updates wait in a buffer of ``buffer_size``; when it is full the client stops
  reading the socket (unless a request is waiting for its reply), so a slow consumer slows the
  connection down instead of growing memory. The daemon may then close the connection (1013);
  the client reconnects and resumes, losing nothing.

`get_latest_data` and `recent` reflect the updates *received*, which can be ahead of what the
iteration has returned. A client nobody iterates or listens to stops reading once its buffer is
full.

Where the connection task lives: in the task group of ``open_client``; in the nursery passed to
`connect`; without one (``await client.connect()``), in a task of the running loop itself (an
asyncio task, or a Trio system task) that `disconnect` ends. Such a task is cancelled when the
loop ends (``asyncio.run``/``trio.run`` returning), closing the socket without a close frame:
call `disconnect` (or use ``async with``) to close cleanly.

Importing this module loads neither numpy, pydantic nor the daemon: only anyio, wsproto, orjson.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import ssl
import sys
import time
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from types import TracebackType
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import anyio
import anyio.abc
import anyio.lowlevel
import orjson
from wsproto.utilities import LocalProtocolError

from .wscore import ABNORMAL, Accepted, ClientCore, Closed, Message, PongReceived, Refused
from .wscore import Event as WsEvent

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
    "SyncClient",
    "Update",
    "Verdict",
    "VolatilityClient",
    "WebSocketDashboardClient",
    "backoff_delay",
    "connect_sync",
    "open_client",
]

DEFAULT_URL = "ws://127.0.0.1:8765/"
ORIGINAL_DEFAULT_URL = "ws://localhost:8765"  # WebSocketDashboardClient's, as it always was
URL_ENV = "AGENTSPOONSD_URL"
TOKEN_ENV = "AGENTSPOONSD_TOKEN"

_log = logging.getLogger("agentspoonsd.client")
_MAX_MESSAGE = 64 * 1024 * 1024  # a `history` reply of 1000 updates is about 1.2 MB
_STEP_TIMEOUT = 10.0  # one connect attempt, one send, when connect_timeout is None

# Server close codes after which reconnecting cannot help (the token is no longer valid).
_FATAL_CLOSE_CODES = {4001: "the token was revoked"}
# Refused upgrades that retrying cannot fix.
_FATAL_STATUSES = {
    401: "the daemon refused the token (401)",
    403: "the daemon refused the connection (403: origin not allowed)",
}
# The reply each request type gets (docs/PROTOCOL.md, "Replies"); an `error` may come instead,
# and is the only reply to anything else (unknown_type, invalid_message).
_REPLY_TYPES = {
    "ping": "pong",
    "subscribe": "subscribed",
    "unsubscribe": "unsubscribed",
    "history": "history",
    "resume": "subscribed",  # then the replay, delivered as updates (no gap, no duplicate)
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


ConnectReason = Literal["refused", "dns", "tls", "timeout", "http", "closed", "unreachable"]


class ConnectFailed(ClientError):
    """No connection could be made (refused, DNS, TLS, handshake timeout, 503, 400 ...).

    Raised when ``reconnect=False``, or when the first connection is not made within
    ``connect_timeout``. `reason` names the cause of the (last) failure; `timeout` is true when
    the TCP connection or the handshake timed out; `refused` when the TCP connection was
    actively refused (nothing listens there); `status` is the HTTP status of a refused upgrade.
    """

    def __init__(
        self,
        message: str,
        *,
        refused: bool = False,
        timeout: bool = False,
        reason: ConnectReason = "unreachable",
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.refused = refused
        self.timeout = timeout
        self.reason: ConnectReason = "refused" if refused else "timeout" if timeout else reason
        self.status = status


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


# --- the anyio layer ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """A connection event, for `on_status` (the CLI prints these to stderr).

    ``connect_failed``: a connect attempt failed; `detail` holds ``reason`` (see
    `ConnectFailed.reason`), ``status`` for an HTTP refusal, and ``first`` (the first failure
    since the last connection). ``failed``: a fatal error, raised to the consumer next.
    """

    kind: Literal[
        "connected",
        "disconnected",
        "retrying",
        "server_error",
        "resync",
        "connect_failed",
        "failed",
    ]
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    """A request waiting for its reply; replies come in request order (one per request)."""

    expected: str
    internal: bool = False  # the client's own (barrier ping, subscribe "*"): not the user's
    waited: bool = True  # False for `send()`: nobody awaits the reply
    done: anyio.Event = field(default_factory=anyio.Event)
    reply: dict[str, Any] | None = None
    lost: bool = False  # the connection ended first


class _Link:
    """One WebSocket connection: a `ClientCore` driven over an anyio byte stream.

    One task reads (`next_event`); any task may send. Frames leave in the order they were
    queued in the core: a sender queues its frame synchronously, then flushes the core's outbox
    under a lock, so whichever task holds the lock sends everyone's bytes in order.
    """

    def __init__(self, stream: anyio.abc.ByteStream, core: ClientCore) -> None:
        self.stream = stream
        self.core = core
        self._lock = anyio.Lock()
        self._events: deque[WsEvent] = deque()
        self.eof = False  # the byte stream ended (or broke)
        self.error: BaseException | None = None  # what broke it, if anything
        self.peer_closed = anyio.Event()  # the peer's close frame (or the end) was read

    async def flush(self) -> bool:
        """Send what the core has queued; False when the stream is broken."""
        async with self._lock:
            data = self.core.data_to_send()
            if not data:
                return self.error is None
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.error = self.error or exc
                return False
        return True

    async def next_event(self) -> WsEvent:
        """The next event from the peer; after the end, `Closed` again and again."""
        while not self._events:
            if self.eof:
                return self.core.closed or Closed(ABNORMAL)
            try:
                data = await self.stream.receive(65536)
            except anyio.EndOfStream:
                data = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.error = self.error or exc
                data = b""
            self.eof = not data
            self._events.extend(self.core.receive(bytes(data)))
            if self.core.closed is not None:
                self.peer_closed.set()
            await self.flush()  # the answers to the peer's pings and close frame
        return self._events.popleft()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (once); the peer's answer is read by the reading task."""
        self.core.close(code, reason)
        await self.flush()

    async def finish(self) -> None:
        """After the session: close (if nobody did), then read until the peer has answered
        and ended the TCP stream (RFC 6455: the server closes first). Unbounded: bound it."""
        await self.close(1000)
        while not self.eof:
            await self.next_event()


@dataclass(slots=True)
class _Connection:
    link: _Link
    info: dict[str, Any]
    pending: deque[_Pending] = field(default_factory=deque)
    barrier: bool = True  # until the first pong: errors are about the connect URL
    blocked: bool = False  # the reader waits for buffer space
    delivered: bool = False
    pong: anyio.Event | None = None  # the keepalive's ping awaits it


@dataclass(frozen=True, slots=True)
class _ResetItem:
    error: StreamReset


class _Signal:
    """Wake every task waiting on it (an Event that re-arms); made lazily, on the loop."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    def notify(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()


class _Resync(Exception):
    """A seq gap: close this connection and resume on a new one."""


class TaskStarter(Protocol):
    """A Trio nursery or an anyio task group."""

    def start_soon(self, func: Callable[..., Awaitable[Any]], /, *args: Any) -> Any: ...


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
        self._items: deque[Update | _ResetItem] = deque()
        self._recent: deque[Update] = deque(maxlen=keep_recent)
        self._latest: dict[str, Update] = {}
        self._latest_any: Update | None = None
        self._arrived = _Signal()  # items, a connection, a failure or closing
        self._space = _Signal()  # buffer space, or a request waiting for a reply
        self._conn: _Connection | None = None
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
        return _STEP_TIMEOUT if self.connect_timeout is None else self.connect_timeout

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
            self._task = _spawn_detached(self._run)
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
        return _REPLY_TYPES.get(kind, "error") if isinstance(kind, str) else "error"

    async def _send_request(
        self,
        conn: _Connection,
        message: Any,
        expected: str,
        *,
        waited: bool,
        internal: bool = False,
    ) -> _Pending | None:
        """Queue the reply slot and the frame, then send. None when the connection is gone."""
        pending = _Pending(expected, internal=internal, waited=waited)
        text = orjson.dumps(dict(message) if isinstance(message, Mapping) else message).decode()
        # The slot and the frame are queued together, synchronously: replies come in the
        # order the frames leave (`_Link` sends queued frames in order).
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
        conn: _Connection | None = None
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

    async def _handshake(self, url: str, within: float) -> tuple[_Link | None, float]:
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
        link: _Link | None = None
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
                core = ClientCore(host_header, resource, self._headers, max_message=_MAX_MESSAGE)
                link = _Link(stream, core)
                await link.flush()
                event = await link.next_event()
                while isinstance(event, PongReceived | Message):  # not before Accepted; safe
                    event = await link.next_event()
        except TimeoutError:
            error = ConnectFailed(f"timed out connecting to {target}", timeout=True)
        except ssl.SSLError as exc:
            error = ConnectFailed(
                f"TLS handshake failed: {_ssl_reason(exc)}: {target}", reason="tls"
            )
        except OSError as exc:
            error = _describe_connect_error(exc, target)
        else:
            assert link is not None
            if isinstance(event, Accepted):
                return link, 0.0
            if isinstance(event, Refused):
                await anyio.aclose_forcefully(link.stream)
                return None, self._refused(event)
            if isinstance(link.error, ssl.SSLError):  # TLS can fail on the first read, too
                reason = _ssl_reason(link.error)
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
        said = _refusal_reason(refusal.body)
        status = refusal.status
        if status in _FATAL_STATUSES:
            text = _FATAL_STATUSES[status] + (f": {said}" if said else "")
            self._fail(AuthenticationError(text, status))
            return 0.0
        text = f"the daemon refused the connection: HTTP {status}" + (f": {said}" if said else "")
        self._connect_error(ConnectFailed(text, reason="http", status=status))
        return _retry_after(refusal.headers)

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

    def _after_connection(self, conn: _Connection | None) -> tuple[float, bool]:
        if conn is None:
            return 0.0, False
        reason = conn.link.core.closed
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
            self._status("disconnected", text, level=logging.WARNING, code=code)
        return 0.0, conn.delivered

    async def _open_session(self, link: _Link, within: float) -> _Connection | None:
        message: dict[str, Any] | None = None
        problem = "the first message was not `connected`"
        with anyio.move_on_after(within) as waited:
            while True:
                event = await link.next_event()
                if isinstance(event, Message):
                    message = _parse(event.data)
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
        conn = _Connection(link, message)
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

    async def _session(self, conn: _Connection) -> None:
        """Read until the connection ends; a seq gap closes it (to resume on the next one)."""
        async with anyio.create_task_group() as group:
            if self.keepalive:
                group.start_soon(self._keepalive, conn, group.cancel_scope)
            try:
                await self._read(conn)
            except _Resync as gap:
                if self.reconnect:
                    self._status("resync", str(gap))
                else:
                    self._fail(ProtocolViolation(f"seq gap without reconnect: {gap}"))
            finally:
                group.cancel_scope.cancel()

    async def _read(self, conn: _Connection) -> None:
        link = conn.link
        while True:
            while len(self._items) >= self.buffer_size and not conn.pending and not self._closed:
                conn.blocked = True
                await self._space.wait()
            conn.blocked = False
            event = await link.next_event()
            if isinstance(event, Message):
                message = _parse(event.data)
                if message is not None:
                    self._dispatch(conn, message)
            elif isinstance(event, PongReceived):
                if conn.pong is not None:
                    conn.pong.set()
            elif isinstance(event, Closed):
                return

    async def _keepalive(self, conn: _Connection, session: anyio.CancelScope) -> None:
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
        self._recent.append(update)
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

    Connects before the body runs (see `VolatilityClient.connect`: `ConnectFailed` when no
    connection is made within ``connect_timeout``, 10 s by default; ``connect_timeout=None``
    keeps trying) and disconnects cleanly when it ends, however it ends. Keyword options are
    those of `VolatilityClient`. An exception from the body propagates unchanged (not wrapped
    in an ExceptionGroup). Runs under asyncio and Trio alike.
    """
    return VolatilityClient(url, token, symbols, **options)


# --- the original system's API ----------------------------------------------------------------


class WebSocketDashboardClient:
    """The original system's consumer API, on `VolatilityClient` (asyncio or Trio)::

        client = WebSocketDashboardClient()          # uri=, token= (or the environment)
        await client.connect()
        await client.listen(callback=handle_update)  # handle_update(message), sync or async

    `uri` defaults to ``$AGENTSPOONSD_URL``, else ``ws://localhost:8765``; `token` to
    ``$AGENTSPOONSD_TOKEN``. Other keyword options are those of `VolatilityClient`
    (``keep_recent`` sizes the local history, 1000 by default).

    `connect` needs no nursery: the connection task runs on its own in the running loop (see
    the module docstring) until `disconnect`; ``async with`` does both. Every guarantee of
    `VolatilityClient` holds (no gap, no duplicate, resume, backoff, cancellation).
    """

    def __init__(self, uri: str | None = None, token: str | None = None, **options: Any) -> None:
        self.uri = uri or os.environ.get(URL_ENV) or ORIGINAL_DEFAULT_URL
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        self.client = VolatilityClient(self.uri, token, options.pop("symbols", None), **options)

    @property
    def is_connected(self) -> bool:
        return self.client.connected

    async def connect(self) -> None:
        """Connect (retrying with backoff up to ``connect_timeout``); returns once connected.
        Raises `AuthenticationError` or `ConnectFailed`."""
        await self.client.connect()

    async def listen(self, callback: Callable[[dict[str, Any]], Any] | None = None) -> None:
        """Deliver every update, in order, as ``{"type": "volatility_update", "data": {...},
        "timestamp": ...}`` to `callback` (called, and awaited if it returns an awaitable)
        until `disconnect`; then return. Without a callback, updates only fill the local
        history. A `StreamReset` (the daemon could not replay a gap) is logged at WARNING and
        listening goes on with the new sequence."""
        while True:
            try:
                update = await self.client.receive()
            except StreamReset as reset:
                _log.warning("client_stream_reset url=%s message=%s", self.uri, reset)
                continue
            except ClientClosed:
                return
            if callback is None:
                continue
            result = callback(
                {"type": "volatility_update", "data": update.data, "timestamp": update.published}
            )
            if inspect.isawaitable(result):
                await result

    async def send(self, message: Any) -> dict[str, Any]:
        """Send any request and return the daemon's reply, an ``error`` reply included (a type
        the protocol does not know gets ``{"type": "error", "code": "unknown_type", ...}``, a
        JSON value that is not an object ``invalid_message``). `message` is any value orjson
        can serialise; nothing is refused locally."""
        try:
            return await self.client.request(message)
        except ServerError as exc:
            return exc.reply

    async def fetch_history(
        self, limit: int = 100, symbol: str | None = None
    ) -> list[dict[str, Any]]:
        """The daemon's retained history (``history`` requests), oldest first; see
        `VolatilityClient.fetch_history`. `get_data_history` reads the local buffer instead."""
        return await self.client.fetch_history(limit, symbol)

    async def disconnect(self) -> None:
        """Close the connection (1000) and end `listen`; idempotent."""
        await self.client.disconnect()

    def get_latest_data(self) -> dict[str, Any] | None:
        """The most recent data point received (the update's `data`), or None. Synchronous."""
        return self.client.get_latest_data()

    def get_data_history(self, limit: int = 10) -> list[dict[str, Any]]:
        """The last `limit` data points received, oldest first. Synchronous, no I/O."""
        return [update.data for update in self.client.recent(limit)]

    async def __aenter__(self) -> WebSocketDashboardClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()


# --- no event loop: scripts and notebooks ------------------------------------------------------


class SyncClient:
    """A blocking client: the `VolatilityClient` runs on an event loop in a background thread
    (anyio's blocking portal, asyncio), and each call here waits for it.

    Safe where an asyncio loop already runs in the calling thread (a Jupyter cell): that loop
    is never used, nor is a second one started in its thread. Use as a context manager (or
    `close`). Iterating yields each update's `data`, in order; `StreamReset` is raised as by
    the async iteration (catch it and iterate again). Ctrl-C interrupts a waiting call;
    leaving the ``with`` then disconnects cleanly.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        symbols: Iterable[str] | None = None,
        **options: Any,
    ) -> None:
        url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        self.client = VolatilityClient(url, token, symbols, **options)
        self._portal_cm: Any = None
        self._portal: Any = None
        self._client_cm: Any = None

    def __enter__(self) -> SyncClient:
        from anyio.from_thread import start_blocking_portal

        self._portal_cm = start_blocking_portal("asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self._client_cm = self._portal.wrap_async_context_manager(self.client)
            self._client_cm.__enter__()
        except BaseException:
            portal_cm, self._portal_cm, self._portal = self._portal_cm, None, None
            portal_cm.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect (1000, bounded by ``close_timeout``) and stop the thread; idempotent."""
        client_cm, self._client_cm = self._client_cm, None
        portal_cm, self._portal_cm = self._portal_cm, None
        try:
            if client_cm is not None:
                client_cm.__exit__(None, None, None)
        finally:
            self._portal = None
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)

    def _call(self, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self._portal is None:
            raise RuntimeError("not connected: use `with connect_sync(...) as client`")
        return self._portal.call(func, *args)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return self._call(self.client.__anext__)  # type: ignore[no-any-return]
        except StopAsyncIteration:
            raise StopIteration from None

    def receive(self, timeout: float | None = None) -> Update:
        """The next update with its envelope; TimeoutError after `timeout` seconds."""

        async def receive() -> Update:
            with anyio.fail_after(timeout):
                return await self.client.receive()

        return self._call(receive)  # type: ignore[no-any-return]

    def latest(self, symbol: str | None = None) -> dict[str, Any] | None:
        """The newest update received (of `symbol`), or None; no waiting."""
        return self.client.get_latest_data(symbol)

    def history(self, limit: int = 10, symbol: str | None = None) -> list[dict[str, Any]]:
        """The last `limit` updates received (local), oldest first; no waiting."""
        return [update.data for update in self.client.recent(limit, symbol)]

    def fetch_history(
        self, limit: int | None = None, symbol: str | None = None
    ) -> list[dict[str, Any]]:
        """The daemon's retained history; see `VolatilityClient.fetch_history`."""
        return self._call(self.client.fetch_history, limit, symbol)  # type: ignore[no-any-return]

    def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send a request and return its reply; see `VolatilityClient.request`."""
        return self._call(self.client.request, message)  # type: ignore[no-any-return]


def connect_sync(
    url: str | None = None,
    token: str | None = None,
    symbols: Iterable[str] | None = None,
    **options: Any,
) -> SyncClient:
    """``with connect_sync(url, token) as c: for update in c: ...`` without an event loop.

    `url` defaults to ``$AGENTSPOONSD_URL``, else ``ws://127.0.0.1:8765/``; `token` to
    ``$AGENTSPOONSD_TOKEN``. Options are those of `VolatilityClient`. Entering connects (or
    raises, as `open_client` does); see `SyncClient`.
    """
    return SyncClient(url, token, symbols, **options)


# --- helpers ----------------------------------------------------------------------------------


def _spawn_detached(run: Callable[[], Awaitable[None]]) -> Any:
    """Run `run` as a task of the running loop itself, outside any nursery: an asyncio task
    (returned: the caller keeps a reference), or a Trio system task (cancelled when the run
    ends; it must not raise, and `_run` never does)."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        trio.lowlevel.spawn_system_task(run)
        return None
    return loop.create_task(run())  # type: ignore[arg-type]


def _parse(raw: str | bytes) -> dict[str, Any] | None:
    if isinstance(raw, bytes):
        _log.warning("client_binary_message_ignored")
        return None
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        _log.warning("client_invalid_json_ignored")
        return None
    return message if isinstance(message, dict) else None


def _refusal_reason(body: bytes) -> str:
    """``code: message`` from the daemon's JSON refusal body (``{"error", "message"}``)."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(parsed, dict):
        return ""
    code, message = parsed.get("error"), parsed.get("message")
    return ": ".join(str(part)[:200] for part in (code, message) if part)


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason or 'CERTIFICATE_VERIFY_FAILED'} ({exc.verify_message})"
    return str(exc.reason or exc)


def _retry_after(headers: Sequence[tuple[bytes, bytes]] | None) -> float:
    for name, value in headers or ():
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value.decode()))
            except ValueError:
                return 0.0
    return 0.0


def _describe_connect_error(exc: OSError, target: str) -> ConnectFailed:
    import socket

    leaves = _os_errors(exc)
    if leaves and all(isinstance(e, ConnectionRefusedError) for e in leaves):
        return ConnectFailed(f"connection refused: {target}", refused=True)
    last = leaves[-1] if leaves else exc
    if isinstance(last, socket.gaierror):
        host = urlsplit(target).hostname
        return ConnectFailed(
            f"cannot resolve host {host!r}: {last.strerror or last}: {target}", reason="dns"
        )
    return ConnectFailed(f"cannot connect to {target}: {last.strerror or last}")


def _os_errors(exc: BaseException | None) -> list[OSError]:
    """The individual OSErrors behind a failed connect (anyio groups one per address tried)."""
    if exc is None:
        return []
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _os_errors(sub)]
    inner = _os_errors(exc.__cause__)
    if inner:
        return inner
    return [exc] if isinstance(exc, OSError) else []
