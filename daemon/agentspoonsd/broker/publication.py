"""One batch on its way into the streams: the seqs each attempt sends, and what the publish
script's reply means. Pure: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Outcome(Enum):
    PUBLISHED = "published"  # appended (by this attempt, or by one whose reply was lost)
    DEPOSED = "deposed"  # the lease is another node's: nothing appended, stop generating


@dataclass(frozen=True, slots=True)
class Resync:
    """The stream's top was not where this node thought: the batch is renumbered from
    `stream_top` + 1 and sent again (nothing was appended)."""

    symbol: str
    expected_seq: int
    stream_top: int


class Publication:
    """The seqs of one batch of updates (`symbols`: each update's symbol, in batch order; a
    symbol repeats when the batch holds several of its bars) from `next_seqs` on.

    Guarantees: seqs are consecutive per symbol, in batch order; a retry after an attempt whose
    outcome is unknown (`failed`) recognises that attempt's success instead of publishing the
    batch twice; after a `Resync` the batch continues the stream's actual top.
    """

    def __init__(self, symbols: Sequence[str], next_seqs: Mapping[str, int]) -> None:
        self.symbols = list(symbols)
        self.next_seqs = dict(next_seqs)  # each symbol's first seq in this batch
        self.uncertain = False  # an earlier attempt may have been applied
        self.seqs: list[int] = []
        self.following: dict[str, int] = {}  # each symbol's next seq after this batch
        self._number()

    def _number(self) -> None:
        self.following = dict(self.next_seqs)
        self.seqs = []
        for symbol in self.symbols:
            self.seqs.append(self.following[symbol])
            self.following[symbol] += 1

    def failed(self) -> None:
        """An attempt got no reply (Redis unavailable, or too slow): it may have been applied."""
        self.uncertain = True

    def judge(self, reply: Any) -> Outcome | Resync:
        """The meaning of the publish script's reply: 0, -1, or ``[i, top]`` (update i, 1-based,
        is the first of its stream, whose top is `top`, not seq - 1)."""
        if reply == 0:
            return Outcome.PUBLISHED
        if reply == -1:
            return Outcome.DEPOSED
        symbol, top = self.symbols[int(reply[0]) - 1], int(reply[1])
        if self.uncertain and top == self.following[symbol] - 1:
            return Outcome.PUBLISHED  # the earlier attempt was applied; its reply was lost
        resync = Resync(symbol, self.next_seqs[symbol], top)
        self.next_seqs[symbol] = top + 1
        self.uncertain = False
        self._number()
        return resync
