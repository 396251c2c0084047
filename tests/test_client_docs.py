"""docs/CLIENT.md's examples, each run as a script against a real daemon: asyncio, Trio, a
plain script, a notebook-style call (an asyncio loop already running), and the original
system's consumer example with only its import line changed, under asyncio.run and trio.run
(across a daemon restart too, its seqs read through a wrapper around the unchanged code)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from daemon_process import DaemonProcess, config_text, new_token

DOC = Path(__file__).resolve().parents[1] / "docs" / "CLIENT.md"
UPDATE = re.compile(r"^(\S+/\S+) (\d+) ")


def examples() -> dict[str, str]:
    """Every ``<!-- example: NAME -->`` python block of docs/CLIENT.md, by name."""
    found = re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)\n```", DOC.read_text(), re.S)
    return dict(found)


def notebook_cell(code: str) -> str:
    """`code` run the way a Jupyter cell runs it: while an asyncio loop runs in the thread."""
    return (
        "import asyncio\n\n"
        f"CELL = {code!r}\n\n"
        "async def kernel() -> None:\n"
        "    asyncio.get_running_loop()  # the cell runs inside the kernel's loop\n"
        "    exec(compile(CELL, '<cell>', 'exec'), {'__name__': '__main__'})\n\n"
        "asyncio.run(kernel())\n"
    )


def watched(code: str) -> str:
    """`code` run unchanged, with `WebSocketDashboardClient.listen` wrapped so that every
    message its callback gets is checked for the original shape and printed as ``SYMBOL SEQ``
    first (the original example prints the volatility alone, so its seqs could not be seen)."""
    return (
        "import inspect\n"
        "from agentspoonsd.client import WebSocketDashboardClient\n\n"
        "listen = WebSocketDashboardClient.listen\n\n\n"
        "async def watched_listen(self, callback=None):\n"
        "    async def watch(message):\n"
        "        assert set(message) == {'type', 'data', 'timestamp'}, message\n"
        "        assert message['type'] == 'volatility_update', message\n"
        "        assert isinstance(message['timestamp'], str), message\n"
        "        print(message['data']['symbol'], message['data']['seq'], 'seen', flush=True)\n"
        "        result = callback(message)\n"
        "        if inspect.isawaitable(result):\n"
        "            await result\n\n"
        "    await listen(self, watch)\n\n\n"
        "WebSocketDashboardClient.listen = watched_listen\n"
        f"exec(compile({code!r}, '<example>', 'exec'), {{'__name__': '__main__'}})\n"
    )


def scripts() -> dict[str, str]:
    found = examples()
    original = found["original"]
    assert "import asyncio\n" in original and "asyncio.run(consume_data())" in original
    under_trio = original.replace("import asyncio\n", "import trio\n").replace(
        "asyncio.run(consume_data())", "trio.run(consume_data)"
    )
    return {
        **found,
        "notebook": notebook_cell(found["sync"]),
        # The original example, the same code under trio.run.
        "original-under-trio": under_trio,
        # Both, their seqs seen from outside the unchanged code.
        "original-watched": watched(original),
        "original-under-trio-watched": watched(under_trio),
    }


class Script:
    """A consumer script in a subprocess; its stdout read line by line."""

    def __init__(self, code: str, path: Path, env: dict[str, str]) -> None:
        path.write_text(code)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # The examples print without flush, as users do: unbuffered, so that each line
            # arrives when printed, not when a pipe's block buffer fills (seconds later).
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def updates(self) -> list[tuple[str, int]]:
        return [(m[1], int(m[2])) for line in self.lines if (m := UPDATE.match(line))]

    def wait(self, until: Callable[[], bool], within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while not until():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("\n".join(self.lines[-30:]))
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def run_script(tmp_path: Path) -> Iterator[Callable[[str, dict[str, str]], Script]]:
    started: list[Script] = []

    def start(name: str, env: dict[str, str]) -> Script:
        script = Script(scripts()[name], tmp_path / f"example_{name.replace('-', '_')}.py", env)
        started.append(script)
        return script

    yield start
    for script in started:
        script.stop()


@pytest.fixture
def daemons(daemon_factory: Callable[..., DaemonProcess]) -> Callable[..., DaemonProcess]:
    return daemon_factory  # conftest.py


def consecutive(updates: list[tuple[str, int]]) -> dict[str, list[int]]:
    by_symbol: dict[str, list[int]] = {}
    for symbol, seq in updates:
        by_symbol.setdefault(symbol, []).append(seq)
    for symbol, seqs in by_symbol.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (symbol, seqs)
    return by_symbol


def test_every_example_is_tested() -> None:
    assert set(examples()) == {"asyncio", "trio", "sync", "original", "original-trio"}


@pytest.mark.parametrize("name", ["original", "original-under-trio"])
def test_the_original_consumer_example_with_its_import_changed(
    name: str,
    daemons: Callable[..., DaemonProcess],
    run_script: Callable[[str, dict[str, str]], Script],
) -> None:
    token = new_token()
    daemon = daemons(config_text(tokens={"t": token}, interval=0.05))
    port, _ = anyio.run(daemon.ports)
    script = run_script(
        name, {"AGENTSPOONSD_URL": f"ws://127.0.0.1:{port}", "AGENTSPOONSD_TOKEN": token}
    )
    volatility = re.compile(r"^Volatility: \d")
    script.wait(lambda: sum(1 for line in script.lines if volatility.match(line)) >= 3)


@pytest.mark.parametrize(
    "name",
    [
        "asyncio",
        "trio",
        "sync",
        "notebook",
        "original-trio",
        "original-watched",
        "original-under-trio-watched",
    ],
)
def test_each_consumer_across_a_daemon_restart_without_gap_or_duplicate(
    name: str,
    daemons: Callable[..., DaemonProcess],
    run_script: Callable[[str, dict[str, str]], Script],
    tmp_path: Path,
) -> None:
    """kill -9 and a restart with `[history] persist`: the script's stream goes on with no gap
    and no duplicate seq (the client resumes, the new daemon replays what was missed)."""
    token = new_token()
    history = f'\n[history]\npersist = true\ndir = "{tmp_path}/h"\n'
    text = config_text(tokens={"t": token}, interval=0.05, extra=history)
    daemon = daemons(text)
    port, _ = anyio.run(daemon.ports)
    url = f"ws://127.0.0.1:{port}/"
    script = run_script(name, {"AGENTSPOONSD_URL": url, "AGENTSPOONSD_TOKEN": token})
    script.wait(lambda: len(script.updates()) >= 6)  # >= 3 updates per symbol, about
    daemon.signal(signal.SIGKILL)
    assert anyio.run(daemon.wait_exit) == -signal.SIGKILL
    before = len(script.updates())
    second = daemons(text, env={"AGENTSPOONSD_SERVER__PORT": str(port)})
    anyio.run(second.ports)
    script.wait(lambda: len(script.updates()) >= before + 30)
    anyio.run(second.wait_for, "client_connected")
    by_symbol = consecutive(script.updates())
    assert set(by_symbol) == {"BTC/USD", "ETH/USD"}
    if name.endswith("-watched"):  # the example's own output went on too
        printed = sum(line.startswith("Volatility: ") for line in script.lines)
        assert printed >= len(script.updates()) - 1  # the last one may be on its way
    if name == "original-trio":
        assert any("'type': 'pong'" in line for line in script.lines)
        assert any("unknown_type" in line for line in script.lines)
        assert any(line.startswith("local history: ") for line in script.lines)
