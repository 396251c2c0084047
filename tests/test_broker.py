"""The redis broker's pure parts (stream entries, the lease state machine, seq continuation, the
hub's mirror path, the generator's continuation) and its service against a real redis-server."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import coredis
import orjson
import pytest
import structlog
import trio

from agentspoonsd import protocol
from agentspoonsd.broker.election import (
    ACQUIRE_SCRIPT,
    RELEASE_SCRIPT,
    RENEW_SCRIPT,
    Election,
    Role,
    Transition,
)
from agentspoonsd.broker.entries import (
    PUBLISH_SCRIPT,
    BadEntry,
    Continuity,
    continuity,
    decode_entry,
    entry_fields,
    entry_id,
    lease_key,
    next_seq_after,
    redact_url,
    seq_of,
    stream_key,
)
from agentspoonsd.broker.service import Backoff, RedisBroker
from agentspoonsd.frames import encode_text_frame
from agentspoonsd.history import History
from agentspoonsd.hub import Hub
from agentspoonsd.market.bar import Bar
from agentspoonsd.market.generator import Generator
from agentspoonsd.metrics import Stats
from agentspoonsd.settings import GeneratorSettings, Settings
from helpers import bar, free_port
from redis_server import RedisServer

SYMBOL = "BTC/USD"
NOW = datetime(2026, 11, 26, 2, 0, 0, tzinfo=UTC)


def payload(seq: int, close: float = 100.0, symbol: str = SYMBOL) -> bytes:
    return protocol.encode(protocol.update_message(bar(symbol, close, NOW), seq, NOW))


# --- entries ----------------------------------------------------------------------------------


def test_entry_ids_carry_the_seq() -> None:
    assert entry_id(1795657770736127) == "1795657770736127-0"
    assert seq_of(b"1795657770736127-0") == seq_of("1795657770736127-0") == 1795657770736127
    for foreign in ("1795657770736127-1", "1795657770736127", "x-0", "-0", b"12-01"):
        with pytest.raises(BadEntry):
            seq_of(foreign)
    with pytest.raises(ValueError, match=">= 1"):
        entry_id(0)


def test_decode_entry_checks_id_symbol_and_seq() -> None:
    update = decode_entry(SYMBOL, b"41-0", entry_fields(payload(41)))
    assert (update.seq, update.payload) == (41, payload(41))
    assert update.message["data"]["seq"] == 41
    assert decode_entry(SYMBOL, "41-0", {"m": payload(41).decode()}).seq == 41
    bad = [
        ("41-0", {}),  # no payload
        ("41-0", {b"m": b"not json"}),
        ("41-0", {b"m": b'{"type":"x"}'}),  # no data
        ("42-0", entry_fields(payload(41))),  # the id says another seq
        ("41-0", entry_fields(payload(41, symbol="ETH/USD"))),  # another symbol's update
    ]
    for identifier, fields in bad:
        with pytest.raises(BadEntry):
            decode_entry(SYMBOL, identifier, fields)


def test_continuity_of_stream_entries_against_the_mirror() -> None:
    assert continuity(10, 10, mirrored=True) is Continuity.NEXT
    assert continuity(10, 9, mirrored=True) is Continuity.SEEN
    assert continuity(10, 12, mirrored=True) is Continuity.JUMP
    # A fresh mirror's next seq is a placeholder: the stream decides, lower or higher.
    assert continuity(10, 5, mirrored=False) is Continuity.JUMP
    assert continuity(10, 50, mirrored=False) is Continuity.JUMP


def test_next_seq_continues_the_stream_or_starts_at_the_time() -> None:
    assert next_seq_after(41) == 42
    assert next_seq_after(None, clock=lambda: 1_795_000_000.25) == 1_795_000_000_250_000


def test_keys_and_redacted_urls() -> None:
    assert stream_key("p", SYMBOL) == "p:stream:BTC/USD"
    assert lease_key("p") == "p:leader"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("rediss://:secret@h/0") == "rediss://***@h/0"


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == 0.1


# --- election ---------------------------------------------------------------------------------


def test_a_follower_takes_a_free_lease_and_renews_it_every_third() -> None:
    election = Election(lease=3.0)
    assert election.attempting(sent_at=10.0) is Role.FOLLOWER  # → SET NX PX
    assert election.replied(10.0, granted=True) is Transition.ELECTED
    assert election.valid_until == 13.0  # from when the request was sent
    assert election.leading(12.9) and not election.leading(13.0)
    assert election.next_attempt_at() == 11.0
    assert election.attempting(11.0) is Role.LEADER  # → the renew script
    assert election.replied(11.0, granted=True) is None
    assert (election.valid_until, election.next_attempt_at()) == (14.0, 12.0)


def test_a_follower_retries_every_quarter_lease() -> None:
    election = Election(lease=2.0)
    election.attempting(5.0)
    assert election.replied(5.0, granted=False) is None
    assert election.role is Role.FOLLOWER and election.next_attempt_at() == 5.5
    assert not election.leading(5.1)


def test_a_renewal_refused_deposes_at_once() -> None:
    election = Election(lease=2.0)
    election.attempting(0.0)
    election.replied(0.0, granted=True)
    election.attempting(0.5)
    assert election.replied(0.5, granted=False) is Transition.DEPOSED  # someone else's now
    assert election.role is Role.FOLLOWER and not election.leading(0.6)


def test_unanswered_renewals_expire_the_lease_on_time() -> None:
    election = Election(lease=2.0)
    election.attempting(0.0)
    election.replied(0.0, granted=True)
    now = 0.0
    transitions = []
    while election.role is Role.LEADER:
        now = election.next_attempt_at()
        election.attempting(now)
        transitions.append(election.failed(now))  # Redis does not answer
        assert now <= 2.0  # never tries later than the lease lasts
    assert transitions[-1] is Transition.EXPIRED and set(transitions[:-1]) == {None}
    assert now == 2.0
    assert election.check(5.0) is None  # once only


def test_resign_ends_the_lead_whatever_the_lease() -> None:
    election = Election(lease=2.0)
    election.attempting(0.0)
    election.replied(0.0, granted=True)
    election.resign()
    assert not election.leading(0.1) and election.role is Role.FOLLOWER
    election.resign()  # idempotent


# --- the hub's mirror path --------------------------------------------------------------------


class Frames:
    deflate = False
    finished = False

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)


async def test_hub_broadcasts_encoded_updates_and_restarts_history_at_a_jump() -> None:
    _, receive = trio.open_memory_channel[list[Bar]](1)
    history = History([SYMBOL], 100, decode_frame=encode_text_frame, start_seq=1)
    hub = Hub([SYMBOL], receive, Stats(), history=history)
    client = Frames()
    hub.subscribe(client, [SYMBOL])
    for seq in (5, 6, 7):  # a fresh mirror adopts the stream's seq
        hub.publish_encoded(SYMBOL, seq, payload(seq), orjson.loads(payload(seq)))
    assert client.frames == [encode_text_frame(payload(s)) for s in (5, 6, 7)]
    assert [e.seq for e in hub.history[SYMBOL].last(10)] == [5, 6, 7]
    hub.publish_encoded(SYMBOL, 20, payload(20), orjson.loads(payload(20)))  # 8..19 are lost
    assert [e.seq for e in hub.history[SYMBOL].last(10)] == [20]
    late = Frames()
    gap = hub.resume(late, SYMBOL, 6)  # across the hole: a reset, not a silent gap
    assert gap is not None and (gap.oldest_seq, gap.latest_seq) == (20, 20)
    assert hub.last_publish is not None


# --- the generator carries on another node's series ------------------------------------------


def settings_for_continuation(seed: int = 11) -> GeneratorSettings:
    return GeneratorSettings(
        interval=1.0,
        symbols=[SYMBOL],
        seed=seed,
        volatility_window=5,
        warmup_bars=50,
        garch_fit={"enabled": False},
    )


async def first_batches(generator: Generator, receive: object, count: int) -> list[list[Bar]]:
    batches = []
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)
        for _ in range(count):
            batches.append(await receive.receive())  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()
    return batches


async def test_continue_from_carries_on_the_price_and_the_windows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = structlog.get_logger()
    send, receive = trio.open_memory_channel[list[Bar]](100)
    original = Generator(settings_for_continuation().spec(), send, log, wall_clock=lambda: NOW)
    published = [
        protocol.update_data(batch[0], 100 + i)
        for i, batch in enumerate(await first_batches(original, receive, 30))
    ]
    send2, receive2 = trio.open_memory_channel[list[Bar]](100)
    successor = Generator(settings_for_continuation().spec(), send2, log, wall_clock=lambda: NOW)
    successor.continue_from({SYMBOL: published})
    nxt = (await first_batches(successor, receive2, 1))[0][0]
    last = published[-1]
    assert nxt.open == last["close"]  # the path goes on from the last bar, exactly
    assert nxt.returns == pytest.approx(math.log(nxt.close / last["close"]))
    # The estimator window is the published bars' plus the new one: no warm-up in between.
    assert nxt.volatility is not None and math.isfinite(nxt.volatility)
    # A fixed seed stays reproducible, and does not replay the original shocks.
    send3, receive3 = trio.open_memory_channel[list[Bar]](100)
    again = Generator(settings_for_continuation().spec(), send3, log, wall_clock=lambda: NOW)
    again.continue_from({SYMBOL: published})
    assert (await first_batches(again, receive3, 1))[0][0] == nxt
    assert nxt.returns != published[1]["returns"]


# --- the service, against a real redis-server -------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def node_settings(url: str, *, lease: float = 0.5, size: int = 50) -> Settings:
    return Settings(
        generator={"interval": 0.05, "symbols": [SYMBOL], "seed": 3, "warmup_bars": 30},
        history={"size": size},
        broker={"kind": "redis", "url": url, "lease": lease, "prefix": "unit"},
    )


def make_node(settings: Settings) -> tuple[RedisBroker, Hub]:
    _, receive = trio.open_memory_channel[list[Bar]](1)
    history = History([SYMBOL], settings.history.size, decode_frame=encode_text_frame)
    hub = Hub([SYMBOL], receive, Stats(), history=history)
    return RedisBroker(settings, hub, structlog.get_logger()), hub


async def wait_until(condition: object, within: float = 5.0) -> None:
    with trio.fail_after(within):
        while True:
            if condition():  # type: ignore[operator]
                return
            await trio.sleep(0.01)


async def stream_seqs(url: str) -> list[int]:
    async with coredis.Redis.from_url(url) as client:
        entries = await client.xrange(stream_key("unit", SYMBOL))
        return [seq_of(e.identifier) for e in entries]


async def test_broker_continues_the_stream_and_is_cancellable(redis: RedisServer) -> None:
    # A stream another node left behind: seq 41..50.
    async with coredis.Redis.from_url(redis.url) as client:
        for seq in range(41, 51):
            fields = entry_fields(payload(seq, close=100.0 + seq))
            await client.xadd(stream_key("unit", SYMBOL), fields, identifier=entry_id(seq))
    broker, hub = make_node(node_settings(redis.url))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        assert [e.seq for e in hub.history[SYMBOL].last(100)] == list(range(41, 51))
        assert broker.problem is None
        await wait_until(lambda: hub.history[SYMBOL].latest_seq >= 55)
        assert broker.leading
        cancelled_at = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - cancelled_at < 1.0  # every loop stops at once when cancelled
    seqs = await stream_seqs(redis.url)
    assert seqs == list(range(41, seqs[-1] + 1))  # no gap, no repeat
    entries = [e.data for e in hub.history[SYMBOL].last(100)]
    assert entries[10]["seq"] == 51 and entries[10]["open"] == 150.0  # the close of seq 50
    async with coredis.Redis.from_url(redis.url) as client:
        assert await client.get(lease_key("unit")) is None  # released on the way out


async def test_broker_without_redis_starts_not_ready_and_cancels() -> None:
    broker, _ = make_node(node_settings(f"redis://127.0.0.1:{free_port()}/0"))
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            await wait_until(lambda: broker.problem is not None and "unavailable" in broker.problem)
            assert not broker.leading
            await trio.sleep(0.3)  # the loops are backing off and retrying
            nursery.cancel_scope.cancel()


async def test_publish_is_fenced_by_the_lease_and_the_seq(redis: RedisServer) -> None:
    key, lease = stream_key("unit", SYMBOL), lease_key("unit")
    async with coredis.Redis.from_url(redis.url) as client:
        publish = client.register_script(PUBLISH_SCRIPT)
        await client.set(lease, "node-a")
        assert await publish(keys=[lease, key], args=["node-a", 10, 7, payload(7)]) == 0
        assert await publish(keys=[lease, key], args=["node-b", 10, 8, payload(8)]) == -1
        reply = await publish(keys=[lease, key], args=["node-a", 10, 7, payload(7)])  # again
        assert (int(reply[0]), int(reply[1])) == (1, 7)
        reply = await publish(keys=[lease, key], args=["node-a", 10, 9, payload(9)])  # a gap
        assert (int(reply[0]), int(reply[1])) == (1, 7)
        assert await publish(keys=[lease, key], args=["node-a", 10, 8, payload(8)]) == 0
        # A generator catching up sends several bars of a symbol in one batch, in seq order.
        args = ["node-a", 10, 9, payload(9), 10, payload(10)]
        assert await publish(keys=[lease, key, key], args=args) == 0
    assert await stream_seqs(redis.url) == [7, 8, 9, 10]


async def test_lease_scripts_take_renew_and_release_only_their_own(redis: RedisServer) -> None:
    lease = lease_key("unit")
    async with coredis.Redis.from_url(redis.url) as client:
        acquire = client.register_script(ACQUIRE_SCRIPT)
        renew = client.register_script(RENEW_SCRIPT)
        release = client.register_script(RELEASE_SCRIPT)
        assert await renew(keys=[lease], args=["node-a", 5000]) == 0  # nobody's: not renewed
        assert await acquire(keys=[lease], args=["node-a", 5000]) == 1  # SET NX PX
        assert await acquire(keys=[lease], args=["node-b", 5000]) == 0  # held by a
        assert await renew(keys=[lease], args=["node-b", 60_000]) == 0  # never another's
        assert 0 < await client.pttl(lease) <= 5000
        assert await acquire(keys=[lease], args=["node-a", 7000]) == 1  # its own: taken back
        assert await renew(keys=[lease], args=["node-a", 9000]) == 1
        assert 7000 < await client.pttl(lease) <= 9000
        assert await release(keys=[lease], args=["node-b"]) == 0
        assert await client.get(lease) == b"node-a"
        assert await release(keys=[lease], args=["node-a"]) == 1
        assert await client.get(lease) is None


async def test_a_deposed_leader_stops_generating(redis: RedisServer) -> None:
    broker, hub = make_node(node_settings(redis.url))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        await wait_until(lambda: broker.leading and hub.history[SYMBOL].latest_seq > 0)
        async with coredis.Redis.from_url(redis.url) as client:
            await client.set(lease_key("unit"), "another-node", px=60_000)  # taken over
        await wait_until(lambda: not broker.leading, within=1.0)
        await trio.sleep(0.2)
        before = await stream_seqs(redis.url)
        await trio.sleep(0.3)
        assert await stream_seqs(redis.url) == before  # nothing published any more
        nursery.cancel_scope.cancel()
