"""`Session`: one connection's protocol state on the client side, sans-IO.

What the daemon sends is judged here (docs/PROTOCOL.md): updates against the `StreamTracker`
(deliver, drop a duplicate, or resume after a gap), resets, and replies matched to the requests
waiting for them (the daemon answers in request order, one reply per request). No I/O, no
clock: the connection task feeds parsed messages and the receive time, and carries out the
action returned.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import StreamReset
from .tracker import StreamTracker, Update, Verdict

_log = logging.getLogger("agentspoonsd.client")

# The reply each request type gets (docs/PROTOCOL.md, "Replies"); an `error` may come instead,
# and is the only reply to anything else (unknown_type, invalid_message).
REPLY_TYPES = {
    "ping": "pong",
    "subscribe": "subscribed",
    "unsubscribe": "unsubscribed",
    "history": "history",
    "resume": "subscribed",  # then the replay, delivered as updates (no gap, no duplicate)
}


def expected_reply(message: Any) -> str:
    """The reply type a request gets when it succeeds (else ``error``)."""
    # Not an object: the daemon answers invalid_message; the client does not judge it.
    kind = message.get("type") if isinstance(message, Mapping) else None
    return REPLY_TYPES.get(kind, "error") if isinstance(kind, str) else "error"


class Settable(Protocol):
    """What a request's waiter is told when its reply came (or never will): an `anyio.Event`,
    or a `Flag` where nobody waits."""

    def set(self) -> None: ...


class Flag:
    """A `Settable` for requests nobody awaits (and for tests)."""

    def __init__(self) -> None:
        self.is_set = False

    def set(self) -> None:
        self.is_set = True


@dataclass(slots=True)
class Pending:
    """A request waiting for its reply; replies come in request order (one per request)."""

    expected: str
    internal: bool = False  # the client's own (barrier ping, subscribe "*"): not the user's
    waited: bool = True  # False for `send()`: nobody awaits the reply
    done: Settable = field(default_factory=Flag)
    reply: dict[str, Any] | None = None
    lost: bool = False  # the connection ended first

    def settle(self, reply: dict[str, Any] | None) -> None:
        """The reply came (None: it never will, the connection is gone); tell the waiter."""
        if reply is None:
            self.lost = True
        else:
            self.reply = reply
        self.done.set()


@dataclass(frozen=True, slots=True)
class Deliver:
    """A new update: hand it to the consumer."""

    update: Update


@dataclass(frozen=True, slots=True)
class Duplicate:
    """An update already delivered (seq not above the last one): drop it, count it."""

    update: Update


@dataclass(frozen=True, slots=True)
class Gap:
    """A seq gap: close this connection and resume on a new one (`text` says which)."""

    text: str


@dataclass(frozen=True, slots=True)
class Reset:
    """The daemon cannot fill a gap: raise `error` to the consumer, in stream order."""

    error: StreamReset


@dataclass(frozen=True, slots=True)
class Report:
    """An ``error`` nobody waits for (about the connect URL, unsolicited, or the reply to a
    request sent without waiting): report it as ``server_error``."""

    message: dict[str, Any]


Action = Deliver | Duplicate | Gap | Reset | Report


class Session:
    """One connection: its ``connected`` message (`info`), the requests awaiting replies, and
    the barrier (until the first internal ``pong``, an ``error`` is about the connect URL).

    Guarantees: every `Pending` passed to `expect` is settled exactly once, by its reply or by
    `lose_all`; a user's subscribe/unsubscribe reply updates the tracker's subscription, the
    client's own do not; an update is delivered only when the tracker accepts its seq.
    """

    def __init__(self, tracker: StreamTracker, info: dict[str, Any]) -> None:
        self.tracker = tracker
        self.info = info
        self.pending: deque[Pending] = deque()
        self.barrier = True
        self.delivered = False  # an update was delivered on this connection

    def expect(self, pending: Pending) -> None:
        """A request was queued to be sent: its reply comes after those already expected."""
        self.pending.append(pending)

    def lose_all(self) -> None:
        """The connection ended: no reply will come."""
        while self.pending:
            self.pending.popleft().settle(None)

    def receive(self, message: dict[str, Any], received_at: float) -> Action | None:
        """Judge one message from the daemon, read at `received_at` (seconds since the epoch).
        None: nothing to do (a reply settled, or a message to ignore)."""
        kind = message.get("type")
        if kind == "volatility_update":
            return self._update(message, received_at)
        if kind == "reset":
            symbol = str(message.get("symbol"))
            oldest, latest = int(message["oldest_seq"]), int(message.get("latest_seq", -1))
            previous = self.tracker.reset(symbol, oldest)
            return Reset(StreamReset(symbol, previous, oldest, latest))
        if kind == "error" or kind in REPLY_TYPES.values():
            return self._reply(message)
        # `connected` again, or a type added later: ignored, as the protocol asks.
        _log.debug("ignored message type %r", kind)
        return None

    def _update(self, message: dict[str, Any], received_at: float) -> Action | None:
        data = message.get("data")
        if not isinstance(data, dict) or "symbol" not in data or "seq" not in data:
            _log.warning("update without data.symbol/seq ignored")
            return None
        update = Update(data, str(message.get("timestamp")), received_at)
        verdict = self.tracker.accept(update.symbol, update.seq)
        if verdict is Verdict.DUPLICATE:
            return Duplicate(update)
        if verdict is Verdict.GAP:
            last = self.tracker.last_seq.get(update.symbol)
            return Gap(f"{update.symbol}: seq {update.seq} after {last}; resuming")
        self.delivered = True
        return Deliver(update)

    def _reply(self, message: dict[str, Any]) -> Report | None:
        kind = message.get("type")
        head = self.pending[0] if self.pending else None
        if kind == "error" and (head is None or (self.barrier and head.internal)):
            return Report(message)  # about the connect URL (unknown_symbol ...), or unsolicited
        if head is None or (kind != "error" and kind != head.expected):
            _log.debug("unmatched reply %r", kind)
            return None
        self.pending.popleft()
        if head.internal and kind == "pong":
            self.barrier = False
        if kind in ("subscribed", "unsubscribed"):
            self.info["symbols"] = list(message.get("symbols") or [])
            if not head.internal:
                self.tracker.subscription_changed(self.info["symbols"])
        head.settle(message)
        if kind == "error" and (head.internal or not head.waited):  # nobody else will see it
            return Report(message)
        return None
