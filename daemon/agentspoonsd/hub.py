"""The fan-out hub: numbers each update, encodes it once, hands the same bytes to every subscriber.

Per update the hub does one JSON encode and one WebSocket frame encode, whatever the number of
subscribers (server frames are unmasked, so the bytes are identical for all). Per subscriber it
calls `send_frame`, which must not block: the connection's own write path writes what the socket
takes and queues the rest under its cap (see `outbox.Outbox`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import trio

from . import protocol
from .frames import encode_deflate_frame, encode_text_frame, frame_payload
from .history import Entry, Gap, History
from .market.bar import Bar
from .metrics import Stats


class Subscriber(Protocol):
    deflate: bool  # negotiated permessage-deflate: it receives the compressed frames
    finished: bool  # its connection is over: the hub must never hold it again

    def send_frame(self, frame: bytes) -> None:
        """Queue one complete, pre-encoded frame; never blocks, never raises."""


class ReplySubscriber(Subscriber, Protocol):
    def send_reply(self, frames: Sequence[bytes]) -> None:
        """Queue a reply (whole frames, in order), exempt from the backlog cap up to its size
        (see `outbox.Outbox.write_reply`); never blocks, never raises."""


def send_reply(subscriber: Subscriber, frames: Sequence[bytes]) -> None:
    """Write `frames` to `subscriber` as one reply, or frame by frame if it has no reply path."""
    reply = getattr(subscriber, "send_reply", None)
    if reply is not None:
        reply(frames)
        return
    for frame in frames:
        subscriber.send_frame(frame)


def deflated_frame(entry: Entry) -> bytes:
    """`entry`'s frame compressed for permessage-deflate clients: made once, then kept."""
    deflated = entry.deflated
    if deflated is None:
        deflated = entry.deflated = encode_deflate_frame(frame_payload(entry.frame))
    return deflated


class Hub:
    """Subscriptions by symbol, per-symbol sequence numbers, the history and the broadcast.

    Guarantees: within one symbol, every subscriber receives updates in `seq` order, and `seq`
    increases by exactly one per update (no gap, no repeat; see `history` for restarts). Every
    method is synchronous: a subscription change, a resume replay and a broadcast never
    interleave, which is what makes `resume` atomic.
    """

    def __init__(
        self,
        symbols: list[str],
        receive_channel: trio.MemoryReceiveChannel[list[Bar]],
        stats: Stats,
        *,
        history: History | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Without `history`, a 1000-update in-memory one is made (seq from `first_seq()`)."""
        self.symbols = tuple(symbols)
        self.symbol_set = frozenset(symbols)
        self._receive = receive_channel
        self._stats = stats
        self._wall_clock = wall_clock
        self.history = history or History(symbols, 1000, decode_frame=encode_text_frame)
        # symbol → {subscriber: its bound send_frame}; bound once so the broadcast loop is lean.
        # Insertion order is the broadcast's order, newest first (see `confirm_reading`).
        self._subscribers: dict[str, dict[Subscriber, Callable[[bytes], None]]] = {
            s: {} for s in symbols
        }
        # The same for clients that negotiated permessage-deflate: they get the compressed frame.
        self._deflaters: dict[str, dict[Subscriber, Callable[[bytes], None]]] = {
            s: {} for s in symbols
        }
        # subscriber → the symbols it receives: what a pong, an unsubscribe and the metrics
        # touch, so that none of them costs a pass over every symbol.
        self._memberships: dict[Subscriber, set[str]] = {}
        self.last_update: dict[str, dict[str, object]] = {}
        self.last_publish: float | None = None  # trio.current_time() of the newest broadcast
        # Called with each symbol's batch of (payload, entry) once its subscribers were written
        # to: the master of fan-out workers sends the same entries to every worker (`workers`).
        self.tap: Callable[[str, list[tuple[bytes, Entry]]], None] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Broadcast every batch of bars the generator sends, until cancelled.

        Never closes the channel: the supervisor may call `run` again on the same Hub.
        """
        task_status.started()
        while True:
            bars = await self._receive.receive()
            self.publish(bars)

    def publish(self, bars: list[Bar]) -> None:
        """Number, encode, record and hand each bar to its subscribers. No checkpoint.

        A symbol's bars of one batch (a generator catching up sends several) reach each of its
        subscribers in one write, their frames back to back in seq order: one send per client
        whatever the number of bars, which is what lets a late generator catch up.
        """
        published = self._wall_clock()
        history = self.history
        encoded: dict[str, list[tuple[bytes, Entry]]] = {}  # symbol → [(payload, entry)]
        for bar in bars:
            seq = history.next_seq(bar.symbol)
            message = protocol.update_message(bar, seq, published)
            payload = protocol.encode(message)
            entry = self._record(bar.symbol, seq, payload, message)
            encoded.setdefault(bar.symbol, []).append((payload, entry))
        for symbol, updates in encoded.items():
            self._send(symbol, updates)
        self.last_publish = trio.current_time()

    def publish_encoded(
        self, symbol: str, seq: int, payload: bytes, message: dict[str, Any]
    ) -> None:
        """Record and broadcast an update numbered and encoded elsewhere (the redis broker: every
        node sends the bytes the generating node encoded). No checkpoint.

        `seq` must not be below the history's next seq (the caller skips what it already has).
        A higher one is a discontinuity (updates lost upstream): the ring restarts there, so a
        resume from before it gets a `reset` instead of a silent hole.
        """
        if seq != self.history.next_seq(symbol):
            self.history.restart(symbol, seq)
        entry = self._record(symbol, seq, payload, message)
        self._send(symbol, [(payload, entry)])
        self.last_publish = trio.current_time()

    def publish_frames(
        self, symbol: str, first_seq: int, frames: list[bytes], deflated: list[bytes | None]
    ) -> None:
        """Record and broadcast updates numbered and encoded elsewhere, frames included (a fan-out
        worker: its master encoded and compressed them once for every worker). No checkpoint.

        `frames` are consecutive seqs from `first_seq`, `deflated` their compressed frames (None
        where not sent: made on first need). A seq other than the next one restarts the ring
        there, as in `publish_encoded`. The frames are written to subscribers as they are.
        """
        if first_seq != self.history.next_seq(symbol):
            self.history.restart(symbol, first_seq)
        updates = []
        for offset, (frame, compressed) in enumerate(zip(frames, deflated, strict=True)):
            payload = frame_payload(frame)
            message = orjson.loads(payload)
            entry = self._record(symbol, first_seq + offset, payload, message, frame)
            entry.deflated = compressed
            updates.append((payload, entry))
        if updates:
            self._send(symbol, updates)
            self.last_publish = trio.current_time()

    def _record(
        self,
        symbol: str,
        seq: int,
        payload: bytes,
        message: dict[str, Any],
        frame: bytes | None = None,
    ) -> Entry:
        """Keep the update in the history (before anyone sees it); its entry. `frame`: the
        update's frame when already encoded."""
        entry = self.history.record(
            symbol, seq, payload, frame or encode_text_frame(payload), message["data"]
        )
        self.last_update[symbol] = message
        self._stats.updates_published += 1
        return entry

    def _send(self, symbol: str, updates: list[tuple[bytes, Entry]]) -> None:
        """Write `updates` ((payload, entry) of one symbol, in seq order) to its subscribers:
        one write per subscriber."""
        frames = updates[0][1].frame if len(updates) == 1 else b"".join(e.frame for _, e in updates)
        subscribers = self._subscribers[symbol]
        # A snapshot (a write that fails closes its client, which unsubscribes it at once), in
        # reverse: the clients that most recently proved they read come first.
        for send_frame in reversed(tuple(subscribers.values())):
            send_frame(frames)
        stats = self._stats
        stats.messages_sent += len(subscribers) * len(updates)
        stats.bytes_sent += len(frames) * len(subscribers)
        deflaters = self._deflaters[symbol]
        if deflaters:
            # Compressed once per update, for every compressing client, and kept with the entry:
            # a replay to such a client reuses it.
            parts: list[bytes] = []
            for payload, entry in updates:
                deflated = entry.deflated
                if deflated is None:  # a worker's were compressed by its master
                    entry.deflated = deflated = encode_deflate_frame(payload)
                parts.append(deflated)
            compressed = b"".join(parts)
            for send_frame in reversed(tuple(deflaters.values())):
                send_frame(compressed)
            stats.messages_sent += len(deflaters) * len(updates)
            stats.bytes_sent += len(compressed) * len(deflaters)
        if self.tap is not None:
            self.tap(symbol, updates)

    def _table(
        self, subscriber: Subscriber
    ) -> dict[str, dict[Subscriber, Callable[[bytes], None]]]:
        return self._deflaters if getattr(subscriber, "deflate", False) else self._subscribers

    def subscribe(self, subscriber: Subscriber, symbols: Iterable[str]) -> None:
        """Add `subscriber` to the broadcasts of `symbols`; nothing for a finished subscriber.

        A write to a peer that has gone (a request read together with its RST) finishes the
        connection and unsubscribes it in the middle of answering: whatever the answer does
        next must not put it back.
        """
        if subscriber.finished:
            return
        table = self._table(subscriber)
        joined = self._memberships.setdefault(subscriber, set())
        for symbol in symbols:
            table[symbol][subscriber] = subscriber.send_frame
            joined.add(symbol)
        if not joined:
            del self._memberships[subscriber]

    def confirm_reading(self, subscriber: Subscriber) -> None:
        """`subscriber` has read everything sent to it so far (it answered a ping sent after it):
        move it to the front of every broadcast it receives, ahead of those that have not.

        Order matters beyond latency. The kernel copies each send into small fragments of pages
        it shares between sockets, and a page is freed only once every fragment in it is read.
        Sent in arbitrary order, a client that stopped reading pins the pages of all the clients
        written around it: with 10 % of clients stalled, nearly every page, so the kernel keeps
        taking fresh memory at the full broadcast rate until their buffers are full, and every
        send gets slower. Sent last, the stalled ones share pages only with each other.
        """
        table = self._table(subscriber)
        for symbol in self._memberships.get(subscriber, ()):
            subscribers = table[symbol]
            send_frame = subscribers.pop(subscriber)
            subscribers[subscriber] = send_frame  # re-inserted: newest, so sent first

    def unsubscribe(self, subscriber: Subscriber, symbols: Iterable[str]) -> None:
        joined = self._memberships.get(subscriber)
        if joined is None:
            return
        table = self._table(subscriber)
        for symbol in symbols:
            table[symbol].pop(subscriber, None)
            joined.discard(symbol)
        if not joined:
            del self._memberships[subscriber]

    def unsubscribe_all(self, subscriber: Subscriber) -> None:
        table = self._table(subscriber)
        for symbol in self._memberships.pop(subscriber, ()):
            table[symbol].pop(subscriber, None)

    def broadcast_order(self, symbol: str) -> list[Subscriber]:
        """The subscribers of `symbol` in the order a broadcast writes to them (each table, the
        uncompressed one first)."""
        return [*reversed(self._subscribers[symbol]), *reversed(self._deflaters[symbol])]

    def subscriber_count(self) -> int:
        """How many distinct subscribers receive at least one symbol (the metrics' gauge)."""
        return len(self._memberships)

    def subscriptions(self, subscriber: Subscriber) -> list[str]:
        """The symbols `subscriber` receives, in the hub's symbol order."""
        joined = self._memberships.get(subscriber, ())
        return [s for s in self.symbols if s in joined]

    def resume(self, subscriber: Subscriber, symbol: str, after_seq: int) -> Gap | None:
        """Send `subscriber` what it missed of `symbol` after `after_seq`, then subscribe it.

        The frames, in order: a `reset` message when the updates in between are not all retained
        (then every retained update follows), else exactly the updates after `after_seq`; then
        the live ones. Atomic: no checkpoint, so nothing is broadcast in between. Returns the gap.
        """
        if subscriber.finished:  # see `subscribe`
            return None
        gap, entries = self.history[symbol].after(after_seq)
        deflate = getattr(subscriber, "deflate", False)
        frames: list[bytes] = []
        if gap is not None:
            encode = encode_deflate_frame if deflate else encode_text_frame
            frames.append(encode(protocol.encode(protocol.reset_message(symbol, gap))))
        if deflate:
            frames.extend(map(deflated_frame, entries))
        else:
            frames.extend(entry.frame for entry in entries)
        if frames:
            # One reply: the history's own frames, no copy, exempt from the backlog cap up to
            # its size (a valid replay never gets its client cut as a slow consumer).
            send_reply(subscriber, frames)
        if not subscriber.finished:  # a send that failed finished it
            self._table(subscriber)[symbol][subscriber] = subscriber.send_frame
            self._memberships.setdefault(subscriber, set()).add(symbol)
        return gap

    def replay_size(self, symbol: str, after_seq: int) -> int:
        """How many updates `resume(…, symbol, after_seq)` would replay now (its cost)."""
        return self.history[symbol].count_after(after_seq)

    def recent(self, symbol: str, limit: int) -> list[dict[str, Any]]:
        """The `data` objects of the newest `limit` updates of `symbol`, oldest first."""
        return [entry.data for entry in self.history[symbol].last(limit)]

    def history_page(
        self, symbol: str, limit: int, before_seq: int | None = None
    ) -> tuple[dict[str, Any], int]:
        """The `history` reply for `symbol` and its number of updates.

        It carries the newest `limit` retained updates below `before_seq` (all retained ones
        when None), oldest first, as many as fit `protocol.MAX_HISTORY_REPLY_BYTES`; `more` and
        the next `before_seq` when older retained updates exist. Each update's JSON is encoded
        once and kept with its entry.
        """
        ring = self.history[symbol]
        entries = ring.before(before_seq, limit)
        count = protocol.history_page_size([len(entry.data_json) for entry in entries])
        entries = entries[len(entries) - count :]
        oldest = entries[0].seq if entries else before_seq
        more = oldest is not None and len(ring) > 0 and oldest > ring.oldest_seq
        message = protocol.history_message(
            symbol,
            [orjson.Fragment(entry.data_json) for entry in entries],
            more=more,
            before_seq=oldest,
        )
        return message, count
