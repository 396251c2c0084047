"""The client's parts that decide, tested on their own without a socket or an event loop:
`Session` (what each message means), `RetryPlan` (when to try again), `UpdateBuffer` (what the
consumer gets), `ClientConfig` (the options), the history merge; and `TaskLifetime` on an event
loop with a stand-in task. The connection task that drives them is tested end to end in
test_client.py."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import trio

from agentspoonsd.client import ConnectFailed, StreamReset, StreamTracker, Update
from agentspoonsd.client.buffer import ResetItem, UpdateBuffer
from agentspoonsd.client.config import STEP_TIMEOUT, ClientConfig
from agentspoonsd.client.connection_task import ClientState
from agentspoonsd.client.lifetime import TaskLifetime
from agentspoonsd.client.paging import history_pages, merge_newest
from agentspoonsd.client.retry import RetryPlan
from agentspoonsd.client.session import (
    Deliver,
    Duplicate,
    Gap,
    Pending,
    Report,
    Reset,
    Session,
    expected_reply,
)

BTC, ETH = "BTC/USD", "ETH/USD"


def update(symbol: str, seq: int) -> dict[str, Any]:
    return {
        "type": "volatility_update",
        "data": {"symbol": symbol, "seq": seq},
        "timestamp": "2026-01-01T00:00:00+00:00",
    }


def session(symbols: list[str] | None = None) -> Session:
    return Session(StreamTracker(symbols), {"type": "connected", "symbols": symbols or []})


# --- Session: updates -------------------------------------------------------------------------


def test_updates_are_delivered_once_in_order_and_a_gap_asks_to_resume() -> None:
    s = session([BTC])
    first = s.receive(update(BTC, 7), received_at=12.5)
    assert isinstance(first, Deliver) and first.update.seq == 7 and first.update.received == 12.5
    assert s.delivered
    assert isinstance(s.receive(update(BTC, 8), 13.0), Deliver)
    assert isinstance(s.receive(update(BTC, 8), 13.0), Duplicate)  # a replay overlapping
    assert isinstance(s.receive(update(BTC, 5), 13.0), Duplicate)
    gap = s.receive(update(BTC, 10), 13.0)
    assert isinstance(gap, Gap) and "seq 10 after 8" in gap.text
    assert s.tracker.last_seq == {BTC: 8}  # the gap is not accepted: resume from 8


def test_an_update_without_symbol_or_seq_and_unknown_types_are_ignored() -> None:
    s = session()
    assert s.receive({"type": "volatility_update", "data": {"seq": 1}}, 0.0) is None
    assert s.receive({"type": "volatility_update", "data": "x"}, 0.0) is None
    assert s.receive({"type": "connected"}, 0.0) is None
    assert s.receive({"type": "added_later"}, 0.0) is None
    assert not s.delivered and s.tracker.last_seq == {}


def test_a_reset_is_raised_in_stream_order_and_the_stream_continues_at_its_oldest_seq() -> None:
    s = session([BTC])
    s.receive(update(BTC, 3), 0.0)
    action = s.receive({"type": "reset", "symbol": BTC, "oldest_seq": 90, "latest_seq": 99}, 0.0)
    assert isinstance(action, Reset)
    assert (action.error.last_seq, action.error.oldest_seq, action.error.latest_seq) == (3, 90, 99)
    assert isinstance(s.receive(update(BTC, 90), 0.0), Deliver)


# --- Session: replies -------------------------------------------------------------------------


def test_errors_before_the_barrier_pong_are_about_the_url_and_settle_nothing() -> None:
    s = session([BTC])
    ping = Pending("pong", internal=True, waited=False)
    s.expect(ping)
    error = {"type": "error", "code": "unknown_symbol", "message": "XYZ"}
    assert s.receive(error, 0.0) == Report(error)
    assert ping.reply is None and not ping.lost and s.barrier
    assert s.receive({"type": "pong"}, 0.0) is None
    assert ping.reply == {"type": "pong"} and ping.done.is_set  # type: ignore[attr-defined]
    assert not s.barrier
    assert s.receive(error, 0.0) == Report(error)  # nothing pending: unsolicited


def test_replies_settle_requests_in_order_and_a_user_subscription_is_remembered() -> None:
    s = session([BTC])
    s.barrier = False
    everything = Pending("subscribed", internal=True, waited=False)
    mine = Pending("subscribed")
    s.expect(everything)
    s.expect(mine)
    assert s.receive({"type": "history"}, 0.0) is None  # not the head's reply: unmatched
    assert s.receive({"type": "subscribed", "symbols": [BTC, ETH]}, 0.0) is None
    assert everything.reply is not None and mine.reply is None
    assert s.tracker.want_all is False and s.tracker.symbols == [BTC]  # internal: unchanged
    assert s.info["symbols"] == [BTC, ETH]
    s.receive({"type": "subscribed", "symbols": [ETH]}, 0.0)
    assert mine.reply == {"type": "subscribed", "symbols": [ETH]}
    assert s.tracker.symbols == [ETH]  # the user's own: the subscription to re-establish


def test_an_error_reply_goes_to_its_waiter_or_is_reported_when_nobody_waits() -> None:
    s = session()
    s.barrier = False
    waited, sent = Pending("history"), Pending("subscribed", waited=False)
    s.expect(waited)
    s.expect(sent)
    error = {"type": "error", "code": "bad_request", "message": "no"}
    assert s.receive(error, 0.0) is None and waited.reply == error
    assert s.receive(error, 0.0) == Report(error) and sent.reply == error


def test_a_lost_connection_settles_every_pending_request_once_as_lost() -> None:
    s = session()
    requests = [Pending("pong"), Pending("history")]
    for pending in requests:
        s.expect(pending)
    s.lose_all()
    assert all(p.lost and p.reply is None and p.done.is_set for p in requests)  # type: ignore[attr-defined]
    assert not s.pending


def test_the_expected_reply_of_each_request_type() -> None:
    assert expected_reply({"type": "ping"}) == "pong"
    assert expected_reply({"type": "resume"}) == "subscribed"
    assert expected_reply({"type": "nonsense"}) == "error"
    assert expected_reply([1, 2]) == "error"  # not an object: invalid_message
    assert expected_reply({"type": 3}) == "error"


# --- RetryPlan --------------------------------------------------------------------------------


def plan(connect_timeout: float | None = 10.0, rand: float = 1.0) -> RetryPlan:
    return RetryPlan(
        connect_timeout=connect_timeout,
        step_timeout=connect_timeout or STEP_TIMEOUT,
        backoff_initial=0.5,
        backoff_max=4.0,
        rand=lambda: rand,
    )


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_delivering_connection() -> None:
    p = plan(connect_timeout=None)
    p.start(0.0)
    delays = [
        p.next_delay(0.0, connected_before=False, delivered=False, retry_after=0) for _ in range(5)
    ]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert p.next_delay(0.0, connected_before=True, delivered=True, retry_after=0) == 0.5
    assert p.next_delay(0.0, connected_before=True, delivered=False, retry_after=3.0) == 3.0
    assert p.next_delay(0.0, connected_before=True, delivered=False, retry_after=60.0) == 4.0


def test_full_jitter_draws_below_the_exponential() -> None:
    p = plan(connect_timeout=None, rand=0.25)
    p.start(0.0)
    assert p.next_delay(0.0, connected_before=False, delivered=False, retry_after=0) == 0.125


def test_the_first_connection_is_tried_until_its_deadline_then_given_up() -> None:
    p = plan(connect_timeout=10.0)
    p.start(100.0)
    assert p.attempt_timeout(100.0, connected_before=False) == 10.0
    assert p.attempt_timeout(107.0, connected_before=False) == 3.0
    assert p.attempt_timeout(109.9, connected_before=False) == 1.0  # the last still gets 1 s
    assert p.attempt_timeout(109.9, connected_before=True) == 10.0
    for _ in range(3):
        p.next_delay(100.0, connected_before=False, delivered=False, retry_after=0)
    # The next backoff (4 s) would end after the deadline: cut to the time left.
    assert p.next_delay(108.5, connected_before=False, delivered=False, retry_after=0) == 1.5
    assert p.next_delay(110.0, connected_before=False, delivered=False, retry_after=0) is None
    assert p.next_delay(110.0, connected_before=True, delivered=False, retry_after=0) == 4.0


def test_giving_up_names_the_last_cause_and_the_attempts() -> None:
    p = plan(connect_timeout=2.0)
    assert p.failed() is True and p.failed() is False
    last = ConnectFailed("connection refused: ws://h:1/", refused=True)
    error = p.give_up_error(last)
    assert str(error) == "connection refused: ws://h:1/ (no connection within 2 s, 2 attempts)"
    assert error.refused and error.reason == last.reason
    p.connected()
    nothing = p.give_up_error(None)
    assert str(nothing) == "no connection (no connection within 2 s, 0 attempts)"
    assert nothing.timeout and nothing.reason == "timeout"


# --- UpdateBuffer -----------------------------------------------------------------------------


def received(symbol: str, seq: int) -> Update:
    return Update({"symbol": symbol, "seq": seq}, "", 0.0)


def test_the_buffer_returns_items_in_order_and_keeps_a_bounded_local_history() -> None:
    buffer = UpdateBuffer(keep_recent=3)
    for seq in range(1, 5):
        buffer.push_update(received(BTC, seq))
    reset = StreamReset(BTC, 4, 90, 99)
    buffer.push_reset(reset)
    buffer.push_update(received(ETH, 1))
    assert len(buffer) == 6 and buffer.buffered == 5  # a reset is an item, not an update
    assert [u.seq for u in buffer.recent()] == [3, 4, 1]  # keep_recent = 3
    assert [u.seq for u in buffer.recent(symbol=BTC)] == [3, 4]
    assert buffer.recent(0) == [] and [u.seq for u in buffer.recent(1)] == [1]
    assert buffer.latest() == received(ETH, 1) and buffer.latest(BTC) == received(BTC, 4)
    popped = [buffer.pop() for _ in range(6)]
    assert [p.seq for p in popped if isinstance(p, Update)] == [1, 2, 3, 4, 1]
    assert popped[4] == ResetItem(reset)
    assert buffer.pop() is None and buffer.latest(BTC) is not None  # history outlives pops


# --- ClientConfig -----------------------------------------------------------------------------


def test_the_config_hides_credentials_and_takes_symbols_from_the_url() -> None:
    config = ClientConfig.build("wss://u:pw@host:9/ws?access_token=s3cret&symbols=A,B", "tok")
    assert config.display_url == "wss://host:9/ws"
    assert config.symbols == ("A", "B")
    assert config.headers == ((b"Authorization", b"Bearer tok"),)
    assert ClientConfig.build("ws://h/", symbols=["C"]).symbols == ("C",)
    assert ClientConfig.build("ws://h").symbols is None and not ClientConfig.build("ws://h").headers
    assert ClientConfig.build("ws://h", connect_timeout=None).step_timeout == STEP_TIMEOUT
    assert ClientConfig.build("ws://h", connect_timeout=3).step_timeout == 3


@pytest.mark.parametrize(
    "url, options",
    [
        ("http://h/", {}),
        ("ws:///nohost", {}),
        ("ws://h/", {"buffer_size": 0}),
        ("ws://h/", {"backoff_initial": -1}),
        ("ws://h/", {"keep_recent": 0}),
        ("ws://h/", {"connect_timeout": 0}),
        ("ws://h/", {"history_limit": 0}),
    ],
)
def test_the_config_refuses_bad_options(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ClientConfig.build(url, **options)


# --- history ----------------------------------------------------------------------------------


def test_merged_history_is_the_newest_rows_by_bar_time_then_symbol() -> None:
    rows = [
        {"symbol": "B", "timestamp": "2026-01-01T00:00:02"},
        {"symbol": "A", "timestamp": "2026-01-01T00:00:02"},
        {"symbol": "A", "timestamp": "2026-01-01T00:00:01"},
        {"symbol": "B", "timestamp": "2026-01-01T00:00:03"},
    ]
    assert [(r["symbol"], r["timestamp"][-1]) for r in merge_newest(rows, 3)] == [
        ("A", "2"),
        ("B", "2"),
        ("B", "3"),
    ]
    assert merge_newest(rows, 0) == []


async def test_history_pages_follow_before_seq_and_come_back_oldest_first() -> None:
    pages = {
        None: {"updates": [{"seq": 4}, {"seq": 5}], "more": True, "before_seq": 4},
        4: {"updates": [{"seq": 2}, {"seq": 3}], "more": True, "before_seq": 2},
    }
    asked: list[dict[str, Any]] = []

    async def request(message: Any) -> dict[str, Any]:
        asked.append(dict(message))
        return pages[message.get("before_seq")]

    rows = await history_pages(request, BTC, 3)
    assert [r["seq"] for r in rows] == [2, 3, 4, 5]
    assert [(m["limit"], m.get("before_seq")) for m in asked] == [(3, None), (1, 4)]


# --- TaskLifetime (an event loop, no socket) --------------------------------------------------


class Runner:
    """A connection task that runs until cancelled, recording how it ended."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.ended_cancelled: bool | None = None

    async def __call__(self, scope: anyio.CancelScope, stopped: anyio.Event) -> None:
        try:
            with scope:
                self.started.set()
                await anyio.sleep_forever()
            self.ended_cancelled = scope.cancelled_caught
        finally:
            stopped.set()


async def test_a_cancelled_nursery_closes_the_task_through_its_guard() -> None:
    state, runner = ClientState(keep_recent=10), Runner()
    lifetime = TaskLifetime(runner, state, close_timeout=1.0)
    with trio.move_on_after(5) as outer:
        async with trio.open_nursery() as nursery:
            lifetime.start(nursery)
            await runner.started.wait()
            nursery.cancel_scope.cancel()  # the task's scope is shielded: only the guard sees it
    assert not outer.cancelled_caught
    assert state.closed and runner.ended_cancelled is True
    with pytest.raises(RuntimeError, match="once"):
        lifetime.start(None)


async def test_closing_twice_at_once_waits_for_the_first_and_stops_the_task() -> None:
    state, runner = ClientState(keep_recent=10), Runner()
    lifetime = TaskLifetime(runner, state, close_timeout=1.0)
    async with trio.open_nursery() as nursery:
        lifetime.start(nursery)
        await runner.started.wait()
        nursery.start_soon(lifetime.close)
        await lifetime.close()
        assert state.closed and runner.ended_cancelled is True
