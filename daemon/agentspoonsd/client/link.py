"""One WebSocket connection of the client over anyio (`Link`), the client's constants, and the
helpers that read what the daemon answered."""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.lowlevel
import orjson

from ..wscore import ABNORMAL, ClientCore, Closed
from ..wscore import Event as WsEvent
from .errors import ConnectFailed, StreamReset
from .session import Session

if TYPE_CHECKING:
    import asyncio  # the client imports it only where it runs on asyncio

_log = logging.getLogger("agentspoonsd.client")


ORIGINAL_DEFAULT_URL = "ws://localhost:8765"  # WebSocketDashboardClient's, as it always was
URL_ENV = "AGENTSPOONSD_URL"
TOKEN_ENV = "AGENTSPOONSD_TOKEN"

MAX_MESSAGE = 64 * 1024 * 1024  # a `history` reply of 1000 updates is about 1.2 MB

# Server close codes after which reconnecting cannot help (the token is no longer valid).
FATAL_CLOSE_CODES = {4001: "the token was revoked"}
# Refused upgrades that retrying cannot fix.
FATAL_STATUSES = {
    401: "the daemon refused the token (401)",
    403: "the daemon refused the connection (403: origin not allowed)",
}


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


class Link:
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
class Connection:
    """An established connection: its link, its protocol state, and the reader's flags."""

    link: Link
    session: Session
    blocked: bool = False  # the reader waits for buffer space
    pong: anyio.Event | None = None  # the keepalive's ping awaits it

    @property
    def info(self) -> dict[str, Any]:
        """The daemon's ``connected`` message, its ``symbols`` kept current."""
        return self.session.info


class Signal:
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


class Resync(Exception):
    """A seq gap: close this connection and resume on a new one."""


class TaskStarter(Protocol):
    """A Trio nursery or an anyio task group."""

    # Coroutine functions only: what anyio's task groups take (Trio's nurseries take more).
    def start_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], /, *args: Any) -> Any: ...


UpdateCallback = Callable[[dict[str, Any]], Awaitable[None] | None]
ResetCallback = Callable[[StreamReset], Awaitable[None] | None]


def spawn_detached(run: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None] | None:
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
    return loop.create_task(run())


def parse_message(raw: str | bytes) -> dict[str, Any] | None:
    if isinstance(raw, bytes):
        _log.warning("client_binary_message_ignored")
        return None
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        _log.warning("client_invalid_json_ignored")
        return None
    return message if isinstance(message, dict) else None


def refusal_reason(body: bytes) -> str:
    """``code: message`` from the daemon's JSON refusal body (``{"error", "message"}``)."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(parsed, dict):
        return ""
    code, message = parsed.get("error"), parsed.get("message")
    return ": ".join(str(part)[:200] for part in (code, message) if part)


def ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason or 'CERTIFICATE_VERIFY_FAILED'} ({exc.verify_message})"
    return str(exc.reason or exc)


def retry_after(headers: Sequence[tuple[bytes, bytes]] | None) -> float:
    for name, value in headers or ():
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value.decode()))
            except ValueError:
                return 0.0
    return 0.0


def describe_connect_error(exc: OSError, target: str) -> ConnectFailed:
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
