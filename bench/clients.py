"""Many clients across fan-out workers: how many one daemon holds, and how fast it serves them.

Starts the daemon with `[server] workers = --workers` and every process of it, and of the load,
under a descriptor limit of --nofile (20,000: one process alone could not hold the total), then
--loads load clients of --clients connections each, every one from its own loopback source
address (127.0.0.2, 127.0.0.3, ...: one address pair has about 28,000 ephemeral ports), all at
once, at an update every --interval seconds. When every load client has reported its connect
phase, it reads `/metrics` (clients connected, per worker) and each daemon process's open
descriptors; then the load clients measure deliveries, loss and latency over their window,
while this samples the daemon's CPU (every process of it) over the same window.

Two uses:
- on any machine, how many clients the workers hold (the defaults: 8 workers, 10 × 10,000
  clients at an update a second, about 3 GB of memory for a minute or two);
- on a machine with cores to spare, how fast they serve them: `--pin` puts the daemon on the
  first --daemon-cores cores and the load clients on the others, one per core (e.g. 8 workers,
  8 × 10,000 clients, `--interval 0.08`: 1,000,000 deliveries/s offered). `--binary` runs a
  frozen executable and `--loadclient` a load client built elsewhere, so only this file, the
  stdlib part of bench/run.py, Python 3.11+ and those two files need to be on that machine.

Prints a table and appends it, dated, to bench/RESULTS.md (unless --no-save); --out DIR also
writes the table and the raw figures there. Not part of `make bench`. Run as root it raises
net.core.somaxconn and tcp_max_syn_backlog for the run and restores them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
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

    window_started: threading.Event = field(default_factory=threading.Event)
    window_ended: threading.Event = field(default_factory=threading.Event)

    def follow(self) -> None:
        """Read its progress lines (stderr) until it ends, and flag its connect phase's end and
        its measurement window's edges as they come."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            if '"all_connected"' in line:
                self.connected.set()
            elif '"window_start"' in line:
                self.window_started.set()
            elif '"window_end"' in line:
                self.window_ended.set()
        for ended in (self.connected, self.window_started, self.window_ended):
            ended.set()  # ended (or failed) before: nothing more to wait for


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


def limit_descriptors(limit: int) -> int:
    """Set this process's RLIMIT_NOFILE (inherited by everything it starts) to `limit` or its
    hard limit if lower; returns the limit set."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    value = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (value, value))
    return value


def new_token() -> str:
    """A bench token (`token new`'s kind: URL-safe, not starting with "-")."""
    token = secrets.token_urlsafe(32)
    while token.startswith("-"):
        token = secrets.token_urlsafe(32)
    return token


def pinned(command: list[str], cores: list[int] | None) -> list[str]:
    """`command` run on `cores` only (taskset), as it is when None."""
    if cores is None:
        return command
    return ["taskset", "-c", ",".join(map(str, cores)), *command]


def core_plan(args: argparse.Namespace) -> tuple[list[int] | None, list[list[int] | None]]:
    """With --pin: the daemon's cores, and each load client's (one core each, round-robin over
    the cores the daemon does not use); without it: no pinning."""
    if not args.pin:
        return None, [None] * args.loads
    cpus = sorted(os.sched_getaffinity(0))
    if args.daemon_cores >= len(cpus):
        sys.exit(f"bench: --daemon-cores {args.daemon_cores} leaves no core of {len(cpus)} free")
    if shutil.which("taskset") is None:
        sys.exit("bench: --pin needs taskset (util-linux)")
    daemon, rest = cpus[: args.daemon_cores], cpus[args.daemon_cores :]
    return daemon, [[rest[i % len(rest)]] for i in range(args.loads)]


def loadclient_command(args: argparse.Namespace, port: int, token: str, source: str) -> list[str]:
    return [
        str(args.loadclient),
        *("--host", "127.0.0.1", "--port", str(port), "--source", source, "--token", token),
        *("--clients", str(args.clients), "--duration", str(args.duration)),
        *("--warmup", str(args.warmup), "--connect-timeout", str(CONNECT_TIMEOUT)),
    ]


def measure(args: argparse.Namespace) -> tuple[list[str], dict]:
    token = new_token()
    digest = hashlib.sha256(token.encode()).hexdigest()  # the config's `sha256` (README)
    daemon_cores, load_cores = core_plan(args)
    found: dict = {"daemon_cores": daemon_cores, "load_cores": load_cores}
    with tempfile.TemporaryDirectory(prefix="bench-clients-") as tmp:
        config = Path(tmp) / "agentspoonsd.toml"
        config.write_text(config_text(args, digest))
        log_path = Path(tmp) / "daemon.log"
        command = pinned([str(args.binary), "run", "--config", str(config)], daemon_cores)
        with bench.server_process(command, log_path) as (daemon, port):
            http_port = bench.wait_for_port(daemon, log_path, service="http")
            bench.wait_ready(http_port)  # every worker serving: none takes the whole storm
            kernel = bench.PeakKernelMemory()
            kernel.start()
            started = time.monotonic()
            loads = []
            for i in range(args.loads):
                source = f"127.0.0.{2 + i}"
                process = subprocess.Popen(
                    pinned(loadclient_command(args, port, token, source), load_cores[i]),
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
            found["descriptors"] = {pid: bench.open_fds(pid) for pid in tree}
            found["rss_mb"] = bench.rss_mb(daemon.pid)  # the whole tree
            found["metrics"] = bench.metrics(http_port)
            # The daemon's CPU over the load clients' windows (they start within moments).
            for load in loads:
                load.window_started.wait(args.warmup + 30)
            window = (time.monotonic(), bench.cpu_seconds(daemon.pid))
            loads[0].window_ended.wait(args.duration + 30)
            elapsed = time.monotonic() - window[0]
            found["daemon_cpu_pct"] = 100 * (bench.cpu_seconds(daemon.pid) - window[1]) / elapsed
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
    daemon_fds = sorted(found["descriptors"].values(), reverse=True)
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
        f"| Open descriptors of each daemon process, most first (limit {args.nofile:,}) | "
        f"{', '.join(f'{n:,}' for n in daemon_fds)} |",
        f"| Connect all (load clients started to the last one connected) | "
        f"{found['connect_all_s']:.1f} s |",
        f"| Deliveries/s (of expected) over {args.duration:g} s | "
        f"{delivered:,.0f} ({100 * delivered / expected:.0f}%) |",
        f"| Lost (seq gaps, whole run) | {sum(r['lost_total'] for r in reports):,} |",
        f"| p50 / p99 latency, worst load client | {p50:.1f} / {p99:.1f} ms |",
        f"| Daemon RSS, all processes | {found['rss_mb']:,.0f} MB |",
        f"| Kernel TCP buffers, peak; machine memory in use, peak rise | "
        f"{found['kernel_tcp_mb']:,.0f} MB; {found['memory_in_use_mb']:,.0f} MB |",
        f"| Daemon CPU over the window, all processes | {found['daemon_cpu_pct']:.0f} % |",
        f"| Load clients' CPU (each, max) | {max(r['cpu_pct'] for r in reports):.0f} % |",
        f"| Cores: daemon; load clients | {cores(found)} |",
        f"| Generator ticks skipped | {found['ticks_skipped']} |",
    ]


def daemon_version(binary: Path) -> str:
    """What `binary --version` prints, and the binary."""
    try:
        printed = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        printed = "version unknown"
    return f"{printed} ({binary})"


def cores(found: dict) -> str:
    if found["daemon_cores"] is None:
        return "not pinned (shared)"
    loads = sorted({c for cores in found["load_cores"] for c in cores})
    return f"{span(found['daemon_cores'])}; {span(loads)}"


def span(cores: list[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])


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
    parser.add_argument(
        "--binary",
        type=Path,
        default=Path(sys.executable).with_name("agentspoonsd"),
        help="the daemon to run (default: this venv's; or a frozen dist/agentspoonsd)",
    )
    parser.add_argument(
        "--loadclient", type=Path, default=None, help="a built load client (default: build it)"
    )
    parser.add_argument("--pin", action="store_true", help="daemon and load on their own cores")
    parser.add_argument("--daemon-cores", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--out", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.loads > 250:
        sys.exit("bench: at most 250 load clients (one loopback address each)")
    args.nofile = limit_descriptors(args.nofile)
    if args.loadclient is None:
        bench.build_loadclient()
        args.loadclient = bench.LOADCLIENT
    with bench.kernel_accept_queue(65535):
        accept_queue = bench.somaxconn()
        lines, found = measure(args)
    now = datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")
    text = "\n".join(
        [
            f"## {now} — `bench/clients.py --workers {args.workers} --loads {args.loads}"
            f" --clients {args.clients}`",
            "",
            *bench.machine_lines(accept_queue),
            f"Daemon: {daemon_version(args.binary)}",
            "",
            f"- One symbol, an update every {args.interval:g} s, every process under "
            f"{args.nofile:,} descriptors; load client i connects from 127.0.0.(2 + i).",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "clients.md").write_text(text)
        (args.out / "clients.json").write_text(json.dumps(found, indent=1, default=str))
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
