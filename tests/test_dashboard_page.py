"""The dashboard a quant keeps open: its overview, charts, state, phones, token and export, in
Chromium (Playwright, Debian's chromium) against real daemons. The connection states themselves:
tests/test_dashboard_browser.py; the pure helpers: tests/test_dashboard_format.py.

One daemon serves the module (two symbols, a bar every 0.2 s) and each test opens a fresh page (its
own storage); the tests that stop a daemon or need 50 symbols start their own.

What the page publishes for tests: overview rows `#overview tr[data-symbol]` with
`data-updates`, `data-stale`, `data-selected` and each number cell's raw `data-value`; a chart's
root `.uplot` with `data-axes` (the axes' titles) and `data-xticks` ([x, label] of each time tick);
`body[data-rate]` and `body[data-latency-ms]`; `window.dashboard.bars(symbol)`.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

import dashboard_support
from daemon_process import DaemonProcess
from dashboard_support import (
    WAIT_MS,
    Ports,
    free_ports,
    new_page,
    start_daemon,
    url,
    wait_state,
    wait_updates,
)

browser = dashboard_support.browser  # the fixtures: one chromium per module, a fresh page
page = dashboard_support.page
TOKEN = "dashboard-page-test-token"
SYMBOLS = ("BTC/USD", "ETH/USD")
ESTIMATORS = ("close-to-close", "EWMA", "Parkinson", "Garman–Klass", "Rogers–Satchell")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    ports = free_ports()
    process = start_daemon(tmp_path_factory.mktemp("dashboard-page"), ports, {"dash": TOKEN})
    try:
        yield ports
    finally:
        process.kill()


def open_live(page: Page, ports: Ports, updates: int = 3) -> None:
    page.goto(url(ports, TOKEN))
    wait_state(page, "live")
    for symbol in SYMBOLS:
        wait_updates(page, symbol, updates)


def rows(page: Page) -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        "#overview tbody tr", "trs => trs.map((tr) => Object.assign({}, tr.dataset))"
    )


def legend(page: Page, symbol: str, chart: str) -> dict[str, str]:
    """The legend of `chart` ("price-plot" or "vol-plot"): label -> value shown."""
    return page.eval_on_selector_all(
        f'section.symbol[data-symbol="{symbol}"] .{chart} .u-legend .u-series',
        """series => Object.fromEntries(series.map((s) => [
            s.querySelector(".u-label").textContent, s.querySelector(".u-value").textContent]))""",
    )


def chart_data(page: Page, symbol: str, chart: str) -> dict[str, object]:
    return page.eval_on_selector(
        f'section.symbol[data-symbol="{symbol}"] .{chart} .uplot',
        "el => ({axes: JSON.parse(el.dataset.axes), xticks: JSON.parse(el.dataset.xticks),"
        " width: el.getBoundingClientRect().width})",
    )


def test_overview_lists_every_symbol_sorts_and_opens_charts(daemon: Ports, page: Page) -> None:
    open_live(page, daemon)
    shown = rows(page)
    assert [r["symbol"] for r in shown] == sorted(SYMBOLS)  # by symbol at first
    assert all(r["selected"] == "true" for r in shown)  # few symbols: every chart open
    header = page.inner_text("#overview thead")
    for title in ("Symbol", "Last price", "Change", "σ annual", "GARCH σ next", "Trend", "Age"):
        assert title in header
    assert page.locator("#overview tbody canvas.spark").count() == len(SYMBOLS)

    # Sorted by the volatility column, highest first, then lowest first.
    page.select_option("#estimator", "yang_zhang")
    page.click('#overview th[data-sort="vol"] button')
    assert page.get_attribute('#overview th[data-sort="vol"]', "aria-sort") == "descending"
    read = """() => [...document.querySelectorAll('#overview tbody tr')].map(
        (tr) => +tr.children[4].dataset.value)"""
    values = page.evaluate(read)
    assert values == sorted(values, reverse=True) and all(v > 0 for v in values)
    page.click('#overview th[data-sort="vol"] button')
    values = page.evaluate(read)
    assert values == sorted(values)

    # A row click closes its charts, another opens them again; the choice is remembered.
    page.click('#overview tr[data-symbol="ETH/USD"] td.symbol-name')
    page.wait_for_selector('section.symbol[data-symbol="ETH/USD"]', state="detached")
    assert page.locator("section.symbol").count() == 1
    page.reload()
    wait_state(page, "live")
    assert page.locator('section.symbol[data-symbol="ETH/USD"]').count() == 0
    page.check('#overview tr[data-symbol="ETH/USD"] input[type="checkbox"]')
    wait_updates(page, "ETH/USD", 3)
    assert page.locator('section.symbol[data-symbol="ETH/USD"] .uplot canvas').count() == 2


def test_charts_have_titled_axes_readable_time_ticks_and_latest_values(
    daemon: Ports, page: Page
) -> None:
    open_live(page, daemon, updates=10)
    price = chart_data(page, "BTC/USD", "price-plot")
    vol = chart_data(page, "BTC/USD", "vol-plot")
    assert re.fullmatch(r"time \(UTC\) · \d{4}-\d\d-\d\d( – \d{4}-\d\d-\d\d)?", price["axes"][0])
    assert price["axes"][1] == "price (USD)"  # the quote currency of BTC/USD
    assert vol["axes"][1] == "σ annualised (%)"
    for chart in (price, vol):
        ticks = chart["xticks"]
        assert len(ticks) >= 2
        labels = [label for _, label in ticks]
        # One format per axis: a time, never a date glued to a time ("12/4/26 2:33pm2:34pm").
        assert all(re.fullmatch(r"\d\d:\d\d(:\d\d)?", label) for label in labels), labels
        width = page.evaluate(
            """(labels) => { const c = document.createElement('canvas').getContext('2d');
                c.font = '12px system-ui, sans-serif';
                return Math.max(...labels.map((l) => c.measureText(l).width)); }""",
            labels,
        )
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(ticks)]
        assert min(gaps) > width + 4, f"tick labels overlap: {ticks}"

    # Legends show the latest values without hovering, every estimator and the window included.
    prices = legend(page, "BTC/USD", "price-plot")
    assert prices["bar close"].endswith(" UTC")
    for name in ("open", "high", "low", "close", "volume"):
        assert re.fullmatch(r"[\d,.]+", prices[name]), prices
    vols = legend(page, "BTC/USD", "vol-plot")
    for name in (*ESTIMATORS, "Yang–Zhang", "GARCH σ next bar"):
        assert re.fullmatch(r"\d+\.\d\d %", vols[name]), vols
    title = page.inner_text('section.symbol[data-symbol="BTC/USD"] .vol-plot >> xpath=..')
    assert re.search(r"window \d+ bars", title)
    help_text = page.get_attribute('section.symbol[data-symbol="BTC/USD"] .help summary', "title")
    assert help_text and all(name in help_text for name in (*ESTIMATORS, "Yang–Zhang"))
    # The tables use the same convention: UTC, no raw ISO string with microseconds.
    bar = page.inner_text('section.symbol[data-symbol="BTC/USD"] .tables')
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC", bar)
    assert not re.search(r"T\d\d:\d\d:\d\d\.\d{6}", bar)

    # Local time is a toggle, remembered; the axes, legends and tables follow it.
    page.select_option("#zone", "local")
    local = chart_data(page, "BTC/USD", "price-plot")
    assert local["axes"][0].startswith("time (local, UTC")
    assert "local, UTC" in legend(page, "BTC/USD", "price-plot")["bar close"]
    page.wait_for_function(
        """() => document.querySelector('section.symbol[data-symbol="BTC/USD"] .tables')
            .textContent.includes('local, UTC')""",
        timeout=WAIT_MS,
    )
    assert page.evaluate("JSON.parse(localStorage.getItem('agentspoonsd.prefs')).zone") == "local"


def test_candles_with_volume_and_per_bar_volatility(daemon: Ports, page: Page) -> None:
    open_live(page, daemon)
    card = 'section.symbol[data-symbol="BTC/USD"]'
    page.click(f'{card} button[data-value="candles"]')
    assert page.get_attribute(card, "data-view") == "candles"
    assert "OHLC candles" in page.inner_text(f"{card} .price-plot >> xpath=..")
    assert page.locator(f"{card} .uplot canvas").count() == 2  # rebuilt, not added
    assert re.fullmatch(r"[\d.]+", legend(page, "BTC/USD", "price-plot")["volume"])
    annual = legend(page, "BTC/USD", "vol-plot")["close-to-close"]
    page.click(f'{card} button[data-value="bar"]')
    assert chart_data(page, "BTC/USD", "vol-plot")["axes"][1] == "σ per bar (%)"
    per_bar = legend(page, "BTC/USD", "vol-plot")["close-to-close"]
    assert re.fullmatch(r"\d+\.\d{4} %", per_bar)
    # Per bar is the annualised figure divided by sqrt(bars per year): far smaller.
    assert float(per_bar.split()[0]) < float(annual.split()[0]) / 10
    assert page.evaluate("document.body.dataset.cspViolations") == "0"


def test_rate_latency_and_ages_are_shown(daemon: Ports, page: Page) -> None:
    open_live(page, daemon)
    page.wait_for_function("() => +document.body.dataset.rate > 0", timeout=WAIT_MS)
    rate = float(page.get_attribute("body", "data-rate") or 0)
    assert 5 <= rate <= 20  # two symbols, a bar every 0.2 s each: 10 updates/s
    assert re.fullmatch(r"\d+\.\d upd/s", page.inner_text("#rate"))
    latency = float(page.get_attribute("body", "data-latency-ms") or "nan")
    assert 0 <= latency < 1000  # the same machine's clock: milliseconds
    assert re.fullmatch(r"latency \d+ ms", page.inner_text("#latency"))
    ages = page.eval_on_selector_all(
        "#overview td.age", "tds => tds.map((td) => +td.dataset.value)"
    )
    assert len(ages) == 2 and all(0 <= age < 1 for age in ages)
    assert "updated" in page.inner_text('section.symbol[data-symbol="BTC/USD"] .age')
    assert all(r["stale"] == "false" for r in rows(page))


def test_phone_widths_have_no_sideways_scroll_and_charts_follow_their_box(
    daemon: Ports, browser: Browser
) -> None:
    page, errors = new_page(browser, width=1400, height=900)
    try:
        open_live(page, daemon)
        wide = chart_data(page, "BTC/USD", "price-plot")["width"]
        for width in (360, 390, 414):
            page.set_viewport_size({"width": width, "height": 800})
            page.wait_for_function(
                """(w) => [...document.querySelectorAll('.uplot')].every(
                    (u) => u.getBoundingClientRect().right <= w)""",
                arg=width,
                timeout=WAIT_MS,
            )
            scroll, inner = page.evaluate(
                "[document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert scroll <= inner, f"{scroll} px of page at {width} px"
        narrow = chart_data(page, "BTC/USD", "price-plot")["width"]
        assert narrow < 414 < wide
        # Touch-sized controls on a phone.
        sizes = page.eval_on_selector_all(
            "section.symbol .toolbar button, #zone",
            "els => els.map((e) => e.getBoundingClientRect().height)",
        )
        assert min(sizes) >= 44
    finally:
        page.context.close()
    assert not errors


def test_token_in_the_query_is_kept_in_the_tab_and_removed_from_the_address(
    daemon: Ports, page: Page
) -> None:
    page.goto(f"http://127.0.0.1:{daemon.http}/?view=1&access_token={TOKEN}#note")
    wait_state(page, "live")
    assert page.url == f"http://127.0.0.1:{daemon.http}/?view=1#note"  # the rest is kept
    assert page.evaluate("sessionStorage.getItem('agentspoonsd.token')") == TOKEN
    page.go_back()  # replaced, not pushed: Back does not bring the token's URL back
    assert page.url == "about:blank"


def test_export_the_shown_window_as_csv_and_a_chart_as_png(daemon: Ports, page: Page) -> None:
    open_live(page, daemon)
    card = 'section.symbol[data-symbol="ETH/USD"]'
    with page.expect_download() as download:
        page.click(f'{card} button[data-action="csv"]')
    shown = [b for b in page.evaluate("window.dashboard.bars('ETH/USD')") if not b["gap"]]
    assert download.value.suggested_filename.startswith("agentspoonsd-ETH-USD-")
    text = Path(download.value.path()).read_text()
    table = list(csv.DictReader(io.StringIO(text)))
    assert table[0].keys() >= {"timestamp", "seq", "open", "close", "yang_zhang_annualized"}
    # The shown window, whole (the page may have drawn a bar or two more since).
    seqs = [int(r["seq"]) for r in table]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert abs(len(seqs) - len(shown)) <= 3 and seqs[0] == shown[0]["seq"]
    assert table[-1]["timestamp"].endswith("Z") and float(table[-1]["close"]) > 0
    for action in ("price-png", "vol-png"):
        with page.expect_download() as download:
            page.click(f'{card} button[data-action="{action}"]')
        assert download.value.suggested_filename.endswith(".png")
        assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stale_symbols_are_dimmed_and_labelled_when_updates_stop(
    tmp_path: Path, page: Page
) -> None:
    ports = free_ports()
    process: DaemonProcess = start_daemon(tmp_path, ports, {"dash": TOKEN})
    try:
        open_live(page, ports)
        assert page.locator("section.symbol.stale").count() == 0
        process.kill()  # updates stop (how the daemon went is tests/test_dashboard_browser.py's)
        # No update for 3 × 0.2 s: every row and chart is stale, dimmed and says so.
        page.wait_for_selector(
            '#overview tr[data-symbol="BTC/USD"][data-stale="true"]', timeout=WAIT_MS
        )
        page.wait_for_selector('section.symbol[data-symbol="ETH/USD"].stale', timeout=WAIT_MS)
        flag = page.inner_text('section.symbol[data-symbol="BTC/USD"] .stale-flag')
        assert flag.startswith("stale: no update for") and "expected every" in flag
        opacity = page.eval_on_selector(
            'section.symbol[data-symbol="BTC/USD"] .charts', "el => getComputedStyle(el).opacity"
        )
        assert float(opacity) < 1
    finally:
        process.kill()


FIFTY = tuple(f"S{i:02d}/USD" for i in range(50))


def test_fifty_symbols_render_in_the_overview_and_keep_updating(
    tmp_path: Path, browser: Browser
) -> None:
    """50 symbols at 1 update/s each (the CPU it costs is measured by bench/dashboard_cpu.py)."""
    ports = free_ports()
    process = start_daemon(tmp_path, ports, {"dash": TOKEN}, interval=1.0, symbols=FIFTY)
    page, errors = new_page(browser)
    try:
        page.goto(url(ports, TOKEN))
        wait_state(page, "live")
        page.wait_for_function(
            "() => document.querySelectorAll('#overview tbody tr').length === 50",
            timeout=WAIT_MS,
        )
        assert [r["symbol"] for r in rows(page)] == list(FIFTY)
        assert "50 symbols" in page.inner_text("#overview-count")
        assert page.locator("section.symbol").count() == 1  # only the first opens by itself
        total = """[...document.querySelectorAll('#overview tbody tr')]
            .reduce((n, tr) => n + +tr.dataset.updates, 0)"""
        page.wait_for_function(f"() => {total} >= 20", timeout=WAIT_MS)  # histories coming in
        before = page.evaluate(f"() => {total}")
        page.wait_for_function(f"() => {total} > {before} + 5", timeout=WAIT_MS)
        filled = page.eval_on_selector_all(
            "#overview tbody tr td.num:nth-child(3)",
            "tds => tds.filter((td) => td.dataset.value).length",
        )
        assert filled >= 5
        assert page.evaluate("document.body.dataset.cspViolations") == "0"
    finally:
        page.context.close()
        process.kill()
    assert not errors
