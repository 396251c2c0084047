"""The history: ring semantics, gaps, seq that never repeats, and the on-disk store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from agentspoonsd.history import Entry, Gap, History, HistoryStore, SymbolHistory, first_seq


def entry(seq: int) -> Entry:
    return Entry(seq, f"frame{seq}".encode(), {"seq": seq})


def filled(size: int, first: int, count: int) -> SymbolHistory:
    ring = SymbolHistory(size, first)
    for seq in range(first, first + count):
        ring.append(entry(seq))
    return ring


def seqs(entries: list[Entry]) -> list[int]:
    return [e.seq for e in entries]


def test_ring_keeps_the_newest_size_entries() -> None:
    ring = filled(5, 10, 12)
    assert len(ring) == 5
    assert (ring.oldest_seq, ring.latest_seq, ring.next_seq) == (17, 21, 22)
    assert seqs(ring.last(3)) == [19, 20, 21]
    assert seqs(ring.last(100)) == [17, 18, 19, 20, 21]


def test_appends_must_be_consecutive() -> None:
    ring = filled(5, 1, 3)
    with pytest.raises(ValueError):
        ring.append(entry(5))
    with pytest.raises(ValueError):
        ring.append(entry(3))


@pytest.mark.parametrize(
    ("after", "gap", "expected"),
    [
        (21, None, []),  # up to date
        (20, None, [21]),
        (16, None, [17, 18, 19, 20, 21]),  # exactly at the edge: nothing lost
        (15, Gap(17, 21), [17, 18, 19, 20, 21]),  # 16 is gone
        (0, Gap(17, 21), [17, 18, 19, 20, 21]),
        (22, Gap(17, 21), [17, 18, 19, 20, 21]),  # from the future: another history
    ],
)
def test_after(after: int, gap: Gap | None, expected: list[int]) -> None:
    found_gap, entries = filled(5, 10, 12).after(after)
    assert found_gap == gap
    assert seqs(entries) == expected


def test_empty_ring_oldest_is_the_next_seq() -> None:
    ring = SymbolHistory(5, 100)
    assert (ring.oldest_seq, ring.latest_seq) == (100, 99)
    assert ring.after(99) == (None, [])
    assert ring.after(50) == (Gap(100, 99), [])


def test_first_seq_is_microseconds_and_exact_in_javascript() -> None:
    before = int(time.time() * 1_000_000)
    seq = first_seq()
    assert before <= seq <= int(time.time() * 1_000_000)
    assert seq < 2**53
    assert first_seq(lambda: 1.5) == 1_500_000


def frame_of(payload: bytes) -> bytes:
    return b"F" + payload


def message(symbol: str, seq: int) -> bytes:
    return orjson.dumps({"type": "volatility_update", "data": {"symbol": symbol, "seq": seq}})


def test_without_a_store_every_symbol_starts_at_start_seq() -> None:
    history = History(["A", "B"], 10, decode_frame=frame_of, start_seq=7)
    assert history.next_seq("A") == history.next_seq("B") == 7


def test_store_round_trip_continues_the_seq(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path, 3)
    history = History(["BTC/USD", "ETH/USD"], 3, store=store, decode_frame=frame_of, start_seq=1)
    for seq in range(1, 6):
        payload = message("BTC/USD", seq)
        history.record("BTC/USD", seq, payload, frame_of(payload), {"seq": seq})
    history.close()

    reopened = History(
        ["BTC/USD", "ETH/USD"], 3, store=HistoryStore(tmp_path, 3), decode_frame=frame_of
    )
    btc = reopened["BTC/USD"]
    assert reopened.next_seq("BTC/USD") == 6
    assert seqs(btc.last(10)) == [3, 4, 5]
    assert btc.last(1)[0].frame == frame_of(message("BTC/USD", 5))
    assert reopened.next_seq("ETH/USD") > 2**40  # nothing stored: time-based start
    reopened.close()


def test_store_files_stay_bounded(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path, 4)
    for seq in range(1, 50):
        store.append("A", message("A", seq))
    lines = store.path("A").read_bytes().splitlines()
    assert len(lines) < 8
    assert [orjson.loads(line)["data"]["seq"] for line in store.load("A")] == [46, 47, 48, 49]
    store.close()


def test_a_torn_last_line_is_skipped_and_sealed(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path, 10)
    store.append("A", message("A", 1))
    store.close()
    path = store.path("A")
    with path.open("ab") as f:
        f.write(message("A", 2)[:10])  # a crash in the middle of a write
    store = HistoryStore(tmp_path, 10)
    assert [orjson.loads(p)["data"]["seq"] for p in store.load("A")] == [1]
    store.append("A", message("A", 2))
    assert [orjson.loads(p)["data"]["seq"] for p in store.load("A")] == [1, 2]
    store.close()


def test_symbols_that_sanitise_alike_get_distinct_files(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path, 10)
    assert store.path("BTC/USD") != store.path("BTC_USD")
    assert "/" not in store.path("BTC/USD").name


def test_each_append_reaches_the_file_at_once(tmp_path: Path) -> None:
    """No user-space buffering: a process killed right after `record` has it on disk."""
    store = HistoryStore(tmp_path, 10)
    store.append("A", message("A", 1))
    assert os.path.getsize(store.path("A")) == len(message("A", 1)) + 1
    store.close()


# --- pages and replay sizes (history requests, resume cost) ---------------------------------------


def test_before_is_the_newest_limit_entries_below_a_seq() -> None:
    ring = filled(5, 10, 12)  # retains 17..21
    assert seqs(ring.before(None, 3)) == [19, 20, 21]
    assert seqs(ring.before(20, 2)) == [18, 19]
    assert seqs(ring.before(20, 100)) == [17, 18, 19]
    assert seqs(ring.before(17, 5)) == []  # nothing retained below the oldest
    assert seqs(ring.before(5, 5)) == []
    assert seqs(ring.before(10**9, 2)) == [20, 21]  # a cursor past the newest: the newest


def test_count_after_matches_what_after_returns() -> None:
    ring = filled(5, 10, 12)
    for seq in range(0, 30):
        assert ring.count_after(seq) == len(ring.after(seq)[1]), seq
    assert ring.count_after(21) == 0 and ring.count_after(16) == 5


def test_an_entry_encodes_its_data_once() -> None:
    item = entry(7)
    first = item.data_json
    assert orjson.loads(first) == {"seq": 7}
    assert item.data_json is first  # kept, not encoded again
