"""`ClientConfig`: a client's options, checked once, and what follows from its URL. Pure."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

DEFAULT_URL = "ws://127.0.0.1:8765/"
STEP_TIMEOUT = 10.0  # one connect attempt, one send, when connect_timeout is None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """The options of `VolatilityClient` (documented there), validated by `build`.

    `display_url` is `url` without its query (it may hold an ``access_token``) or any
    user:password: the only form that goes to messages and logs. `symbols` is the subscription
    (from the argument, else the URL's ``symbols`` parameter; None: everything allowed).
    """

    url: str
    display_url: str
    symbols: tuple[str, ...] | None
    headers: tuple[tuple[bytes, bytes], ...]
    reconnect: bool = True
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    history_limit: int = 100
    buffer_size: int = 10_000
    keep_recent: int = 1000
    connect_timeout: float | None = 10.0
    close_timeout: float = 2.0
    keepalive: float | None = 20.0
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def build(
        cls,
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
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | os.PathLike[str] | None = None,
    ) -> ClientConfig:
        """Check the options; ValueError names the one that is wrong. A `cafile` is read here
        (into a new SSL context) unless `ssl_context` is given."""
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
        host = parts.netloc.rpartition("@")[2]
        if ssl_context is None and cafile is not None:
            ssl_context = ssl.create_default_context(cafile=os.fspath(cafile))
        return cls(
            url=url,
            display_url=urlunsplit((parts.scheme, host, parts.path or "/", "", "")),
            symbols=None if symbols is None else tuple(symbols),
            headers=((b"Authorization", f"Bearer {token}".encode()),) if token else (),
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
        )

    @property
    def step_timeout(self) -> float:
        """The bound of one connect attempt and of one send."""
        return STEP_TIMEOUT if self.connect_timeout is None else self.connect_timeout
