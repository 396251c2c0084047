"""The pure parts of the client: reconnect delays, and the stream tracker that keeps every
update once and in order across reconnects (no I/O, no clock)."""

from __future__ import annotations

import random
from collections.abc import (
    Callable,
    Iterable,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from ..backoff import capped_exponential


def backoff_delay(
    attempt: int,
    initial: float = 0.5,
    maximum: float = 30.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 for the first retry).

    Exponential backoff with full jitter: uniform in [0, min(maximum, initial × 2**attempt)).
    `rand` returns a float in [0, 1) (``random.random`` by default; injectable for tests).
    """
    return rand() * capped_exponential(attempt, initial, maximum)


@dataclass(frozen=True, slots=True)
class Update:
    """One `volatility_update` as received: its `data`, the outer (publish) timestamp, and the
    wall-clock time (seconds since the epoch) at which the client read it."""

    data: dict[str, Any]
    published: str
    received: float

    @property
    def symbol(self) -> str:
        return str(self.data["symbol"])

    @property
    def seq(self) -> int:
        return int(self.data["seq"])

    @property
    def latency(self) -> float | None:
        """Seconds from the daemon publishing the update to the client reading it (None when
        the timestamp is missing or unreadable). Includes any clock offset between hosts."""
        try:
            return self.received - datetime.fromisoformat(self.published).timestamp()
        except (TypeError, ValueError):
            return None


class Verdict(Enum):
    """What to do with a received update."""

    DELIVER = "deliver"
    DUPLICATE = "duplicate"  # seq not above the last one accepted: drop it
    GAP = "gap"  # seq more than one above the last one: missed updates, resume instead


class StreamTracker:
    """Sans-IO: what a client knows of its stream, and what to ask for on (re)connect.

    `want_all` (no `symbols` given) means "every symbol the token may see", re-established on
    every connection; otherwise `symbols` is the explicit subscription. `last_seq` holds the last
    seq accepted per symbol.
    """

    def __init__(self, symbols: Iterable[str] | None = None) -> None:
        self.want_all = symbols is None
        self.symbols: list[str] = list(dict.fromkeys(symbols or ()))
        self.last_seq: dict[str, int] = {}

    def resume_positions(self) -> dict[str, int]:
        """The symbols to resume and the last seq of each: those subscribed that were seen."""
        if self.want_all:
            return dict(self.last_seq)
        return {s: self.last_seq[s] for s in self.symbols if s in self.last_seq}

    def target(self, base_url: str) -> str:
        """The URL to connect to: `base_url` with ``symbols`` and ``resume`` set for this state.

        Other query parameters (``access_token``) are kept. With `want_all` and nothing to
        resume, neither is set (the daemon's default: everything allowed).
        """
        parts = urlsplit(base_url)
        query = [
            f"{quote(key, safe='')}={quote(value, safe='')}"
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
            if key not in ("symbols", "resume")
        ]
        positions = self.resume_positions()
        if not self.want_all:
            fresh = [s for s in self.symbols if s not in positions]
            query.append("symbols=" + ",".join(quote(s, safe="") for s in fresh))
        if positions:
            query.append(
                "resume=" + ",".join(f"{quote(s, safe='')}:{seq}" for s, seq in positions.items())
            )
        path = parts.path or "/"
        return urlunsplit((parts.scheme, parts.netloc, path, "&".join(query), parts.fragment))

    def needs_subscribe_all(self) -> bool:
        """True when the connection URL resumes some symbols and `want_all` holds: the daemon
        then subscribes only the resumed ones, so the client must ``subscribe ["*"]``."""
        return self.want_all and bool(self.last_seq)

    def accept(self, symbol: str, seq: int) -> Verdict:
        """Judge an update; DELIVER records `seq` as the last one of `symbol`."""
        last = self.last_seq.get(symbol)
        if last is not None:
            if seq <= last:
                return Verdict.DUPLICATE
            if seq != last + 1:
                return Verdict.GAP
        self.last_seq[symbol] = seq
        return Verdict.DELIVER

    def reset(self, symbol: str, oldest_seq: int) -> int | None:
        """A `reset`: the next update of `symbol` will be `oldest_seq`. Returns the previous
        last seq (what the consumer had)."""
        previous = self.last_seq.get(symbol)
        self.last_seq[symbol] = oldest_seq - 1
        return previous

    def subscription_changed(self, symbols: Sequence[str]) -> None:
        """The daemon's answer to a subscribe/unsubscribe the *user* sent: the new explicit
        subscription. Symbols no longer subscribed are forgotten, so subscribing them again
        later starts from the live stream instead of replaying the time in between."""
        self.want_all = False
        self.symbols = list(symbols)
        for symbol in [s for s in self.last_seq if s not in self.symbols]:
            del self.last_seq[symbol]
