"""First start: the start banner, console logs on a terminal, the development token of `make run`.

The banner's pure parts are tested directly; the rest runs the real daemon (stdout a pipe, or a
pseudo-terminal from `pty.openpty`), the real `watch` command it prints, and the real
`make run` target.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from agentspoonsd.auth import hash_token
from agentspoonsd.banner import (
    BUILT_IN_DEFAULTS,
    dashboard_url,
    program_command,
    start_banner,
    watch_command,
    websocket_url,
)
from agentspoonsd.logs import Disclosed
from agentspoonsd.settings import load_settings, read_tokens_file
from daemon_process import DaemonProcess, config_text, new_token

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TOKEN = "q3xTOKEN_-value"


def clean_env(**variables: str) -> dict[str, str]:
    """The environment without the daemon's and the clients' variables, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AGENTSPOONSD_")}
    env.pop("NO_COLOR", None)
    return {**env, **variables}


# --- the banner's values (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "tls", "expected"),
    [
        ("0.0.0.0", False, "ws://127.0.0.1:8765/"),
        ("", False, "ws://127.0.0.1:8765/"),
        ("::", False, "ws://[::1]:8765/"),
        ("127.0.0.1", True, "wss://127.0.0.1:8765/"),
        ("192.0.2.7", False, "ws://192.0.2.7:8765/"),
        ("2001:db8::1", True, "wss://[2001:db8::1]:8765/"),
        ("stream.example.com", True, "wss://stream.example.com:8765/"),
    ],
)
def test_websocket_url_is_connectable(host: str, tls: bool, expected: str) -> None:
    assert websocket_url(host, 8765, tls=tls) == expected


def test_dashboard_url_has_a_token_fragment_only_when_given_one() -> None:
    assert dashboard_url("0.0.0.0", 8766) == "http://127.0.0.1:8766/"
    assert not isinstance(dashboard_url("0.0.0.0", 8766), Disclosed)
    with_token = dashboard_url("::", 8766, TOKEN)
    assert with_token == f"http://[::1]:8766/#access_token={TOKEN}"
    assert isinstance(with_token, Disclosed)


def test_watch_command_is_shell_words_with_the_token_in_the_environment() -> None:
    url = "ws://127.0.0.1:8765/"
    assert watch_command(["agentspoonsd"], url) == f"agentspoonsd watch {url}"
    spaced = watch_command(["/opt/my tools/python", "-m", "agentspoonsd"], url, "a'b")
    assert isinstance(spaced, Disclosed)
    words = shlex.split(spaced)
    program = ["/opt/my tools/python", "-m", "agentspoonsd"]
    assert words == ["AGENTSPOONSD_TOKEN=a'b", *program, "watch", url]


@pytest.mark.parametrize(
    ("argv0", "frozen", "expected"),
    [
        (".venv/bin/agentspoonsd", False, [".venv/bin/agentspoonsd"]),
        ("/usr/local/bin/agentspoonsd", False, ["/usr/local/bin/agentspoonsd"]),
        ("/x/agentspoonsd/__main__.py", False, ["/usr/bin/python3", "-m", "agentspoonsd"]),
        ("-c", False, ["/usr/bin/python3", "-m", "agentspoonsd"]),
        ("/usr/local/bin/agentspoonsd", True, ["/usr/bin/python3"]),
    ],
)
def test_program_command_starts_the_same_program(
    argv0: str, frozen: bool, expected: list[str]
) -> None:
    assert program_command(argv0, "/usr/bin/python3", frozen=frozen) == expected


def test_start_banner_fields(tmp_path: Path) -> None:
    path = tmp_path / "agentspoonsd.toml"
    path.write_text('[server]\nhost = "0.0.0.0"\n[health]\nhost = "127.0.0.1"\n')
    settings = load_settings(path)
    banner = start_banner(
        settings,
        path,
        websocket_port=9001,
        http_port=9002,
        tls=False,
        ephemeral_token=None,
        program=["agentspoonsd"],
    )
    assert banner.fields() == {
        "config": str(path),
        "websocket_url": "ws://127.0.0.1:9001/",
        "dashboard_url": "http://127.0.0.1:9002/",
        "watch": "agentspoonsd watch ws://127.0.0.1:9001/",
    }
    ephemeral = start_banner(
        load_settings(None),
        None,
        websocket_port=9001,
        http_port=9002,
        tls=True,
        ephemeral_token=TOKEN,
    )
    assert ephemeral.config == BUILT_IN_DEFAULTS
    assert ephemeral.websocket_url == "wss://127.0.0.1:9001/"
    assert ephemeral.dashboard_url == f"http://127.0.0.1:9002/#access_token={TOKEN}"
    assert ephemeral.watch == f"AGENTSPOONSD_TOKEN={TOKEN} agentspoonsd watch wss://127.0.0.1:9001/"


def test_a_relative_config_path_is_shown_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    banner = start_banner(
        load_settings(None),
        Path("agentspoonsd.toml"),
        websocket_port=1,
        http_port=2,
        tls=False,
        ephemeral_token=None,
    )
    assert banner.config == str(REPO / "agentspoonsd.toml")


def read_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/html")
        return response.read()


# --- the banner of the real daemon ----------------------------------------------------------------


@pytest.fixture
def daemon_factory(daemon_factory: Callable[..., DaemonProcess]) -> Callable[..., DaemonProcess]:
    """conftest.py's, each daemon on `clean_env` plus the `env` given."""

    def start(text: str, env: dict[str, str] | None = None) -> DaemonProcess:
        return daemon_factory(text, environ=clean_env(**(env or {})))

    return start


async def test_banner_urls_and_watch_command_work_with_the_ephemeral_token(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_factory(config_text())
    ws_port, http_port = await daemon.ports()
    banner = await daemon.wait_for("daemon_started")
    assert banner["config"] == str(daemon.config_path)
    assert banner["websocket_url"] == f"ws://127.0.0.1:{ws_port}/"
    dashboard, _, fragment = banner["dashboard_url"].partition("#")
    assert dashboard == f"http://127.0.0.1:{http_port}/"
    assert fragment.startswith("access_token=")
    token = fragment.removeprefix("access_token=")

    # The WebSocket URL, with the token the dashboard URL hands the page.
    async with open_websocket_url(f"{banner['websocket_url']}?access_token={token}") as ws:
        assert json.loads(await ws.get_message())["token"] == "ephemeral"
    # The dashboard URL, as it is (a client drops the fragment), serves the page.
    page = await trio.to_thread.run_sync(read_url, banner["dashboard_url"])
    assert b"<html" in page.lower()
    # The watch command, pasted into a shell as it is, prints an update.
    with trio.fail_after(30):
        done = await trio.run_process(
            ["sh", "-c", banner["watch"] + " --count 1"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_env(),
        )
    assert done.returncode == 0, done.stderr.decode()
    assert b"BTC/USD" in done.stdout

    # Shown in this one event and no other; auth_ephemeral_token says where.
    assert [e["event"] for e in daemon.events if token in json.dumps(e)] == ["daemon_started"]
    warning = await daemon.wait_for("auth_ephemeral_token")
    assert warning["level"] == "warning" and "daemon_started" in warning["hint"]


async def test_banner_never_carries_a_configured_token(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"desk": token}))
    ws_port, http_port = await daemon.ports()
    banner = await daemon.wait_for("daemon_started")
    assert banner["dashboard_url"] == f"http://127.0.0.1:{http_port}/"
    assert banner["watch"].endswith(f" watch ws://127.0.0.1:{ws_port}/")
    assert "AGENTSPOONSD_TOKEN" not in banner["watch"]
    assert "access_token" not in daemon.log_text and token not in daemon.log_text
    assert all(e["event"] != "auth_ephemeral_token" for e in daemon.events)


async def test_banner_of_a_wildcard_bind_is_loopback_and_connects(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    text = config_text(auth_enabled=False).replace('host = "127.0.0.1"', 'host = "0.0.0.0"')
    daemon = daemon_factory(text)
    ws_port, http_port = await daemon.ports()
    banner = await daemon.wait_for("daemon_started")
    assert banner["websocket_url"] == f"ws://127.0.0.1:{ws_port}/"
    assert banner["dashboard_url"] == f"http://127.0.0.1:{http_port}/"
    async with open_websocket_url(banner["websocket_url"]) as ws:
        assert json.loads(await ws.get_message())["token"] == "anonymous"


# --- console on a terminal, JSON on a pipe --------------------------------------------------------


@contextlib.contextmanager
def daemon_on_a_terminal(config: Path, env: dict[str, str]) -> Iterator[Callable[[str], str]]:
    """The daemon with stdout and stderr a pseudo-terminal; yields `read_until(pattern)`, which
    returns everything written so far once the regex `pattern` matches it (fails after 15 s).
    SIGTERM at exit: the daemon must exit 0."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentspoonsd", "run", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen = bytearray()

    def pump(until: float) -> bool:
        ready, _, _ = select.select([master], [], [], max(0.0, min(0.1, until - time.monotonic())))
        if not ready:
            return True
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        seen.extend(chunk)
        return bool(chunk)

    def read_until(pattern: str) -> str:
        deadline = time.monotonic() + 15
        while not re.search(pattern, seen.decode("utf-8", "replace")):
            if time.monotonic() > deadline or not pump(deadline):
                break
        output = seen.decode("utf-8", "replace")
        assert re.search(pattern, output), output
        return output

    try:
        yield read_until
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            pump(deadline)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_auto_format_on_a_terminal_is_console_with_the_banner_on_lines(tmp_path: Path) -> None:
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(config_text())
    with daemon_on_a_terminal(config, clean_env()) as read_until:
        output = read_until(r"\n    watch +[^\r\n]+\r?\n")  # the banner, its last line whole
    lines = [ANSI.sub("", line) for line in re.split(r"\r?\n", output) if line]
    assert "\x1b[" in output  # coloured
    assert not any(line.lstrip().startswith("{") for line in lines), lines
    assert any("daemon_started" in line for line in lines)
    by_name = {
        words[0]: words[1:] for line in lines if line.startswith("    ") and (words := line.split())
    }
    assert by_name["config"] == [str(config)]
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/", by_name["websocket_url"][0])
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/#access_token=\S+", by_name["dashboard_url"][0])
    assert by_name["watch"][0].startswith("AGENTSPOONSD_TOKEN=")


def test_json_format_forced_on_a_terminal(tmp_path: Path) -> None:
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(config_text() + '\n[log]\nformat = "json"\n')
    with daemon_on_a_terminal(config, clean_env()) as read_until:
        output = read_until(r'"daemon_started"[^\r\n]*\r?\n')
    lines = [line for line in re.split(r"\r?\n", output) if line.strip()]
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(events) == len(lines)  # every line is one JSON object
    assert any(e["event"] == "daemon_started" for e in events)


async def test_auto_format_on_a_pipe_is_json(daemon_factory: Callable[..., DaemonProcess]) -> None:
    daemon = daemon_factory(config_text())
    await daemon.wait_for("daemon_started")
    assert daemon.raw_lines and all(line.startswith("{") for line in daemon.raw_lines)
    assert "\x1b[" not in daemon.log_text


# --- the development token of `make run` ----------------------------------------------------------

DEV_TOKEN_SCRIPT = REPO / "build" / "devtoken.py"
TOKEN_LINE = re.compile(r"^\s+token\s+(\S+)\s*$", re.MULTILINE)


def dev_token(dev_dir: Path, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEV_TOKEN_SCRIPT), str(dev_dir), "--config", str(config), *extra],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )


def test_dev_token_is_made_once_kept_private_and_printed_every_time(tmp_path: Path) -> None:
    config = tmp_path / "agentspoonsd.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\nport = 18765\n[health]\nport = 18766\n')
    dev = tmp_path / ".dev"
    first = dev_token(dev, config, "--program", ".venv/bin/agentspoonsd")
    assert first.returncode == 0, first.stderr
    token = TOKEN_LINE.findall(first.stdout)[0]
    assert f"http://127.0.0.1:18766/#access_token={token}" in first.stdout
    watch = f"AGENTSPOONSD_TOKEN={token} .venv/bin/agentspoonsd watch ws://127.0.0.1:18765/"
    assert watch in first.stdout
    # The plain token and its digest, each readable by the owner only.
    assert (dev / "token").read_text().strip() == token
    assert os.stat(dev).st_mode & 0o777 == 0o700
    for name in ("token", "tokens.toml"):
        assert os.stat(dev / name).st_mode & 0o777 == 0o600, name
    assert token not in (dev / "tokens.toml").read_text()

    second = dev_token(dev, config)
    assert second.returncode == 0, second.stderr
    assert TOKEN_LINE.findall(second.stdout) == [token]
    assert [t.name for t in read_tokens_file(dev / "tokens.toml")[0]] == ["dev"]


@pytest.mark.parametrize("damage", ["token_lost", "digest_lost", "token_changed", "files_lost"])
def test_a_dev_token_that_no_longer_matches_is_replaced(tmp_path: Path, damage: str) -> None:
    config = tmp_path / "agentspoonsd.toml"
    config.write_text("")
    dev = tmp_path / ".dev"
    first = TOKEN_LINE.findall(dev_token(dev, config).stdout)[0]
    if damage == "token_lost":
        (dev / "token").unlink()
    elif damage == "digest_lost":
        (dev / "tokens.toml").write_text("")
    elif damage == "token_changed":
        (dev / "token").write_text("something-else\n")
    else:
        for path in dev.iterdir():
            path.unlink()
        dev.rmdir()
    again = dev_token(dev, config)
    assert again.returncode == 0, again.stderr
    (token,) = TOKEN_LINE.findall(again.stdout)
    assert token != first
    assert (dev / "token").read_text().strip() == token
    entries = read_tokens_file(dev / "tokens.toml")[0]
    assert [(t.name, t.sha256) for t in entries] == [("dev", hash_token(token))]


class MakeRun(DaemonProcess):
    """`make run` of this repository with this test's venv, config and development folder."""

    def __init__(self, config: Path, dev_dir: Path) -> None:
        # The clients' variables exported, as a developer running `watch` in this shell has
        # them: `make run` must not take them for config keys.
        env = clean_env(AGENTSPOONSD_TOKEN="stale-token", AGENTSPOONSD_URL="ws://127.0.0.1:1/")
        super().__init__(config, env=env)
        self.env = env
        self.dev_dir = dev_dir

    def start(self) -> None:
        venv = Path(sys.prefix)
        self.proc = subprocess.Popen(
            # -o: the venv is this test's, installed already; make must not reinstall it.
            [
                *("make", "-s", "-C", str(REPO), "-o", f"{venv}/.installed", "run"),
                *(f"VENV={venv}", f"CONFIG={self.config_path}", f"DEV_DIR={self.dev_dir}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # make and the daemon: one group, stopped together
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signum)

    async def stopped(self, within: float = 15.0) -> None:
        """Once make has exited and the daemon too (it held the other end of the pipe)."""
        assert self.proc is not None and self._reader is not None
        await trio.to_thread.run_sync(self.proc.wait, within)
        await trio.to_thread.run_sync(self._reader.join, within)
        assert not self._reader.is_alive()

    def kill(self) -> None:
        if self.proc is not None:  # the group: the daemon may outlive make
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


async def test_make_run_twice_keeps_the_same_development_token(tmp_path: Path) -> None:
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(config_text())
    dev = tmp_path / ".dev"
    seen = []
    for _ in range(2):
        run = MakeRun(config, dev)
        run.start()
        try:
            ws_port, _ = await run.ports()
            banner = await run.wait_for("daemon_started")
            (token,) = TOKEN_LINE.findall(run.log_text)
            seen.append(token)
            # A configured token now: the banner does not carry it, the client must bring it.
            assert token not in json.dumps(banner)
            assert "access_token" not in banner["dashboard_url"]
            url = f"ws://127.0.0.1:{ws_port}/?access_token={token}"
            async with open_websocket_url(url) as ws:
                assert json.loads(await ws.get_message())["token"] == "dev"
            run.signal(signal.SIGINT)  # Ctrl-C: make and the daemon both get it
            await run.stopped()
            assert any(e["event"] == "daemon_stopped" for e in run.events), run.log_text
        finally:
            run.kill()
    assert seen[0] == seen[1]
    assert (dev / "token").read_text().strip() == seen[0]


def test_the_production_config_never_uses_a_development_token() -> None:
    shipped = [REPO / "config", REPO / "systemd", REPO / "build" / "install.sh"]
    for root in shipped:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                text = path.read_text(errors="replace")
                assert ".dev/" not in text and "devtoken" not in text, path
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", ".dev/token", ".dev/tokens.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    # git-ignored: a development token is never committed
    assert ignored.stdout.split() == [".dev/token", ".dev/tokens.toml"], ignored.stderr


async def test_banner_of_a_tls_daemon_is_wss_and_connects(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    tls = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
    text = config_text(auth_enabled=False).replace("port = 0\n", "port = 0\n" + tls, 1)
    daemon = daemon_factory(text)
    ws_port, _ = await daemon.ports()
    banner = await daemon.wait_for("daemon_started")
    assert banner["websocket_url"] == f"wss://127.0.0.1:{ws_port}/"
    assert banner["watch"].endswith(f" watch wss://127.0.0.1:{ws_port}/")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with open_websocket_url(banner["websocket_url"], ssl_context=context) as ws:
        assert json.loads(await ws.get_message())["token"] == "anonymous"
