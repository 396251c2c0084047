"""End to end: `[broker] kind = "redis"` nodes (real daemon subprocesses) sharing a real
redis-server, with real WebSocket clients on each node.

Fast settings: a 0.5 s lease and 20 updates a second, so a takeover and an outage take about a
second each.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from daemon_process import DaemonProcess, config_text, http_get
from redis_server import RedisServer

LEASE = 0.5
INTERVAL = 0.05
SYMBOL = "BTC/USD"


def cluster_config(redis_url: str, *, history: int = 300) -> str:
    return config_text(
        interval=INTERVAL,
        symbols=(SYMBOL,),
        auth_enabled=False,
        extra=(
            f"\n[history]\nsize = {history}\n\n"
            f'[broker]\nkind = "redis"\nurl = "{redis_url}"\nlease = {LEASE}\nprefix = "test"\n'
        ),
    )


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def start_node(daemon_factory: Callable[..., DaemonProcess], redis: RedisServer) -> Any:
    """`start()`: one more node on the shared Redis (conftest.py's daemon_factory stops them)."""

    async def start() -> tuple[DaemonProcess, int, int]:
        node = daemon_factory(cluster_config(redis.url))
        ws_port, http_port = await node.ports()
        return node, ws_port, http_port

    return start


class Client:
    """One WebSocket client: every update it receives, as (seq, the exact text)."""

    def __init__(self) -> None:
        self.updates: list[tuple[int, str]] = []
        self.replies: list[dict[str, Any]] = []
        self.ws: WebSocketConnection | None = None
        self.closed = False

    @property
    def seqs(self) -> list[int]:
        return [seq for seq, _ in self.updates]

    async def run(self, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with open_websocket_url(url) as ws:
            self.ws = ws
            assert json.loads(await ws.get_message())["type"] == "connected"
            task_status.started()
            try:
                while True:
                    text = await ws.get_message()
                    message = json.loads(text)
                    if message["type"] == "volatility_update":
                        self.updates.append((message["data"]["seq"], text))
                    else:
                        self.replies.append(message)
            except Exception:
                self.closed = True

    async def wait_for_count(self, count: int, within: float = 10.0) -> None:
        await until(lambda: len(self.updates) >= count, within)

    async def wait_for_seq_above(self, seq: int, within: float = 10.0) -> None:
        await until(lambda: bool(self.updates) and self.updates[-1][0] > seq, within)


async def until(condition: Callable[[], bool], within: float) -> None:
    """Poll `condition` (state other tasks change) until it holds; fail after `within` s."""
    with trio.fail_after(within):
        while True:
            if condition():
                return
            await trio.sleep(0.01)


def assert_consecutive(seqs: list[int]) -> None:
    """No gap, no duplicate, no reordering."""
    assert seqs, "no update"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


def log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


async def test_every_node_sends_the_same_updates_and_history(start_node) -> None:
    first, first_ws, first_http = await start_node()
    await first.wait_for("leader_elected")
    second, second_ws, second_http = await start_node()
    async with trio.open_nursery() as nursery:
        a, b = Client(), Client()
        await nursery.start(a.run, f"ws://127.0.0.1:{first_ws}/")
        await nursery.start(b.run, f"ws://127.0.0.1:{second_ws}/")
        await a.wait_for_count(30)
        await b.wait_for_count(30)
        nursery.cancel_scope.cancel()
    assert_consecutive(a.seqs)
    assert_consecutive(b.seqs)
    on_a, on_b = dict(a.updates), dict(b.updates)
    common = on_a.keys() & on_b.keys()
    assert len(common) >= 20
    assert all(on_a[seq] == on_b[seq] for seq in common)  # the very same bytes on both nodes
    # Only the first node generates; the second one follows.
    assert sum(e.get("event") == "leader_elected" for e in second.events) == 0

    # The second node's history came from the stream: a resume there from the first seq the
    # first node's client saw replays every update since, without a gap.
    start = a.seqs[0]
    url = f"ws://127.0.0.1:{second_ws}/?symbols=&resume={SYMBOL.replace('/', '%2F')}:{start}"
    async with trio.open_nursery() as nursery:
        resumed = Client()
        await nursery.start(resumed.run, url)
        await resumed.wait_for_seq_above(a.seqs[-1])
        nursery.cancel_scope.cancel()
    assert resumed.seqs[0] == start + 1
    assert_consecutive(resumed.seqs)
    assert all(on_a[seq] == text for seq, text in resumed.updates if seq in on_a)
    status, _, body = await http_get(second_http, "/readyz")
    assert (status, json.loads(body)["status"]) == (200, "ready")
    for port, leader in ((first_http, 1.0), (second_http, 0.0)):
        metrics = (await http_get(port, "/metrics"))[2].decode()
        assert f"agentspoonsd_broker_leader {leader}" in metrics
        assert "agentspoonsd_broker_connected 1.0" in metrics


async def test_kill_9_of_the_leader_hands_over_within_two_leases(start_node) -> None:
    leader, leader_ws, _ = await start_node()
    await leader.wait_for("leader_elected")
    follower, follower_ws, _ = await start_node()
    await follower.wait_for("broker_history_loaded")
    async with trio.open_nursery() as nursery:
        on_follower, on_leader = Client(), Client()
        await nursery.start(on_follower.run, f"ws://127.0.0.1:{follower_ws}/")
        await nursery.start(on_leader.run, f"ws://127.0.0.1:{leader_ws}/")
        await on_leader.wait_for_count(10)
        await on_follower.wait_for_count(10)
        killed_at = time.time()
        leader.signal(signal.SIGKILL)
        elected = await follower.wait_for("leader_elected", within=5 * LEASE)
        last_before = on_leader.seqs[-1]
        await on_follower.wait_for_seq_above(elected["next_seq"][SYMBOL] + 10)
        # The client of the dead node reconnects to the other one and resumes: nothing lost.
        resumed = Client()
        url = f"ws://127.0.0.1:{follower_ws}/?resume={SYMBOL.replace('/', '%2F')}:{last_before}"
        await nursery.start(resumed.run, url)
        await resumed.wait_for_seq_above(elected["next_seq"][SYMBOL] + 10)
        nursery.cancel_scope.cancel()

    takeover = log_time(elected) - killed_at
    print(f"takeover {takeover * 1000:.0f} ms after kill -9 (lease {LEASE} s)")
    assert takeover < 2 * LEASE
    assert_consecutive(on_follower.seqs)  # across the takeover: no gap, no duplicate
    assert_consecutive(on_leader.seqs + resumed.seqs)
    # The new leader carries on the price path from the last bar published.
    by_seq = {seq: json.loads(text)["data"] for seq, text in on_follower.updates}
    first_new = elected["next_seq"][SYMBOL]
    assert by_seq[first_new]["open"] == by_seq[first_new - 1]["close"]
    assert by_seq[first_new]["returns"] is not None


async def test_redis_outage_keeps_clients_and_recovers(start_node, redis: RedisServer) -> None:
    nodes = [await start_node(), await start_node()]
    await nodes[0][0].wait_for("leader_elected")
    async with trio.open_nursery() as nursery:
        clients = [Client(), Client()]
        for client, (_, ws_port, _) in zip(clients, nodes, strict=True):
            await nursery.start(client.run, f"ws://127.0.0.1:{ws_port}/")
        for client in clients:
            await client.wait_for_count(5)

        redis.stop()
        for node, _, http_port in nodes:
            await node.wait_for("broker_disconnected", within=5)
            _, _, body = await wait_for_readyz(http_port, 503)
            assert any("redis unavailable" in reason for reason in json.loads(body)["reasons"])
            metrics = (await http_get(http_port, "/metrics"))[2].decode()
            assert "agentspoonsd_broker_connected 0.0" in metrics
            assert "agentspoonsd_broker_disconnects_total 1.0" in metrics
        # The outage outlasts the leader's lease: it stops leading.
        await nodes[0][0].wait_for("leader_lost", within=5, reason="expired")
        seen = [client.seqs[-1] for client in clients]
        for client in clients:  # still connected, still answered
            assert client.ws is not None
            await client.ws.send_message(json.dumps({"type": "ping"}))
        await until(lambda: all(any(r["type"] == "pong" for r in c.replies) for c in clients), 5)

        redis.start()
        for node, _, http_port in nodes:
            await node.wait_for("broker_connected", within=5, down_s=pytest.approx(2, abs=10))
            await wait_for_readyz(http_port, 200)
        for client, last in zip(clients, seen, strict=True):
            await client.wait_for_seq_above(last, within=5)
            count = len(client.updates)
            await client.wait_for_count(count + 5)
        nursery.cancel_scope.cancel()

    for client in clients:
        assert not client.closed
    for node, _, _ in nodes:
        assert node.proc is not None and node.proc.poll() is None  # still up
        events = [e.get("event") for e in node.events]
        assert events.count("broker_disconnected") == 1  # logged once per change
        assert "service_crashed" not in events
    # Redis came back empty (no persistence): the new stream starts above every earlier seq,
    # and both nodes send it alike.
    after = [dict(c.updates[-5:]) for c in clients]
    common = after[0].keys() & after[1].keys()
    assert all(after[0][seq] == after[1][seq] for seq in common)


async def wait_for_readyz(port: int, status: int, within: float = 5.0) -> tuple[int, Any, bytes]:
    with trio.fail_after(within):
        while True:
            reply = await http_get(port, "/readyz")
            if reply[0] == status:
                return reply
            await trio.sleep(0.05)


@pytest.fixture
def frozen(frozen_binary: Path) -> Path:
    """dist/agentspoonsd (conftest.py freezes it while the other tests run)."""
    return frozen_binary


async def test_the_frozen_binary_runs_a_redis_node(
    tmp_path: Path, redis: RedisServer, frozen: Path
) -> None:
    """coredis ships mypyc-compiled modules with a hidden helper module: the one-file build must
    carry it (build/agentspoonsd.spec), or a redis node dies at import."""
    config = tmp_path / "frozen.toml"
    config.write_text(cluster_config(redis.url))
    node = FrozenNode(frozen, config)
    node.start()
    try:
        elected = await node.wait_for("leader_elected")
        assert elected["next_seq"][SYMBOL] > 0
    finally:
        node.kill()


class FrozenNode(DaemonProcess):
    """DaemonProcess, running the frozen executable instead of `python -m agentspoonsd`."""

    def __init__(self, binary: Path, config_path: Path) -> None:
        super().__init__(config_path)
        self.binary = binary

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(self.binary), "run", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: `kill` reaches the child too
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def kill(self) -> None:
        """SIGKILL the one-file bootloader *and* the daemon it unpacked and started: a SIGKILL
        is not forwarded, so killing the bootloader alone would leave the daemon running."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
