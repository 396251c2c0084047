"""The example outputs in README.md and docs/PROTOCOL.md are what the real commands and the real
daemon produce: each is checked here against a run, so the docs cannot drift from the software."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from daemon_process import DaemonProcess, config_text

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"


def clean_environ(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AGENTSPOONSD_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def agentspoonsd_on_path(tmp_path: Path) -> Path:
    """A bin directory whose `agentspoonsd` is this interpreter's package (the docs' command)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "agentspoonsd"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m agentspoonsd "$@"\n')
    script.chmod(0o755)
    return bin_dir


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def console_sessions(text: str) -> list[tuple[str, str]]:
    """(command, expected output) for every `$ command` of every ```console block."""
    sessions = []
    for block in fenced_blocks(text, "console"):
        for chunk in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, _, output = chunk.partition("\n")
            sessions.append((command, output))
    return sessions


def test_readme_update_example_is_what_simulate_prints(tmp_path: Path) -> None:
    bin_dir = agentspoonsd_on_path(tmp_path)
    command = "agentspoonsd simulate --steps 1 --seed 42"
    text = README.read_text(encoding="utf-8")
    assert f"`{command}`" in text
    examples = [json.loads(b) for b in fenced_blocks(text, "json") if "volatility_update" in b]
    assert len(examples) == 1
    result = subprocess.run(
        ["sh", "-c", command],
        cwd=tmp_path,  # no ./agentspoonsd.toml: the defaults, as the shipped file
        env=clean_environ(bin_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert examples[0]["data"] == data  # every digit, not an approximation
    # PROTOCOL.md shows an excerpt ("…" for what it leaves out): its numbers are the same bar's.
    protocol = PROTOCOL.read_text(encoding="utf-8")
    assert f"`{command}`" in protocol
    (excerpt,) = [b for b in fenced_blocks(protocol, "json") if "volatility_update" in b]
    numbers = dict(re.findall(r'"(\w+)": (-?\d[\d.e+-]*)', excerpt))
    numbers.pop("seq")  # the daemon's, from its start time; simulate's is 1
    assert len(numbers) >= 8
    assert {key: float(value) for key, value in numbers.items()} == {k: data[k] for k in numbers}


def test_readme_console_examples_are_what_the_commands_print(tmp_path: Path) -> None:
    sessions = console_sessions(README.read_text(encoding="utf-8"))
    assert len(sessions) >= 3
    bin_dir = agentspoonsd_on_path(tmp_path)
    for command, expected in sessions:
        result = subprocess.run(
            ["sh", "-c", command + " 2>&1"],
            cwd=tmp_path,
            env=clean_environ(bin_dir),
            stdout=subprocess.PIPE,
            text=True,
            timeout=60,
        )
        assert result.stdout == expected, command


def test_config_error_example_is_one_line_per_problem_with_exit_78(tmp_path: Path) -> None:
    """The README's invalid config example ends the command with the documented status."""
    text = README.read_text(encoding="utf-8")
    commands = [command for command, _ in console_sessions(text)]
    check = next(c for c in commands if c.startswith("agentspoonsd check-config --config"))
    setup = [c for c in commands[: commands.index(check)] if c.startswith("printf")]
    bin_dir = agentspoonsd_on_path(tmp_path)
    result = subprocess.run(
        ["sh", "-c", "; ".join([*setup, check])],
        cwd=tmp_path,
        env=clean_environ(bin_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    assert "exit 78" in text


def documented_status(path: Path, what: str) -> set[int]:
    """The statuses a doc gives for `what`, written as `NNN with ... (what`."""
    text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))
    return {
        int(code) for code in re.findall(rf"(\d{{3}})(?: with [^(]*)? \({re.escape(what)}", text)
    }


async def test_a_plain_http_request_to_the_websocket_port_gets_the_documented_answer(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(config_text(interval=1.0))
    ws_port, _ = await daemon.ports()

    def get() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ws_port}/", timeout=10) as r:
                return r.status, r.headers
        except urllib.error.HTTPError as err:
            return err.code, err.headers

    status, headers = await trio.to_thread.run_sync(get)
    assert status == 426
    assert headers["Upgrade"].lower() == "websocket"
    for doc in (README, PROTOCOL):
        assert documented_status(doc, "a plain HTTP request") == {status}, doc.name
