"""The wire protocol's messages: pure builders and the client-message interpreter.

No sockets here. Server messages are plain dicts encoded once with orjson; client messages are
interpreted into a reply dict. Field names follow the prototype's documented contract
(DESIGN.md "Wire protocol"); new fields are additive.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from . import __version__
from .market.bar import Bar

SERVER_BANNER = "AgentSpoons WebSocket Server"


class ErrorCode:
    """Stable `code` values of `{"type": "error"}` replies."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    BINARY_UNSUPPORTED = "binary_unsupported"
    MESSAGE_TOO_LARGE = "message_too_large"


def iso_utc(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds and a `Z`, whatever the microsecond value."""
    # isoformat of a UTC datetime ends in "+00:00"; it is faster than strftime (per update).
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def encode(message: dict[str, Any]) -> bytes:
    """UTF-8 JSON of a server message."""
    return orjson.dumps(message)


def connected_message(now: datetime, *, token: str, symbols: list[str]) -> dict[str, Any]:
    """The greeting sent right after the upgrade."""
    return {
        "type": "connected",
        "message": SERVER_BANNER,
        "timestamp": iso_utc(now),
        "version": __version__,
        "token": token,
        "symbols": symbols,
    }


def update_message(bar: Bar, seq: int, published: datetime) -> dict[str, Any]:
    """A `volatility_update`; `timestamp` is when the daemon published it (latency origin)."""
    return {
        "type": "volatility_update",
        "data": {
            "timestamp": iso_utc(bar.timestamp),
            "symbol": bar.symbol,
            "seq": seq,
            "volatility": bar.volatility,
            "price": bar.close,
            "returns": bar.returns,
            "open": bar.open,
            "high": bar.high,
            "low": bar.low,
            "close": bar.close,
            "volume": bar.volume,
        },
        "timestamp": iso_utc(published),
    }


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def reply_to(text: str, now: datetime) -> dict[str, Any]:
    """Interpret one client text message and return the reply to send.

    Never raises on client input: anything malformed becomes an `error` reply.
    """
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        return error_message(ErrorCode.INVALID_JSON, "message is not valid JSON")
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return error_message(
            ErrorCode.INVALID_MESSAGE, 'message must be a JSON object with a string "type"'
        )
    kind = message["type"]
    if kind == "ping":
        return {"type": "pong", "timestamp": iso_utc(now)}
    shown = kind if len(kind) <= 64 else kind[:64] + "…"
    return error_message(ErrorCode.UNKNOWN_TYPE, f"unknown message type {shown!r}")
