"""`make bench`: agentspoonsd against Node.js `ws` and Python `websockets`, same job, same machine.

For each scenario and server: start the server as a subprocess on a free port, run the C load
client (bench/loadclient.c) against it, sample the server's CPU over the client's measurement
window and its peak RSS over the whole run, stop it with SIGTERM. Prints one Markdown table and
appends it, dated, with the machine's description, to bench/RESULTS.md.

Stdlib only; run it with the daemon venv's python (`measure` and `main` import agentspoonsd for
the token; the rest, which bench/clients.py uses, runs on any Python 3.11+). It builds the load
client and installs the comparison servers' dependencies when they are missing.
See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RUNS = BENCH / ".runs"  # server logs and raw client reports of the last run (gitignored)
LOADCLIENT_SRC = BENCH / "loadclient.c"
LOADCLIENT = BENCH / ".build" / "loadclient"
BENCH_VENV = BENCH / ".venv-bench"
BENCH_REQUIREMENTS = BENCH / "requirements-bench.txt"
RESULTS = BENCH / "RESULTS.md"
SYMBOL = "BTC/USD"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    clients: int
    rate: float  # updates per second of the one symbol
    warmup: float
    duration: float
    nonreading_fraction: float = 0.0
    backlog_bytes: int = 1 << 20  # the servers' per-client cap on unsent bytes (daemon default)
    connect_rate: float = 0.0  # connections started per second; 0 = all at once
    listen_backlog: int = 16384  # every server's listen(2) backlog
    deflate: bool = False  # clients offer permessage-deflate; servers enable it

    @property
    def readers(self) -> int:
        return self.clients - int(self.clients * self.nonreading_fraction)


@dataclass
class Result:
    scenario: Scenario
    server: str
    client: dict = field(default_factory=dict)  # the load client's JSON report
    server_cpu_pct: float | None = None
    server_rss_mb: float | None = None
    listen_overflows: int = 0  # the kernel's count of connections dropped, accept queue full
    ticks_skipped: int = 0  # generator ticks the daemon skipped because it was behind
    kernel_tcp_mb: float | None = None  # peak of the kernel's TCP buffer memory (all sockets)
    memory_in_use_mb: float | None = None  # peak rise of the machine's memory in use
    error: str | None = None


# ---------------------------------------------------------------- setup


def run_quiet(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)


def ensure_tool(name: str, apt_package: str) -> bool:
    """Is `name` on PATH? If not, try apt-get (as root), the only installer a fresh box has."""
    if shutil.which(name):
        return True
    if shutil.which("apt-get") and os.geteuid() == 0:
        with contextlib.suppress(subprocess.CalledProcessError):
            run_quiet(["apt-get", "install", "-y", "-q", apt_package])
    return shutil.which(name) is not None


def build_loadclient() -> None:
    if LOADCLIENT.exists() and LOADCLIENT.stat().st_mtime >= LOADCLIENT_SRC.stat().st_mtime:
        return
    if not ensure_tool("gcc", "gcc"):
        sys.exit("bench: gcc is needed to build the load client")
    LOADCLIENT.parent.mkdir(exist_ok=True)
    cmd = [
        *("gcc", "-O2", "-Wall", "-Wextra", "-Werror"),
        *("-o", str(LOADCLIENT), str(LOADCLIENT_SRC), "-lz"),
    ]
    run_quiet(cmd)


def ensure_node_deps() -> str | None:
    """None when the Node.js server can run, else why not."""
    if not (ensure_tool("node", "nodejs") and ensure_tool("npm", "npm")):
        return "node/npm not available"
    if not (BENCH / "node_modules" / "ws" / "package.json").exists():
        try:
            run_quiet(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH)
        except subprocess.CalledProcessError:
            return "npm ci failed"
    return None


def ensure_bench_venv() -> str | None:
    """websockets (and py-spy) live in their own venv so the daemon's stays clean."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".installed"
    if stamp.exists() and stamp.stat().st_mtime >= BENCH_REQUIREMENTS.stat().st_mtime:
        return None
    try:
        if not python.exists():
            run_quiet([sys.executable, "-m", "venv", str(BENCH_VENV)])
        run_quiet([str(python), "-m", "pip", "install", "-q", "-r", str(BENCH_REQUIREMENTS)])
    except subprocess.CalledProcessError:
        return "pip install -r requirements-bench.txt failed"
    stamp.touch()
    return None


# ---------------------------------------------------------------- the servers


def daemon_command(scenario: Scenario, workdir: Path, digest: str, workers: int = 1) -> list[str]:
    """The daemon on a config for `scenario`; `workers` > 1: a master and that many fan-out
    worker processes (`[server] workers`)."""
    config = workdir / "agentspoonsd.toml"
    config.write_text(
        f"""[server]
host = "127.0.0.1"
port = 0
workers = {workers}
max_connections = {scenario.clients + 1000}
# every client comes from 127.0.0.1: a storm of them is many handshakes from one address
max_handshakes_per_ip = {scenario.clients + 1000}
max_backlog_bytes = {scenario.backlog_bytes}
permessage_deflate = {str(scenario.deflate).lower()}
listen_backlog = {scenario.listen_backlog}

[auth]
enabled = true
[[auth.tokens]]
name = "bench"
sha256 = "{digest}"
symbols = ["*"]

[generator]
interval = {1 / scenario.rate!r}
symbols = ["{SYMBOL}"]
seed = 42

[health]
host = "127.0.0.1"
port = 0

[log]
level = "info"
"""
    )
    executable = Path(sys.executable).with_name("agentspoonsd")
    return [str(executable), "run", "--config", str(config)]


def sample_analytics(workdir: Path) -> Path:
    """The analytics fields of one real update (estimators, GARCH forecast), for the comparison
    servers to send along: every server then sends messages of the same size."""
    path = workdir / "sample-analytics.json"
    if not path.exists():
        executable = Path(sys.executable).with_name("agentspoonsd")
        line = subprocess.run(
            [str(executable), "simulate", "--steps", "1", "--seed", "42"],
            check=True,
            capture_output=True,
        ).stdout
        data = json.loads(line)
        keys = ("estimators", "estimators_annualized", "garch_forecast")
        path.write_text(json.dumps({key: data[key] for key in keys}))
    return path


def comparison_args(scenario: Scenario, digest: str, workdir: Path) -> list[str]:
    return [
        *("--extra-json", str(sample_analytics(workdir))),
        *("--interval", repr(1 / scenario.rate), "--symbols", SYMBOL),
        *("--token-sha256", digest, "--max-backlog-bytes", str(scenario.backlog_bytes)),
        *("--listen-backlog", str(scenario.listen_backlog)),
        *("--deflate", "true" if scenario.deflate else "false"),
    ]


def node_command(scenario: Scenario, workdir: Path, digest: str) -> list[str]:
    script = BENCH / "servers" / "node_ws_server.js"
    return ["node", str(script), *comparison_args(scenario, digest, workdir)]


def websockets_command(scenario: Scenario, workdir: Path, digest: str) -> list[str]:
    script = BENCH / "servers" / "py_websockets_server.py"
    python = BENCH_VENV / "bin" / "python"
    return [str(python), str(script), *comparison_args(scenario, digest, workdir)]


CommandFn = Callable[[Scenario, Path, str], list[str]]
SERVERS: dict[str, CommandFn] = {
    "agentspoonsd": daemon_command,
    # The same daemon as a master and two fan-out workers: compare with the line above (not
    # part of the default run: --servers agentspoonsd,agentspoonsd-2w; bench/README.md).
    "agentspoonsd-2w": functools.partial(daemon_command, workers=2),
    "node-ws": node_command,
    "python-websockets": websockets_command,
}


DEFAULT_SERVERS = ("agentspoonsd", "node-ws", "python-websockets")


# ---------------------------------------------------------------- process sampling


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc: a daemon's worker processes, and below a
    frozen executable's bootloader the daemon itself and its workers."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
    tree = [pid]
    for member in tree:  # grows while it is walked: breadth first
        tree.extend(sorted(child for child, parent in parents.items() if parent == member))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` and of its children, from /proc (fields 14 and
    15): over 100 % of one core when a daemon's workers use several."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def listen_overflows() -> int:
    """TcpExt ListenOverflows: a handshake dropped because the accept queue was full.

    A dropped SYN is retried by the client after 1 s, then 3 s, 7 s…: the usual cause of a slow
    connect-all time. The counter is per network namespace, so take the difference over a run.
    """
    with contextlib.suppress(OSError, ValueError, StopIteration):
        rows = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
        names, values = (r for r in rows if r[0] == "TcpExt:")
        return int(values[names.index("ListenOverflows")])
    return 0


def rss_mb(pid: int) -> float:
    """VmRSS of `pid` and its children (a daemon's workers), MB."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


def kernel_memory_mb() -> tuple[float, float]:
    """(TCP buffer memory, memory in use) of the whole machine, MB: what sockets hold in the
    kernel (both ends, on loopback), and MemTotal - MemAvailable, which also counts pages the
    kernel keeps beyond what it charges to sockets."""
    pages = 0
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            pages = int(fields[fields.index("mem") + 1])
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0])  # kB
    in_use = (info["MemTotal"] - info["MemAvailable"]) / 1024
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, in_use


class PeakKernelMemory(threading.Thread):
    """Polls `kernel_memory_mb` until stopped: the peaks, memory in use as a rise over the start."""

    def __init__(self, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.tcp_mb, baseline = kernel_memory_mb()
        self.baseline, self.in_use_mb = baseline, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            tcp, in_use = kernel_memory_mb()
            self.tcp_mb = max(self.tcp_mb, tcp)
            self.in_use_mb = max(self.in_use_mb, in_use - self.baseline)
            self._stop_event.wait(self.period)

    def stop(self) -> tuple[float, float]:
        self._stop_event.set()
        self.join()
        return self.tcp_mb, self.in_use_mb


class PeakRss(threading.Thread):
    """Polls a process's VmRSS until stopped and keeps the peak."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.period, self.peak = pid, period, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_mb(self.pid))
            self._stop_event.wait(self.period)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak


@contextlib.contextmanager
def server_process(cmd: list[str], log_path: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """Start a server, wait for its `listener_bound` line, yield (process, port), then stop it."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=BENCH)
    try:
        yield proc, wait_for_port(proc, log_path)
    finally:
        stop_process(proc)


def wait_for_port(proc: subprocess.Popen, log_path: Path, service: str = "websocket") -> int:
    """The port `service` ("websocket", or the daemon's "http": probes and /metrics) bound, from
    its `listener_bound` line."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "listener_bound" and event.get("service") == service:
                    return int(event["address"].rsplit(":", 1)[1])
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {tail(log_path)}")
        time.sleep(0.1)
    raise RuntimeError(f"no listener_bound line within {SERVER_START_TIMEOUT:.0f}s")


def metrics(port: int) -> dict[str, float]:
    """The daemon's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


def wait_ready(port: int, timeout: float = 30.0) -> None:
    """Until the daemon's /readyz on HTTP `port` answers 200 (with workers: all of them serve)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = f"http://127.0.0.1:{port}/readyz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError("the daemon did not become ready")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(SERVER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ticks_skipped(log_path: Path) -> int:
    """Sum of the daemon's `generator_ticks_skipped` counts (its log is one JSON per line)."""
    total = 0
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if "generator_ticks_skipped" in line:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    total += int(json.loads(line)["count"])
    return total


def tail(path: Path, lines: int = 5) -> str:
    return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------- one measurement


class WindowCpu:
    """Reads the load client's progress lines and samples the server's CPU at window edges."""

    def __init__(self, server_pid: int, on_window_start: Callable[[], None] | None) -> None:
        self.server_pid = server_pid
        self.on_window_start = on_window_start
        self.marks: dict[str, tuple[float, float]] = {}  # event -> (monotonic, server cpu s)
        self.other_lines: list[str] = []

    def follow(self, stream) -> None:
        for line in stream:
            try:
                event = json.loads(line)["event"]
            except (ValueError, KeyError, TypeError):
                self.other_lines.append(line.rstrip())
                continue
            with contextlib.suppress(OSError):
                self.marks[event] = (time.monotonic(), cpu_seconds(self.server_pid))
            if event == "window_start" and self.on_window_start:
                self.on_window_start()

    def percent(self) -> float | None:
        if "window_start" not in self.marks or "window_end" not in self.marks:
            return None
        (t0, c0), (t1, c1) = self.marks["window_start"], self.marks["window_end"]
        return 100 * (c1 - c0) / (t1 - t0) if t1 > t0 else None


def loadclient_command(scenario: Scenario, port: int, token: str) -> list[str]:
    return [
        str(LOADCLIENT),
        *("--host", "127.0.0.1", "--port", str(port), "--token", token),
        *("--clients", str(scenario.clients), "--duration", str(scenario.duration)),
        *("--warmup", str(scenario.warmup), "--connect-rate", str(scenario.connect_rate)),
        *("--nonreading-fraction", str(scenario.nonreading_fraction)),
        *("--connect-timeout", "90"),
        *(["--deflate"] if scenario.deflate else []),
    ]


def run_loadclient(cmd: list[str], window: WindowCpu) -> dict:
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    follower = threading.Thread(target=window.follow, args=(client.stderr,), daemon=True)
    follower.start()
    out = client.stdout.read()  # not communicate(): the follower owns stderr
    client.wait()
    follower.join()
    if client.returncode != 0 or not out.strip():
        raise RuntimeError(f"load client failed ({client.returncode}): {window.other_lines[-3:]}")
    return json.loads(out)


def measure(scenario: Scenario, server: str, token: str, profile: bool) -> Result:
    from agentspoonsd.auth import hash_token  # the daemon's venv (module docstring)

    result = Result(scenario, server)
    name = f"{scenario.key}-{server}"
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        cmd = SERVERS[server](scenario, Path(tmp), hash_token(token))
        overflows_before = listen_overflows()
        try:
            with server_process(cmd, RUNS / f"{name}.log") as (proc, port):
                rss = PeakRss(proc.pid)
                rss.start()
                kernel = PeakKernelMemory()
                kernel.start()
                profiler = Profiler(proc.pid, scenario, RUNS / name) if profile else None
                window = WindowCpu(proc.pid, profiler.start if profiler else None)
                try:
                    result.client = run_loadclient(
                        loadclient_command(scenario, port, token), window
                    )
                finally:
                    result.server_rss_mb = rss.stop()
                    result.kernel_tcp_mb, result.memory_in_use_mb = kernel.stop()
                    if profiler:
                        profiler.finish()
                result.server_cpu_pct = window.percent()
                result.listen_overflows = listen_overflows() - overflows_before
        except (RuntimeError, OSError, ValueError) as exc:
            result.error = str(exc)
    result.ticks_skipped = ticks_skipped(RUNS / f"{name}.log")
    (RUNS / f"{name}.json").write_text(json.dumps(result.client, indent=1))
    return result


class Profiler:
    """py-spy over the measurement window (--profile): where the server's CPU goes.

    It samples from the other core the client and server share, so the figures of a profiled
    run are not comparable with an unprofiled one.
    """

    def __init__(self, pid: int, scenario: Scenario, stem: Path) -> None:
        self.pid, self.scenario, self.out = pid, scenario, stem.with_suffix(".folded")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        py_spy = BENCH_VENV / "bin" / "py-spy"
        if not py_spy.exists() or not is_python(self.pid):
            return
        cmd = [str(py_spy), "record", "--pid", str(self.pid), "--nonblocking", "--rate", "50"]
        cmd += ["--duration", str(int(self.scenario.duration)), "--format", "raw"]
        cmd += ["--output", str(self.out)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self) -> None:
        if self.proc is None:
            return
        self.proc.wait()
        print(f"\nprofile {self.out.name} (self time, top 15):", file=sys.stderr)
        for share, frame in top_frames(self.out, 15):
            print(f"  {share:5.1f}%  {frame}", file=sys.stderr)


def is_python(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "python" in os.readlink(f"/proc/{pid}/exe")
    return False


def top_frames(folded: Path, count: int) -> list[tuple[float, str]]:
    """Leaf frames of py-spy's raw (folded) output, by share of samples."""
    leaves: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in folded.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            leaves[stack.rsplit(";", 1)[-1]] += int(samples)
    total = sum(leaves.values()) or 1
    return [(100 * n / total, frame) for frame, n in leaves.most_common(count)]


# ---------------------------------------------------------------- the report


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def notes(result: Result) -> str:
    c = result.client
    found = []
    failed = sum(c.get(k, 0) for k in ("connect_failed", "http_refused", "connect_timeouts"))
    if failed:
        found.append(f"{failed} of {c['clients']} not connected ({c.get('first_error')})")
    if result.scenario.key == "B" and c.get("connect_ms"):
        ms = c["connect_ms"]
        found.append(f"connect p50 {ms['p50'] / 1000:.2f} s, p99 {ms['p99'] / 1000:.2f} s")
    if result.scenario.deflate:
        share = c.get("inflated", 0) / max(1, c.get("messages", 0))
        found.append(f"{share:.0%} of messages arrived compressed")
    if result.ticks_skipped:
        found.append(f"{result.ticks_skipped:,} ticks skipped (whole run)")
    if result.listen_overflows:
        found.append(f"{result.listen_overflows:,} accept-queue overflows")
    if c.get("readers_closed"):
        found.append(f"{c['readers_closed']} readers closed")
    if c.get("nonreaders"):
        queued_kb = c["nonreaders_drained_bytes"] / c["nonreaders"] / 1024
        found.append(
            f"non-readers cut {c['nonreaders_cut']}/{c['nonreaders']}, "
            f"{queued_kb:,.0f} KiB queued for each"
        )
        if result.kernel_tcp_mb is not None and result.memory_in_use_mb is not None:
            found.append(
                f"kernel TCP buffers peak {result.kernel_tcp_mb:,.0f} MB, "
                f"machine's memory in use +{result.memory_in_use_mb:,.0f} MB"
            )
    codes = ", ".join(f"{k}×{v}" for k, v in c.get("close_codes", {}).items())
    if codes:
        found.append(f"close codes {codes}")
    if c.get("lost_total", 0) > c.get("lost", 0):
        found.append(f"{c['lost_total']} lost over the whole run")
    return "; ".join(found)


def table_row(result: Result) -> str:
    s, c = result.scenario, result.client
    if result.error or not c:
        return f"| {s.key} | {result.server} | {s.clients:,} | failed: {result.error} |" + " |" * 9
    expected = c["readers"] * s.rate
    rate = c["deliveries_per_s"]
    latency = c["latency_ms"]
    cells = [
        s.key,
        result.server,
        f"{s.clients:,}",
        f"{rate:,.0f} ({100 * rate / expected:.0f}%)" if expected else fmt(rate, 0),
        fmt(latency["p50"]),
        fmt(latency["p99"]),
        fmt(latency["max"]),
        f"{c['lost']:,}",
        fmt(c["connect_all_s"], 2),
        fmt(result.server_cpu_pct, 0),
        fmt(result.server_rss_mb, 0),
        fmt(c["cpu_pct"], 0),
        notes(result),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| Scn | Server | Clients | Deliveries/s (of expected) | p50 ms | p99 ms | max ms | Lost "
    "| Connect-all s | Server CPU % | Server RSS MB | Client CPU % | Notes |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
)


def ratio_lines(results: list[Result]) -> list[str]:
    """agentspoonsd against node-ws, per scenario: >1 deliveries is better, <1 p99 is better."""
    by_key: dict[tuple[str, str], Result] = {(r.scenario.key, r.server): r for r in results}
    lines = []
    for key in dict.fromkeys(r.scenario.key for r in results):
        ours, theirs = by_key.get((key, "agentspoonsd")), by_key.get((key, "node-ws"))
        if not (ours and theirs and ours.client and theirs.client):
            continue
        rate = ratio(ours.client["deliveries_per_s"], theirs.client["deliveries_per_s"])
        p99 = ratio(ours.client["latency_ms"]["p99"], theirs.client["latency_ms"]["p99"])
        connect = ratio(ours.client["connect_all_s"], theirs.client["connect_all_s"])
        lines.append(
            f"- {key}: agentspoonsd / node-ws — deliveries/s ×{rate}, p99 ×{p99}, "
            f"connect-all ×{connect}"
        )
    return lines


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "–"


def scenario_lines(scenarios: list[Scenario]) -> list[str]:
    lines = []
    for s in scenarios:
        line = (
            f"- {s.key}: {s.title} — {s.clients:,} clients, {s.rate:g} updates/s, "
            f"{s.warmup:g} s warm-up + {s.duration:g} s measured, "
            f"backlog cap {s.backlog_bytes:,} B"
        )
        if s.nonreading_fraction:
            line += f", {s.nonreading_fraction:.0%} never reading"
        lines.append(line + ("" if s.connect_rate == 0 else f", connect {s.connect_rate:g}/s"))
    return lines


def machine_lines(accept_queue: str) -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return [
        f"Machine: {os.cpu_count()} × {model}, {memory_gib():.0f} GiB, "
        f"Linux {platform.release()}, load client and server on the same machine, "
        f"net.core.somaxconn {accept_queue} during the run",
        f"Versions: {versions()}",
    ]


def memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return 0.0


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        daemon = f"agentspoonsd {version('agentspoonsd')}"
    except PackageNotFoundError:  # a frozen binary run from another Python (bench/clients.py)
        daemon = "agentspoonsd (the binary run)"
    parts = [daemon, f"Python {platform.python_version()}"]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True)
        parts.append(f"Node {node.stdout.strip()}")
    with contextlib.suppress(OSError, ValueError):
        ws = json.loads((BENCH / "node_modules" / "ws" / "package.json").read_text())
        parts.append(f"ws {ws['version']}")
    with contextlib.suppress(OSError):
        for line in BENCH_REQUIREMENTS.read_text().splitlines():
            if line.startswith("websockets=="):
                parts.append(line.replace("==", " "))
    return ", ".join(parts)


def report(
    results: list[Result], scenarios: list[Scenario], command: str, accept_queue: str
) -> str:
    stamp = datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")  # as `date -u` prints it
    return "\n".join(
        [
            f"## {stamp} — `{command}`",
            "",
            *machine_lines(accept_queue),
            "",
            *scenario_lines(scenarios),
            "",
            HEADER,
            *(table_row(r) for r in results),
            "",
            *(ratio_lines(results) or ["- no agentspoonsd/node-ws pair to compare"]),
            "",
        ]
    )


def append_results(text: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by `make bench` (bench/run.py); newest last. "
            "Columns: see bench/README.md.\n\n"
        )
    with RESULTS.open("a") as f:
        f.write(text + "\n")


# ---------------------------------------------------------------- scenarios and main


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    common = {
        "clients": args.clients,
        "warmup": args.warmup,
        "duration": args.duration,
        "backlog_bytes": args.backlog_bytes,
        "listen_backlog": args.listen_backlog,
    }
    all_scenarios = {
        "A": Scenario("A", "steady fan-out", rate=args.rate, **common),
        "B": Scenario(
            "B",
            "handshake storm: all clients connect at once during the broadcast",
            rate=args.storm_rate,
            clients=args.clients,
            warmup=1.0,
            duration=min(5.0, args.duration),
            backlog_bytes=args.backlog_bytes,
        ),
        "C": Scenario(
            "C",
            "slow consumers: some clients never read",
            rate=args.rate,
            nonreading_fraction=args.nonreading_fraction,
            **common,
        ),
        "D": Scenario(
            "D",
            "A with permessage-deflate offered by every client and enabled on every server, at"
            " half the rate (the load client's inflating is the limit above ~120,000 messages/s)",
            rate=args.rate / 2,
            deflate=True,
            **common,
        ),
        "E": Scenario(
            "E",
            "capacity: A at twice the rate, more than any server here delivers (its maximum)",
            rate=2 * args.rate,
            **common,
        ),
    }
    chosen = [all_scenarios[k] for k in args.scenarios]
    if args.connect_rate:
        chosen = [s if s.key == "B" else replace(s, connect_rate=args.connect_rate) for s in chosen]
    return chosen


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 clients, 10 s")
    parser.add_argument("--scenarios", default="ABCDE", type=lambda v: list(v.replace(",", "")))
    parser.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        type=lambda v: v.split(","),
        help=f"of {', '.join(SERVERS)} (default {','.join(DEFAULT_SERVERS)})",
    )
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=20.0, help="updates/s in A and C")
    parser.add_argument("--storm-rate", type=float, default=10.0, help="updates/s in B")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--connect-rate", type=float, default=0.0, help="A/C: connects/s (0: all)")
    parser.add_argument("--nonreading-fraction", type=float, default=0.1, help="in C")
    parser.add_argument("--backlog-bytes", type=int, default=1 << 20, help="per-client cap")
    parser.add_argument(
        "--listen-backlog",
        type=int,
        default=16384,
        help="every server's accept queue; the kernel's somaxconn is raised to it for the run",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the daemon (perturbs)")
    parser.add_argument("--no-save", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.duration, args.warmup = 1000, 10.0, 3.0
    unknown = [s for s in args.servers if s not in SERVERS] + [
        k for k in args.scenarios if k not in "ABCDE"
    ]
    if unknown:
        parser.error(f"unknown server or scenario: {', '.join(unknown)}")
    return args


def prepare(servers: list[str]) -> dict[str, str]:
    """Build and install what the chosen servers need; returns {server: why it is skipped}."""
    build_loadclient()
    skipped = {}
    if "node-ws" in servers and (why := ensure_node_deps()):
        skipped["node-ws"] = why
    if "python-websockets" in servers and (why := ensure_bench_venv()):
        skipped["python-websockets"] = why
    return skipped


def main(argv: list[str]) -> None:
    from agentspoonsd.auth import new_token  # the daemon's venv (module docstring)

    args = parse_args(argv)
    skipped = prepare(args.servers)
    RUNS.mkdir(exist_ok=True)
    token = new_token()
    scenarios = build_scenarios(args)
    with kernel_accept_queue(args.listen_backlog):
        accept_queue = somaxconn()
        results = run_all(scenarios, args, skipped, token)
    text = report(results, scenarios, " ".join(["bench/run.py", *argv]), accept_queue)
    print(text)
    if not args.no_save:
        append_results(text)
        print(f"appended to {RESULTS.relative_to(ROOT)}", file=sys.stderr)


def run_all(
    scenarios: list[Scenario], args: argparse.Namespace, skipped: dict[str, str], token: str
) -> list[Result]:
    results = []
    for scenario in scenarios:
        for server in args.servers:
            if server in skipped:
                results.append(Result(scenario, server, error=f"skipped: {skipped[server]}"))
                continue
            print(f"bench: {scenario.key} {scenario.title} — {server} …", file=sys.stderr)
            results.append(measure(scenario, server, token, args.profile))
            print(table_row(results[-1]), file=sys.stderr)
            time.sleep(1)  # let the kernel reap the last run's sockets
    return results


ACCEPT_QUEUE_SYSCTLS = (
    Path("/proc/sys/net/core/somaxconn"),
    Path("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
)


@contextlib.contextmanager
def kernel_accept_queue(size: int) -> Iterator[None]:
    """Let listen(2) have `size` slots for the run, then restore the kernel's settings.

    Linux caps every listen backlog at net.core.somaxconn (4096 by default): with 10,000 clients
    connecting at once, the rest are dropped and retried by their kernels 1 s and 3 s later, which
    measures the sysctl, not the server. Production hosts raise it; so does the benchmark, for every
    server alike, when it runs as root. Otherwise the cap stays and the table says so.
    """
    saved = {}
    for path in ACCEPT_QUEUE_SYSCTLS:
        with contextlib.suppress(OSError, ValueError):
            current = int(path.read_text())
            if current < size:
                path.write_text(str(size))
                saved[path] = current
    try:
        yield
    finally:
        for path, value in saved.items():
            with contextlib.suppress(OSError):
                path.write_text(str(value))


def somaxconn() -> str:
    with contextlib.suppress(OSError):
        return ACCEPT_QUEUE_SYSCTLS[0].read_text().strip()
    return "unknown"


if __name__ == "__main__":
    main(sys.argv[1:])
