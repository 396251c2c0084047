"""The master ↔ worker channel's messages (``[server] workers`` > 1): framing and parsing.

One Unix stream socket per worker carries length-prefixed messages, each an orjson header and
raw byte parts::

    u32 body length (header + parts) | u32 header length | header JSON | part 0 | part 1 | …

The header names the message (`"t"`) and the length of every part (`"n"`), so the bytes of an
update (its frame, its compressed frame) travel as they are: the master encodes each update once
and writes the same message to every worker; no part is ever escaped, copied into JSON or
re-encoded. Pure: bytes in, messages out, no sockets.

Kinds, master → worker: `config` (tokens, limits, TLS files, log level: one pickled part, see
`workerconfig`), `history` (one symbol's retained frames), `start`, `update` (one symbol's frames
of one batch, then their compressed frames when sent), `close_tokens`, `drain`.
Worker → master: `ready`, `stats`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_PREFIX = struct.Struct(">II")
PREFIX_SIZE = _PREFIX.size
# Largest message accepted: a history snapshot of one symbol (10,000 updates of ~1 KB each is
# ~11 MB) fits many times over; anything bigger is a defect, not data.
MAX_MESSAGE_BYTES = 256 << 20


class ChannelError(Exception):
    """The peer sent bytes that are not a message of this channel (a defect: end the worker)."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: str
    header: dict[str, Any]
    parts: list[bytes]


def encode(kind: str, parts: Sequence[bytes] = (), **fields: Any) -> bytes:
    """One whole message: header `{"t": kind, "n": [part lengths], **fields}` and `parts`."""
    header = orjson.dumps({"t": kind, "n": [len(p) for p in parts], **fields})
    body_length = len(header) + sum(len(p) for p in parts)
    if body_length > MAX_MESSAGE_BYTES:
        raise ChannelError(f"message of {body_length} bytes is over {MAX_MESSAGE_BYTES}")
    return b"".join((_PREFIX.pack(body_length, len(header)), header, *parts))


def encode_update(
    symbol: str, first_seq: int, frames: Sequence[bytes], deflated: Sequence[bytes] = ()
) -> bytes:
    """The `update` message of one symbol's batch: frames of seq `first_seq`, `first_seq + 1`, …
    and, when given, the same updates' permessage-deflate frames (as many, same order)."""
    if deflated and len(deflated) != len(frames):
        raise ValueError("deflated frames must match the frames one for one")
    return encode("update", [*frames, *deflated], s=symbol, q=first_seq, k=len(frames))


def update_parts(message: Message) -> tuple[list[bytes], list[bytes | None]]:
    """The frames of an `update` message and their compressed frames (None where not sent)."""
    count = int(message.header["k"])
    frames = message.parts[:count]
    deflated: list[bytes | None] = list(message.parts[count:]) or [None] * count
    return frames, deflated


class ChannelParser:
    """Turns the bytes read from a channel, in whatever pieces they arrive, into messages.

    Guarantees: messages come out whole and in order; a piece may hold several messages or a
    fraction of one. Raises ChannelError on a length over MAX_MESSAGE_BYTES or a header that is
    not a JSON object naming its kind and part lengths (which then do not exceed the body).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= PREFIX_SIZE:
            body_length, header_length = _PREFIX.unpack_from(buffer, start)
            if body_length > MAX_MESSAGE_BYTES or header_length > body_length:
                raise ChannelError(f"bad message lengths {body_length}/{header_length}")
            end = start + PREFIX_SIZE + body_length
            if len(buffer) < end:
                break
            header_end = start + PREFIX_SIZE + header_length
            raw_header = bytes(buffer[start + PREFIX_SIZE : header_end])
            messages.append(_message(raw_header, buffer, header_end, end))
            start = end
        if start:
            del buffer[:start]
        return messages


def _message(raw_header: bytes, buffer: bytearray, offset: int, end: int) -> Message:
    try:
        header = orjson.loads(raw_header)
        kind = header["t"]
        lengths = [int(n) for n in header["n"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ChannelError(f"bad message header: {exc!r}") from None
    if not isinstance(kind, str) or any(n < 0 for n in lengths) or offset + sum(lengths) != end:
        raise ChannelError("message parts do not match its length")
    parts = []
    for n in lengths:
        parts.append(bytes(buffer[offset : offset + n]))
        offset += n
    return Message(kind, header, parts)
