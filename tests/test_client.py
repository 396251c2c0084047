"""agentspoonsd.client: the pure parts directly, the rest against the real daemon subprocess."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from agentspoonsd.client import (
    AuthenticationError,
    ClientClosed,
    ConnectFailed,
    ServerError,
    Status,
    StreamReset,
    StreamTracker,
    Update,
    Verdict,
    VolatilityClient,
    WebSocketDashboardClient,
    backoff_delay,
    connect_sync,
    open_client,
)
from daemon_process import DaemonProcess, config_text, http_get, new_token
from helpers import free_port

FAST = {"backoff_initial": 0.05, "backoff_max": 0.4, "close_timeout": 2.0}

# --- pure parts ---------------------------------------------------------------------------


def test_backoff_delay_full_jitter_bounds() -> None:
    for attempt in range(40):
        ceiling = min(30.0, 0.5 * 2**attempt)
        assert backoff_delay(attempt, 0.5, 30.0, rand=lambda: 0.0) == 0.0
        top = backoff_delay(attempt, 0.5, 30.0, rand=lambda: 0.999999)
        assert ceiling * 0.999 < top < ceiling
        for _ in range(50):
            assert 0.0 <= backoff_delay(attempt, 0.5, 30.0) < ceiling
    assert backoff_delay(10**6, 0.5, 30.0, rand=lambda: 0.5) == 15.0  # no overflow, capped
    # Full jitter: uniform, so the mean is half the ceiling.
    samples = [backoff_delay(3, 0.5, 30.0) for _ in range(4000)]
    assert statistics.fmean(samples) == pytest.approx(2.0, rel=0.08)
    with pytest.raises(ValueError):
        backoff_delay(-1)


def test_tracker_urls_for_all_explicit_and_resume() -> None:
    base = "ws://h:1/?access_token=a%2Bb"
    everything = StreamTracker()
    assert everything.target(base) == "ws://h:1/?access_token=a%2Bb"
    assert not everything.needs_subscribe_all()
    assert everything.accept("BTC/USD", 41) is Verdict.DELIVER
    assert everything.target(base) == "ws://h:1/?access_token=a%2Bb&resume=BTC%2FUSD:41"
    assert everything.needs_subscribe_all()  # resume alone would drop the other symbols

    chosen = StreamTracker(["BTC/USD", "ETH/USD"])
    assert chosen.target("ws://h:1") == "ws://h:1/?symbols=BTC%2FUSD,ETH%2FUSD"
    chosen.accept("ETH/USD", 17)
    assert chosen.target("ws://h:1/x?symbols=Z") == (
        "ws://h:1/x?symbols=BTC%2FUSD&resume=ETH%2FUSD:17"
    )
    chosen.accept("BTC/USD", 5)
    assert chosen.target("ws://h:1/") == "ws://h:1/?symbols=&resume=BTC%2FUSD:5,ETH%2FUSD:17"
    assert not chosen.needs_subscribe_all()


def test_tracker_duplicates_gaps_reset_and_unsubscribe() -> None:
    tracker = StreamTracker()
    assert [tracker.accept("A", s) for s in (10, 11, 11, 9, 13, 12)] == [
        Verdict.DELIVER,
        Verdict.DELIVER,
        Verdict.DUPLICATE,
        Verdict.DUPLICATE,
        Verdict.GAP,  # 12 is missing: not delivered, not recorded
        Verdict.DELIVER,
    ]
    assert tracker.last_seq == {"A": 12}
    assert tracker.reset("A", 500) == 12
    assert tracker.accept("A", 500) is Verdict.DELIVER
    tracker.accept("B", 3)
    tracker.subscription_changed(["B"])
    assert not tracker.want_all and tracker.last_seq == {"B": 3}
    assert tracker.target("ws://h/") == "ws://h/?symbols=&resume=B:3"


def test_update_latency() -> None:
    update = Update({"symbol": "A", "seq": 1}, "2026-01-01T00:00:00.000000Z", 1767225600.25)
    assert update.latency == pytest.approx(0.25)
    assert (update.symbol, update.seq) == ("A", 1)
    assert Update({}, "None", 0.0).latency is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="URL"):
        VolatilityClient("http://127.0.0.1:8765/")
    with pytest.raises(ValueError):
        VolatilityClient(backoff_initial=-1)


# --- against the real daemon --------------------------------------------------------------

Factory = Callable[..., DaemonProcess]
BACKENDS = ["trio", "asyncio"]


def on_both_loops(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run the async `test` once under Trio and once under asyncio (`backend` says which):
    the client must behave the same on both. The test itself is sync to pytest (trio_mode
    would otherwise claim it); its fixtures are those of `test`."""

    def run(**fixtures: Any) -> None:
        anyio.run(functools.partial(test, **fixtures), backend=fixtures["backend"])

    run.__name__ = run.__qualname__ = test.__name__
    run.__doc__ = test.__doc__
    run.__signature__ = inspect.signature(test)  # type: ignore[attr-defined]
    return pytest.mark.parametrize("backend", BACKENDS)(run)


# daemon_factory: conftest.py


def assert_consecutive(updates: list[dict[str, Any]]) -> dict[str, list[int]]:
    by_symbol: dict[str, list[int]] = {}
    for data in updates:
        by_symbol.setdefault(data["symbol"], []).append(data["seq"])
    for symbol, seqs in by_symbol.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (symbol, seqs)
    return by_symbol


@on_both_loops
async def test_updates_history_requests_and_errors(backend: str, daemon_factory: Factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    async with open_client(f"ws://127.0.0.1:{port}/", token, **FAST) as client:
        assert client.server_info is not None and client.server_info["token"] == "t"
        seen = []
        async for update in client:
            seen.append(update)
            if len(seen) == 8:
                break
        by_symbol = assert_consecutive(seen)
        assert set(by_symbol) == {"BTC/USD", "ETH/USD"}
        latest = client.get_latest_data("BTC/USD")
        assert latest is not None and latest["seq"] >= by_symbol["BTC/USD"][-1]

        history = await client.fetch_history(5, "BTC/USD")
        assert len(history) == 5 and {d["symbol"] for d in history} == {"BTC/USD"}
        assert_consecutive(history)
        merged = await client.fetch_history(6)  # both symbols, newest 6 by bar time
        assert len(merged) == 6 and {d["symbol"] for d in merged} == {"BTC/USD", "ETH/USD"}
        assert [d["timestamp"] for d in merged] == sorted(d["timestamp"] for d in merged)

        with pytest.raises(ServerError) as refused:
            await client.fetch_history(5, "DOGE/USD")
        assert refused.value.code == "unknown_symbol"
        assert (await client.request({"type": "ping"}))["type"] == "pong"

        # Unsubscribing is remembered: only ETH/USD from here on, still gap-free.
        assert await client.unsubscribe(["BTC/USD"]) == ["ETH/USD"]
        after: list[dict[str, Any]] = []
        with anyio.fail_after(5):
            while len([d for d in after if d["symbol"] == "ETH/USD"]) < 4:
                after.append(await client.__anext__())
        # A reconnect would now resume ETH/USD alone (BTC/USD is forgotten, not resumed).
        assert client.tracker.target("ws://h/").startswith("ws://h/?symbols=&resume=ETH%2FUSD:")
        assert_consecutive([d for d in seen + after if d["symbol"] == "ETH/USD"])
        assert client.duplicates == 0


@on_both_loops
async def test_callback_style_and_symbol_filter(backend: str, daemon_factory: Factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    statuses: list[Status] = []
    client = VolatilityClient(
        f"ws://127.0.0.1:{port}/", token, ["ETH/USD", "NOPE"], on_status=statuses.append, **FAST
    )
    got: list[dict[str, Any]] = []
    enough = anyio.Event()

    async def on_update(data: dict[str, Any]) -> None:
        got.append(data)
        if len(got) >= 4:
            enough.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as nursery:
            await client.connect(nursery)
            nursery.start_soon(client.listen, on_update)
            await enough.wait()
            assert len(await client.fetch_history(3)) == 3
            await client.send({"type": "ping"})  # fire and forget: its pong is not mistaken
            assert (await client.request({"type": "ping"}))["type"] == "pong"
            await client.disconnect()  # listen() returns, so the nursery ends
    assert {d["symbol"] for d in got} == {"ETH/USD"}
    assert_consecutive(got)
    assert client.get_latest_data()["symbol"] == "ETH/USD"  # type: ignore[index]
    errors = [s for s in statuses if s.kind == "server_error"]
    assert errors and errors[0].detail["code"] == "unknown_symbol"
    await daemon.wait_for("client_disconnected", reason="close_1000")


@on_both_loops
async def test_slow_consumer_backpressure_and_a_request_meanwhile(
    backend: str, daemon_factory: Factory
) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{port}/"
    async with open_client(url, token, buffer_size=2, **FAST) as client:
        await published(daemon, 10)  # more than the client buffers
        assert client.buffered == 2  # so the client stopped reading
        with anyio.fail_after(3):  # a reply is due: the client reads past its full buffer for it
            assert len(await client.fetch_history(3, "ETH/USD")) == 3
        got = [await client.__anext__() for _ in range(30)]
    assert_consecutive(got)  # nothing was lost by not reading


@on_both_loops
async def test_cancelling_the_iteration_closes_cleanly(
    backend: str, daemon_factory: Factory
) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{port}/"
    count = 0
    with anyio.move_on_after(10) as outer:  # not reached: the inner scope cancels first
        with anyio.CancelScope() as scope:
            async with open_client(url, token, **FAST) as client:
                async for _update in client:
                    count += 1
                    if count == 3:
                        scope.cancel()
                        cancelled_at = anyio.current_time()
                        # the cancellation lands in the next step of the iteration
    assert scope.cancelled_caught and not outer.cancelled_caught and count == 3
    # The close handshake completed (well under close_timeout): a close frame each way.
    assert anyio.current_time() - cancelled_at < 1.0
    event = await daemon.wait_for("client_disconnected")
    assert event["reason"] == "close_1000"  # a close frame, not a dropped socket

    # Callback style: cancelling the nursery without disconnect() also closes cleanly.
    daemon.events.clear()
    client = VolatilityClient(url, token, **FAST)
    with anyio.move_on_after(10) as outer:
        async with anyio.create_task_group() as nursery:
            await client.connect(nursery)
            listening = anyio.Event()
            nursery.start_soon(client.listen, lambda data: listening.set())
            await listening.wait()  # an update has come through the callback
            nursery.cancel_scope.cancel()
            cancelled_at = anyio.current_time()
    assert not outer.cancelled_caught and anyio.current_time() - cancelled_at < 1.0
    event = await daemon.wait_for("client_disconnected")
    assert event["reason"] == "close_1000"
    with pytest.raises(ClientClosed):
        await client.receive()


@on_both_loops
async def test_bad_token_revoked_token_and_refused(backend: str, daemon_factory: Factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{port}/"
    with anyio.fail_after(5), pytest.raises(AuthenticationError) as denied:
        async with open_client(url, new_token(), **FAST):
            pass
    assert denied.value.status == 401

    # Revoked while connected (4001): not retried, raised from the iteration.
    with anyio.fail_after(10), pytest.raises(AuthenticationError) as revoked:
        async with open_client(url, token, **FAST) as client:
            await client.__anext__()
            daemon.config_path.write_text(config_text(tokens={"other": new_token()}))
            daemon.signal(signal.SIGHUP)
            async for _update in client:
                pass
    assert "revoked" in str(revoked.value) and "4001" in str(revoked.value)

    with anyio.fail_after(5), pytest.raises(ConnectFailed) as refused:
        async with open_client("ws://127.0.0.1:1/", reconnect=False, **FAST):
            pass
    assert refused.value.refused


@on_both_loops
async def test_the_original_api_with_its_arguments_local_buffers_and_any_request(
    backend: str, daemon_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WebSocketDashboardClient: `uri=` and `token=` win over the environment; connect() takes
    no nursery; a sync callback gets each update in the original shape; get_latest_data and
    get_data_history are synchronous reads of what was received; send() returns the daemon's
    reply to anything, its error reply included, and forwards a `resume`, whose replay goes
    through the same no-gap, no-duplicate judgement."""
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    monkeypatch.setenv("AGENTSPOONSD_URL", f"ws://127.0.0.1:{free_port()}/")  # nothing there
    monkeypatch.setenv("AGENTSPOONSD_TOKEN", "not-the-token")
    client = WebSocketDashboardClient(
        uri=f"ws://127.0.0.1:{port}", token=token, symbols=["ETH/USD"], **FAST
    )
    got: list[dict[str, Any]] = []
    enough, replayed = anyio.Event(), anyio.Event()

    def on_update(message: dict[str, Any]) -> None:  # a plain function, not a coroutine
        got.append(message)
        if len(got) == 6:
            enough.set()
        if sum(m["data"]["symbol"] == "BTC/USD" for m in got) == 5:
            replayed.set()

    with anyio.fail_after(10):
        await client.connect()
        assert client.is_connected
        async with anyio.create_task_group() as group:
            group.start_soon(client.listen, on_update)
            await enough.wait()
            assert client.get_data_history(0) == []
            latest, local = client.get_latest_data(), client.get_data_history(4)
            assert isinstance(latest, dict) and isinstance(local, list) and len(local) == 4
            assert local[-1] == latest and [d["seq"] for d in local] == list(
                range(latest["seq"] - 3, latest["seq"] + 1)
            )
            assert (await client.send({"type": "ping"}))["type"] == "pong"
            unknown = await client.send({"type": "hello"})
            assert (unknown["type"], unknown["code"]) == ("error", "unknown_type")
            not_an_object = await client.send(["ping"])
            assert (not_an_object["type"], not_an_object["code"]) == ("error", "invalid_message")
            # The daemon's history (not the local one) of a symbol not subscribed ...
            stored = await client.fetch_history(3, "BTC/USD")
            assert len(stored) == 3 and {d["symbol"] for d in stored} == {"BTC/USD"}
            # ... and a resume from its oldest: subscribed, then the replay of the next ones.
            since = stored[0]["seq"]
            resumed = await client.send({"type": "resume", "from": {"BTC/USD": since}})
            assert resumed == {"type": "subscribed", "symbols": ["BTC/USD", "ETH/USD"]}
            await replayed.wait()
            await client.disconnect()  # listen() returns
    assert not client.is_connected
    assert all(set(m) == {"type", "data", "timestamp"} for m in got)
    assert all(m["type"] == "volatility_update" and m["timestamp"] != "None" for m in got)
    by_symbol = assert_consecutive([m["data"] for m in got])  # the replay, then live, gap-free
    assert by_symbol["BTC/USD"][:2] == [d["seq"] for d in stored[1:]]
    assert client.client.duplicates == 0
    await daemon.wait_for("client_disconnected", reason="close_1000")


def test_the_blocking_client_iterates_and_reads_its_latest_without_an_event_loop(
    daemon_factory: Factory,
) -> None:
    """connect_sync: iteration in order; latest() and history() answer at once from what was
    received (latest at least as new as what the iteration returned); requests block for
    their reply; leaving the ``with`` closes with 1000."""
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = anyio.run(daemon.ports)
    with connect_sync(f"ws://127.0.0.1:{port}/", token, **FAST) as client:
        assert client.latest() is None or isinstance(client.latest(), dict)
        got = [update for _, update in zip(range(6), client, strict=False)]
        by_symbol = assert_consecutive(got)
        for symbol, seqs in by_symbol.items():
            latest = client.latest(symbol)
            assert latest is not None and latest["seq"] >= seqs[-1]
        newest = client.latest()
        assert newest is not None and client.history(3)[-1] == newest
        assert client.history(1000)[: len(got)] == got  # received in the order iterated
        assert client.request({"type": "ping"})["type"] == "pong"
        assert len(client.fetch_history(4, "ETH/USD")) == 4
    event = anyio.run(daemon.wait_for, "client_disconnected")
    assert event["reason"] == "close_1000"


async def collect(
    client: VolatilityClient,
    into: list[dict[str, Any]],
    resets: list[StreamReset],
    until: Callable[[], bool],
) -> None:
    """Iterate, recording updates and resets, until `until()` holds."""
    while not until():
        try:
            into.append(await client.__anext__())
        except StreamReset as reset:
            resets.append(reset)


async def published(daemon: DaemonProcess, count: int) -> None:
    """Return once `daemon` has broadcast `count` more updates than when called (its
    agentspoonsd_updates_published_total, polled)."""
    _, http_port = await daemon.ports()

    async def total() -> float:
        status, _, body = await http_get(http_port, "/metrics")
        assert status == 200, body
        (line,) = [
            line
            for line in body.decode().splitlines()
            if line.startswith("agentspoonsd_updates_published_total ")
        ]
        return float(line.split()[1])

    start = await total()
    with anyio.fail_after(10):
        while await total() < start + count:  # noqa: ASYNC110 (a counter over HTTP: polled)
            await anyio.sleep(0.02)


async def restart(
    daemon_factory: Factory, text: str, port: int, old: DaemonProcess
) -> DaemonProcess:
    old.signal(signal.SIGKILL)
    assert await old.wait_exit() == -signal.SIGKILL
    new = daemon_factory(text, env={"AGENTSPOONSD_SERVER__PORT": str(port)})
    await new.ports()
    return new


@pytest.mark.parametrize("persist", [True, False])
@on_both_loops
async def test_kill_and_restart(
    backend: str, daemon_factory: Factory, tmp_path: Path, persist: bool
) -> None:
    """kill -9 the daemon mid-stream, start another on the same port: with a persisted history
    the consumer's sequence continues with no gap and no duplicate (the missed updates are
    replayed); without one, each symbol's stream is `reset` (and gap-free after it)."""
    token = new_token()
    history = f'\n[history]\npersist = {"true" if persist else "false"}\ndir = "{tmp_path}/h"\n'
    text = config_text(tokens={"t": token}, interval=0.05, extra=history)
    first = daemon_factory(text)
    port, _ = await first.ports()
    updates: list[dict[str, Any]] = []
    resets: list[StreamReset] = []
    statuses: list[Status] = []
    with anyio.fail_after(20):
        async with open_client(
            f"ws://127.0.0.1:{port}/", token, on_status=statuses.append, **FAST
        ) as client:
            await collect(client, updates, resets, lambda: len(updates) >= 10)
            second = await restart(daemon_factory, text, port, first)
            before = len(updates)
            await published(second, 4)  # the new daemon publishes while the client reconnects
            await collect(
                client,
                updates,
                resets,
                lambda: client.connections >= 2 and len(updates) >= before + 30,
            )
            await second.wait_for("client_connected")
    assert any(s.kind == "disconnected" for s in statuses)
    assert client.connections == 2
    if persist:
        assert resets == []
        by_symbol = assert_consecutive(updates)  # across the restart: no gap, no duplicate
        assert all(len(seqs) >= 10 for seqs in by_symbol.values())
    else:
        assert sorted(r.symbol for r in resets) == ["BTC/USD", "ETH/USD"]
        for reset in resets:
            mine = [d["seq"] for d in updates if d["symbol"] == reset.symbol]
            assert reset.last_seq in mine
            cut = mine.index(reset.last_seq) + 1
            assert mine[cut] == reset.oldest_seq > reset.last_seq  # seq never repeats
            assert_consecutive([{"symbol": "x", "seq": s} for s in mine[:cut]])
            assert_consecutive([{"symbol": "x", "seq": s} for s in mine[cut:]])


class Gate:
    """A TCP relay between the client and the daemon that the test can cut and hold shut, so
    the daemon publishes while the client is away: what it missed must be replayed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.is_open = True
        self._links: list[anyio.CancelScope] = []
        self._held: list[anyio.Event] = []  # one per link: set, it relays nothing more

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        async with listener:
            await listener.serve(self._link)

    async def _link(self, client: anyio.abc.SocketStream) -> None:
        with anyio.CancelScope() as scope:
            self._links.append(scope)
            try:
                if not self.is_open:
                    return  # closed at once: the client's handshake fails, it backs off
                upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
                held = anyio.Event()
                self._held.append(held)
                async with upstream, anyio.create_task_group() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope, held)
                    nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope, held)
            except OSError:
                pass
            finally:
                await anyio.aclose_forcefully(client)

    @staticmethod
    async def _pump(
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        done: anyio.CancelScope,
        held: anyio.Event,
    ) -> None:
        try:
            while True:
                data = await source.receive(65536)
                if held.is_set():
                    await anyio.sleep_forever()  # a dead path: TCP stays up, nothing arrives
                await sink.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        done.cancel()

    def cut(self) -> None:
        """Drop every relayed connection (no close frame) and refuse new ones."""
        self.is_open = False
        for scope in self._links:
            scope.cancel()

    def reopen(self) -> None:
        self.is_open = True

    def hold(self) -> None:
        """Stop relaying on every current connection, keeping it open (a path gone silent, as
        when a NAT forgets it); new connections are relayed as before."""
        for held in self._held:
            held.set()


@on_both_loops
async def test_missed_updates_are_replayed_after_a_drop_and_a_restart(
    backend: str, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Held away while the daemon publishes, the client gets what it missed on reconnect:
    first from the running daemon's history, then, after kill -9 and a restart with
    `[history] persist`, from the history the new daemon loaded."""
    token = new_token()
    history = f'\n[history]\npersist = true\ndir = "{tmp_path}/h"\n'
    text = config_text(tokens={"t": token}, interval=0.05, extra=history)
    daemon = daemon_factory(text)
    port, _ = await daemon.ports()
    got: list[Update] = []
    statuses: list[Status] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as nursery:
            gate = Gate(port)
            relay_port = await nursery.start(gate.serve)
            url = f"ws://127.0.0.1:{relay_port}/"
            async with open_client(url, token, on_status=statuses.append, **FAST) as client:
                for restart_daemon in (False, True):
                    while len(got) < 10 * (2 if restart_daemon else 1):
                        got.append(await client.receive())
                    gate.cut()
                    if restart_daemon:
                        daemon = await restart(daemon_factory, text, port, daemon)
                    await published(daemon, 6)  # three per symbol published meanwhile
                    gate.reopen()
                    connections = client.connections
                    while client.connections == connections:  # until the client is back
                        got.append(await client.receive())
                    assert client.server_info is not None
                    back_at = client.server_info["timestamp"]  # the new `connected`
                    # Its first updates are replayed ones: published while it was away.
                    got.append(await client.receive())
                    assert got[-1].published < back_at
                    while len(got) < 10 * (4 if restart_daemon else 3):
                        got.append(await client.receive())
            nursery.cancel_scope.cancel()
    assert client.connections == 3
    # A connection closed during the handshake is retried at once (with backoff), not after
    # the connect timeout.
    assert any("closed during the handshake" in s.message for s in statuses)
    by_symbol = assert_consecutive([u.data for u in got])  # no gap, no duplicate, all along
    assert all(len(seqs) >= 10 for seqs in by_symbol.values())


@on_both_loops
async def test_a_silent_connection_is_found_by_the_keepalive_and_resumed(
    backend: str, daemon_factory: Factory, tmp_path: Path
) -> None:
    """The client's heartbeat: a connection that stays open but carries nothing (the relay
    holds it) is declared dead when a ping goes unanswered within `keepalive`; the client
    reconnects and resumes with no gap and no duplicate."""
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    got: list[dict[str, Any]] = []
    statuses: list[Status] = []
    options = {**FAST, "close_timeout": 0.5}
    with anyio.fail_after(15):
        async with anyio.create_task_group() as nursery:
            gate = Gate(port)
            url = f"ws://127.0.0.1:{await nursery.start(gate.serve)}/"
            async with open_client(
                url, token, keepalive=0.2, on_status=statuses.append, **options
            ) as client:
                while len(got) < 6:
                    got.append(await client.__anext__())
                gate.hold()
                while client.connections < 2 or len(got) < 20:
                    got.append(await client.__anext__())
            nursery.cancel_scope.cancel()
    assert any("no answer to a ping" in s.message for s in statuses)
    by_symbol = assert_consecutive(got)
    assert set(by_symbol) == {"BTC/USD", "ETH/USD"}
    assert client.connections == 2


@on_both_loops
async def test_the_daemons_pings_are_answered(backend: str, daemon_factory: Factory) -> None:
    """The daemon's heartbeat: it pings every `ping_interval` and closes a client from which
    nothing arrived for `idle_timeout`; with no pings of its own (keepalive=None), the client
    stays connected through many idle timeouts by answering the daemon's pings."""
    token = new_token()
    daemon = daemon_factory(
        config_text(tokens={"t": token}, interval=0.05),
        env={
            "AGENTSPOONSD_SERVER__PING_INTERVAL": "0.05",
            "AGENTSPOONSD_SERVER__IDLE_TIMEOUT": "0.2",
        },
    )
    port, _ = await daemon.ports()
    statuses: list[Status] = []
    with anyio.fail_after(10):
        async with open_client(
            f"ws://127.0.0.1:{port}/", token, keepalive=None, on_status=statuses.append, **FAST
        ) as client:
            got = [await client.__anext__()]
            await anyio.sleep(1.0)  # five idle timeouts
            got += [await client.__anext__() for _ in range(3)]
            assert client.connections == 1
    assert not any(s.kind == "disconnected" for s in statuses)
    event = await daemon.wait_for("client_disconnected")
    assert event["reason"] == "close_1000"  # ended by the client, not the idle timeout


@on_both_loops
async def test_first_failed_connect_says_why_then_raises(
    backend: str, daemon_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused, DNS, 401 with the daemon's reason: each reported to on_status and logging at
    WARNING on the first attempt; `connect_timeout` ends the retrying with `ConnectFailed`."""
    caplog.set_level(logging.INFO, logger="agentspoonsd.client")
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    for url, reason in (
        (f"ws://127.0.0.1:{free_port()}/", "refused"),
        ("ws://nothing-here.invalid:8765/", "dns"),
    ):
        statuses: list[Status] = []
        caplog.clear()
        started = anyio.current_time()
        with anyio.fail_after(5), pytest.raises(ConnectFailed) as failed:
            async with open_client(url, connect_timeout=1.0, on_status=statuses.append, **FAST):
                pass
        # Retried until connect_timeout had passed (a last attempt at the deadline), not given
        # up early because a whole backoff no longer fitted before it.
        assert 1.0 <= anyio.current_time() - started < 3.0
        assert failed.value.reason == reason and "no connection within 1 s" in str(failed.value)
        first = [s for s in statuses if s.kind == "connect_failed"]
        assert len(first) >= 2 and first[0].detail == {
            "reason": reason,
            "status": None,
            "first": True,
        }
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert reason in warned[0].getMessage() or "resolve" in warned[0].getMessage()
        assert [r for r in caplog.records if "client_connect_failed" in r.getMessage()][
            1
        ].levelno == logging.INFO

    caplog.clear()
    with anyio.fail_after(5), pytest.raises(AuthenticationError) as denied:
        async with open_client(f"ws://127.0.0.1:{port}/", "not-the-token", **FAST):
            pass
    assert "401" in str(denied.value) and "invalid_token: a valid bearer token" in str(denied.value)
    assert "not-the-token" not in caplog.text  # the token never reaches a log
    assert any(
        "invalid_token" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )


@on_both_loops
async def test_connect_timeout_none_keeps_trying_until_the_daemon_comes(
    backend: str, daemon_factory: Factory
) -> None:
    token = new_token()
    port = free_port()
    statuses: list[Status] = []
    failed_thrice = anyio.Event()

    def on_status(status: Status) -> None:
        statuses.append(status)
        if [s.kind for s in statuses].count("connect_failed") == 3:
            failed_thrice.set()

    got: list[dict[str, Any]] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as group:

            async def start_later() -> None:
                await failed_thrice.wait()  # the client has kept trying, with its backoff
                daemon_factory(
                    config_text(tokens={"t": token}, interval=0.05),
                    env={"AGENTSPOONSD_SERVER__PORT": str(port)},
                )

            group.start_soon(start_later)
            async with open_client(
                f"ws://127.0.0.1:{port}/",
                token,
                connect_timeout=None,
                on_status=on_status,
                **FAST,
            ) as client:
                got = [await client.__anext__() for _ in range(3)]
    assert len(got) == 3 and [s.kind for s in statuses].count("connect_failed") >= 3


@on_both_loops
async def test_tls_with_a_cafile_and_an_untrusted_certificate(
    backend: str, daemon_factory: Factory, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    token = new_token()
    tls = f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    daemon = daemon_factory(
        config_text(tokens={"t": token}, interval=0.05).replace("[server]\n", tls, 1)
    )
    port, _ = await daemon.ports()
    url = f"wss://127.0.0.1:{port}/"
    with anyio.fail_after(10):
        async with open_client(url, token, cafile=ca_file, **FAST) as client:
            assert (await client.__anext__())["seq"] >= 0
        with pytest.raises(ConnectFailed) as untrusted:
            async with open_client(url, token, reconnect=False, **FAST):
                pass
    assert untrusted.value.reason == "tls" and "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)


def test_importing_the_client_loads_no_daemon_stack() -> None:
    code = (
        "import sys, agentspoonsd.client\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'pydantic',"
        " 'pydantic_settings', 'structlog', 'trio', 'trio_websocket', 'prometheus_client'))\n"
        "ours = sorted(m for m in sys.modules if m.startswith('agentspoonsd.')"
        " and not m.startswith('agentspoonsd.client.'))\n"
        "print(heavy, ours)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Its own modules, the sans-IO WebSocket core and the backoff rule: nothing of the daemon.
    assert done.stdout.strip() == (
        "[] ['agentspoonsd.backoff', 'agentspoonsd.client', 'agentspoonsd.wscore']"
    )
