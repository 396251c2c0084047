"""The wire protocol's messages: pure builders and the client-request parser.

No sockets here. Server messages are plain dicts encoded once with orjson; client messages are
parsed into typed requests (or an `error` reply). Field names follow the prototype's documented
contract (DESIGN.md "Wire protocol"); new fields are additive. docs/PROTOCOL.md is the spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

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
    UNKNOWN_SYMBOL = "unknown_symbol"
    FORBIDDEN_SYMBOL = "forbidden_symbol"
    ALREADY_SUBSCRIBED = "already_subscribed"
    RATE_LIMITED = "rate_limited"
    NO_SYMBOLS = "no_symbols"


ALL = "*"  # in subscribe/unsubscribe: every symbol
DEFAULT_HISTORY_LIMIT = 100
# One `history` reply carries at most this many bytes of JSON: a bigger `limit` is answered with
# the newest updates that fit, `"more": true` and the `before_seq` to ask for the older ones.
# A reply that size crosses a slow link in well under a ping interval, and it bounds the
# exemption a reply gets from the backlog cap (see `outbox.Outbox.write_reply`).
MAX_HISTORY_REPLY_BYTES = 256 * 1024
# A request's cost against `server.max_client_messages_per_second` (see `request_cost`): one,
# plus one per this many updates a reply or a replay carries.
UPDATES_PER_COST_UNIT = 50


def iso_utc(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds and a `Z`, whatever the microsecond value."""
    # isoformat of a UTC datetime ends in "+00:00"; it is faster than strftime (per update).
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def encode(message: dict[str, Any]) -> bytes:
    """UTF-8 JSON of a server message."""
    return orjson.dumps(message)


def connected_message(
    now: datetime,
    *,
    token: str,
    symbols: list[str],
    available: list[str] | None = None,
    history_size: int | None = None,
    ping_interval: float | None = None,
    idle_timeout: float | None = None,
) -> dict[str, Any]:
    """The greeting sent right after the upgrade: `symbols` is the subscription."""
    message: dict[str, Any] = {
        "type": "connected",
        "message": SERVER_BANNER,
        "timestamp": iso_utc(now),
        "version": __version__,
        "token": token,
        "symbols": symbols,
    }
    if available is not None:
        message["available"] = available
    if history_size is not None:
        message["history_size"] = history_size
    if ping_interval is not None:
        message["ping_interval"] = ping_interval
    if idle_timeout is not None:
        message["idle_timeout"] = idle_timeout
    return message


def update_data(bar: Bar, seq: int) -> dict[str, Any]:
    """The `data` object of a `volatility_update` (also what `agentspoonsd simulate` writes)."""
    return {
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
        **bar.analytics,
    }


def update_message(bar: Bar, seq: int, published: datetime) -> dict[str, Any]:
    """A `volatility_update`; `timestamp` is when the daemon published it (latency origin)."""
    return {
        "type": "volatility_update",
        "data": update_data(bar, seq),
        "timestamp": iso_utc(published),
    }


def error_message(code: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **fields}


def no_symbols_error(token: str, published: Sequence[str]) -> dict[str, Any]:
    """The error a connection gets right after `connected` when its token allows none of the
    `published` symbols: it names the token and (up to five of) the symbols it could have had."""
    shown = ", ".join(published[:5]) + (
        f" and {len(published) - 5} more" if len(published) > 5 else ""
    )
    return error_message(
        ErrorCode.NO_SYMBOLS,
        f"token {token!r} allows none of the published symbols ({shown}):"
        " this connection receives no updates",
    )


def pong_message(now: datetime) -> dict[str, Any]:
    return {"type": "pong", "timestamp": iso_utc(now)}


def subscribed_message(symbols: list[str]) -> dict[str, Any]:
    return {"type": "subscribed", "symbols": symbols}


def unsubscribed_message(symbols: list[str]) -> dict[str, Any]:
    return {"type": "unsubscribed", "symbols": symbols}


def history_message(
    symbol: str,
    updates: Sequence[dict[str, Any] | orjson.Fragment],
    *,
    more: bool = False,
    before_seq: int | None = None,
) -> dict[str, Any]:
    """A `history` reply: `updates` (data objects or their `orjson.Fragment`s), oldest first.

    `more`: older retained updates exist than the first one carried; then `before_seq` is the
    cursor for the next page (the seq of the oldest update carried)."""
    message: dict[str, Any] = {"type": "history", "symbol": symbol, "updates": updates}
    message["more"] = more
    if more and before_seq is not None:
        message["before_seq"] = before_seq
    return message


# The bytes a `history` reply adds around its updates, with the longest symbol and cursor: the
# page size leaves room for them.
HISTORY_ENVELOPE_BYTES = 512


def history_page_size(sizes: list[int], budget: int = MAX_HISTORY_REPLY_BYTES) -> int:
    """How many of the newest updates fit one reply: `sizes` are the JSON sizes of the candidate
    updates, oldest first. At least one (an update larger than a page still gets through)."""
    room = budget - HISTORY_ENVELOPE_BYTES
    count = 0
    for size in reversed(sizes):
        room -= size + 1  # the comma
        if room < 0 and count:
            break
        count += 1
    return count


def reset_message(symbol: str, gap: Any) -> dict[str, Any]:
    """`gap`: a `history.Gap` (oldest_seq, latest_seq)."""
    return {
        "type": "reset",
        "symbol": symbol,
        "oldest_seq": gap.oldest_seq,
        "latest_seq": gap.latest_seq,
    }


# --- client requests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Subscribe:
    symbols: tuple[str, ...]  # may contain ALL


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    symbols: tuple[str, ...]  # may contain ALL


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    symbol: str
    limit: int
    before_seq: int | None = None  # only updates with a lower seq (a page cursor); None: newest


@dataclass(frozen=True, slots=True)
class Resume:
    positions: tuple[tuple[str, int], ...]  # (symbol, last seq the client has), in given order


Request = Ping | Subscribe | Unsubscribe | HistoryRequest | Resume


class RequestError(ValueError):
    """A malformed request; `reply` is the `error` message to send."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.reply = error_message(code, message)


def parse_request(text: str, *, history_size: int) -> Request:
    """Interpret one client text message. Raises RequestError (never anything else) on bad input.

    Only the shape is checked here; whether a symbol exists or is allowed is the server's.
    """
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise RequestError(ErrorCode.INVALID_JSON, "message is not valid JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, 'message must be a JSON object with a string "type"'
        )
    kind = message["type"]
    if kind == "ping":
        return Ping()
    if kind in ("subscribe", "unsubscribe"):
        symbols = _symbol_list(message.get("symbols"), kind)
        return Subscribe(symbols) if kind == "subscribe" else Unsubscribe(symbols)
    if kind == "history":
        symbol = message.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            raise RequestError(ErrorCode.INVALID_MESSAGE, 'history needs a string "symbol"')
        limit = message.get("limit", min(DEFAULT_HISTORY_LIMIT, history_size))
        if not _is_int(limit) or not 1 <= limit <= history_size:
            raise RequestError(
                ErrorCode.INVALID_MESSAGE,
                f'"limit" must be an integer from 1 to {history_size} (the history size)',
            )
        before_seq = message.get("before_seq")
        if before_seq is not None and (not _is_int(before_seq) or before_seq < 0):
            raise RequestError(
                ErrorCode.INVALID_MESSAGE, '"before_seq" must be an integer >= 0 (a seq)'
            )
        return HistoryRequest(symbol, limit, before_seq)
    if kind == "resume":
        positions = message.get("from")
        if not isinstance(positions, dict) or not positions:
            raise RequestError(
                ErrorCode.INVALID_MESSAGE, 'resume needs "from": {"SYMBOL": last seq, ...}'
            )
        for symbol, seq in positions.items():
            if not symbol or not _is_int(seq) or seq < 0:
                raise RequestError(
                    ErrorCode.INVALID_MESSAGE,
                    f'resume "from" maps symbols to seq numbers >= 0; bad entry for {symbol!r}',
                )
        return Resume(tuple(positions.items()))
    shown = kind if len(kind) <= 64 else kind[:64] + "…"
    raise RequestError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {shown!r}")


def request_cost(request: Request, updates: int = 0) -> int:
    """What `request` counts against the client's per-second message budget.

    1 for every request, plus 1 per UPDATES_PER_COST_UNIT updates its answer carries (`updates`:
    the entries a `history` page or a `resume` replay sends), so a client replaying the whole
    history over and over gets `rate_limited` long before it costs the loop more than a few
    ordinary clients. Only `history` and `resume` carry updates; `updates` is ignored otherwise.
    """
    if isinstance(request, (HistoryRequest, Resume)):
        return 1 + max(0, updates) // UPDATES_PER_COST_UNIT
    return 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _symbol_list(value: object, kind: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, f'{kind} needs "symbols": a non-empty list of strings'
        )
    return tuple(dict.fromkeys(value))  # duplicates collapse, order kept


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """What the upgrade URL asks for (docs/PROTOCOL.md "Connecting")."""

    symbols: tuple[str, ...] | None  # None: the default subscription
    resume: tuple[tuple[str, int], ...]


def parse_connect_target(target: str) -> ConnectOptions:
    """The `symbols` and `resume` query parameters of an upgrade request's target.

    Raises RequestError (invalid_message) for a malformed `resume`.
    """
    symbols: tuple[str, ...] | None = None
    resume: list[tuple[str, int]] = []
    query = target.partition("?")[2].partition("#")[0]  # not urlsplit: it raises on some targets
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "symbols":
            symbols = tuple(dict.fromkeys(s for s in value.split(",") if s))
        elif key == "resume":
            for pair in filter(None, value.split(",")):
                symbol, _, seq = pair.rpartition(":")
                # ASCII digits only ("²".isdigit() is true), and few enough for a seq (< 2**53).
                if not symbol or not (seq.isascii() and seq.isdigit()) or len(seq) > 16:
                    raise RequestError(
                        ErrorCode.INVALID_MESSAGE,
                        f"resume parameter: expected SYMBOL:SEQ pairs, got {pair!r}",
                    )
                resume.append((symbol, int(seq)))
    return ConnectOptions(symbols, tuple(dict(resume).items()))
