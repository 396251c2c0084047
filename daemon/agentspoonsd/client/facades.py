"""The original system's API (`WebSocketDashboardClient`) and the blocking client for scripts
and notebooks (`SyncClient`), both on `VolatilityClient`."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

import anyio
import anyio.abc
import anyio.lowlevel

from .config import DEFAULT_URL
from .errors import ClientClosed, ServerError, StreamReset
from .link import ORIGINAL_DEFAULT_URL, TOKEN_ENV, URL_ENV
from .stream import VolatilityClient
from .tracker import Update

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from anyio.from_thread import BlockingPortal

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")

_log = logging.getLogger("agentspoonsd.client")


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
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._client_cm: AbstractContextManager[VolatilityClient] | None = None

    def __enter__(self) -> SyncClient:
        from anyio.from_thread import start_blocking_portal

        self._portal_cm = start_blocking_portal("asyncio")
        self._portal = portal = self._portal_cm.__enter__()
        try:
            self._client_cm = portal.wrap_async_context_manager(self.client)
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

    def _call(self, func: Callable[[*_Args], Awaitable[_T]], *args: *_Args) -> _T:
        if self._portal is None:
            raise RuntimeError("not connected: use `with connect_sync(...) as client`")
        return self._portal.call(func, *args)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return self._call(self.client.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def receive(self, timeout: float | None = None) -> Update:
        """The next update with its envelope; TimeoutError after `timeout` seconds."""

        async def receive() -> Update:
            with anyio.fail_after(timeout):
                return await self.client.receive()

        return self._call(receive)

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
        return self._call(self.client.fetch_history, limit, symbol)

    def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send a request and return its reply; see `VolatilityClient.request`."""
        return self._call(self.client.request, message)


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
