"""`make bench` (shipping part): the frozen executable's figures.

- `make binary` from a clean dist/ (PyInstaller's own cache kept, as on a developer machine);
- the size of dist/agentspoonsd;
- exec to READY=1: the frozen daemon started as systemd would (NOTIFY_SOCKET set to a datagram
  socket), timed from exec to the READY=1 datagram, over several starts; the median is reported.

Prints a table and appends it, dated, to bench/RESULTS.md (unless --no-save).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "agentspoonsd"
RESULTS = Path(__file__).with_name("RESULTS.md")


def build() -> float:
    BINARY.unlink(missing_ok=True)
    started = time.monotonic()
    subprocess.run(["make", "-s", "binary"], cwd=ROOT, check=True)
    return time.monotonic() - started


def exec_to_ready(workdir: Path) -> float:
    token = secrets.token_urlsafe(16)
    config = workdir / "agentspoonsd.toml"
    config.write_text(
        f"""[server]
host = "127.0.0.1"
port = 0
[auth]
[[auth.tokens]]
name = "bench"
sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"
[health]
port = 0
[log]
level = "warning"
"""
    )
    address = str(workdir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(10)
        env = {**os.environ, "NOTIFY_SOCKET": address, "TMPDIR": str(workdir)}
        started = time.monotonic()
        daemon = subprocess.Popen(
            [str(BINARY), "run", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                fields = notify.recv(4096).decode().splitlines()
                if "READY=1" in fields:
                    return time.monotonic() - started
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=15)
            os.unlink(address)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=7)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    build_s = build()
    size_mb = BINARY.stat().st_size / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        times = [exec_to_ready(Path(tmp)) for _ in range(args.starts)]
    lines = [
        f"## {datetime.now(UTC):%a %b %d %H:%M:%S UTC %Y} — `bench/ship.py`",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}.",
        "",
        "| Measure | Value | Target |",
        "|---|--:|--:|",
        f"| `make binary` (dist/ cleared, PyInstaller cache kept) | {build_s:.0f} s | ≤ 300 s |",
        f"| dist/agentspoonsd size | {size_mb:.1f} MB | ≤ 60 MB |",
        f"| exec to READY=1, median of {len(times)} starts | {statistics.median(times):.2f} s "
        f"(min {min(times):.2f}, max {max(times):.2f}) | ≤ 1.5 s |",
        "",
    ]
    print("\n".join(lines))
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
