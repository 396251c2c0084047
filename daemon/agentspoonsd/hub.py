"""The fan-out hub: numbers each update, encodes it once, hands the same bytes to every subscriber.

Per update the hub does one JSON encode and one WebSocket frame encode, whatever the number of
subscribers (server frames are unmasked, so the bytes are identical for all). Per subscriber it
calls `send_frame`, which must not block: the connection's own write path writes what the socket
takes and queues the rest under its cap (see `outbox.Outbox`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import trio
from wsproto.frame_protocol import FrameProtocol

from . import protocol
from .market.bar import Bar
from .metrics import Stats


class Subscriber(Protocol):
    def send_frame(self, frame: bytes) -> None:
        """Queue one complete, pre-encoded frame; never blocks, never raises."""


def encode_text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented server text frame carrying `payload` (UTF-8 JSON)."""
    return bytes(FrameProtocol(client=False, extensions=[]).send_data(payload.decode(), fin=True))


class Hub:
    """Subscriptions by symbol, per-symbol sequence numbers, and the broadcast itself.

    Guarantees: within one symbol, every subscriber receives updates in `seq` order, and `seq`
    increases by exactly one per update (no gap, no repeat) for the life of the Hub object, across
    restarts of `run`.
    """

    def __init__(
        self,
        symbols: list[str],
        receive_channel: trio.MemoryReceiveChannel[list[Bar]],
        stats: Stats,
        *,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.symbols = tuple(symbols)
        self._receive = receive_channel
        self._stats = stats
        self._wall_clock = wall_clock
        # symbol → {subscriber: its bound send_frame}; bound once so the broadcast loop is lean.
        self._subscribers: dict[str, dict[Subscriber, Callable[[bytes], None]]] = {
            s: {} for s in symbols
        }
        self._seq = dict.fromkeys(symbols, 0)
        self.last_update: dict[str, dict[str, object]] = {}
        self.last_publish: float | None = None  # trio.current_time() of the newest broadcast

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Broadcast every batch of bars the generator sends, until cancelled.

        Never closes the channel: the supervisor may call `run` again on the same Hub.
        """
        task_status.started()
        while True:
            bars = await self._receive.receive()
            self.publish(bars)

    def publish(self, bars: list[Bar]) -> None:
        """Number, encode and hand each bar to its subscribers. Synchronous: no checkpoint."""
        published = self._wall_clock()
        for bar in bars:
            seq = self._seq[bar.symbol] + 1
            self._seq[bar.symbol] = seq
            message = protocol.update_message(bar, seq, published)
            frame = encode_text_frame(protocol.encode(message))
            subscribers = self._subscribers[bar.symbol]
            # A snapshot: a write that fails closes its client, which unsubscribes it at once.
            for send_frame in tuple(subscribers.values()):
                send_frame(frame)
            self.last_update[bar.symbol] = message
            self._stats.updates_published += 1
            self._stats.messages_sent += len(subscribers)
            self._stats.bytes_sent += len(frame) * len(subscribers)
        self.last_publish = trio.current_time()

    def subscribe(self, subscriber: Subscriber, symbols: list[str]) -> None:
        for symbol in symbols:
            self._subscribers[symbol][subscriber] = subscriber.send_frame

    def unsubscribe_all(self, subscriber: Subscriber) -> None:
        for subscribers in self._subscribers.values():
            subscribers.pop(subscriber, None)
