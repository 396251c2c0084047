"""Session-wide checks shared by every test module."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio


def _processes_using(directory: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line names a path under `directory`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        command = " ".join(a.decode(errors="replace") for a in argv if a)
        if directory in command:
            found.append((int(entry.name), command))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every daemon, server and client a test starts is gone when the session ends.

    Tests start them with configs under the session's temporary directory, so a survivor names
    it. A survivor is killed (so it cannot disturb what runs next, a benchmark for one) and
    fails the session.
    """
    yield
    leaked = _processes_using(str(tmp_path_factory.getbasetemp()))
    for pid, _ in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"processes left running by the tests: {leaked}"


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`start(config, env=None, *, environ=None, prefix=())`: the real daemon as a subprocess;
    every daemon started is killed when the test ends.

    `config` is the config's text (written under the test's tmp_path) or the path of one already
    written. `env` is added to this process's environment; `environ`, when given, replaces it.
    `prefix`: a command that execs the daemon (e.g. ``prlimit --nofile=300:300``).
    """
    from daemon_process import DaemonProcess

    started: list[DaemonProcess] = []

    def start(
        config: str | Path,
        env: dict[str, str] | None = None,
        *,
        environ: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> DaemonProcess:
        if isinstance(config, str):
            path = tmp_path / f"agentspoonsd-{len(started)}.toml"
            path.write_text(config)
            config = path
        process = DaemonProcess(config, env, prefix)
        if environ is not None:
            process.env = {**environ, **(env or {})}
        started.append(process)  # before start: killed even if starting it fails half-way
        process.start()
        return process

    yield start
    for process in started:
        process.kill()


AsyncTest = Callable[..., Awaitable[Any]]


def _cancellation_is_a_failure(test: AsyncTest) -> AsyncTest:
    """`test`, failing if it ends by raising `trio.Cancelled`.

    pytest-trio runs a test inside a nursery whose scope it cancels on the way out, so a
    Cancelled that escapes the test is absorbed there and the test passes. One escapes, for
    instance, from trio-websocket's `open_websocket` when its reader task crashes: the test
    stops half-way and is reported as passed. (A test that pytest-trio cancels because a
    fixture crashed fails for that crash anyway.)
    """

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return await test(*args, **kwargs)
        except trio.Cancelled as exc:
            raise AssertionError("the test was cancelled before it finished") from exc

    return run


# Modules whose tests assert latencies, loop time, CPU time or memory of a daemon: `make test` runs
# them alone after the rest (which runs on two workers), so another test's load cannot move them.
SERIAL_MODULES = frozenset(
    {
        "test_deflate_bomb",
        "test_fuzz_flood",
        "test_http_hardening",
        "test_httpserver",
        "test_sdnotify",
        "test_ws_hardening",
    }
)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marker added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)
    for item in items:
        test = getattr(item, "obj", None)
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(test):
            item.obj = _cancellation_is_a_failure(test)
    # The tests of the frozen executable run last, so that its freeze (`_freeze_in_background`)
    # has had the whole suite to finish instead of holding the first of them up.
    items.sort(key=_needs_the_binary)


# --- the frozen executable, built while the other tests run ------------------------------------

ROOT = Path(__file__).resolve().parents[1]
_FREEZE = pytest.StashKey[tuple[subprocess.Popen[bytes], Any]]()
# Test workers (pytest -n) share one dist/: a freeze holds this lock, so a second one waits for
# it and then finds the executable up to date.
_FREEZE_LOCK = ("flock", str(ROOT / "build" / "work" / "freeze.lock"))


def _needs_the_binary(item: pytest.Item) -> bool:
    return "frozen_binary" in getattr(item, "fixturenames", ())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start `make binary` (PyInstaller, ~35 s of CPU on a fresh checkout) at the lowest CPU
    priority when a collected test needs the executable: it then uses the time the other tests
    spend waiting on sockets and processes, and `frozen_binary` only waits for what is left."""
    if not any(_needs_the_binary(item) for item in session.items):
        return
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return  # one freeze for the whole run; the other workers wait on its lock if they need it
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by pytest_sessionfinish)
    Path(_FREEZE_LOCK[1]).parent.mkdir(parents=True, exist_ok=True)
    freeze = subprocess.Popen(
        [*_FREEZE_LOCK, "nice", "-n", "19", "make", "-s", "binary"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped whole if the session ends first
    )
    session.config.stash[_FREEZE] = (freeze, log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    freeze, log = session.config.stash.get(_FREEZE, (None, None))
    if freeze is not None and freeze.poll() is None:  # the session ended before needing it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(freeze.pid, signal.SIGKILL)
        freeze.wait()
    if log is not None:
        log.close()


@pytest.fixture(scope="session")
def frozen_binary(request: pytest.FixtureRequest) -> Path:
    """dist/agentspoonsd, frozen if missing or older than its sources (make's decision): the
    background freeze is waited for, then make confirms it is up to date (a failed freeze runs
    again here, in the foreground, and fails the test with make's own message)."""
    started = time.monotonic()
    freeze, _ = request.config.stash.get(_FREEZE, (None, None))
    if freeze is not None:
        freeze.wait()
    Path(_FREEZE_LOCK[1]).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*_FREEZE_LOCK, "make", "-s", "binary"], cwd=ROOT, check=True)
    print(f"make binary: waited {time.monotonic() - started:.1f} s")
    binary = ROOT / "dist" / "agentspoonsd"
    assert os.access(binary, os.X_OK)
    return binary
