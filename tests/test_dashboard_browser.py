"""The dashboard in a real browser: Playwright driving Debian's chromium (headless) against a real
daemon. Nothing is mocked: the page is the one the daemon serves, the stream its own.

build/ensure-chromium.sh installs /usr/bin/chromium when it is missing (Playwright's own browser
downloads are never used). Screenshots are kept as build/test-artifacts/dashboard*.png.

The page publishes what it shows in data attributes, which the tests read: `body[data-state]`
(connecting, live, reconnecting, down, refused, revoked, origin…), and per symbol
`section.symbol[data-symbol]` (a symbol's charts, open for the rows selected in the overview)
with `data-updates` (updates received), `data-points` (points drawn on its charts), `data-seq`,
`data-gaps` (seq jumps: never expected), `data-resets` and `data-stale`; `window.dashboard.bars()`
gives a symbol's charted window. The overview, charts, phones, token and export:
tests/test_dashboard_page.py.
"""

from __future__ import annotations

import itertools
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page

import dashboard_support
from daemon_process import DaemonProcess
from dashboard_support import (
    ROOT,
    WAIT_MS,
    Ports,
    card,
    free_ports,
    start_daemon,
    stop_daemon,
    url,
    wait_state,
    wait_updates,
    write_config,
)

browser = dashboard_support.browser  # the fixtures: one chromium per module, a fresh page
page = dashboard_support.page
ARTIFACTS = ROOT / "build" / "test-artifacts"
TOKEN = "dashboard-browser-test-token"
SYMBOLS = ("BTC/USD", "ETH/USD")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Ports]]:
    ports = free_ports()
    process = start_daemon(tmp_path, ports, {"dash": TOKEN})
    try:
        yield process, ports
    finally:
        process.kill()


def wait_state_saying(page: Page, state: str, text: str) -> None:
    """Wait until the page is in `state` and its detail line contains `text`, read together:
    a retrying page leaves each state after its countdown, so two separate reads could race."""
    page.wait_for_function(
        """([state, text]) => document.body.dataset.state === state
            && document.getElementById("detail").textContent.includes(text)""",
        arg=[state, text],
        timeout=WAIT_MS,
    )


def assert_no_false_jump(points: list[dict[str, object]]) -> None:
    """The charted window across a reconnect: every seq once and in order, time increasing, and
    no line drawn across a hole in time (a break precedes a bar more than 3 spacings late)."""
    bars = [p for p in points if not p["gap"]]
    seqs = [int(str(p["seq"])) for p in bars]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a seq missing or repeated"
    times = [float(str(p["t"])) for p in points]
    assert all(a < b for a, b in itertools.pairwise(times)), "time not increasing"
    steps = sorted(b - a for a, b in itertools.pairwise(times))
    spacing = steps[len(steps) // 2]
    for before, after in itertools.pairwise(points):
        if not before["gap"] and not after["gap"]:
            late = float(str(after["t"])) - float(str(before["t"]))
            assert late <= 3 * spacing + 1e-6, f"a line drawn across {late:.2f} s"


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
        assert_no_false_jump(page.evaluate("window.dashboard.bars('BTC/USD')"))

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
