"""What goes into the Redis streams and how it comes back out. Pure: no I/O, no clock.

One stream per symbol, ``{prefix}:stream:{symbol}``. Each entry is one update message, exactly the
bytes the generating node encoded (every node broadcasts those same bytes), in one field ``m``.
The entry id is ``{seq}-0``: the stream's own ordering is the seq, so Redis itself refuses an
entry that would repeat or go back (XADD of an id not above the top fails), and a reader resumes
a stream from the last seq it applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from ..history import first_seq

PAYLOAD_FIELD = b"m"

# Append one batch while the lease is the caller's, atomically. KEYS: the lease, then one stream
# per update (a symbol repeats when the batch has several of its bars, in seq order). ARGV: node
# id, MAXLEN, then seq and payload per update. Returns 0 (appended), -1 (the lease is not the
# caller's: nothing appended) or {i, top}: update i (1-based) is the first of its stream, whose
# top is `top`, not seq - 1 (nothing appended). Seqs are below 2^53, exact in Lua's doubles.
PUBLISH_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return -1
end
local checked = {}
for i = 2, #KEYS do
    if not checked[KEYS[i]] then
        checked[KEYS[i]] = true
        local top = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
        if #top > 0 then
            local last = string.match(top[1][1], '^(%d+)-')
            if tonumber(last) + 1 ~= tonumber(ARGV[2 * i - 1]) then
                return {i - 1, last}
            end
        end
    end
end
for i = 2, #KEYS do
    redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[2], ARGV[2 * i - 1] .. '-0', 'm', ARGV[2 * i])
end
return 0
"""


class BadEntry(ValueError):
    """A stream entry this daemon did not write (or wrote for another symbol)."""


def stream_key(prefix: str, symbol: str) -> str:
    return f"{prefix}:stream:{symbol}"


def lease_key(prefix: str) -> str:
    return f"{prefix}:leader"


def entry_id(seq: int) -> str:
    """The stream id of the update numbered `seq` (> 0)."""
    if seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    return f"{seq}-0"


def seq_of(identifier: bytes | str) -> int:
    """The seq of a stream id made by `entry_id`; BadEntry for any other id."""
    text = identifier.decode() if isinstance(identifier, bytes) else identifier
    milliseconds, _, sequence = text.partition("-")
    if sequence != "0" or not milliseconds.isdigit():
        raise BadEntry(f"stream id {text!r} is not one of ours")
    return int(milliseconds)


@dataclass(frozen=True, slots=True)
class StreamUpdate:
    """One update read from a stream."""

    seq: int
    payload: bytes  # the update message as encoded by the generating node
    message: dict[str, Any]  # the same, decoded


def decode_entry(symbol: str, identifier: bytes | str, fields: Mapping[Any, Any]) -> StreamUpdate:
    """The update in one stream entry of `symbol`. Raises BadEntry when it is not one of ours,
    or when the id, the symbol or the seq inside disagree."""
    seq = seq_of(identifier)
    payload = fields.get(PAYLOAD_FIELD, fields.get(PAYLOAD_FIELD.decode()))
    if isinstance(payload, str):
        payload = payload.encode()
    if not isinstance(payload, bytes):
        raise BadEntry(f"entry {seq} of {symbol!r} has no payload")
    try:
        message = orjson.loads(payload)
        data = message["data"]
        inside = (data["symbol"], data["seq"])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadEntry(f"entry {seq} of {symbol!r} is not an update: {exc}") from None
    if inside != (symbol, seq):
        raise BadEntry(f"entry {seq} of {symbol!r} carries {inside}")
    return StreamUpdate(seq, payload, message)


def entry_fields(payload: bytes) -> dict[bytes, bytes]:
    return {PAYLOAD_FIELD: payload}


class Continuity(Enum):
    """How an update read from the stream relates to what a node already mirrors."""

    NEXT = "next"  # the seq the mirror expects: apply it
    SEEN = "seen"  # at or below what the mirror has: skip it (a re-read after a reconnect)
    JUMP = "jump"  # above the next one: updates are missing (trimmed or lost): restart there


def continuity(expected_seq: int, seq: int, *, mirrored: bool) -> Continuity:
    """Classify `seq` against the mirror's next seq. `mirrored`: the mirror holds updates of this
    stream already (a fresh mirror's next seq is a placeholder, so anything is a jump to it)."""
    if seq == expected_seq:
        return Continuity.NEXT
    if mirrored and seq < expected_seq:
        return Continuity.SEEN
    return Continuity.JUMP


def next_seq_after(top_seq: int | None, clock: Callable[[], float] | None = None) -> int:
    """The seq a new generating node gives a symbol's next update.

    The stream's top plus one: no reuse, no gap. An empty stream (a new cluster, or a Redis that
    lost its data) starts at the time in microseconds, as a node without history does: above any
    seq issued before, so nothing is reused (clients resuming across it get a `reset`).
    """
    if top_seq is not None:
        return top_seq + 1
    return first_seq() if clock is None else first_seq(clock)


def redact_url(url: str) -> str:
    """`url` without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if user else f"{scheme}{sep}***@{host}"
