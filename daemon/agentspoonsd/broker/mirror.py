"""Which stream entries a node's local history still needs: the mirror's bookkeeping. Pure: no
I/O, no clock; the service reads the entries and hands them to the hub."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .entries import BadEntry, Continuity, StreamUpdate, continuity, decode_entry, stream_key


@dataclass(frozen=True, slots=True)
class Mirrored:
    """An entry to apply: publish `update` to the local hub. `expected_seq` is set when the
    stream jumped past what the node mirrors (entries trimmed while it could not read, or
    Redis lost its data): the seq it expected, for the warning."""

    symbol: str
    update: StreamUpdate
    expected_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry this daemon did not write: skipped, with the reason."""

    symbol: str
    error: str


class StreamMirror:
    """The streams of `symbols` under `prefix`, the id of the last entry read from each, and
    which symbols' local history already follows its stream.

    Guarantees: `positions` only moves forward through what was handed to `entry`; an entry at
    or below the local history's next seq is applied once (re-reads after a reconnect are
    skipped); the first entry of a stream not mirrored yet is always applied.
    """

    def __init__(self, prefix: str, symbols: Iterable[str]) -> None:
        self.keys = {symbol: stream_key(prefix, symbol) for symbol in symbols}
        self._symbol_of = {key: symbol for symbol, key in self.keys.items()}
        self._last_ids: dict[str, str] = {}  # stream key → id of the last entry read
        self.mirrored: set[str] = set()  # symbols whose local history follows the stream
        self.loaded = False  # the recent entries of every stream are in the local history

    def symbol_of(self, key: bytes | str) -> str:
        """The symbol of a stream key, as XREAD names it."""
        return self._symbol_of[key.decode() if isinstance(key, bytes) else key]

    def positions(self) -> dict[str, str]:
        """Stream key → the id to read on from (XREAD's arguments): every stream loaded."""
        return dict(self._last_ids)

    def loaded_stream(self, symbol: str) -> None:
        """The recent entries of `symbol` were read: read the rest from the start if none."""
        self._last_ids.setdefault(self.keys[symbol], "0-0")

    def entry(
        self, symbol: str, identifier: bytes | str, fields: Mapping[Any, Any], next_seq: int
    ) -> Mirrored | Rejected | None:
        """Judge one entry of `symbol`'s stream against the local history, whose next seq is
        `next_seq`. None: already there (skip it). A `Mirrored` must be applied: the symbol
        counts as mirrored from now on."""
        text = identifier.decode() if isinstance(identifier, bytes) else identifier
        self._last_ids[self.keys[symbol]] = text
        try:
            update = decode_entry(symbol, identifier, fields)
        except BadEntry as exc:
            return Rejected(symbol, str(exc))
        mirrored = symbol in self.mirrored
        relation = continuity(next_seq, update.seq, mirrored=mirrored)
        if relation is Continuity.SEEN:
            return None
        jumped = relation is Continuity.JUMP and mirrored
        self.mirrored.add(symbol)
        return Mirrored(symbol, update, next_seq if jumped else None)
