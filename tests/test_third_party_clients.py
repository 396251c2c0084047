"""Clients the project did not write, against a real daemon: the `websockets` package, and the
documentation's examples (docs/examples/client.js under Node.js with `ws`, docs/examples/client.py
with `websockets`) run as their README line says and judged by what they print."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

from daemon_process import DaemonProcess, config_text, new_token

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
SYMBOLS = ("BTC/USD", "ETH/USD")
TOKEN_NAME = "third-party"


@dataclass
class Live:
    port: int
    token: str

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    token = new_token()
    path = tmp_path_factory.mktemp("clients") / "agentspoonsd.toml"
    path.write_text(config_text(tokens={TOKEN_NAME: token}, interval=0.1, symbols=SYMBOLS))
    daemon = DaemonProcess(path)
    daemon.start()
    try:
        deadline = time.monotonic() + 20
        port = None
        while port is None and time.monotonic() < deadline:
            for event in list(daemon.events):
                if event.get("event") == "listener_bound" and event.get("service") == "websocket":
                    port = int(event["address"].rsplit(":", 1)[1])
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_text
            time.sleep(0.02)
        assert port is not None, "the daemon did not start:\n" + daemon.log_text
        live = Live(port, token)
        # Every symbol has published (the examples' history requests find something).
        headers = {"Authorization": f"Bearer {token}"}
        with sync_connect(live.url, additional_headers=headers, open_timeout=10) as ws:
            published: set[str] = set()
            while published != set(SYMBOLS):
                message = json.loads(ws.recv(timeout=10))
                if message["type"] == "volatility_update":
                    published.add(message["data"]["symbol"])
        yield live
    finally:
        daemon.kill()


def _consecutive(seqs: list[int]) -> bool:
    return bool(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))


# --- the `websockets` package ------------------------------------------------------------------


async def _websockets_session(url: str, token: str) -> dict[str, Any]:
    """Connect with a bearer token, take a few updates, ask for history (asyncio, as most
    `websockets` users write it)."""
    async with asyncio.timeout(15):
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(url, additional_headers=headers) as ws:
            connected = json.loads(await ws.recv())
            updates = []
            while len(updates) < 6:
                message = json.loads(await ws.recv())
                assert message["type"] == "volatility_update", message
                updates.append(message["data"])
            await ws.send(json.dumps({"type": "history", "symbol": "BTC/USD", "limit": 3}))
            while (reply := json.loads(await ws.recv()))["type"] == "volatility_update":
                updates.append(reply["data"])
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        return {"connected": connected, "updates": updates, "reply": reply, "ext": extensions}


async def _websockets_refused(url: str, token: str) -> tuple[int, str]:
    async with asyncio.timeout(10):
        try:
            async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}):
                pass
        except InvalidStatus as exc:
            return exc.response.status_code, exc.response.headers.get("WWW-Authenticate", "")
    raise AssertionError("a wrong token was accepted")


async def _websockets_query_token(url: str) -> dict[str, Any]:
    async with asyncio.timeout(10), connect(url, compression=None) as ws:
        return json.loads(await ws.recv())


async def test_websockets_package_bearer_updates_and_history(live: Live) -> None:
    result = await trio.to_thread.run_sync(asyncio.run, _websockets_session(live.url, live.token))
    connected, updates, reply = result["connected"], result["updates"], result["reply"]
    assert connected["type"] == "connected" and connected["token"] == TOKEN_NAME
    assert connected["symbols"] == list(SYMBOLS)
    for symbol in SYMBOLS:
        seqs = [u["seq"] for u in updates if u["symbol"] == symbol]
        assert _consecutive(seqs), (symbol, seqs)

    assert reply["type"] == "history" and reply["symbol"] == "BTC/USD", reply
    history = [u["seq"] for u in reply["updates"]]
    assert len(history) == 3 and _consecutive(history)
    seen_btc = [u["seq"] for u in updates if u["symbol"] == "BTC/USD"]
    assert history[-1] >= seen_btc[-1]  # the newest, oldest first
    assert set(reply["updates"][-1]) >= {"seq", "close", "estimators", "garch_forecast"}
    # `websockets` offers permessage-deflate by default; the daemon takes it (PROTOCOL.md
    # "Compression"), and the updates above were inflated by a third-party implementation.
    assert "permessage-deflate" in result["ext"] and "server_no_context_takeover" in result["ext"]


async def test_websockets_package_refused_and_query_token(live: Live) -> None:
    status, challenge = await trio.to_thread.run_sync(
        asyncio.run, _websockets_refused(live.url, new_token())
    )
    assert status == 401 and challenge.startswith("Bearer")
    connected = await trio.to_thread.run_sync(
        asyncio.run, _websockets_query_token(f"{live.url}?access_token={live.token}")
    )
    assert connected["type"] == "connected" and connected["token"] == TOKEN_NAME


# --- the documentation's examples -------------------------------------------------------------

UPDATE_LINE = re.compile(
    r"update (?P<symbol>\S+) seq=(?P<seq>\d+) close=\d+\.\d{2} volatility=(\d\.\d{6}|-)"
    r" garch=(disabled|pending|ok|nonstationary|failed)"
)
HISTORY_LINE = re.compile(
    r"history (?P<symbol>\S+): (?P<n>\d+) updates, seq (?P<a>\d+)\.\.(?P<b>\d+)"
)


def _check_example_output(stdout: str, symbols: tuple[str, ...], count: int) -> None:
    lines = stdout.splitlines()
    assert lines and lines[0] == f"connected: token={TOKEN_NAME} symbols={','.join(symbols)}", (
        stdout
    )
    histories = [m for line in lines if (m := HISTORY_LINE.fullmatch(line))]
    assert len(histories) == 1, stdout  # the reply to the example's one request
    history = histories[0]
    assert history["symbol"] == symbols[0]
    assert 1 <= int(history["n"]) <= 5
    assert int(history["b"]) - int(history["a"]) + 1 == int(history["n"])

    updates = [line for line in lines if line.startswith("update ")]
    assert len(updates) == count, stdout
    seqs: dict[str, list[int]] = {}
    for line in updates:
        match = UPDATE_LINE.fullmatch(line)
        assert match is not None, line
        seqs.setdefault(match["symbol"], []).append(int(match["seq"]))
    assert set(seqs) <= set(symbols) and all(_consecutive(s) for s in seqs.values()), seqs
    assert not [line for line in lines if line.startswith("gap ")], stdout
    assert len(lines) == 1 + 1 + count, stdout  # nothing else


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A node_modules folder holding `ws` for docs/examples/client.js: bench's when `make bench`
    installed it, else a fresh `npm install` of docs/examples/package.json in a temporary folder."""
    if shutil.which("node") is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js (node) is required to test docs/examples/client.js")
        pytest.skip("Node.js is not installed")
    for candidate in (EXAMPLES / "node_modules", ROOT / "bench" / "node_modules"):
        if (candidate / "ws" / "package.json").exists():
            return str(candidate)
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed to install `ws` for docs/examples/client.js"
    target = tmp_path_factory.mktemp("node")
    shutil.copy(EXAMPLES / "package.json", target / "package.json")
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error"],
        cwd=target,
        check=True,
        timeout=180,
        capture_output=True,
    )
    assert (target / "node_modules" / "ws" / "package.json").exists()
    return str(target / "node_modules")


async def _run_example(command: list[str], live: Live, env: dict[str, str]) -> str:
    with trio.fail_after(20):
        result = await trio.run_process(
            command,
            env={**os.environ, **env, "AGENTSPOONSD_TOKEN": live.token},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"exit {result.returncode}\n{stdout}\n{stderr}"
    assert not stderr, stderr  # no `error` message from the daemon, no warning
    return stdout


SELECTIONS = [pytest.param((), id="default"), pytest.param(("ETH/USD",), id="symbol")]


@pytest.mark.parametrize("selected", SELECTIONS)
async def test_js_example_runs_under_node(
    live: Live, node_modules: str, selected: tuple[str, ...]
) -> None:
    args = [a for symbol in selected for a in ("--symbol", symbol)]
    command = ["node", str(EXAMPLES / "client.js"), live.url, *args, "--count", "6"]
    stdout = await _run_example(command, live, {"NODE_PATH": node_modules})
    _check_example_output(stdout, selected or SYMBOLS, 6)


@pytest.mark.parametrize("selected", SELECTIONS)
async def test_python_example_runs(live: Live, selected: tuple[str, ...]) -> None:
    args = [a for symbol in selected for a in ("--symbol", symbol)]
    command = [sys.executable, str(EXAMPLES / "client.py"), live.url, *args, "--count", "6"]
    stdout = await _run_example(command, live, {})
    _check_example_output(stdout, selected or SYMBOLS, 6)


async def test_examples_need_a_token(live: Live, node_modules: str) -> None:
    """Without AGENTSPOONSD_TOKEN the examples say so and exit non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "AGENTSPOONSD_TOKEN"}
    for command in (
        ["node", str(EXAMPLES / "client.js"), live.url],
        [sys.executable, str(EXAMPLES / "client.py"), live.url],
    ):
        with trio.fail_after(10):
            result = await trio.run_process(
                command, env={**env, "NODE_PATH": node_modules}, capture_stderr=True, check=False
            )
        assert result.returncode != 0 and b"AGENTSPOONSD_TOKEN" in result.stderr, command
