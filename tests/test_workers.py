"""`[server] workers = 2`: the real daemon (a master and two worker processes), real clients."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, connect_websocket_url, open_websocket_url

from daemon_process import DaemonProcess, config_text, http_get, new_token, token_block
from redis_server import RedisServer

WORKERS = "[server]\nworkers = 2\n"


def workers_config(**kwargs: Any) -> str:
    """config_text with `workers = 2` in its [server] table."""
    return config_text(**kwargs).replace("[server]\n", WORKERS, 1)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {token}".encode())]


async def started(daemon: DaemonProcess) -> tuple[int, int, dict[int, int]]:
    """The ports, once both workers are ready, and the pid of each worker."""
    ws_port, http_port = await daemon.ports()
    for index in (0, 1):
        await daemon.wait_for("worker_ready", within=20.0, worker=index)
    pids = {e["worker"]: e["pid"] for e in daemon.events if e.get("event") == "worker_ready"}
    return ws_port, http_port, pids


def worker_of(daemon: DaemonProcess, local_port: int) -> int | None:
    """The worker that logged the connection from 127.0.0.1:`local_port` (its newest)."""
    peer = f"127.0.0.1:{local_port}"
    found = None
    for event in daemon.events:
        if event.get("event") == "client_connected" and event.get("peer") == peer:
            found = event.get("worker")
    return found


async def updates(ws: Any, count: int) -> list[tuple[str, int]]:
    """The (symbol, seq) of the next `count` updates `ws` receives."""
    got = []
    while len(got) < count:
        message = json.loads(await ws.get_message())
        if message["type"] == "volatility_update":
            got.append((message["data"]["symbol"], message["data"]["seq"]))
    return got


def assert_in_order(seen: list[tuple[str, int]]) -> None:
    """Within each symbol, every seq exactly one above the previous (no gap, no repeat)."""
    last: dict[str, int] = {}
    for symbol, seq in seen:
        if symbol in last:
            assert seq == last[symbol] + 1, (symbol, last[symbol], seq)
        last[symbol] = seq


async def test_every_client_on_every_worker_gets_every_update_in_order(daemon_factory) -> None:
    daemon = daemon_factory(workers_config(auth_enabled=False, interval=0.05))
    ws_port, http_port, _ = await started(daemon)
    url = f"ws://127.0.0.1:{ws_port}/"
    received: dict[int, list[tuple[str, int]]] = {}
    workers: dict[int, int | None] = {}

    async def client(number: int) -> None:
        async with open_websocket_url(url) as ws:
            received[number] = await updates(ws, 30)
            workers[number] = worker_of(daemon, ws.local.port)

    async with trio.open_nursery() as nursery:
        for number in range(16):
            nursery.start_soon(client, number)
            await trio.sleep(0.02)
    assert set(workers.values()) == {0, 1}, workers  # both workers served some
    by_update: dict[tuple[str, int], int] = {}
    for seen in received.values():
        assert_in_order(seen)
        for key in seen:
            by_update[key] = by_update.get(key, 0) + 1
    # The same numbered updates on both workers (one stream), and /metrics sums the workers.
    assert max(by_update.values()) > 1
    status, _, body = await http_get(http_port, "/metrics")
    assert status == 200
    text = body.decode()
    assert 'agentspoonsd_worker_clients{worker="0"}' in text
    assert "agentspoonsd_workers_ready 2.0" in text
    accepted = [
        line for line in text.splitlines() if line.startswith("agentspoonsd_connections_accepted")
    ]
    assert accepted and float(accepted[0].split()[-1]) >= 16


async def connect_to_worker(
    nursery: trio.Nursery, daemon: DaemonProcess, url: str, wanted: int, **kwargs: Any
) -> Any:
    """A connection (its `connected` message read) that landed on worker `wanted`."""
    for _ in range(40):
        ws = await connect_websocket_url(nursery, url, **kwargs)
        await ws.get_message()  # connected: logged by then
        await trio.sleep(0.05)
        if worker_of(daemon, ws.local.port) == wanted:
            return ws
        await ws.aclose()
    raise AssertionError(f"no connection landed on worker {wanted}")


async def closed_with(ws: Any) -> int:
    """The close code `ws` gets (within 5 s), reading whatever comes before."""
    with pytest.raises(ConnectionClosed) as closed, trio.fail_after(5):
        while True:
            await ws.get_message()
    return closed.value.reason.code


async def test_resume_on_another_worker_has_no_gap(daemon_factory) -> None:
    daemon = daemon_factory(workers_config(auth_enabled=False, symbols=("BTC/USD",)))
    ws_port, _, _ = await started(daemon)
    url = f"ws://127.0.0.1:{ws_port}/"
    async with trio.open_nursery() as nursery:
        ws = await connect_to_worker(nursery, daemon, url, 0)
        seen = await updates(ws, 3)
        await ws.aclose()
        await trio.sleep(0.5)  # updates go by meanwhile
        resume = f"{url}?resume={quote('BTC/USD:' + str(seen[-1][1]), safe='')}"
        ws = await connect_to_worker(nursery, daemon, resume, 1)
        seen += await updates(ws, 5)
        await ws.aclose()
    assert_in_order(seen)


async def test_a_killed_worker_is_restarted_and_its_clients_resume(daemon_factory) -> None:
    daemon = daemon_factory(workers_config(auth_enabled=False, symbols=("BTC/USD",)))
    ws_port, http_port, pids = await started(daemon)
    url = f"ws://127.0.0.1:{ws_port}/"
    async with trio.open_nursery() as nursery:
        ws = await connect_to_worker(nursery, daemon, url, 1)
        seen = await updates(ws, 2)
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(ConnectionClosed), trio.fail_after(5):
            while True:
                seen += await updates(ws, 1)
    restarted = await daemon.wait_for("worker_exited", worker=1)
    assert restarted["status"] == -signal.SIGKILL
    # Not ready while it is down (its restart takes the time of a process start).
    status, _, body = await http_get(http_port, "/readyz")
    assert status == 503, body
    assert "1 of 2 workers not serving (worker 1)" in json.loads(body)["reasons"]
    await daemon.wait_for("worker_restarting", worker=1)
    resume = f"{url}?resume={quote('BTC/USD:' + str(seen[-1][1]), safe='')}"
    async with open_websocket_url(resume) as ws:
        seen += await updates(ws, 4)
    assert_in_order(seen)
    # The new worker 1 comes back with the history, and serves a resume from before it died.
    ready = [e for e in daemon.events if e.get("event") == "worker_ready" and e["worker"] == 1]
    with trio.fail_after(10):
        while len(ready) < 2:
            await trio.sleep(0.05)
            ready = [
                e for e in daemon.events if e.get("event") == "worker_ready" and e["worker"] == 1
            ]
    assert ready[-1]["pid"] != pids[1]
    async with trio.open_nursery() as nursery:
        ws = await connect_to_worker(nursery, daemon, resume, 1)
        again = await updates(ws, 2)
        await ws.aclose()
    assert again[0][1] == int(resume.rsplit("%3A", 1)[1]) + 1
    status, _, _ = await http_get(http_port, "/readyz")
    assert status == 200


async def test_a_revoked_token_is_cut_on_every_worker(daemon_factory) -> None:
    kept, revoked = new_token(), new_token()
    daemon = daemon_factory(workers_config(tokens={"kept": kept, "revoked": revoked}))
    ws_port, _, pids = await started(daemon)
    os.kill(pids[0], signal.SIGHUP)  # `pkill -HUP agentspoonsd` reaches workers too: ignored
    url = f"ws://127.0.0.1:{ws_port}/"
    async with trio.open_nursery() as nursery:
        opened = [
            await connect_to_worker(nursery, daemon, url, wanted, extra_headers=bearer(revoked))
            for wanted in (0, 1)
        ]
        keeper = await connect_to_worker(nursery, daemon, url, 0, extra_headers=bearer(kept))
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(text.replace(token_block("revoked", revoked), ""))
        daemon.signal(signal.SIGHUP)
        for ws in opened:
            assert await closed_with(ws) == 4001
        await updates(keeper, 2)  # the other token's client is served on
        await keeper.aclose()
    cut = [e for e in daemon.events if e.get("event") == "token_connections_closed"]
    assert {e["worker"] for e in cut if e["connections"] == 1} == {0, 1}
    assert not [e for e in daemon.events if e.get("event") == "worker_exited"]


async def test_sigterm_closes_every_client_with_1001_and_exits_0(daemon_factory) -> None:
    daemon = daemon_factory(workers_config(auth_enabled=False))
    ws_port, _, pids = await started(daemon)
    url = f"ws://127.0.0.1:{ws_port}/"
    async with trio.open_nursery() as nursery:
        opened = [await connect_to_worker(nursery, daemon, url, wanted) for wanted in (0, 1)]
        daemon.signal(signal.SIGTERM)
        for ws in opened:
            assert await closed_with(ws) == 1001
    assert await daemon.wait_exit() == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_workers_end_when_the_master_is_killed(daemon_factory) -> None:
    daemon = daemon_factory(workers_config(auth_enabled=False))
    _, _, pids = await started(daemon)
    daemon.kill()
    with trio.fail_after(8):
        while any(_alive(pid) for pid in pids.values()):  # noqa: ASYNC110
            await trio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the init process) counts as ended.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


async def test_the_http_ports_ws_is_handed_to_the_least_busy_worker(daemon_factory) -> None:
    token = new_token()
    daemon = daemon_factory(workers_config(tokens={"dashboard": token}))
    _, http_port, _ = await started(daemon)
    url = f"ws://127.0.0.1:{http_port}/ws?access_token={token}"
    async with trio.open_nursery() as nursery:
        first = await connect_websocket_url(nursery, url)
        second = await connect_websocket_url(nursery, url)  # while the first is served
        for ws in (first, second):
            assert_in_order(await updates(ws, 2))
        served_by = {worker_of(daemon, ws.local.port) for ws in (first, second)}
        assert served_by == {0, 1}
        for ws in (first, second):
            await ws.aclose()
    # Refused as on the WebSocket port: by the worker, with the same answer.
    status, _, _ = await http_get(http_port, "/ws")
    assert status == 426


async def test_systemd_hears_ready_only_once_every_worker_serves(daemon_factory) -> None:
    name = f"agentspoonsd-workers-{os.getpid()}-{secrets.token_hex(4)}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind("\0" + name)
        daemon = daemon_factory(
            workers_config(auth_enabled=False), env={"NOTIFY_SOCKET": "@" + name}
        )
        with trio.fail_after(20):
            while (await sock.recv(4096)).split(b"\n")[0] != b"READY=1":
                pass
        heard = datetime.now(UTC)
    ready = [await daemon.wait_for("worker_ready", worker=index) for index in (0, 1)]
    assert all(datetime.fromisoformat(e["timestamp"]) <= heard for e in ready)


async def test_wss_is_served_by_every_worker(daemon_factory, tmp_path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    files = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
    daemon = daemon_factory(workers_config(auth_enabled=False).replace(WORKERS, WORKERS + files, 1))
    ws_port, _, _ = await started(daemon)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    url = f"wss://127.0.0.1:{ws_port}/"
    async with trio.open_nursery() as nursery:
        for wanted in (0, 1):
            ws = await connect_to_worker(nursery, daemon, url, wanted, ssl_context=context)
            assert_in_order(await updates(ws, 2))
            await ws.aclose()


async def test_a_redis_node_feeds_its_workers_from_the_stream(daemon_factory, tmp_path) -> None:
    # The master mirrors the Redis streams (and generates while elected); its workers get the
    # same bytes as its own hub would send.
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        broker = f'\n[broker]\nkind = "redis"\nurl = "{redis.url}"\nlease = 1.0\nprefix = "w"\n'
        daemon = daemon_factory(
            workers_config(auth_enabled=False, symbols=("BTC/USD",), extra=broker)
        )
        ws_port, _, _ = await started(daemon)
        url = f"ws://127.0.0.1:{ws_port}/"
        async with trio.open_nursery() as nursery:
            for wanted in (0, 1):
                ws = await connect_to_worker(nursery, daemon, url, wanted)
                assert_in_order(await updates(ws, 3))
                await ws.aclose()
    finally:
        redis.stop()
