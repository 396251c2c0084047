"""The browser module (/client.js) in Chromium, imported by the documentation's example page
(docs/examples/browser.html) from another origin, against a real daemon.

The page is served by a small static HTTP server on its own port, as a user's page would be, with
only the daemon's two default addresses in it replaced by the test daemon's ports; the daemon
admits that page's Origin through `server.allowed_origins`, as docs/CLIENT.md says to.
The page shows the stream's status in `#status` and one `li[data-seq]` per update received.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from dashboard_support import Ports, free_ports, start_daemon, stop_daemon
from test_dashboard_browser import browser  # noqa: F401 (the fixture: one headless chromium)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "browser.html"
DOC = ROOT / "docs" / "CLIENT.md"
TOKEN = "client-js-browser-test-token"
WAIT_MS = 15_000
MODULE_URL = "http://127.0.0.1:8766/client.js"
SOCKET_URL = "ws://127.0.0.1:8765/"


class ExamplePage:
    """docs/examples/browser.html at http://127.0.0.1:PORT/browser.html, moved onto `ports`."""

    def __init__(self, ports: Ports) -> None:
        text = EXAMPLE.read_text()
        assert text.count(MODULE_URL) == 1 and text.count(SOCKET_URL) == 1
        text = text.replace(MODULE_URL, f"http://127.0.0.1:{ports.http}/client.js")
        body = text.replace(SOCKET_URL, f"ws://127.0.0.1:{ports.ws}/").encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path.split("?")[0] == "/browser.html"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body) if found else 0))
                self.end_headers()
                if found:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, token: str) -> str:
        return f"{self.origin}/browser.html#access_token={token}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:  # noqa: F811 (the fixture it uses)
    """A fresh tab; an uncaught error in it fails the test."""
    context = browser.new_context()
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def ports() -> Ports:
    return free_ports()


@pytest.fixture
def example(ports: Ports) -> Iterator[ExamplePage]:
    served = ExamplePage(ports)
    try:
        yield served
    finally:
        served.close()


def admit(example: ExamplePage) -> dict[str, str]:
    return {"AGENTSPOONSD_SERVER__ALLOWED_ORIGINS": f'["{example.origin}"]'}


def wait_status(page: Page, text: str) -> None:
    page.wait_for_function(
        "t => document.getElementById('status').textContent.startsWith(t)",
        arg=text,
        timeout=WAIT_MS,
    )


def wait_updates(page: Page, at_least: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#updates li').length >= n", arg=at_least, timeout=WAIT_MS
    )


def seqs(page: Page) -> list[int]:
    return [
        int(s) for s in page.eval_on_selector_all("#updates li", "l => l.map(e => e.dataset.seq)")
    ]


def test_the_example_page_imports_the_module_from_another_origin_and_receives_updates(
    tmp_path: Path, ports: Ports, example: ExamplePage, page: Page
) -> None:
    daemon = start_daemon(tmp_path, ports, {"page": TOKEN}, env=admit(example))
    try:
        page.goto(example.url(TOKEN))
        wait_status(page, "open")
        wait_updates(page, 3)
        received = seqs(page)
        assert received == list(range(received[0], received[0] + len(received)))
        assert "BTC/USD #" in page.inner_text("#updates")
        assert "ETH/USD" not in page.inner_text("#updates")  # symbols: ["BTC/USD"] only
    finally:
        daemon.kill()
    assert TOKEN not in daemon.log_text


def test_the_stream_resumes_without_gap_or_duplicate_across_a_daemon_restart(
    tmp_path: Path, ports: Ports, example: ExamplePage, page: Page
) -> None:
    persisted = f'\n[history]\npersist = true\ndir = "{tmp_path / "history"}"\n'
    env = admit(example)
    first = start_daemon(tmp_path, ports, {"page": TOKEN}, persisted, name="persisted", env=env)
    second = None
    try:
        page.goto(example.url(TOKEN))
        wait_updates(page, 3)
        assert stop_daemon(first) == 0
        wait_status(page, "reconnecting in")
        time.sleep(1.0)  # down long enough for the page to retry against nothing
        before = seqs(page)
        second = start_daemon(
            tmp_path, ports, {"page": TOKEN}, persisted, name="persisted", env=env
        )
        ready = time.monotonic()
        wait_updates(page, len(before) + 1)
        first_after = time.monotonic() - ready
        wait_updates(page, len(before) + 3)
        received = seqs(page)
        # Every seq once, in order: the updates published while the page was away were replayed.
        assert received == list(range(received[0], received[0] + len(received)))
        assert received[: len(before)] == before
        assert page.inner_text("#status") == "open"
        print(f"first update {first_after:.2f} s after the restarted daemon was ready")
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()


def test_a_wrong_token_is_refused_once_confirmed_and_never_retried(
    tmp_path: Path,
    ports: Ports,
    example: ExamplePage,
    browser: Browser,  # noqa: F811
) -> None:
    daemon = start_daemon(tmp_path, ports, {"page": TOKEN}, env=admit(example))
    context = browser.new_context()
    try:
        page = context.new_page()
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(example.url("not-a-valid-token"))
        wait_status(page, "refused")
        time.sleep(3.0)  # a retry loop (backoff starts under 0.5 s) would have tried again
        assert page.inner_text("#status") == "refused"
        assert len(sockets) == 2  # the attempt, and the one confirmation
        assert page.locator("#updates li").count() == 0
    finally:
        daemon.kill()
    assert "not-a-valid-token" not in daemon.log_text


def test_the_documented_example_is_the_one_tested() -> None:
    assert EXAMPLE.read_text() in DOC.read_text()
    assert len(EXAMPLE.read_text().splitlines()) <= 26


def test_close_ends_the_stream_while_it_retries_and_while_it_is_open(
    tmp_path: Path, ports: Ports, page: Page
) -> None:
    """close() is the stream's cancellation: no attempt follows it, whether a retry was pending
    (here against a port where nothing listens) or the connection was open."""
    daemon = start_daemon(tmp_path, ports, {"page": TOKEN})
    try:
        page.goto(f"http://127.0.0.1:{ports.http}/healthz")  # any page of the daemon's origin
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        statuses = page.evaluate(
            """async ([moduleUrl, socketUrl, token]) => {
                const { connect } = await import(moduleUrl);
                const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
                const retrying = [];
                const nowhere = connect({ url: "ws://127.0.0.1:9/", token, healthUrl: null,
                    backoffInitialMs: 20, backoffMaxMs: 40,
                    onStatus: (s) => retrying.push(s.state) });
                while (retrying.filter((s) => s === "connecting").length < 4) await sleep(10);
                nowhere.close();
                const atClose = retrying.length;
                const open = [];
                let updates = 0;
                const live = connect({ url: socketUrl, token, onStatus: (s) => open.push(s.state),
                    onUpdate: () => { updates += 1; } });
                while (updates < 2) await sleep(10);
                live.close();
                const seen = updates;
                await sleep(1500);
                return { retrying, atClose, open, late: updates - seen };
            }""",
            [f"http://127.0.0.1:{ports.http}/client.js", f"ws://127.0.0.1:{ports.ws}/", TOKEN],
        )
        assert statuses["retrying"][-1] == "closed"
        assert len(statuses["retrying"]) == statuses["atClose"]  # nothing after close()
        assert statuses["open"] == ["connecting", "open", "closed"]
        assert statuses["late"] == 0
        assert sum(url.startswith(f"ws://127.0.0.1:{ports.ws}/") for url in sockets) == 1
    finally:
        daemon.kill()


def test_subscribe_and_unsubscribe_change_the_stream_on_a_real_daemon(
    tmp_path: Path, ports: Ports, page: Page
) -> None:
    """subscribe() adds a symbol to an open stream (its updates follow, in seq order) and
    unsubscribe() removes one (none of its updates after the daemon's `unsubscribed`)."""
    fast = {"AGENTSPOONSD_GENERATOR__INTERVAL": "0.05"}
    daemon = start_daemon(tmp_path, ports, {"page": TOKEN}, env=fast)
    try:
        page.goto(f"http://127.0.0.1:{ports.http}/healthz")  # any page of the daemon's origin
        seen = page.evaluate(
            """async ([moduleUrl, socketUrl, token]) => {
                const { connect } = await import(moduleUrl);
                const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
                const until = async (what, holds) => {
                    const end = Date.now() + 10000;
                    while (!holds()) {
                        if (Date.now() > end) throw new Error(`timed out: ${what}`);
                        await sleep(10);
                    }
                };
                const updates = [];
                let unsubscribedAt = null;
                const count = (symbol) => updates.filter((u) => u.symbol === symbol).length;
                const stream = connect({ url: socketUrl, token, symbols: ["BTC/USD"],
                    onUpdate: (data) => updates.push({ symbol: data.symbol, seq: data.seq }),
                    onMessage: (m) => {
                        if (m.type === "unsubscribed") unsubscribedAt = updates.length;
                    } });
                await until("BTC/USD", () => count("BTC/USD") >= 3);
                const onlyBtc = count("ETH/USD") === 0;
                stream.subscribe(["ETH/USD"]);
                await until("ETH/USD after subscribe", () => count("ETH/USD") >= 3);
                stream.unsubscribe(["BTC/USD"]);
                await until("unsubscribed", () => unsubscribedAt !== null);
                const settled = updates.length;
                await until("updates after it", () => updates.length >= settled + 4);
                stream.close();
                return { updates, onlyBtc, unsubscribedAt, positions: stream.positions() };
            }""",
            [f"http://127.0.0.1:{ports.http}/client.js", f"ws://127.0.0.1:{ports.ws}/", TOKEN],
        )
    finally:
        daemon.kill()
    updates = seen["updates"]
    assert seen["onlyBtc"]
    for symbol in ("BTC/USD", "ETH/USD"):
        mine = [u["seq"] for u in updates if u["symbol"] == symbol]
        assert mine == list(range(mine[0], mine[0] + len(mine))), (symbol, mine)
    after = updates[seen["unsubscribedAt"] :]
    assert after and all(u["symbol"] == "ETH/USD" for u in after)
    assert list(seen["positions"]) == ["ETH/USD"]  # BTC/USD's position is forgotten
