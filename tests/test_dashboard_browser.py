"""The dashboard in a real browser: Playwright driving Debian's chromium (headless) against a real
daemon. Nothing is mocked: the page is the one the daemon serves, the stream its own.

build/ensure-chromium.sh installs /usr/bin/chromium when it is missing (Playwright's own browser
downloads are never used). Screenshots are kept as build/test-artifacts/dashboard*.png.

The page publishes what it shows in data attributes, which the tests read: `body[data-state]`
(connecting, live, reconnecting, down, refused, revoked, origin…), and per symbol
`section.symbol[data-symbol]` with `data-updates` (updates received), `data-points` (points drawn
on its charts), `data-seq`, `data-gaps` (seq jumps: never expected) and `data-resets`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from daemon_process import DaemonProcess
from dashboard_support import Ports, free_ports, start_daemon, stop_daemon, write_config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "build" / "test-artifacts"
TOKEN = "dashboard-browser-test-token"
SYMBOLS = ("BTC/USD", "ETH/USD")
WAIT_MS = 15_000  # no step should come close: updates arrive every 0.2 s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    subprocess.run(["sh", str(ROOT / "build" / "ensure-chromium.sh")], check=True)
    with sync_playwright() as p:
        # Headless, no sandbox (the tests run as root in CI, where chromium's sandbox refuses).
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Ports]]:
    ports = free_ports()
    process = start_daemon(tmp_path, ports, {"dash": TOKEN})
    try:
        yield process, ports
    finally:
        process.kill()


def url(ports: Ports, token: str | None = None) -> str:
    base = f"http://127.0.0.1:{ports.http}/"
    return base if token is None else f"{base}#access_token={token}"


def wait_state(page: Page, state: str, timeout: float = WAIT_MS) -> None:
    page.wait_for_selector(f'body[data-state="{state}"]', state="attached", timeout=timeout)


def wait_state_saying(page: Page, state: str, text: str) -> None:
    """Wait until the page is in `state` and its detail line contains `text`, read together:
    a retrying page leaves each state after its countdown, so two separate reads could race."""
    page.wait_for_function(
        """([state, text]) => document.body.dataset.state === state
            && document.getElementById("detail").textContent.includes(text)""",
        arg=[state, text],
        timeout=WAIT_MS,
    )


def wait_updates(page: Page, symbol: str, at_least: int) -> None:
    page.wait_for_function(
        """([symbol, n]) => {
            const card = document.querySelector(`section.symbol[data-symbol="${symbol}"]`);
            return card && +card.dataset.updates >= n && +card.dataset.points >= n;
        }""",
        arg=[symbol, at_least],
        timeout=WAIT_MS,
    )


def card(page: Page, symbol: str) -> dict[str, str]:
    return page.eval_on_selector(
        f'section.symbol[data-symbol="{symbol}"]', "el => Object.assign({}, el.dataset)"
    )


def test_live_page_authenticates_from_the_fragment_and_charts_updates(
    daemon: tuple[DaemonProcess, Ports], page: Page
) -> None:
    _, ports = daemon
    page.goto(url(ports, TOKEN))
    wait_state(page, "live")
    for symbol in SYMBOLS:
        wait_updates(page, symbol, 3)
    # The token left the address bar and lives in this tab's sessionStorage only.
    assert page.url == url(ports)
    assert page.evaluate("sessionStorage.getItem('agentspoonsd.token')") == TOKEN
    assert "token dash" in page.inner_text("#session-text")
    # Two charts per symbol (price, volatility), drawn by uPlot on canvas.
    assert page.locator("section.symbol .uplot canvas").count() == 2 * len(SYMBOLS)
    btc = page.locator('section.symbol[data-symbol="BTC/USD"]')
    text = btc.inner_text()
    for label in ("open", "high", "low", "close", "volume", "close-to-close", "EWMA", "Parkinson"):
        assert label in text
    for label in ("Garman–Klass", "Rogers–Satchell", "Yang–Zhang", "GARCH(1,1) forecast", "α + β"):
        assert label in text
    first = card(page, "BTC/USD")
    assert first["gaps"] == "0" and first["resets"] == "0"
    # Still flowing, and the history loaded first joins the live stream without a gap.
    wait_updates(page, "BTC/USD", int(first["updates"]) + 3)
    assert card(page, "BTC/USD")["gaps"] == "0"
    # The policy held: no inline script or style, nothing blocked, not even uPlot's.
    assert page.evaluate("document.body.dataset.cspViolations") == "0"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


def test_wrong_token_is_shown_and_a_typed_token_then_connects(
    daemon: tuple[DaemonProcess, Ports], page: Page
) -> None:
    _, ports = daemon
    page.goto(url(ports, "not-a-valid-token"))
    wait_state(page, "refused")
    assert "refused this token" in page.inner_text("#detail")
    assert page.is_visible("#token-form")
    assert page.evaluate("sessionStorage.getItem('agentspoonsd.token')") is None
    page.screenshot(path=str(ARTIFACTS / "dashboard-refused.png"))
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    wait_state(page, "live")
    wait_updates(page, "ETH/USD", 3)
    assert page.url == url(ports)  # submitted by script: nothing in the URL


def test_revoked_token_is_shown(
    tmp_path: Path, daemon: tuple[DaemonProcess, Ports], page: Page
) -> None:
    process, ports = daemon
    page.goto(url(ports, TOKEN))
    wait_state(page, "live")
    # The token leaves the config; a reload closes its connections with 4001.
    write_config(tmp_path, ports, {"other": "some-other-token"})
    process.signal(signal.SIGHUP)
    wait_state(page, "revoked")
    assert "token revoked" in page.inner_text("#detail")
    assert page.is_visible("#token-form")


def test_origin_the_daemon_refuses_is_shown(tmp_path: Path, page: Page) -> None:
    ports = free_ports()
    only = {"AGENTSPOONSD_SERVER__ALLOWED_ORIGINS": '["https://dash.example.com"]'}
    process = start_daemon(tmp_path, ports, {"dash": TOKEN}, env=only)
    try:
        page.goto(url(ports, TOKEN))
        wait_state(page, "origin")
        detail = page.inner_text("#detail")
        assert "https://dash.example.com" in detail and "server.allowed_origins" in detail
    finally:
        process.kill()


def test_no_token_asks_for_one(daemon: tuple[DaemonProcess, Ports], page: Page) -> None:
    _, ports = daemon
    page.goto(url(ports))
    wait_state(page, "no-token")
    assert page.is_visible("#token-form")


def test_down_daemon_is_shown_then_the_page_resumes_without_a_gap(
    tmp_path: Path, page: Page
) -> None:
    """SIGTERM, then the same daemon again with its persisted history: the page shows the daemon
    down, reconnects by itself and resumes by seq (no gap, no reset). Then a daemon without that
    history: the resume cannot be served, and the page shows the reset."""
    ports = free_ports()
    persisted = f'\n[history]\npersist = true\ndir = "{tmp_path / "history"}"\n'
    first = start_daemon(tmp_path, ports, {"dash": TOKEN}, persisted, name="persisted")
    second = third = None
    try:
        page.goto(url(ports, TOKEN))
        wait_state(page, "live")
        wait_updates(page, "BTC/USD", 3)
        assert stop_daemon(first) == 0
        wait_state_saying(page, "down", "does not answer")
        before = card(page, "BTC/USD")
        second = start_daemon(tmp_path, ports, {"dash": TOKEN}, persisted, name="persisted")
        wait_state(page, "live")
        wait_updates(page, "BTC/USD", int(before["updates"]) + 3)
        after = card(page, "BTC/USD")
        assert int(after["seq"]) > int(before["seq"])
        assert after["gaps"] == "0" and after["resets"] == "0"
        assert "Reconnected after" in page.inner_text("#notices")

        assert stop_daemon(second) == 0
        wait_state(page, "down")
        shutil.rmtree(tmp_path / "history")
        third = start_daemon(tmp_path, ports, {"dash": TOKEN}, name="fresh")
        wait_state(page, "live")
        page.wait_for_selector('section.symbol[data-symbol="BTC/USD"][data-resets="1"]')
        wait_updates(page, "BTC/USD", 3)
        assert "History reset for BTC/USD" in page.inner_text("#notices")
        assert card(page, "BTC/USD")["gaps"] == "0"
    finally:
        for process in (first, second, third):
            if process is not None:
                process.kill()
