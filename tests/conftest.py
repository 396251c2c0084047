"""Session-wide checks shared by every test module."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        test = getattr(item, "obj", None)
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(test):
            item.obj = _cancellation_is_a_failure(test)
