"""The dashboard's screenshots in docs/: `make screenshots` (docs/dashboard-1400.png, -390.png).

A real daemon (six symbols, a bar every 0.25 s, seed 7) and Debian's chromium driven by
Playwright, headless, as the browser tests do. The page fills for a few seconds, the ETH/USD
charts are switched to candles, then a full-page screenshot at 1400 px and one at 390 px (a
phone). Usage: python build/screenshots.py [DIRECTORY] (default docs/).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from dashboard_support import CHROMIUM, free_ports, start_daemon  # noqa: E402

TOKEN = "dashboard-screenshot-token"
SYMBOLS = ("BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "ADA/USD", "DOGE/USD")
OPEN = ("BTC/USD", "ETH/USD")
FILL_SECONDS = 12.0  # ~48 bars per symbol


def prepare(page: Page, http_port: int) -> None:
    page.goto(f"http://127.0.0.1:{http_port}/#access_token={TOKEN}")
    page.wait_for_selector('body[data-state="live"]', state="attached")
    page.wait_for_function("() => document.querySelectorAll('#overview tbody tr').length === 6")
    for symbol in SYMBOLS[:4]:  # more than OPEN_AT_FIRST symbols: choose the charts shown
        box = page.locator(f'#overview tr[data-symbol="{symbol}"] input[type="checkbox"]')
        box.set_checked(symbol in OPEN)
    page.click('section.symbol[data-symbol="ETH/USD"] button[data-value="candles"]')


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    ports = free_ports()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_daemon(Path(tmp), ports, {"docs": TOKEN}, interval=0.25, symbols=SYMBOLS)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
                wide = browser.new_page(viewport={"width": 1400, "height": 900})
                phone = browser.new_page(viewport={"width": 390, "height": 844})
                for page in (wide, phone):
                    prepare(page, ports.http)
                time.sleep(FILL_SECONDS)
                for page, name in ((wide, "dashboard-1400.png"), (phone, "dashboard-390.png")):
                    page.mouse.move(0, 0)  # no hover: legends show the latest values
                    page.screenshot(path=str(out / name), full_page=True)
                    print(out / name)
                browser.close()
        finally:
            daemon.kill()


if __name__ == "__main__":
    main()
