"""The hub: sequence numbers, one encode per update, subscriptions, a cancellable run loop."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

import orjson
import pytest
import trio
from wsproto.frame_protocol import FrameDecoder

import helpers
from agentspoonsd import protocol
from agentspoonsd.frames import encode_deflate_frame, encode_text_frame, frame_payload
from agentspoonsd.history import History
from agentspoonsd.hub import Hub
from agentspoonsd.market.bar import Bar
from agentspoonsd.metrics import Stats

SYMBOLS = ["BTC/USD", "ETH/USD"]
NOW = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)


class Collector:
    """A subscriber that keeps the frames it is handed."""

    deflate = False
    finished = False

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)


bar = functools.partial(helpers.bar, at=NOW)


def make_hub(stats: Stats | None = None) -> tuple[Hub, trio.MemorySendChannel[list[Bar]]]:
    send, receive = trio.open_memory_channel[list[Bar]](8)
    history = History(SYMBOLS, 1000, decode_frame=encode_text_frame, start_seq=1)
    return Hub(SYMBOLS, receive, stats or Stats(), history=history, wall_clock=lambda: NOW), send


def decode(frame: bytes) -> dict:
    decoder = FrameDecoder(client=True)
    decoder.receive_bytes(frame)
    parsed = decoder.process_buffer()
    assert parsed is not None and parsed.frame_finished and parsed.message_finished
    assert decoder.process_buffer() is None  # exactly one frame
    return orjson.loads(bytes(parsed.payload))


def test_text_frame_is_unmasked_and_decodes() -> None:
    frame = encode_text_frame(b'{"a":1}')
    assert frame[0] == 0x81 and frame[1] == 7  # FIN+text, no mask bit, length 7
    assert decode(frame) == {"a": 1}
    long = encode_text_frame(b'"' + b"x" * 70_000 + b'"')
    assert long[1] == 127 and len(decode(long)) == 70_000


async def test_seq_increases_by_one_per_symbol() -> None:
    hub, _ = make_hub()
    btc, eth = Collector(), Collector()
    hub.subscribe(btc, ["BTC/USD"])
    hub.subscribe(eth, ["ETH/USD"])
    for i in range(5):
        hub.publish([bar("BTC/USD", 100 + i), bar("ETH/USD", 10 + i)])
    assert [decode(f)["data"]["seq"] for f in btc.frames] == [1, 2, 3, 4, 5]
    assert [decode(f)["data"]["symbol"] for f in eth.frames] == ["ETH/USD"] * 5
    assert hub.last_update["BTC/USD"]["data"]["seq"] == 5


async def test_one_encode_shared_by_every_subscriber() -> None:
    stats = Stats()
    hub, _ = make_hub(stats)
    subscribers = [Collector() for _ in range(50)]
    for s in subscribers:
        hub.subscribe(s, SYMBOLS)
    hub.publish([bar("BTC/USD")])
    first = subscribers[0].frames[0]
    assert all(s.frames[0] is first for s in subscribers)  # the same bytes object
    message = decode(first)
    assert message["type"] == "volatility_update"
    assert message["timestamp"] == "2026-11-25T12:00:00.123456Z"
    assert stats.messages_sent == 50 and stats.bytes_sent == 50 * len(first)
    assert stats.updates_published == 1


async def test_unsubscribed_clients_receive_nothing_more() -> None:
    hub, _ = make_hub()
    client = Collector()
    hub.subscribe(client, SYMBOLS)
    hub.publish([bar("BTC/USD")])
    hub.unsubscribe_all(client)
    hub.publish([bar("BTC/USD"), bar("ETH/USD")])
    assert len(client.frames) == 1


async def test_run_broadcasts_is_cancellable_and_restartable() -> None:
    hub, send = make_hub()
    client = Collector()
    hub.subscribe(client, SYMBOLS)
    for _ in range(2):  # the second run continues the first one's numbering
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            await send.send([bar("BTC/USD")])
            await send.send([bar("BTC/USD"), bar("ETH/USD")])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    seqs = [decode(f)["data"]["seq"] for f in client.frames]
    assert seqs == [1, 2, 1, 3, 4, 2]
    assert hub.last_publish is not None
    await send.send([])  # the channel survived both runs


def inflate(frame: bytes) -> bytes:
    """RFC 7692 by hand (zlib, not wsproto): strip the header, raw-inflate with the tail added."""
    import zlib

    assert frame[0] == 0xC1  # FIN + RSV1 (compressed) + text
    length = frame[1] & 0x7F
    body = frame[2 + (2 if length == 126 else 8 if length == 127 else 0) :]
    return zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff")


@pytest.mark.parametrize("size", [10, 1_000, 70_000])
def test_deflate_frame_inflates_to_the_payload(size: int) -> None:
    payload = orjson.dumps({"x": "y" * size})
    frame = encode_deflate_frame(payload)
    assert inflate(frame) == payload
    assert frame_payload(encode_text_frame(payload)) == payload
    if size > 100:
        assert len(frame) < len(payload) / 5


class DeflateCollector(Collector):
    deflate = True


async def test_deflate_subscribers_get_the_compressed_frame_and_replays() -> None:
    hub, _ = make_hub()
    plain, packed = Collector(), DeflateCollector()
    hub.subscribe(plain, ["BTC/USD"])
    hub.subscribe(packed, ["BTC/USD"])
    for i in range(3):
        hub.publish([bar("BTC/USD", 100 + i)])
    assert [orjson.loads(inflate(f)) for f in packed.frames] == [decode(f) for f in plain.frames]
    assert hub.subscriptions(packed) == ["BTC/USD"]
    late = DeflateCollector()
    hub.resume(late, "BTC/USD", 1)
    assert [orjson.loads(inflate(f))["data"]["seq"] for f in late.frames] == [2, 3]
    hub.unsubscribe_all(packed)
    assert hub.subscriptions(packed) == []


def decode_all(data: bytes, *, deflate: bool = False) -> list[dict]:
    """Every message of `data`, a run of whole frames (compressed ones with `deflate`)."""
    from wsproto.extensions import PerMessageDeflate

    extensions = []
    if deflate:
        extension = PerMessageDeflate(client_no_context_takeover=True)
        extension.finalize("permessage-deflate; server_no_context_takeover")
        extensions.append(extension)
    decoder = FrameDecoder(client=True, extensions=extensions)
    decoder.receive_bytes(data)
    messages = []
    while (parsed := decoder.process_buffer()) is not None:
        assert parsed.frame_finished and parsed.message_finished
        payload = parsed.payload if isinstance(parsed.payload, str) else bytes(parsed.payload)
        messages.append(orjson.loads(payload))
    return messages


async def test_a_symbols_bars_of_one_batch_go_out_in_one_write() -> None:
    """A generator catching up sends several bars of a symbol in one batch: each subscriber
    gets them in one write, frames back to back in seq order, compressed ones too."""
    stats = Stats()
    hub, _ = make_hub(stats)
    plain, compressed, eth_only = Collector(), Collector(), Collector()
    compressed.deflate = True  # type: ignore[attr-defined]
    hub.subscribe(plain, SYMBOLS)
    hub.subscribe(compressed, SYMBOLS)
    hub.subscribe(eth_only, ["ETH/USD"])
    hub.publish([bar("BTC/USD", 100), bar("ETH/USD", 10), bar("BTC/USD", 101)])

    assert len(plain.frames) == 2 and len(compressed.frames) == 2 and len(eth_only.frames) == 1
    btc, eth = decode_all(plain.frames[0]), decode_all(plain.frames[1])
    assert [(m["data"]["symbol"], m["data"]["seq"], m["data"]["close"]) for m in btc] == [
        ("BTC/USD", 1, 100.0),
        ("BTC/USD", 2, 101.0),
    ]
    assert [m["data"]["seq"] for m in eth] == [1]
    assert decode_all(compressed.frames[0], deflate=True) == btc
    assert decode_all(compressed.frames[1], deflate=True) == eth
    assert decode_all(eth_only.frames[0]) == eth
    # Counted as messages, not writes; the history has each update on its own.
    assert (
        stats.updates_published == 3 and stats.messages_sent == 2 * 2 + 2 * 1 + 1
    )  # BTC ×2, ETH to three
    assert [e.seq for e in hub.history["BTC/USD"].last(10)] == [1, 2]


async def test_clients_that_confirmed_reading_are_written_first() -> None:
    """The broadcast writes newest confirmations first: a client that answered a ping goes ahead
    of every client that has not since, so stalled clients end up last (see `confirm_reading`)."""
    order: list[str] = []

    class Recorder:
        def __init__(self, name: str, *, deflate: bool = False) -> None:
            self.name, self.deflate, self.finished = name, deflate, False

        def send_frame(self, frame: bytes) -> None:
            order.append(self.name)

    hub, _ = make_hub()
    a, b, c, z = Recorder("a"), Recorder("b"), Recorder("c"), Recorder("z", deflate=True)
    for subscriber in (a, b, c, z):
        hub.subscribe(subscriber, SYMBOLS)
    hub.publish([bar("BTC/USD")])
    assert order == ["c", "b", "a", "z"]  # nobody confirmed yet: the newest first
    hub.confirm_reading(a)
    hub.confirm_reading(z)
    order.clear()
    hub.publish([bar("BTC/USD"), bar("ETH/USD")])
    assert order == ["a", "c", "b", "z"] * 2  # every symbol's table, compressed ones too
    assert hub.broadcast_order("ETH/USD") == [a, c, b, z]
    # Confirming changes nothing else: the subscriptions, and unsubscribed symbols stay so.
    hub.unsubscribe(b, ["ETH/USD"])
    hub.confirm_reading(b)
    assert hub.subscriptions(b) == ["BTC/USD"]
    assert hub.broadcast_order("BTC/USD") == [b, a, c, z]
    assert hub.broadcast_order("ETH/USD") == [a, c, z]
    hub.confirm_reading(Recorder("never subscribed"))  # a no-op
    assert hub.broadcast_order("ETH/USD") == [a, c, z]


class ReplyCollector(Collector):
    """A subscriber with a reply path: each reply is kept as its list of frames."""

    def __init__(self, *, deflate: bool = False) -> None:
        super().__init__()
        self.deflate = deflate
        self.replies: list[list[bytes]] = []

    def send_reply(self, frames: list[bytes]) -> None:
        self.replies.append(list(frames))


async def test_a_replay_is_one_reply_of_the_historys_own_frames() -> None:
    hub, _ = make_hub()
    for i in range(5):
        hub.publish([bar("BTC/USD", 100 + i)])
    client = ReplyCollector()
    assert hub.resume(client, "BTC/USD", 2) is None
    assert len(client.replies) == 1 and client.frames == []
    entries = hub.history["BTC/USD"].after(2)[1]
    assert all(f is e.frame for f, e in zip(client.replies[0], entries, strict=True))
    assert hub.subscriptions(client) == ["BTC/USD"]


async def test_a_deflate_replay_compresses_each_entry_once_ever() -> None:
    hub, _ = make_hub()
    for i in range(5):
        hub.publish([bar("BTC/USD", 100 + i)])
    first, second = ReplyCollector(deflate=True), ReplyCollector(deflate=True)
    hub.resume(first, "BTC/USD", 0)
    hub.resume(second, "BTC/USD", 0)
    assert [orjson.loads(inflate(f))["data"]["seq"] for f in first.replies[0]] == [1, 2, 3, 4, 5]
    assert all(a is b for a, b in zip(first.replies[0], second.replies[0], strict=True))


async def test_the_broadcast_keeps_the_frame_it_compressed_for_replays() -> None:
    hub, _ = make_hub()
    live = ReplyCollector(deflate=True)
    hub.subscribe(live, ["BTC/USD"])
    hub.publish([bar("BTC/USD")])
    late = ReplyCollector(deflate=True)
    hub.resume(late, "BTC/USD", 0)
    assert late.replies[0][0] is live.frames[0]  # the very bytes the broadcast sent


async def test_history_page_is_capped_and_carries_the_cursor() -> None:
    hub, _ = make_hub()
    analytics = {"estimators": {f"estimator_{k}": k / 7 for k in range(20)}}  # ~600 B of data
    for i in range(1000):
        hub.publish([bar("BTC/USD", 100 + i)._replace(analytics=analytics)])
    message, count = hub.history_page("BTC/USD", 1000)
    payload = orjson.dumps(message)
    assert len(payload) <= protocol.MAX_HISTORY_REPLY_BYTES
    decoded = orjson.loads(payload)
    seqs = [u["seq"] for u in decoded["updates"]]
    assert count == len(seqs) and 0 < count < 1000
    assert seqs == list(range(1001 - count, 1001))  # the newest, oldest first
    assert decoded["more"] is True and decoded["before_seq"] == seqs[0]
    collected = seqs
    while decoded["more"]:
        message, _ = hub.history_page("BTC/USD", 1000, decoded["before_seq"])
        decoded = orjson.loads(orjson.dumps(message))
        collected = [u["seq"] for u in decoded["updates"]] + collected
    assert collected == list(range(1, 1001))
    small, count = hub.history_page("BTC/USD", 3)
    assert [u["seq"] for u in orjson.loads(orjson.dumps(small))["updates"]] == [998, 999, 1000]
    assert small["more"] is True and count == 3


async def test_a_finished_subscriber_is_never_added_again() -> None:
    """A connection finished while its request was being answered (its reply's send failed)
    stays out of the hub whatever the answer does next: subscribe and resume do nothing."""
    hub, _ = make_hub()
    hub.publish([bar("BTC/USD"), bar("ETH/USD")])
    gone = Collector()
    gone.finished = True
    hub.subscribe(gone, SYMBOLS)
    assert hub.resume(gone, "BTC/USD", 0) is None
    assert hub.subscriber_count() == 0 and gone.frames == []

    class FinishedBySend(Collector):
        def send_frame(self, frame: bytes) -> None:
            self.finished = True  # the peer reset: the write path finished the connection

    failing = FinishedBySend()
    hub.resume(failing, "BTC/USD", 0)
    assert hub.subscriber_count() == 0
    assert hub.subscriptions(failing) == []


async def test_a_worker_hub_writes_its_masters_frames_as_they_are() -> None:
    # The master's hub encodes and compresses once; its tap sees the very entries recorded.
    master, _ = make_hub()
    tapped: list[tuple[str, list[bytes], list[bytes]]] = []
    master.tap = lambda symbol, updates: tapped.append(
        (
            symbol,
            [entry.frame for _, entry in updates],
            [encode_deflate_frame(payload) for payload, _ in updates],
        )
    )
    master.publish([bar("BTC/USD", 100.0), bar("BTC/USD", 101.0), bar("ETH/USD")])
    assert [(symbol, len(frames)) for symbol, frames, _ in tapped] == [
        ("BTC/USD", 2),
        ("ETH/USD", 1),
    ]
    worker, _ = make_hub()
    plain, compressing = Collector(), Collector()
    compressing.deflate = True
    worker.subscribe(plain, ["BTC/USD"])
    worker.subscribe(compressing, ["BTC/USD"])
    symbol, frames, deflated = tapped[0]
    worker.publish_frames(symbol, 1, frames, list(deflated))
    assert plain.frames == [b"".join(frames)]  # one write for the batch, the master's bytes
    assert compressing.frames == [b"".join(deflated)]
    assert [e.seq for e in worker.history["BTC/USD"].last(5)] == [1, 2]
    assert worker.recent("BTC/USD", 1)[0]["close"] == 101.0
    # Compressed frames not sent are made on first need; a seq ahead restarts the ring.
    worker.publish_frames("BTC/USD", 9, [frames[0]], [None])
    assert compressing.frames[-1] == encode_deflate_frame(frame_payload(frames[0]))
    assert [e.seq for e in worker.history["BTC/USD"].last(5)] == [9]
