"""sdnotify: the notification protocol against real AF_UNIX datagram sockets (path and abstract),
watchdog interval parsing, and the watchdog and status loops under Trio.

Cadence is checked on pytest-trio's `autojump_clock` (virtual time, real sockets); one test runs
on the real clock with a receiver thread, to show a blocked event loop stops the petting.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import CapturingLogger

from agentspoonsd import sdnotify
from agentspoonsd.metrics import Stats
from agentspoonsd.sdnotify import (
    Notifier,
    own_pids,
    ready_when,
    socket_address,
    status_loop,
    status_text,
    watchdog_loop,
    watchdog_timeout,
)


def parse(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket at a filesystem path, as systemd's notify socket is."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace; NOTIFY_SOCKET spells it `@name`."""
    name = f"agentspoonsd-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield "@" + name, sock


# --- addresses and the watchdog environment (pure) ---------------------------------------------


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert socket_address("@abstract/name") == b"\0abstract/name"
    for unusable in (None, "", "@", "relative/path", "vsock:2:1234"):
        assert socket_address(unusable) is None


def test_watchdog_timeout_parsing() -> None:
    me = str(os.getpid())
    assert watchdog_timeout({}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "10000000"}) == 10.0
    assert watchdog_timeout({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": me}) == 0.25
    for bad in ("0", "-5", "ten", "", "1.5"):
        assert watchdog_timeout({"WATCHDOG_USEC": bad}) is None
    # WATCHDOG_PID names another process (e.g. a child that inherited the environment): not us.
    other = str(os.getpid() + 1)
    assert watchdog_timeout({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": other}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}) is None
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}
    assert watchdog_timeout(env, pids=[4242]) == 1.0


def test_watchdog_pid_of_a_frozen_bootloader_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-file PyInstaller child accepts its bootloader parent's PID (systemd's main PID)."""
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getppid())}
    monkeypatch.delattr(sys, "frozen", raising=False)
    assert own_pids() == {os.getpid()}
    assert watchdog_timeout(env) is None
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert own_pids() == {os.getpid(), os.getppid()}
    assert watchdog_timeout(env) == 1.0


def test_from_environ_reads_socket_and_watchdog() -> None:
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "8000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.enabled and notifier.address == b"\0x"
    assert notifier.watchdog_timeout == 8.0 and notifier.watchdog_interval == 4.0
    bare = Notifier.from_environ({})
    assert not bare.enabled and bare.watchdog_interval is None
    assert bare.ready() is False  # outside systemd: a no-op


def test_unsupported_socket_is_logged_and_disabled() -> None:
    log = CapturingLogger()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:9999"}, log=log)
    assert not notifier.enabled and notifier.ready() is False
    assert [call.args[0] for call in log.calls] == ["sd_notify_unsupported_socket"]


def test_status_text() -> None:
    assert status_text(12, 1.0) == "12 clients, 1.0 updates/s"
    assert status_text(1, 0.25) == "1 client, 0.2 updates/s"


# --- datagrams on real sockets -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_every_notification_arrives_as_one_datagram(kind: str, request: Any) -> None:
    address, sock = request.getfixturevalue(kind)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready(status="serving") is True
    assert parse(sock.recv(4096)) == {"READY": "1", "STATUS": "serving"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading = parse(sock.recv(4096))
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    assert reloading["STATUS"] == "reloading configuration"

    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"
    assert notifier.status("3 clients, 1.5 updates/s") is True
    assert sock.recv(4096) == b"STATUS=3 clients, 1.5 updates/s"
    assert notifier.watchdog() is True
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping() is True
    assert parse(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "shutting down"}


def test_a_newline_cannot_inject_an_assignment(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    Notifier.from_environ({"NOTIFY_SOCKET": address}).status("ok\nREADY=1")
    assert sock.recv(4096) == b"STATUS=ok READY=1"


def test_failures_never_raise_and_are_logged_once(tmp_path: Path) -> None:
    log = CapturingLogger()
    path = str(tmp_path / "not-yet.sock")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path}, log=log)
    assert notifier.ready() is False  # nobody listens: ENOENT
    assert notifier.watchdog() is False
    assert [c.args[0] for c in log.calls] == ["sd_notify_failed"]
    assert log.calls[0].kwargs["failure"] == "ENOENT"

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert notifier.watchdog() is True  # systemd came back
        assert sock.recv(4096) == b"WATCHDOG=1"
    assert [c.args[0] for c in log.calls] == ["sd_notify_failed", "sd_notify_recovered"]


def test_a_full_receiver_queue_never_blocks(path_socket: tuple[str, socket.socket]) -> None:
    """Nobody reads the socket: sends start failing (EAGAIN) instead of blocking the caller."""
    address, _unread = path_socket
    log = CapturingLogger()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address}, log=log)
    started = time.monotonic()
    sent = 0
    while sent < 100_000:  # the kernel queue holds far fewer (net.unix.max_dgram_qlen)
        if not notifier.watchdog():
            break
        sent += 1
    assert sent < 100_000 and time.monotonic() - started < 5
    assert log.calls[-1].kwargs["failure"] == "EAGAIN"


# --- the loops under Trio -----------------------------------------------------------------------


async def receive_for(sock: trio.socket.SocketType, seconds: float) -> list[tuple[float, bytes]]:
    """Datagrams received within `seconds` of trio time, each with its arrival time."""
    got: list[tuple[float, bytes]] = []
    with trio.move_on_after(seconds):
        while True:
            data = await sock.recv(4096)
            got.append((trio.current_time(), data))
    return got


@pytest.fixture
async def trio_receiver(tmp_path: Path) -> AsyncIterator[tuple[str, trio.socket.SocketType]]:
    path = str(tmp_path / "notify.sock")
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    plain.bind(path)
    with trio.socket.from_stdlib_socket(plain) as sock:
        yield path, sock


async def test_watchdog_loop_pets_at_half_the_timeout_and_stops_when_cancelled(
    autojump_clock: trio.abc.Clock, trio_receiver: tuple[str, trio.socket.SocketType]
) -> None:
    address, sock = trio_receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000"})
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(watchdog_loop, notifier)
        got = await receive_for(sock, 22.0)
        nursery.cancel_scope.cancel()
    assert {data for _, data in got} == {b"WATCHDOG=1"}
    assert [round(t - start, 6) for t, _ in got] == [0.0, 5.0, 10.0, 15.0, 20.0]
    # Cancelled: nothing more arrives.
    assert await receive_for(sock, 30.0) == []


async def test_watchdog_loop_counts_a_late_pet_as_a_near_miss(
    autojump_clock: trio.testing.MockClock, trio_receiver: tuple[str, trio.socket.SocketType]
) -> None:
    """WatchdogSec=10 s: pets every 5 s. The loop stuck from 3 s to 8 s sends the pet due at 5 s
    at 8 s: an 8 s gap, past 0.75 × 10 s, is a near miss (counted and logged); cadence resumes."""
    address, sock = trio_receiver
    log = CapturingLogger()
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000"}
    notifier = Notifier.from_environ(env, log=log)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(watchdog_loop, notifier)
        assert await sock.recv(64) == b"WATCHDOG=1"  # the first pet, at once
        await trio.sleep(3.0)
        autojump_clock.jump(5.0)  # five seconds pass without a checkpoint: a wedged event loop
        got = await receive_for(sock, 8.5)
        nursery.cancel_scope.cancel()
    assert [round(t - start, 6) for t, _ in got] == [8.0, 10.0, 15.0]
    assert notifier.pets.pets == 4 and notifier.pets.near_misses == 1
    assert notifier.pets.longest_gap == pytest.approx(8.0)
    near = [call for call in log.calls if call.args[0] == "watchdog_near_miss"]
    assert len(near) == 1 and near[0].kwargs == {"gap_s": 8.0, "timeout_s": 10.0}


async def test_watchdog_loop_without_watchdog_sleeps_until_cancelled(
    autojump_clock: trio.abc.Clock, trio_receiver: tuple[str, trio.socket.SocketType]
) -> None:
    address, sock = trio_receiver
    for env in ({"NOTIFY_SOCKET": address}, {"WATCHDOG_USEC": "1000000"}):
        notifier = Notifier.from_environ(env)
        with trio.move_on_after(3600) as scope:
            await watchdog_loop(notifier)
        assert scope.cancelled_caught  # it never returned by itself
    assert await receive_for(sock, 1.0) == []


async def test_watchdog_loop_on_the_real_clock_stops_while_the_loop_is_blocked(
    path_socket: tuple[str, socket.socket],
) -> None:
    """WATCHDOG_USEC = 0.2 s: pets every 0.1 s; a 0.6 s blocking call leaves a gap as long,
    then petting resumes at its cadence without a burst of catch-up datagrams."""
    address, sock = path_socket
    arrivals: list[float] = []

    def receive() -> None:
        sock.settimeout(0.8)  # longer than the wedge below
        try:
            while sock.recv(64) == b"WATCHDOG=1":
                arrivals.append(time.monotonic())
        except TimeoutError:
            pass

    reader = threading.Thread(target=receive)
    reader.start()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    async with trio.open_nursery() as nursery:
        await nursery.start(watchdog_loop, notifier)
        await trio.sleep(0.35)
        wedged_at = time.monotonic()
        time.sleep(0.6)  # the event loop is stuck: no task runs  # noqa: ASYNC251
        await trio.sleep(0.35)
        nursery.cancel_scope.cancel()
    reader.join()
    before = [t for t in arrivals if t < wedged_at]
    after = [t for t in arrivals if t >= wedged_at]
    assert len(before) >= 3 and len(after) >= 3
    assert after[0] - before[-1] >= 0.55  # the wedge: no pet for its whole length
    assert len(after) <= 6  # 0.35 s at 0.1 s: no catch-up burst
    gaps = [b - a for a, b in itertools.pairwise(before)]
    assert all(0.05 < gap < 0.3 for gap in gaps)


async def test_status_loop_reports_clients_and_update_rate(
    autojump_clock: trio.abc.Clock, trio_receiver: tuple[str, trio.socket.SocketType]
) -> None:
    address, sock = trio_receiver
    stats = Stats()
    stats.clients_connected = 3

    async def publish_twice_a_second() -> None:
        await trio.sleep(0.25)  # off the status ticks: no tie on the virtual clock
        while True:
            stats.updates_published += 1
            await trio.sleep(0.5)

    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_twice_a_second)
        await nursery.start(status_loop, notifier, stats, 5.0)
        got = await receive_for(sock, 10.5)
        nursery.cancel_scope.cancel()
    assert [data for _, data in got] == [b"STATUS=3 clients, 2.0 updates/s"] * 2


async def test_ready_when_waits_for_the_condition_then_sends_ready_once(
    autojump_clock: trio.abc.Clock, trio_receiver: tuple[str, trio.socket.SocketType]
) -> None:
    address, sock = trio_receiver
    first_update: list[float] = []

    async def publish_later() -> None:
        await trio.sleep(1.23)
        first_update.append(trio.current_time())

    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_later)
        start = trio.current_time()
        await ready_when(notifier, lambda: bool(first_update), status="serving 2 symbols")
        assert 1.23 <= trio.current_time() - start <= 1.23 + 0.05
    got = await receive_for(sock, 5.0)
    assert [parse(data) for _, data in got] == [{"READY": "1", "STATUS": "serving 2 symbols"}]


async def test_status_loop_outside_systemd_only_sleeps(autojump_clock: trio.abc.Clock) -> None:
    with trio.move_on_after(3600) as scope:
        await status_loop(Notifier.from_environ({}), Stats())
    assert scope.cancelled_caught


def test_module_has_no_dependency_beyond_the_standard_library_and_trio() -> None:
    imported = {
        name.split(".")[0]
        for name in sdnotify.__dict__
        if isinstance(sdnotify.__dict__[name], type(os))
    }
    assert imported <= {"errno", "os", "socket", "sys", "time", "trio"}
