"""Session-wide checks shared by every test module."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest


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
