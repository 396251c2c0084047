"""How much CPU the dashboard costs the browser: 50 symbols at 1 update/s each, in Chromium.

A real daemon (50 symbols, `interval = 1.0`) and Debian's chromium driven by Playwright, headless
(software rendering: no GPU, so everything the page costs lands on the CPU). The page is opened
with its defaults (the 50-row overview, the first symbol's charts open; `--open N` opens N), the
histories are let in and the page warmed up, then for `--seconds` (30) we read:

- the CPU time (user + system, /proc/PID/stat) of every chromium process under this browser, by
  process type (renderer, gpu-process, utility, browser), as a share of one core;
- the renderer main thread's busy time (CDP Performance.getMetrics `TaskDuration`) and its script
  part (`ScriptDuration`), as a share of one core.

The figure the issue asks about is the page's renderer process (`page_renderer_cpu_share`); the
others (the GPU process doing software compositing, the browser process) are listed beside it.
Not part of `make test`: `make bench-dashboard` (or `python bench/dashboard_cpu.py`). Prints one
JSON object. The machine's other load counts too: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from dashboard_support import CHROMIUM, free_ports, start_daemon  # noqa: E402

TOKEN = "dashboard-cpu-bench-token"
TICKS = os.sysconf("SC_CLK_TCK")
MARKER = "--agentspoonsd-bench-browser"  # finds this browser's processes among others


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used) of `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def _kind(pid: int) -> str:
    # Chromium rewrites its command line as one space-separated string (setproctitle).
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    match = re.search(r"--type=(\S+)", command)
    return match[1] if match else "browser"


def browser_processes() -> dict[int, str]:
    """Every process of the chromium started with MARKER, by pid: its type."""
    parents: dict[int, int] = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None:
            continue
        parents[pid] = stat[0]
        try:
            if MARKER.encode() in (entry / "cmdline").read_bytes():
                roots.append(pid)
        except OSError:
            continue
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return {pid: _kind(pid) for pid in found}


def cpu_by_pid(processes: dict[int, str]) -> dict[int, float]:
    return {pid: stat[1] for pid in processes if (stat := _stat(pid)) is not None}


def measure(seconds: float, open_charts: int, symbols: int, warmup: float) -> dict[str, Any]:
    names = tuple(f"S{i:02d}/USD" for i in range(symbols))
    ports = free_ports()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_daemon(Path(tmp), ports, {"bench": TOKEN}, interval=1.0, symbols=names)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=str(CHROMIUM), headless=True, args=[MARKER]
                )
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{ports.http}/#access_token={TOKEN}")
                page.wait_for_selector('body[data-state="live"]', state="attached")
                # The histories come in at ~5 symbols a second (the daemon's request budget).
                page.wait_for_function(
                    """(n) => [...document.querySelectorAll('#overview tbody tr')]
                        .filter((tr) => +tr.dataset.updates > 0).length === n""",
                    arg=symbols,
                    timeout=60_000,
                )
                for name in names[1:open_charts]:
                    page.check(f'#overview tr[data-symbol="{name}"] input[type="checkbox"]')
                time.sleep(warmup)
                cdp = page.context.new_cdp_session(page)
                cdp.send("Performance.enable")
                processes = browser_processes()

                def metrics() -> dict[str, float]:
                    reply = cdp.send("Performance.getMetrics")
                    return {m["name"]: m["value"] for m in reply["metrics"]}

                updates = "() => [...document.querySelectorAll('#overview tbody tr')]" + (
                    ".reduce((n, tr) => n + +tr.dataset.updates, 0)"
                )
                cpu0, m0, u0 = cpu_by_pid(processes), metrics(), page.evaluate(updates)
                t0 = time.monotonic()
                time.sleep(seconds)
                elapsed = time.monotonic() - t0
                cpu1, m1, u1 = cpu_by_pid(processes), metrics(), page.evaluate(updates)
                rows = page.locator("#overview tbody tr").count()
                errors = page.evaluate("document.body.dataset.cspViolations")
                browser.close()
        finally:
            daemon.kill()
    used = {pid: (cpu1[pid] - cpu0.get(pid, 0.0)) / elapsed for pid in cpu1}
    share: dict[str, float] = {}
    for pid, seconds in used.items():
        share[processes[pid]] = round(share.get(processes[pid], 0.0) + seconds, 4)
    # The page's own renderer: the busiest (the others are chromium's internal pages, idle).
    page_renderer = max((v for p, v in used.items() if processes[p] == "renderer"), default=None)
    return {
        "symbols": symbols,
        "interval_s": 1.0,
        "charts_open": open_charts,
        "seconds": round(elapsed, 1),
        "rows": rows,
        "updates_received": int(u1 - u0),
        "cpu_share_of_one_core_by_process": share,
        "page_renderer_cpu_share": None if page_renderer is None else round(page_renderer, 4),
        "renderer_main_thread_busy_share": round(
            (m1["TaskDuration"] - m0["TaskDuration"]) / elapsed, 4
        ),
        "renderer_script_share": round((m1["ScriptDuration"] - m0["ScriptDuration"]) / elapsed, 4),
        "csp_violations": errors,
        "chromium": CHROMIUM.name,
        "cores": os.cpu_count(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--open", type=int, default=1, help="symbols whose charts are open")
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args()
    result = measure(args.seconds, args.open, args.symbols, args.warmup)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
