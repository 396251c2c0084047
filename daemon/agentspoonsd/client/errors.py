"""What the client raises: `ClientError` and its kinds."""

from __future__ import annotations

from collections.abc import (
    Mapping,
)
from typing import Any, Literal


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
