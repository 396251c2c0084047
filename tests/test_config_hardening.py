"""Bad config and tokens files at start, in check-config and on SIGHUP.

Every class of bad file is a one-line config error naming the file (and the key that named it),
exit 78 at start and in `check-config`, `config_reload_rejected` on SIGHUP with the old settings
kept and the clients still served; never a traceback, never a blocked event loop.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from agentspoonsd import reloader
from agentspoonsd.auth import hash_token
from agentspoonsd.daemon import Daemon
from agentspoonsd.logs import configure_logging
from agentspoonsd.settings import EXIT_CONFIG, ConfigError, load_settings
from agentspoonsd.tomlfile import (
    MAX_CONFIG_BYTES,
    MAX_KEY_PARTS,
    MAX_TOKENS_FILE_BYTES,
    FileRefused,
    parse_toml,
    read_bounded,
)
from daemon_process import DaemonProcess, config_text, new_token
from helpers import bearer

AS_ROOT = os.geteuid() == 0
# 4,000 parts: refused by the key check; tomllib alone would take ~65 MB for it (and tens of GB
# for 100,000), so the old code stays safe to run these tests against.
DOTTED = b".".join([b"a"] * 4000)


def entry(name: str, token: str) -> str:
    return f'[[tokens]]\nname = "{name}"\nsha256 = "{hash_token(token)}"\nsymbols = ["*"]\n'


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    if path.is_dir():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)
    make(path)


def _bytes(data: Callable[[bytes], bytes]) -> Callable[[Path, bytes], None]:
    return lambda path, good: _replace(path, lambda p: p.write_bytes(data(good)))


# Each class of bad file: how to turn the good file at a path into one, and words of the reason.
BAD_FILES: dict[str, tuple[Callable[[Path, bytes], None], str]] = {
    "invalid UTF-8": (_bytes(lambda good: b"# caf\xe9\n" + good), "not UTF-8: byte 0xe9 at line 1"),
    "NUL byte": (_bytes(lambda good: b"# \x00\n" + good), "invalid TOML: "),
    "nested arrays": (_bytes(lambda good: b"x = " + b"[" * 100_000 + b"\n" + good), "nested"),
    "nested inline tables": (_bytes(lambda g: b"x = " + b"{a = " * 100_000 + b"\n" + g), "nested"),
    "long dotted key": (_bytes(lambda good: DOTTED + b" = 1\n" + good), "dotted parts"),
    "long table header": (_bytes(lambda good: good + b"\n[" + DOTTED + b"]\n"), "dotted parts"),
    "huge number": (_bytes(lambda good: b"x = " + b"7" * 5000 + b"\n" + good), "invalid TOML"),
    "over the size limit": (
        _bytes(lambda good: good + b"#" + b"x" * (MAX_CONFIG_BYTES + 10) + b"\n"),
        "larger than the 1 MiB limit",
    ),
    "directory": (
        lambda path, good: _replace(path, Path.mkdir),
        "not a regular file (a directory)",
    ),
    "FIFO": (lambda path, good: _replace(path, os.mkfifo), "not a regular file (a FIFO)"),
    "missing": (lambda path, good: path.unlink(), "not found"),
    "permission denied": (
        lambda path, good: (path.write_bytes(good), path.chmod(0)),
        "cannot read: Permission denied",
    ),
}
CLASSES = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            AS_ROOT and name == "permission denied", reason="root reads a mode 000 file"
        ),
    )
    for name in BAD_FILES
]
# Read at the path, not inside the file: these name the key that gave the path.
PATH_PROBLEMS = {"over the size limit", "directory", "FIFO", "missing", "permission denied"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("AGENTSPOONSD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def files(tmp_path: Path, token: str = "t0", interval: float = 0.2) -> tuple[Path, Path]:
    """A valid config (with a tokens file, ticking every `interval` seconds) and its tokens
    file, the latter holding `token`."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry("first", token))
    tokens.chmod(0o600)
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(config_text(interval=interval, extra=f'tokens_file = "{tokens}"\n'))
    return config, tokens


async def load_error(config: Path) -> str:
    """load_settings' ConfigError message, from a thread, failing if it blocks (a FIFO)."""
    with trio.fail_after(5):
        try:
            await trio.to_thread.run_sync(load_settings, config, abandon_on_cancel=True)
        except ConfigError as exc:
            return str(exc)
    raise AssertionError("the bad file was accepted")


# --- the pure parts: tomlfile ----------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in BAD_FILES if n not in PATH_PROBLEMS])
def test_parse_toml_refuses_every_bad_document_in_one_line(tmp_path: Path, name: str) -> None:
    make, words = BAD_FILES[name]
    path = tmp_path / "doc.toml"
    make(path, b"[server]\nport = 8765\n")
    with pytest.raises(FileRefused) as refused:
        parse_toml(path.read_bytes())
    message = str(refused.value)
    assert words in message and "\n" not in message and len(message) < 300, message


def test_parse_toml_skips_a_byte_order_mark_at_the_start_only() -> None:
    assert parse_toml(b"\xef\xbb\xbfport = 1\n") == {"port": 1}
    with pytest.raises(FileRefused, match="invalid TOML"):
        parse_toml(b"port = 1\n\xef\xbb\xbfx = 2\n")


def test_keys_up_to_the_limit_parse() -> None:
    key = ".".join(["a"] * MAX_KEY_PARTS)
    data = parse_toml(f'{key} = 1\ns = "{".".join(["b"] * 100)}"\n# {key}.{key}\n'.encode())
    for _ in range(MAX_KEY_PARTS):
        data = data["a"]
    assert data == 1


def test_a_long_dotted_key_costs_little_memory() -> None:
    """tomllib's memory for one dotted key grows with the square of its parts."""
    text = b".".join([b"a"] * 8000) + b" = 1\n"  # tomllib alone: ~260 MB
    tracemalloc.start()
    try:
        with pytest.raises(FileRefused, match="dotted parts"):
            parse_toml(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak


def test_key_check_is_linear_on_a_file_at_the_size_limit() -> None:
    for text in (b"a" * MAX_CONFIG_BYTES, b'"' * MAX_CONFIG_BYTES, b"a." * (MAX_CONFIG_BYTES // 2)):
        started = time.perf_counter()
        with pytest.raises(FileRefused):
            parse_toml(text)
        assert time.perf_counter() - started < 2.0  # measured: under 0.1 s each


def test_read_bounded_refuses_by_type_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would wait forever
    for path, words in ((fifo, "a FIFO"), (tmp_path, "a directory"), (Path("/dev/zero"), "device")):
        with pytest.raises(FileRefused, match=f"not a regular file .*{words}"):
            read_bounded(path, 1024)


def test_read_bounded_takes_a_file_at_its_limit_and_refuses_one_byte_more(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    assert read_bounded(path, 1000)[0] == b"x" * 1000
    with pytest.raises(FileRefused, match="larger than the 999 bytes limit"):
        read_bounded(path, 999)
    with pytest.raises(FileRefused) as missing:
        read_bounded(tmp_path / "nope", 1000)
    assert missing.value.missing


# --- load_settings: the config file and the tokens file ----------------------------------------


@pytest.mark.parametrize("name", CLASSES)
async def test_bad_config_file_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    config, _ = files(tmp_path)
    make, words = BAD_FILES[name]
    make(config, config.read_bytes())
    error = await load_error(config)
    assert error.startswith(f"{config}: ") and words in error and "\n" not in error, error


@pytest.mark.parametrize("name", CLASSES)
async def test_bad_tokens_file_is_one_line_naming_it_and_its_key(tmp_path: Path, name: str) -> None:
    config, tokens = files(tmp_path)
    make, words = BAD_FILES[name]
    make(tokens, tokens.read_bytes())
    error = await load_error(config)
    assert words in error and "\n" not in error, error
    if name in PATH_PROBLEMS:
        assert error.startswith(f"{config}: auth.tokens_file: {tokens}: "), error
    else:
        assert error.startswith(f"{tokens}: "), error


def test_a_config_and_tokens_file_with_a_byte_order_mark_load(tmp_path: Path) -> None:
    config, tokens = files(tmp_path)
    for path in (config, tokens):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [t.name for t in load_settings(config).auth.all_tokens] == ["first"]


# --- check-config and the token commands: exit 78, one line on stderr --------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentspoonsd", *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=20,
    )


@pytest.mark.parametrize("which", ["config", "tokens file"])
@pytest.mark.parametrize("name", CLASSES)
def test_check_config_exits_78_with_one_line(tmp_path: Path, name: str, which: str) -> None:
    config, tokens = files(tmp_path)
    path = config if which == "config" else tokens
    make, words = BAD_FILES[name]
    make(path, path.read_bytes())
    result = cli("check-config", "--config", str(config))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], result.stderr
    assert lines[0].startswith("agentspoonsd: invalid configuration: ")


@pytest.mark.parametrize("name", ["FIFO", "nested arrays", "invalid UTF-8", "over the size limit"])
def test_token_commands_refuse_a_bad_tokens_file_in_one_line(tmp_path: Path, name: str) -> None:
    _, tokens = files(tmp_path)
    make, _ = BAD_FILES[name]
    make(tokens, tokens.read_bytes())
    for args in (("new", "second", "--file"), ("revoke", "first", "--file")):
        result = cli("token", *args, str(tokens))
        assert result.returncode == EXIT_CONFIG, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(tokens) in lines[0] and "Traceback" not in result.stderr
        assert "token:" not in result.stdout  # no token printed for an entry never written


def test_token_new_refuses_to_grow_the_file_past_its_limit(tmp_path: Path) -> None:
    _, tokens = files(tmp_path)
    padding = MAX_TOKENS_FILE_BYTES - tokens.stat().st_size - 20
    tokens.write_bytes(tokens.read_bytes() + b"#" * padding + b"\n")
    before = tokens.read_bytes()
    result = cli("token", "new", "second", "--file", str(tokens))
    assert result.returncode == EXIT_CONFIG and "1 MiB limit" in result.stderr, result.stderr
    assert tokens.read_bytes() == before


# --- the daemon: at start, and on SIGHUP -------------------------------------------------------


# daemon_factory: conftest.py


@pytest.mark.parametrize(
    ("which", "name"),
    [("config", "nested arrays"), ("tokens file", "invalid UTF-8"), ("tokens file", "FIFO")],
)
async def test_daemon_refuses_to_start_on_a_bad_file(
    tmp_path: Path, daemon_factory: Any, which: str, name: str
) -> None:
    config, tokens = files(tmp_path)
    path = config if which == "config" else tokens
    make, words = BAD_FILES[name]
    make(path, path.read_bytes())
    daemon = daemon_factory(config)
    event = await daemon.wait_for("config_invalid")
    assert await daemon.wait_exit() == EXIT_CONFIG
    assert words in event["error"] and "\n" not in event["error"]
    assert "Traceback" not in daemon.log_text


async def rejected(daemon: DaemonProcess, count: int, within: float = 10.0) -> dict[str, Any]:
    """The `count`-th config_reload_rejected event, waiting for it."""
    with trio.move_on_after(within):
        while True:
            events = [e for e in daemon.events if e.get("event") == "config_reload_rejected"]
            if len(events) >= count:
                return events[count - 1]
            await trio.sleep(0.02)
    raise AssertionError(f"no reload rejection #{count}:\n" + "\n".join(daemon.raw_lines[-20:]))


async def next_seq(ws: Any) -> int:
    """The sequence number of the next BTC/USD update (each symbol has its own)."""
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] == "volatility_update" and message["data"]["symbol"] == "BTC/USD":
            return int(message["data"]["seq"])


async def test_sighup_with_any_bad_file_keeps_the_old_settings_and_the_stream(
    tmp_path: Path, daemon_factory: Any
) -> None:
    token, second = new_token(), new_token()
    # Fast ticks: each case below waits for the next update.
    config, tokens = files(tmp_path, token, interval=0.05)
    good = {config: config.read_bytes(), tokens: tokens.read_bytes()}
    daemon = daemon_factory(config)
    ws_port, _ = await daemon.ports()
    headers = bearer(token)
    cases = [
        (path, name)
        for path in (config, tokens)
        for name in BAD_FILES
        if not (AS_ROOT and name == "permission denied")
    ]
    async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/", extra_headers=headers) as ws:
        seq = await next_seq(ws)
        for count, (path, name) in enumerate(cases, start=1):
            make, words = BAD_FILES[name]
            make(path, good[path])
            daemon.signal(signal.SIGHUP)
            event = await rejected(daemon, count)
            assert words in event["error"] and str(path) in event["error"], (name, event)
            with trio.fail_after(5):  # the loop still runs: the client still gets updates
                seq, before = await next_seq(ws), seq
            assert seq > before, name
            _replace(path, lambda p: p.write_bytes(good[p]))
        assert not any(e.get("event") == "reload_failed" for e in daemon.events)
        assert "Traceback" not in daemon.log_text

        # The old settings were kept throughout; a good reload still applies, and turning auth
        # off by reload is warned of, as at start.
        tokens.write_text(entry("first", token) + entry("second", second))
        config.write_text(config.read_text().replace("enabled = true", "enabled = false"))
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("config_reloaded", tokens=2)
        warning = await daemon.wait_for("auth_disabled", by="reload")
        assert warning["level"] == "warning"
        with trio.fail_after(5):
            assert await next_seq(ws) > seq
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


# --- the reload task: off the loop, contained, cancellable -------------------------------------


def in_process(tmp_path: Path) -> tuple[Daemon, SimpleNamespace, io.BytesIO]:
    config, _ = files(tmp_path)
    stream = io.BytesIO()
    daemon = Daemon(load_settings(config), config, configure_logging("debug", "json", stream))
    websocket = SimpleNamespace(tls=None, limits=None, close_token_connections=lambda *a, **k: {})
    websocket.auth = daemon.tokens.store(daemon.settings)
    return daemon, websocket, stream


def events(stream: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_an_unexpected_error_in_a_reload_is_logged_and_contained(tmp_path: Path) -> None:
    daemon, websocket, stream = in_process(tmp_path)
    before = (daemon.settings, websocket.auth)

    def broken(path: Path | None) -> Any:
        raise RuntimeError("a defect")

    await daemon.reloader.reload(websocket, broken)  # type: ignore[arg-type]
    (failed,) = [e for e in events(stream) if e["event"] == "reload_failed"]
    assert failed["level"] == "error" and "RuntimeError: a defect" in failed["exception"]
    assert (daemon.settings, websocket.auth) == before
    assert daemon.stats.config_reloads["rejected"] == 1


async def test_a_reload_whose_read_hangs_is_abandoned_and_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reloader, "RELOAD_TIMEOUT", 0.3)
    daemon, websocket, stream = in_process(tmp_path)
    before = websocket.auth
    release = threading.Event()

    def hanging(path: Path | None) -> Any:
        release.wait(10)  # a read on a hung mount
        return load_settings(path)

    started = trio.current_time()
    ticks = 0

    async def tick() -> None:  # the event loop keeps running meanwhile
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await daemon.reloader.reload(websocket, hanging)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    release.set()
    assert trio.current_time() - started < 2.0 and ticks >= 10
    (event,) = [e for e in events(stream) if e["event"] == "config_reload_rejected"]
    assert "took over 0.3 s" in event["error"] and websocket.auth is before


async def test_the_reload_loop_applies_requests_and_stops_when_cancelled(tmp_path: Path) -> None:
    daemon, websocket, stream = in_process(tmp_path)
    send, receive = trio.open_memory_channel[None](1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.reloader.serve, receive, websocket)
            await send.send(None)
            while not any(e["event"] == "config_reloaded" for e in events(stream)):  # noqa: ASYNC110
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert daemon.stats.config_reloads["applied"] == 1
