"""The descriptor budget: the soft limit raised, `max_connections` capped at what it holds, and
a full daemon that answers 503 and keeps its HTTP port, alone and with workers (real daemon
under prlimit, real sockets)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
import trio

from agentspoonsd.descriptors import RESERVED, connection_capacity
from daemon_process import DaemonProcess, config_text, http_get

needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_one_process_sets_aside_the_reserve_and_the_http_connections() -> None:
    assert connection_capacity(20_000, 1, 512) == 20_000 - RESERVED - 512
    assert connection_capacity(300, 1, 32) == 300 - RESERVED - 32
    assert connection_capacity(100, 1, 512) == 1  # never 0 or less: one client at least


def test_workers_hold_their_limit_each_and_unlimited_is_no_cap() -> None:
    assert connection_capacity(20_000, 8, 512) == 8 * (20_000 - RESERVED)
    assert connection_capacity(200, 2, 32) == 2 * (200 - RESERVED)
    assert connection_capacity(None, 1, 512) is None
    assert connection_capacity(None, 4, 512) is None


@needs_prlimit
@pytest.mark.parametrize(("limits", "expected"), [("100:400", "400"), ("300:300", "300")])
def test_the_soft_limit_is_raised_to_the_hard_one(limits: str, expected: str) -> None:
    code = (
        "import resource; from agentspoonsd.descriptors import raise_soft_limit;"
        "print(raise_soft_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        ["prlimit", f"--nofile={limits}", sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == [expected, expected]


async def upgrade_status(port: int) -> tuple[int, socket.socket | None]:
    """The status of an upgrade to `port` (0: closed unanswered); the socket, still open, on
    101 (the caller holds the client), None otherwise."""
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.connect_ex(("127.0.0.1", port))
        with trio.fail_after(10):
            await trio.lowlevel.wait_writable(sock)
            sock.send(UPGRADE)
            head = b""
            while b"\r\n\r\n" not in head:
                await trio.lowlevel.wait_readable(sock)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError:
        head = b""
    status = int(head.split(b" ", 2)[1]) if head else 0
    if status == 101:
        return status, sock
    sock.close()
    return status, None


async def fill(port: int, attempts: int) -> tuple[list[socket.socket], dict[int, int]]:
    """`attempts` upgrades one after another; the clients let in, and a count of each status."""
    held: list[socket.socket] = []
    statuses: dict[int, int] = {}
    for _ in range(attempts):
        status, sock = await upgrade_status(port)
        statuses[status] = statuses.get(status, 0) + 1
        if sock is not None:
            held.append(sock)
    return held, statuses


HTTP_CAP = (
    '[health]\nhost = "127.0.0.1"\nport = 0\nmax_connections = 32\nmax_connections_per_ip = 32\n'
)


def capped_config(workers: int) -> str:
    text = config_text(auth_enabled=False, interval=0.5, symbols=("BTC/USD",))
    text = text.replace('[health]\nhost = "127.0.0.1"\nport = 0\n', HTTP_CAP)
    server = f"[server]\nworkers = {workers}\nmax_connections = 1000\n"
    return text.replace("[server]\n", server + "max_handshakes_per_ip = 1000\n", 1)


@needs_prlimit
@pytest.mark.parametrize(
    ("workers", "nofile", "capacity"),
    [(1, 300, 300 - RESERVED - 32), (2, 200, 2 * (200 - RESERVED))],
    ids=["one process", "two workers"],
)
async def test_a_full_daemon_answers_503_and_keeps_its_http_port(
    daemon_factory, workers: int, nofile: int, capacity: int
) -> None:
    """Under a descriptor limit below what `max_connections` asks, the daemon logs the cap at
    start, lets exactly that many clients in, answers the next ones 503 (not a connection left
    in the accept queue, as EMFILE would), and its probes and /metrics still answer."""
    daemon: DaemonProcess = daemon_factory(
        capped_config(workers), prefix=("prlimit", f"--nofile={nofile}:{nofile}")
    )
    ws_port, http_port = await daemon.ports()
    capped = await daemon.wait_for("max_connections_capped")
    assert capped["key"] == "server.max_connections"
    assert (capped["configured"], capped["capped"]) == (1000, capacity)
    assert capped["descriptor_limit"] == nofile
    assert (await daemon.wait_for("descriptor_limit"))["limit"] == nofile
    for index in range(workers if workers > 1 else 0):
        await daemon.wait_for("worker_ready", within=20.0, worker=index)
    held, statuses = await fill(ws_port, capacity + 20)
    try:
        assert statuses == {101: capacity, 503: 20}, statuses
        for path in ("/healthz", "/readyz", "/metrics"):
            status, _, body = await http_get(http_port, path)
            assert status == 200, (path, body[:200])
        # Workers report their counts once a second.
        expected = f"agentspoonsd_clients_connected {float(capacity)}"
        with trio.fail_after(5):
            while expected not in (await http_get(http_port, "/metrics"))[2].decode():  # noqa: ASYNC110
                await trio.sleep(0.1)  # another process's count: no event to wait on
    finally:
        for sock in held:
            sock.close()
    # Room again once clients leave.
    with trio.fail_after(10):
        while True:
            status, sock = await upgrade_status(ws_port)
            if sock is not None:
                sock.close()
                break
            await trio.sleep(0.1)
    assert status == 101
