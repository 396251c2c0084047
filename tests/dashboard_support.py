"""Helpers shared by the dashboard's tests: a daemon on known ports, started synchronously.

The ports are picked before the daemon starts (not port 0, as the other end-to-end tests do):
the WebSocket's default Origin check admits the dashboard's own origin, which it derives from the
configured `[health] port`, so the browser's page must be served from that configured port.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from daemon_process import DaemonProcess, config_text

START_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 15_000  # no step should come close: updates arrive every 0.2 s


@dataclass(frozen=True)
class Ports:
    ws: int
    http: int


def free_ports() -> Ports:
    """Two loopback ports that were free a moment ago (held together, so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        ws, http = (sock.getsockname()[1] for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    return Ports(ws=ws, http=http)


def write_config(
    directory: Path,
    ports: Ports,
    tokens: dict[str, str],
    extra: str = "",
    name: str = "a",
    **config: object,
) -> Path:
    """A test config (tests/daemon_process.py; `config`: its `interval`, `symbols`) moved onto
    `ports`; returns its path."""
    text = config_text(tokens=tokens, extra=extra, **config)  # type: ignore[arg-type]
    server = '[server]\nhost = "127.0.0.1"\nport = 0\n'
    health = '[health]\nhost = "127.0.0.1"\nport = 0\n'
    assert server in text and health in text
    text = text.replace(server, server.replace("port = 0", f"port = {ports.ws}"))
    text = text.replace(health, health.replace("port = 0", f"port = {ports.http}"))
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def start_daemon(
    directory: Path,
    ports: Ports,
    tokens: dict[str, str],
    extra: str = "",
    name: str = "a",
    env: dict[str, str] | None = None,
    **config: object,
) -> DaemonProcess:
    """A daemon on `ports`, returned once /readyz answers 200 (it publishes updates)."""
    daemon = DaemonProcess(write_config(directory, ports, tokens, extra, name, **config), env)
    daemon.start()
    try:
        wait_ready(daemon, ports)
    except BaseException:
        daemon.kill()
        raise
    return daemon


def wait_ready(daemon: DaemonProcess, ports: Ports) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    url = f"http://127.0.0.1:{ports.http}/readyz"
    while time.monotonic() < deadline:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited {daemon.proc.returncode}:\n{daemon.log_text}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"daemon not ready within {START_TIMEOUT} s:\n{daemon.log_text[-3000:]}")


def stop_daemon(daemon: DaemonProcess, timeout: float = 10.0) -> int:
    """SIGTERM (clients get 1001) and the exit status."""
    assert daemon.proc is not None
    daemon.proc.terminate()
    return daemon.proc.wait(timeout)


# --- the browser: Playwright driving Debian's chromium ------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless chromium per module (build/ensure-chromium.sh installs Debian's when missing;
    Playwright's own browser downloads are never used)."""
    subprocess.run(["sh", str(ROOT / "build" / "ensure-chromium.sh")], check=True)
    with sync_playwright() as p:
        # Headless, no sandbox (the tests run as root in CI, where chromium's sandbox refuses).
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Browser, width: int = 1280, height: int = 1400) -> tuple[Page, list[str]]:
    """A page in a fresh context (its own storage) and the list its uncaught errors go to."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page; the test fails on any uncaught error in it."""
    page, errors = new_page(browser)
    try:
        yield page
    finally:
        page.context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def url(ports: Ports, token: str | None = None) -> str:
    base = f"http://127.0.0.1:{ports.http}/"
    return base if token is None else f"{base}#access_token={token}"


def wait_state(page: Page, state: str, timeout: float = WAIT_MS) -> None:
    page.wait_for_selector(f'body[data-state="{state}"]', state="attached", timeout=timeout)


def wait_updates(page: Page, symbol: str, at_least: int) -> None:
    """Until the charts of `symbol` hold at least `at_least` updates, received and drawn."""
    page.wait_for_function(
        """([symbol, n]) => {
            const card = document.querySelector(`section.symbol[data-symbol="${symbol}"]`);
            return card && +card.dataset.updates >= n && +card.dataset.points >= n;
        }""",
        arg=[symbol, at_least],
        timeout=WAIT_MS,
    )


def card(page: Page, symbol: str) -> dict[str, str]:
    """The data attributes of the charts (detail card) of `symbol`."""
    return page.eval_on_selector(
        f'section.symbol[data-symbol="{symbol}"]', "el => Object.assign({}, el.dataset)"
    )
