"""Per-symbol history: the last `size` updates with their seq numbers, optionally on disk.

The ring serves `history` requests and `resume` replays. Each entry keeps the update's encoded
frame, so a replay writes the very bytes the live broadcast wrote, and caches what replies need
beyond it (the compressed frame, the `data` object's JSON) on first use: a replay or a history
page encodes nothing that was encoded before.

Seq numbers never repeat, across restarts too:

- with a store (``[history] persist = true``), a symbol continues from the last seq on disk; every
  update is appended to the store *before* it is broadcast (one ``write`` to an ``O_APPEND`` file:
  it survives the process being killed), so no seq a client has seen can be issued again;
- otherwise (or for a symbol with nothing stored) the first seq is the start time in microseconds
  since the Unix epoch, above anything an earlier run issued at up to a million updates per second,
  and below 2**53, so it is exact in JavaScript.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(slots=True, eq=False)
class Entry:
    """One published update, and the encodings replies reuse (each made once, then kept)."""

    seq: int
    frame: bytes  # the WebSocket frame as broadcast
    data: dict[str, Any]  # its `data` object (what `history` replies carry)
    # The permessage-deflate frame of the same message: set by the broadcast when a compressing
    # client received it, else by the first replay that needs it (see `Hub.deflated_frame`).
    deflated: bytes | None = None
    _data_json: bytes | None = None

    @property
    def data_json(self) -> bytes:
        """`data` as JSON, encoded on first use and kept (a reply embeds it as an
        `orjson.Fragment`: copied, not encoded again)."""
        if self._data_json is None:
            self._data_json = orjson.dumps(self.data)
        return self._data_json


@dataclass(frozen=True, slots=True)
class Gap:
    """Why a resume cannot be served without a hole: the client must start over."""

    oldest_seq: int  # the first seq the client will now receive
    latest_seq: int  # the last seq issued (oldest_seq - 1 when nothing is retained)


def first_seq(clock: Callable[[], float] = time.time) -> int:
    """The first seq of a symbol with no history: now in microseconds since the epoch."""
    return int(clock() * 1_000_000)


class SymbolHistory:
    """The ring of one symbol. Appends must carry consecutive seq numbers."""

    def __init__(self, size: int, next_seq: int) -> None:
        self._ring: deque[Entry] = deque(maxlen=size)
        self.next_seq = next_seq

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def oldest_seq(self) -> int:
        """The seq of the oldest retained entry (the next seq when empty)."""
        return self._ring[0].seq if self._ring else self.next_seq

    @property
    def latest_seq(self) -> int:
        return self.next_seq - 1

    def append(self, entry: Entry) -> None:
        if entry.seq != self.next_seq:
            raise ValueError(f"seq {entry.seq} is not the next one ({self.next_seq})")
        self._ring.append(entry)
        self.next_seq = entry.seq + 1

    def restart(self, next_seq: int) -> None:
        """Forget every entry and continue at `next_seq`: what is retained stays contiguous."""
        self._ring.clear()
        self.next_seq = next_seq

    def last(self, limit: int) -> list[Entry]:
        """The newest `limit` entries, oldest first."""
        if limit >= len(self._ring):
            return list(self._ring)
        return list(self._ring)[-limit:]

    def before(self, seq: int | None, limit: int) -> list[Entry]:
        """The newest `limit` entries with a seq below `seq` (any seq when None), oldest first."""
        end = (
            len(self._ring) if seq is None else max(0, min(len(self._ring), seq - self.oldest_seq))
        )
        return list(itertools.islice(self._ring, max(0, end - limit), end))

    def count_after(self, seq: int) -> int:
        """How many entries `after(seq)` returns, without building them."""
        if seq > self.latest_seq or seq < self.oldest_seq - 1:
            return len(self._ring)
        return self.latest_seq - seq

    def after(self, seq: int) -> tuple[Gap | None, list[Entry]]:
        """What a client that has everything up to `seq` is missing, oldest first.

        A `Gap` when that cannot be served exactly: `seq` is older than the oldest retained entry
        minus one (updates in between are gone), or newer than the latest seq issued (the
        client's view belongs to another history). The entries are then all retained ones.
        """
        if seq > self.latest_seq or seq < self.oldest_seq - 1:
            return Gap(self.oldest_seq, self.latest_seq), list(self._ring)
        # Seqs are contiguous: the missed entries are the last `latest_seq - seq`, found by
        # position instead of comparing every retained seq.
        count = self.latest_seq - seq
        return None, list(itertools.islice(self._ring, len(self._ring) - count, None))


class HistoryStore:
    """Append-only JSON Lines files, one per symbol, in `directory` (the `[history] dir`).

    Each line is one whole update message. A file is rewritten (to a temporary file, then
    renamed) with its newest `size` lines once it holds twice that many, so it stays bounded.
    """

    def __init__(self, directory: Path, size: int) -> None:
        self._directory = directory
        self._size = size
        self._fds: dict[str, int] = {}
        self._lines: dict[str, int] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, symbol: str) -> Path:
        # Symbols such as "BTC/USD" are not file names; the checksum keeps distinct symbols apart
        # even when they sanitise alike.
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", symbol)
        return self._directory / f"{safe}-{zlib.crc32(symbol.encode()):08x}.jsonl"

    def load(self, symbol: str) -> Iterator[bytes]:
        """The stored update messages of `symbol`, oldest first, complete lines only (a line cut
        short by a crash is skipped). At most the newest `size`."""
        path = self.path(symbol)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        lines = [line for line in raw.split(b"\n") if line]
        if raw and not raw.endswith(b"\n"):
            lines.pop()  # the write that was cut short
        self._lines[symbol] = len(lines)
        return iter(lines[-self._size :])

    def append(self, symbol: str, payload: bytes) -> None:
        fd = self._fds.get(symbol)
        if fd is None:
            fd = self._open(symbol)
        os.write(fd, payload + b"\n")
        count = self._lines.get(symbol, 0) + 1
        self._lines[symbol] = count
        if count >= 2 * self._size:
            self._compact(symbol)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _open(self, symbol: str) -> int:
        path = self.path(symbol)
        raw = path.read_bytes() if path.exists() else b""
        if raw and not raw.endswith(b"\n"):
            os.truncate(path, raw.rfind(b"\n") + 1)  # drop the line a crash cut short
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fds[symbol] = fd
        return fd

    def _compact(self, symbol: str) -> None:
        keep = list(self.load(symbol))
        path = self.path(symbol)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(b"".join(line + b"\n" for line in keep))
        os.replace(temporary, path)
        os.close(self._fds.pop(symbol))
        self._lines[symbol] = len(keep)


class History:
    """Every symbol's ring, and the store when history is persisted."""

    def __init__(
        self,
        symbols: list[str] | tuple[str, ...],
        size: int,
        *,
        store: HistoryStore | None = None,
        decode_frame: Callable[[bytes], bytes],
        start_seq: int | None = None,
    ) -> None:
        """`decode_frame` turns a stored update message into its frame (the hub's encoder).
        `start_seq`: the first seq of a symbol with nothing stored (default: `first_seq()`)."""
        self._store = store
        self.size = size
        self._symbols: dict[str, SymbolHistory] = {}
        start = first_seq() if start_seq is None else start_seq
        for symbol in symbols:
            ring = SymbolHistory(size, start)
            if store is not None:
                for payload in store.load(symbol):
                    try:
                        data = orjson.loads(payload)["data"]
                        int(data["seq"])
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # not an update this daemon wrote: ignore it
                    ring.next_seq = data["seq"]  # continue from disk, whatever came before
                    ring.append(Entry(data["seq"], decode_frame(payload), data))
            self._symbols[symbol] = ring

    def __getitem__(self, symbol: str) -> SymbolHistory:
        return self._symbols[symbol]

    def next_seq(self, symbol: str) -> int:
        return self._symbols[symbol].next_seq

    def restart(self, symbol: str, next_seq: int) -> None:
        """Drop `symbol`'s entries and continue at `next_seq` (a discontinuity upstream)."""
        self._symbols[symbol].restart(next_seq)

    def record(
        self, symbol: str, seq: int, payload: bytes, frame: bytes, data: dict[str, Any]
    ) -> Entry:
        """Keep one update (and store it first, when persisted); its entry."""
        if self._store is not None:
            self._store.append(symbol, payload)
        entry = Entry(seq, frame, data)
        self._symbols[symbol].append(entry)
        return entry

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
