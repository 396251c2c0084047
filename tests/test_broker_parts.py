"""The redis broker's bookkeeping, on its own: `StreamMirror` (which stream entries the local
history needs) and `Publication` (a batch's seqs and what the publish script's reply means).
No Redis, no event loop; test_broker.py runs the service that drives them against a real one."""

from __future__ import annotations

from datetime import UTC, datetime

from agentspoonsd import protocol
from agentspoonsd.broker.entries import entry_fields, stream_key
from agentspoonsd.broker.mirror import Mirrored, Rejected, StreamMirror
from agentspoonsd.broker.publication import Outcome, Publication, Resync
from helpers import bar

BTC, ETH = "BTC/USD", "ETH/USD"
NOW = datetime(2026, 11, 26, 2, 0, 0, tzinfo=UTC)


def fields(seq: int, symbol: str = BTC) -> dict[bytes, bytes]:
    return entry_fields(protocol.encode(protocol.update_message(bar(symbol, 100.0, NOW), seq, NOW)))


# --- StreamMirror -----------------------------------------------------------------------------


def test_the_mirror_names_each_stream_and_reads_on_from_the_last_entry() -> None:
    mirror = StreamMirror("unit", [BTC, ETH])
    assert mirror.keys == {BTC: stream_key("unit", BTC), ETH: stream_key("unit", ETH)}
    assert mirror.positions() == {}  # nothing loaded: nothing to XREAD yet
    mirror.loaded_stream(BTC)
    assert mirror.positions() == {stream_key("unit", BTC): "0-0"}
    mirror.entry(BTC, b"41-0", fields(41), next_seq=1)
    mirror.loaded_stream(BTC)  # loading again does not go back
    assert mirror.positions() == {stream_key("unit", BTC): "41-0"}
    assert mirror.symbol_of(stream_key("unit", ETH).encode()) == ETH


def test_a_fresh_mirror_adopts_the_stream_then_applies_each_entry_once() -> None:
    mirror = StreamMirror("unit", [BTC])
    first = mirror.entry(BTC, b"41-0", fields(41), next_seq=1)
    assert isinstance(first, Mirrored) and first.update.seq == 41
    assert first.expected_seq is None  # adopting is not a discontinuity
    assert BTC in mirror.mirrored
    assert mirror.entry(BTC, b"41-0", fields(41), next_seq=42) is None  # a re-read
    assert isinstance(mirror.entry(BTC, b"42-0", fields(42), next_seq=42), Mirrored)


def test_a_jump_in_a_mirrored_stream_is_applied_and_flagged() -> None:
    mirror = StreamMirror("unit", [BTC])
    mirror.entry(BTC, "42-0", fields(42), next_seq=1)
    jumped = mirror.entry(BTC, "50-0", fields(50), next_seq=43)
    assert isinstance(jumped, Mirrored) and jumped.expected_seq == 43


def test_entries_not_ours_are_rejected_but_read_past() -> None:
    mirror = StreamMirror("unit", [BTC])
    mirror.loaded_stream(BTC)
    for identifier, content in [("7-1", fields(7)), ("7-0", {}), ("7-0", fields(7, ETH))]:
        rejected = mirror.entry(BTC, identifier, content, next_seq=1)
        assert isinstance(rejected, Rejected) and rejected.symbol == BTC and rejected.error
    assert mirror.positions() == {stream_key("unit", BTC): "7-0"}
    assert mirror.mirrored == set()


# --- Publication ------------------------------------------------------------------------------


def test_a_batch_numbers_each_symbol_consecutively_in_batch_order() -> None:
    publication = Publication([BTC, ETH, BTC], {BTC: 10, ETH: 3})
    assert publication.seqs == [10, 3, 11]
    assert publication.following == {BTC: 12, ETH: 4}
    assert publication.judge(0) is Outcome.PUBLISHED
    assert publication.judge(-1) is Outcome.DEPOSED


def test_a_stream_top_elsewhere_renumbers_the_batch_from_it() -> None:
    publication = Publication([BTC, ETH], {BTC: 10, ETH: 3})
    verdict = publication.judge([2, 7])  # update 2 (ETH) is the first of a stream at 7
    assert verdict == Resync(ETH, expected_seq=3, stream_top=7)
    assert publication.seqs == [10, 8] and publication.following == {BTC: 11, ETH: 9}
    assert publication.judge(0) is Outcome.PUBLISHED


def test_a_batch_applied_although_its_reply_was_lost_is_not_published_twice() -> None:
    publication = Publication([BTC, BTC], {BTC: 10})
    publication.failed()  # no reply: it may have been applied
    assert publication.judge([1, 11]) is Outcome.PUBLISHED  # the top is this batch's last
    assert publication.following == {BTC: 12}
    other = Publication([BTC], {BTC: 10})
    assert isinstance(other.judge([1, 11]), Resync)  # no attempt was uncertain: a resync
