"""`agentspoonsd watch` and `probe` as subprocesses against the real daemon subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from agentspoonsd.tools import HEADER, table_line
from daemon_process import DaemonProcess, config_text, new_token
from helpers import free_port

Factory = Callable[..., DaemonProcess]


# daemon_factory: conftest.py


def tool_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agentspoonsd.tools", *args]


async def run_tool(*args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AGENTSPOONSD_TOKEN"}
    if token is not None:
        env["AGENTSPOONSD_TOKEN"] = token
    with trio.fail_after(15):
        done = await trio.run_process(
            tool_argv(*args), env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def test_table_line_formats_and_tolerates_nulls() -> None:
    data = {
        "symbol": "BTC/USD",
        "seq": 1764094877252614,
        "timestamp": "2026-11-25T18:21:17.252700Z",
        "price": 49974.75,
        "volatility": 0.0010454,
        "estimators_annualized": {"close_to_close": 0.7579},
        "garch_forecast": {"status": "ok", "volatility_1": 0.00087},
    }
    line = table_line(data)
    assert line.split() == [
        "BTC/USD",
        "1764094877252614",
        "18:21:17.252",
        "49,974.75",
        "0.0010454",
        "75.79%",
        "0.00087000",
    ]
    assert len(line) == len(HEADER)
    sparse = table_line({"symbol": "X", "seq": 1, "volatility": None, "garch_forecast": {}})
    assert sparse.split()[-4:] == ["-", "-", "-", "-"]
    pending = {**data, "garch_forecast": {"status": "pending", "volatility_1": None}}
    assert table_line(pending).split()[-1] == "pending"


async def test_watch_json_and_table(daemon_factory: Factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{port}/"

    as_json, as_table, refused = await run_tools(
        (("watch", url, "--json", "--count", "6"), token),
        (("watch", "--symbol", "ETH/USD", url, "--count", "3", "--token", token), None),
        (("watch", url, "--count", "1"), new_token()),
    )
    code, out, err = as_json
    assert code == 0, err
    updates = [json.loads(line) for line in out.splitlines()]
    assert len(updates) == 6 and {u["symbol"] for u in updates} == {"BTC/USD", "ETH/USD"}
    for symbol in ("BTC/USD", "ETH/USD"):
        seqs = [u["seq"] for u in updates if u["symbol"] == symbol]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert "connected to" in err

    code, out, err = as_table
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header == HEADER and len(rows) == 3
    assert all(row.split()[0] == "ETH/USD" and row.split()[5].endswith("%") for row in rows)

    code, out, err = refused
    assert code == 77 and out == "" and "401" in err


async def test_watch_stops_cleanly_on_sigint(daemon_factory: Factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    port, _ = await daemon.ports()
    env = {**os.environ, "AGENTSPOONSD_TOKEN": token}
    with trio.fail_after(15):
        process = await trio.lowlevel.open_process(
            tool_argv("watch", f"ws://127.0.0.1:{port}/", "--json"),
            env=env,
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        received = b""
        while received.count(b"\n") < 3:
            received += await process.stdout.receive_some()
        process.send_signal(signal.SIGINT)
        assert await process.wait() == 0
        await process.stdout.aclose()
    assert (await daemon.wait_for("client_disconnected"))["reason"] == "close_1000"


async def run_tools(*calls: tuple[tuple[str, ...], str | None]) -> list[tuple[int, str, str]]:
    """`run_tool(*args, token=token)` for each `(args, token)`, all at once (they are separate
    processes waiting on the network): the results in the order of the calls."""
    results: list[tuple[int, str, str]] = [(-1, "", "")] * len(calls)

    async def one(index: int, args: tuple[str, ...], token: str | None) -> None:
        results[index] = await run_tool(*args, token=token)

    async with trio.open_nursery() as nursery:
        for index, (args, token) in enumerate(calls):
            nursery.start_soon(one, index, args, token)
    return results


async def test_probe_exit_statuses(daemon_factory: Factory) -> None:
    token = new_token()
    fast = daemon_factory(config_text(tokens={"t": token}, interval=0.05))
    slow = daemon_factory(config_text(tokens={"t": token}, interval=60.0))
    fast_port, _ = await fast.ports()
    slow_port, _ = await slow.ports()
    refused = f"ws://127.0.0.1:{free_port()}/"
    # A listener that never answers the handshake.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    silent_port = listeners[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async def hold() -> None:
        while True:
            held.append(await listeners[0].accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        ok, no_listener, wrong_token, no_update, silent, not_ws = await run_tools(
            (("probe", f"ws://127.0.0.1:{fast_port}/"), token),
            (("probe", refused, "--timeout", "3"), token),
            (("probe", f"ws://127.0.0.1:{fast_port}/", "--token", "wrong"), None),
            # Connected, but no update within the timeout (the slow daemon ticks once a minute);
            # 2 s: a connection slower than the timeout on a loaded machine would say
            # "waiting for connecting" instead. The other probes run meanwhile.
            (("probe", f"ws://127.0.0.1:{slow_port}/", "--timeout", "2"), token),
            (("probe", f"ws://127.0.0.1:{silent_port}/", "--timeout", "0.5"), token),
            (("probe", "http://127.0.0.1/"), token),
        )
        nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()
    await listeners[0].aclose()

    code, out, err = ok
    assert code == 0, err
    words = dict(word.split("=") for word in out.split()[2:])
    assert out.startswith("ok ") and out.split()[1] in ("BTC/USD", "ETH/USD")
    assert int(words["seq"]) > 0 and 0 <= float(words["latency_ms"]) < 5000
    code, out, err = no_listener
    assert (code, out) == (69, "") and err == f"probe: connection refused: {refused}\n"
    code, _, err = wrong_token
    assert code == 77 and "refused the token (401)" in err and err.count("\n") == 1
    code, _, err = no_update
    assert code == 75 and "waiting for an update" in err
    code, _, err = silent
    assert code == 75 and "timed out" in err
    code, _, err = not_ws
    assert code == 64 and "ws://" in err


async def test_probe_over_wss_with_cafile(daemon_factory: Factory, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    token = new_token()
    tls = f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    text = config_text(tokens={"t": token}, interval=0.05).replace("[server]\n", tls, 1)
    daemon = daemon_factory(text)
    port, _ = await daemon.ports()
    url = f"wss://127.0.0.1:{port}/"

    trusted, untrusted = await run_tools(
        (("probe", url, "--cafile", str(ca_file)), token), (("probe", url, "--timeout", "3"), token)
    )
    code, out, err = trusted
    assert code == 0 and out.startswith("ok "), err
    code, _, err = untrusted
    assert code == 69 and "CERTIFICATE_VERIFY_FAILED" in err, err  # not trusted by the system
