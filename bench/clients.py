"""Many clients across fan-out workers: how many one daemon holds with `[server] workers = N`.

Starts the daemon with `[server] workers = --workers` and every process of it, and of the load,
under a descriptor limit of --nofile (20,000: one process alone could not hold the total), then
--loads load clients of --clients connections each, every one from its own loopback source
address (127.0.0.2, 127.0.0.3, ...: one address pair has about 28,000 ephemeral ports), all at
once, at a low update rate (--interval). When every load client has reported its connect phase,
it reads `/metrics` (clients connected, per worker) and each daemon process's open descriptors;
then the load clients measure deliveries, loss and latency over their window.

Prints a table and appends it, dated, to bench/RESULTS.md (unless --no-save). Not part of
`make bench`: at the defaults (8 workers, 10 × 10,000 clients) it holds 100,000 connections,
about 3 GB of memory across the processes, for a minute or two. Run as root it raises
net.core.somaxconn and tcp_max_syn_backlog for the run and restores them.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import run as bench

RESULTS = Path(__file__).with_name("RESULTS.md")
CONNECT_TIMEOUT = 240.0  # seconds the load clients' connect phase may take


@dataclass
class Load:
    """One load client process and what it reported."""

    source: str
    process: subprocess.Popen[str]
    connected: threading.Event = field(default_factory=threading.Event)
    report: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def follow(self) -> None:
        """Read its progress lines (stderr) until it ends; `connected` at `all_connected`."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            if '"all_connected"' in line:
                self.connected.set()
        self.connected.set()  # ended (or failed) before: nothing more to wait for


def config_text(args: argparse.Namespace, digest: str) -> str:
    total = args.loads * args.clients
    return f"""[server]
host = "127.0.0.1"
port = 0
workers = {args.workers}
max_connections = {total + 1000}
max_handshakes_per_ip = {args.clients + 1000}
listen_backlog = 65535

[[auth.tokens]]
name = "bench"
sha256 = "{digest}"
symbols = ["*"]

[generator]
interval = {args.interval!r}
symbols = ["{bench.SYMBOL}"]
seed = 42

[health]
host = "127.0.0.1"
port = 0

[log]
level = "info"
"""


def health_port(log_path: Path) -> int:
    """The port of the daemon's HTTP service (health, `/metrics`), from its log."""
    deadline = time.monotonic() + bench.SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"listener_bound"' in line and '"service":"http"' in line:
                return int(json.loads(line)["address"].rsplit(":", 1)[1])
        time.sleep(0.1)
    raise RuntimeError("no listener_bound line for the HTTP port")


def metrics(port: int) -> dict[str, float]:
    """The samples of `/metrics` this benchmark reads, by series (labels kept)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = re.compile(
        r"^(agentspoonsd_(?:clients_connected|workers_ready|worker_clients)\S*) (\S+)$", re.M
    )
    return {name: float(value) for name, value in wanted.findall(text)}


def descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def limit_descriptors(limit: int) -> int:
    """Set this process's RLIMIT_NOFILE (inherited by everything it starts) to `limit` or its
    hard limit if lower; returns the limit set."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    value = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (value, value))
    return value


def loadclient_command(args: argparse.Namespace, port: int, token: str, source: str) -> list[str]:
    return [
        str(bench.LOADCLIENT),
        *("--host", "127.0.0.1", "--port", str(port), "--source", source, "--token", token),
        *("--clients", str(args.clients), "--duration", str(args.duration)),
        *("--warmup", str(args.warmup), "--connect-timeout", str(CONNECT_TIMEOUT)),
    ]


def measure(args: argparse.Namespace) -> tuple[list[str], dict]:
    token = bench.new_token()
    found: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-clients-") as tmp:
        config = Path(tmp) / "agentspoonsd.toml"
        config.write_text(config_text(args, bench.hash_token(token)))
        executable = Path(sys.executable).with_name("agentspoonsd")
        log_path = Path(tmp) / "daemon.log"
        command = [str(executable), "run", "--config", str(config)]
        with bench.server_process(command, log_path) as (daemon, port):
            http_port = health_port(log_path)
            kernel = bench.PeakKernelMemory()
            kernel.start()
            started = time.monotonic()
            loads = []
            for i in range(args.loads):
                source = f"127.0.0.{2 + i}"
                process = subprocess.Popen(
                    loadclient_command(args, port, token, source),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                load = Load(source, process)
                threading.Thread(target=load.follow, daemon=True).start()
                loads.append(load)
            for load in loads:
                load.connected.wait(CONNECT_TIMEOUT + 30)
            found["connect_all_s"] = time.monotonic() - started
            time.sleep(2.0)  # the last handshakes reach the workers' counts and their reports
            tree = bench.process_tree(daemon.pid)
            found["descriptors"] = {pid: descriptors(pid) for pid in tree}
            found["rss_mb"] = bench.rss_mb(daemon.pid)  # the whole tree
            found["metrics"] = metrics(http_port)
            for load in loads:
                assert load.process.stdout is not None
                out = load.process.stdout.read()
                load.process.wait()
                if load.process.returncode != 0 or not out.strip():
                    raise RuntimeError(f"load client {load.source} failed: {load.lines[-3:]}")
                load.report = json.loads(out)
            found["kernel_tcp_mb"], found["memory_in_use_mb"] = kernel.stop()
            found["ticks_skipped"] = bench.ticks_skipped(log_path)
    found["loads"] = [load.report for load in loads]
    return table(args, found), found


def table(args: argparse.Namespace, found: dict) -> list[str]:
    reports = found["loads"]
    total = args.loads * args.clients
    upgraded = sum(r["upgraded"] for r in reports)
    connected = found["metrics"].get("agentspoonsd_clients_connected", float("nan"))
    per_worker = sorted(
        int(v) for k, v in found["metrics"].items() if k.startswith("agentspoonsd_worker_clients")
    )
    daemon_fds = found["descriptors"]
    master_fds = next(iter(daemon_fds.values()))
    worker_fds = list(daemon_fds.values())[1:]
    expected = sum(r["readers"] for r in reports) * (1 / args.interval)
    delivered = sum(r["deliveries_per_s"] for r in reports)
    p50 = max(r["latency_ms"]["p50"] for r in reports)
    p99 = max(r["latency_ms"]["p99"] for r in reports)
    return [
        "| Measure | Value |",
        "|---|--:|",
        f"| Clients offered ({args.loads} load clients × {args.clients:,}) | {total:,} |",
        f"| Upgraded (load clients' count) | {upgraded:,} |",
        f"| `agentspoonsd_clients_connected` once all had connected | {connected:,.0f} |",
        f"| Clients per worker (`agentspoonsd_worker_clients`) | "
        f"{', '.join(f'{n:,}' for n in per_worker)} |",
        f"| Open descriptors: master; each worker (limit {args.nofile:,} per process) | "
        f"{master_fds:,}; {', '.join(f'{n:,}' for n in worker_fds)} |",
        f"| Connect all (load clients started to the last one connected) | "
        f"{found['connect_all_s']:.1f} s |",
        f"| Deliveries/s (of expected) over {args.duration:g} s | "
        f"{delivered:,.0f} ({100 * delivered / expected:.0f}%) |",
        f"| Lost (seq gaps, whole run) | {sum(r['lost_total'] for r in reports):,} |",
        f"| p50 / p99 latency, worst load client | {p50:.1f} / {p99:.1f} ms |",
        f"| Daemon RSS, all processes | {found['rss_mb']:,.0f} MB |",
        f"| Kernel TCP buffers, peak; machine memory in use, peak rise | "
        f"{found['kernel_tcp_mb']:,.0f} MB; {found['memory_in_use_mb']:,.0f} MB |",
        f"| Load clients' CPU (each, max) | {max(r['cpu_pct'] for r in reports):.0f} % |",
        f"| Generator ticks skipped | {found['ticks_skipped']} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--loads", type=int, default=10, help="load client processes")
    parser.add_argument("--clients", type=int, default=10_000, help="connections per load client")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--nofile", type=int, default=20_000, help="descriptors per process")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.loads > 250:
        sys.exit("bench: at most 250 load clients (one loopback address each)")
    args.nofile = limit_descriptors(args.nofile)
    bench.build_loadclient()
    with bench.kernel_accept_queue(65535):
        accept_queue = bench.somaxconn()
        lines, _ = measure(args)
    now = datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")
    text = "\n".join(
        [
            f"## {now} — `bench/clients.py --workers {args.workers} --loads {args.loads}"
            f" --clients {args.clients}`",
            "",
            *bench.machine_lines(accept_queue),
            "",
            f"- One symbol, an update every {args.interval:g} s, every process under "
            f"{args.nofile:,} descriptors; load client i connects from 127.0.0.(2 + i).",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
