"""Fan-out through a cluster: N agentspoonsd nodes (`[broker] kind = "redis"`) share one local
redis-server; one load client (bench/loadclient.c) per node reads every update.

Latency here is end to end through Redis: the load client measures receive time minus the
message's `timestamp`, which the generating node stamps before its XADD, so it includes the
Lua publish, the XREAD of every node and its fan-out. Prints a Markdown table and appends it,
dated, to bench/RESULTS.md (unless --no-save).

    .venv/bin/python bench/cluster.py                  # 2 nodes x 2,000 clients, 20 updates/s
    .venv/bin/python bench/cluster.py --nodes 3 --clients 1000 --duration 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from run import (
    LOADCLIENT,
    RESULTS,
    ROOT,
    RUNS,
    SYMBOL,
    build_loadclient,
    cpu_seconds,
    memory_gib,
    rss_mb,
    stop_process,
    wait_for_port,
)

from agentspoonsd.auth import hash_token, new_token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def redis_server(workdir: Path) -> Any:
    """A throwaway redis-server (no persistence) on a free port; yields (process, port)."""
    subprocess.run(["sh", str(ROOT / "build" / "ensure-redis.sh")], check=True)
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield proc, port
    finally:
        stop_process(proc)


def node_config(workdir: Path, index: int, args: argparse.Namespace, redis_port: int, digest: str):
    path = workdir / f"node-{index}.toml"
    path.write_text(
        f"""[server]
host = "127.0.0.1"
port = 0
max_connections = {args.clients + 1000}
# every client comes from 127.0.0.1
max_handshakes_per_ip = {args.clients + 1000}

[auth]
enabled = true
[[auth.tokens]]
name = "bench"
sha256 = "{digest}"
symbols = ["*"]

[generator]
interval = {1 / args.rate!r}
symbols = ["{SYMBOL}"]
seed = 42

[history]
size = 1000

[broker]
kind = "redis"
url = "redis://127.0.0.1:{redis_port}/0"
lease = {args.lease}
prefix = "bench"

[health]
host = "127.0.0.1"
port = 0
"""
    )
    return path


class Window:
    """Follows one load client's progress lines; samples every process's CPU at the edges of
    its measurement window (the clients start together, so their windows coincide)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.times: list[float] = []

    def follow(self, stream: Any) -> None:
        for line in stream:
            with contextlib.suppress(ValueError):
                event = json.loads(line).get("event")
                if event == "window_start":
                    self.times.append(time.monotonic())
                    self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
                elif event == "window_end":
                    self.times.append(time.monotonic())
                    self.end = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def cpu_percent(self, name: str) -> float | None:
        if len(self.times) < 2 or name not in self.end:
            return None
        return 100 * (self.end[name] - self.start[name]) / (self.times[1] - self.times[0])


def run_clients(ports: list[int], token: str, args: argparse.Namespace, window: Window) -> list:
    clients = []
    for port in ports:
        cmd = [str(LOADCLIENT), "--host", "127.0.0.1", "--port", str(port), "--token", token]
        cmd += ["--clients", str(args.clients), "--duration", str(args.duration)]
        cmd += ["--warmup", str(args.warmup), "--connect-timeout", "90"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        clients.append(proc)
    follower = threading.Thread(target=window.follow, args=(clients[0].stderr,), daemon=True)
    follower.start()
    for proc in clients[1:]:  # drain the others' progress so they never block on a full pipe
        threading.Thread(target=proc.stderr.read, daemon=True).start()
    reports = []
    for proc in clients:
        out = proc.stdout.read()
        proc.wait()
        if proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"load client failed ({proc.returncode})")
        reports.append(json.loads(out))
    follower.join(5)
    return reports


def leader_of(logs: list[Path]) -> int | None:
    for index, log in enumerate(logs):
        if "leader_elected" in log.read_text(errors="replace"):
            return index
    return None


def measure(args: argparse.Namespace) -> str:
    build_loadclient()
    args.load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    token = new_token()
    RUNS.mkdir(exist_ok=True)
    executable = Path(sys.executable).with_name("agentspoonsd")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        redis_proc, redis_port = stack.enter_context(redis_server(workdir))
        nodes, logs, ports = [], [], []
        for index in range(args.nodes):
            config = node_config(workdir, index, args, redis_port, hash_token(token))
            log_path = RUNS / f"cluster-node-{index}.log"
            with log_path.open("w") as log:
                cmd = [str(executable), "run", "--config", str(config)]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(stop_process, proc)
            nodes.append(proc)
            logs.append(log_path)
            ports.append(wait_for_port(proc, log_path))
        deadline = time.monotonic() + 10
        while leader_of(logs) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = {f"node {i}": p.pid for i, p in enumerate(nodes)} | {"redis": redis_proc.pid}
        window = Window(pids)
        reports = run_clients(ports, token, args, window)
        rss = {name: rss_mb(pid) for name, pid in pids.items()}
        leader = leader_of(logs)
    return report(args, reports, window, rss, leader)


def report(
    args: argparse.Namespace,
    reports: list[dict[str, Any]],
    window: Window,
    rss: dict[str, float],
    leader: int | None,
) -> str:
    stamp = datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")
    command = " ".join(["bench/cluster.py", *sys.argv[1:]])
    lines = [
        f"## {stamp} — `{command}` (cluster)",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB; "
        f"nodes, redis-server and load clients all on it; load average {args.load_before:.2f} "
        "before the run",
        f"- {args.nodes} nodes x {args.clients:,} clients, {args.rate:g} updates/s of one "
        f"symbol, lease {args.lease:g} s, warm-up {args.warmup:g} s, measured {args.duration:g} s",
        "- latency: client receive - the generating node's publish stamp (taken before its "
        "XADD): Redis round trips included",
        "",
        "| node | role | clients | deliveries/s | p50 ms | p99 ms | max ms | lost | CPU % | "
        "RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for index, r in enumerate(reports):
        name = f"node {index}"
        latency = r["latency_ms"]
        total += r["deliveries_per_s"]
        role = "generator" if index == leader else "follower"
        lines.append(
            f"| {index} | {role} | {r['upgraded']:,} | {r['deliveries_per_s']:,.0f} | "
            f"{latency['p50']:.1f} | {latency['p99']:.1f} | {latency['max']:.1f} | "
            f"{r['lost_total']} | {fmt(window.cpu_percent(name))} | {rss[name]:.0f} |"
        )
    lines += [
        "",
        f"- total: {total:,.0f} deliveries/s; redis-server CPU {fmt(window.cpu_percent('redis'))} %"
        f", RSS {rss['redis']:.0f} MB",
        "",
    ]
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2000, help="per node")
    parser.add_argument("--rate", type=float, default=20.0, help="updates/s of the symbol")
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--no-save", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    text = measure(args)
    print(text)
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
