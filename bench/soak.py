"""The soak (security issue, "Robustness"): many clients for a long time, with churn.

Not part of `make test`. One daemon, one run of the C load client (bench/loadclient.c) holding
`--clients` connections for `--minutes` while `--churn` of them per second are closed and
reopened (its `--churn-rate`, over the last `--churn-pool` connections; the others keep their
whole stream and are where loss is measured). Every `--sample-every` seconds the daemon's RSS
and open file descriptors are read from /proc. Then:

1. RSS growth between minute `--rss-from` (default a fifth of the run: minute 2 of 10) and the
   end of the run. Figure: < 5 %.
2. Open fds once every client has left, against the idle count before the run. Figure: equal,
   within a few.
3. Half-open handshakes: a legitimate client's connect time (TCP connect to its `connected`
   message) is measured `--samples` times without, then with `--half-open` connections that
   sent a partial upgrade request and stalled, `--rounds` times; the last round also waits for
   the daemon's handshake_timeout to reap them. Figure: the worst connect with them is less than
   100 ms slower than the median without.

Prints a Markdown table and appends it, dated, to bench/RESULTS.md (unless --no-save); the
daemon's log and the load client's raw report go to bench/.runs/. Exits 1 when a figure is
missed. Run it with the daemon venv's python:

    .venv/bin/python bench/soak.py                          # 5,000 clients, 10 minutes
    .venv/bin/python bench/soak.py --minutes 1 --clients 500 --no-save   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import run as bench  # bench/run.py: the load client's build, process sampling, RESULTS.md

from agentspoonsd.auth import hash_token, new_token

SYMBOL = "BTC/USD"
HANDSHAKE_TIMEOUT = 10.0  # the daemon's default, set explicitly: the half-open phase relies on it
RSS_FIGURE = 5.0  # percent
FD_SLACK = 3
HALF_OPEN_FIGURE_MS = 100.0
HISTORY_SIZE = 1000  # the daemon's default [history] size: updates kept per symbol
# A partial upgrade request: a request line and some headers, never the blank line ending it.
PARTIAL_REQUEST = b"GET /?symbols= HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"


# ---------------------------------------------------------------- the daemon


def daemon_config(args: argparse.Namespace, digest: str) -> str:
    return f"""[server]
host = "127.0.0.1"
port = 0
max_connections = {args.clients + args.half_open + 1000}
# every client comes from 127.0.0.1, the half-open ones too
max_handshakes_per_ip = {args.clients + args.half_open + 1000}
handshake_timeout = {HANDSHAKE_TIMEOUT}
listen_backlog = 16384

[auth]
enabled = true
[[auth.tokens]]
name = "soak"
sha256 = "{digest}"
symbols = ["*"]

[history]
size = {HISTORY_SIZE}

[generator]
interval = {1 / args.rate!r}
symbols = ["{SYMBOL}"]
seed = 42

[health]
host = "127.0.0.1"
port = 0

[log]
level = "info"
"""


def log_events(log_path: Path) -> list[dict]:
    events = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    events.append(entry)
    return events


# ---------------------------------------------------------------- sampling


@dataclass
class Sample:
    t: float  # seconds since the load client's window_start
    rss_mb: float
    fds: int
    cpu_s: float  # the daemon's user + system seconds so far
    clients: float | None  # agentspoonsd_clients_connected


@dataclass
class Soak:
    """What the follower thread learns while the load client runs."""

    pid: int
    health: int
    every: float
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # progress event -> monotonic time
    other_lines: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        start = self.marks.get("window_start", time.monotonic())
        clients = None
        with contextlib.suppress(OSError, ValueError):
            clients = bench.metrics(self.health).get("agentspoonsd_clients_connected")
        with contextlib.suppress(OSError):
            self.samples.append(
                Sample(
                    time.monotonic() - start,
                    bench.rss_mb(self.pid),
                    bench.open_fds(self.pid),
                    bench.cpu_seconds(self.pid),
                    clients,
                )
            )

    def follow(self, stream) -> None:
        """Read the load client's progress lines; sample from window_start to window_end."""
        sampler: threading.Thread | None = None
        for line in stream:
            try:
                event = json.loads(line)["event"]
            except (ValueError, KeyError, TypeError):
                self.other_lines.append(line.rstrip())
                continue
            self.marks[event] = time.monotonic()
            if event == "churn":
                print(f"soak: {line.strip()}", file=sys.stderr)
            elif event == "window_start":
                sampler = threading.Thread(target=self._sample_loop, daemon=True)
                sampler.start()
            elif event == "window_end":
                self._stop.set()
                if sampler is not None:
                    sampler.join()
        self._stop.set()

    def _sample_loop(self) -> None:
        while True:
            self.sample()
            last = self.samples[-1] if self.samples else None
            if last:
                print(
                    f"soak: t={last.t:6.0f} s  RSS {last.rss_mb:7.1f} MB  fds {last.fds:6d}  "
                    f"clients {last.clients}",
                    file=sys.stderr,
                )
            if self._stop.wait(self.every):
                return


def run_loadclient(args: argparse.Namespace, port: int, token: str, soak: Soak) -> dict:
    cmd = [
        str(bench.LOADCLIENT),
        *("--host", "127.0.0.1", "--port", str(port), "--token", token),
        *("--clients", str(args.clients), "--warmup", "0"),
        *("--duration", str(args.minutes * 60)),
        *("--connect-rate", str(args.connect_rate), "--connect-timeout", "120"),
        *("--churn-rate", str(args.churn), "--churn-pool", str(args.churn_pool)),
    ]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    follower = threading.Thread(target=soak.follow, args=(client.stderr,), daemon=True)
    follower.start()
    out = client.stdout.read()
    client.wait()
    follower.join()
    if client.returncode != 0 or not out.strip():
        raise RuntimeError(f"load client failed ({client.returncode}): {soak.other_lines[-3:]}")
    return json.loads(out)


def wait_all_gone(pid: int, health: int, baseline: int, timeout: float = 60.0) -> tuple[int, float]:
    """Wait until the daemon has no client and its fd count is back to `baseline` (or timeout).

    Returns the fd count at the end and how long it took."""
    start = time.monotonic()
    fds = bench.open_fds(pid)
    while time.monotonic() - start < timeout:
        with contextlib.suppress(OSError, ValueError):
            gone = bench.metrics(health).get("agentspoonsd_clients_connected") == 0
            fds = bench.open_fds(pid)
            if gone and abs(fds - baseline) <= FD_SLACK:
                break
        time.sleep(0.5)
    time.sleep(1.0)  # and stays there
    return bench.open_fds(pid), time.monotonic() - start


def cpu_percent(samples: list[Sample]) -> float | None:
    """The daemon's CPU over the sampled run, 100 = one core."""
    if len(samples) < 2 or samples[-1].t <= samples[0].t:
        return None
    return 100 * (samples[-1].cpu_s - samples[0].cpu_s) / (samples[-1].t - samples[0].t)


def rss_at(samples: list[Sample], seconds: float) -> Sample:
    return min(samples, key=lambda s: abs(s.t - seconds))


# ---------------------------------------------------------------- half-open handshakes


def upgrade_request(port: int, token: str) -> bytes:
    return (
        f"GET /?symbols= HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()


def legit_connect_ms(port: int, token: str) -> float:
    """TCP connect, upgrade, and the `connected` greeting: milliseconds, as a client sees them."""
    request = upgrade_request(port, token)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while b'"connected"' not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"the legitimate client was refused: {received[:80]!r}")
            received += chunk
        elapsed = time.perf_counter() - start
        if not received.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"the legitimate client was refused: {received[:80]!r}")
        sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000, masked with zeros
    return elapsed * 1000


def open_half_open(
    port: int, count: int, sockets: list[socket.socket], halfway: threading.Event
) -> None:
    """Open `count` connections that send a partial request and stall; `halfway` is set when
    half of them are open."""
    try:
        for n in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(PARTIAL_REQUEST)
            sock.setblocking(False)  # still_open peeks without waiting
            sockets.append(sock)
            if n == count // 2:
                halfway.set()
    finally:
        halfway.set()


def still_open(sockets: list[socket.socket]) -> int:
    """How many of `sockets` the server has neither answered nor closed."""
    count = 0
    for sock in sockets:
        try:
            sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            count += 1  # nothing to read and not closed: still stalled
        except OSError:
            pass  # reset by the daemon
        # Else an answer or EOF: not a stalled handshake any more.
    return count


@dataclass
class HalfOpenResult:
    without_ms: list[float] = field(default_factory=list)
    with_ms: list[float] = field(default_factory=list)
    burst_ms: list[float] = field(default_factory=list)  # each round's first: during the burst
    open_after_samples: list[int] = field(default_factory=list)  # per round, of `half_open`
    reaped: int | None = None  # closed by the daemon after handshake_timeout (last round)
    reap_wait_s: float | None = None


def half_open_phase(args: argparse.Namespace, port: int, token: str) -> HalfOpenResult:
    result = HalfOpenResult()
    for round_number in range(args.rounds):
        for _ in range(args.samples):
            result.without_ms.append(legit_connect_ms(port, token))
            time.sleep(args.sample_gap)
        opened = time.monotonic()
        sockets: list[socket.socket] = []
        halfway = threading.Event()
        opener = threading.Thread(
            target=open_half_open, args=(port, args.half_open, sockets, halfway)
        )
        opener.start()
        try:
            # The first sample starts when half of the half-open connections are open, so it
            # arrives amid the burst and queues behind them; the others find them all
            # established and stalled.
            halfway.wait()
            for n in range(args.samples):
                if n == 1:
                    opener.join()
                result.with_ms.append(legit_connect_ms(port, token))
                if n == 0:
                    result.burst_ms.append(result.with_ms[-1])
                time.sleep(args.sample_gap)
            result.open_after_samples.append(still_open(sockets))
            if time.monotonic() - opened > HANDSHAKE_TIMEOUT * 0.8:
                print("soak: the samples took close to handshake_timeout", file=sys.stderr)
            if round_number == args.rounds - 1:
                # The last round: leave them stalled and let handshake_timeout reap them.
                deadline = opened + HANDSHAKE_TIMEOUT + 5.0
                while time.monotonic() < deadline and still_open(sockets):
                    time.sleep(0.25)
                result.reap_wait_s = time.monotonic() - opened
                result.reaped = args.half_open - still_open(sockets)
        finally:
            opener.join()
            for sock in sockets:
                sock.close()
        if len(sockets) < args.half_open:
            raise RuntimeError(f"only {len(sockets)} half-open connections could be opened")
        time.sleep(1.0)
        print(
            f"soak: half-open round {round_number + 1}: without "
            f"{statistics.median(result.without_ms):.1f} ms, with "
            f"{statistics.median(result.with_ms):.1f} ms (median so far)",
            file=sys.stderr,
        )
    return result


# ---------------------------------------------------------------- the report


@dataclass
class Outcome:
    args: argparse.Namespace
    client: dict
    samples: list[Sample]
    idle_fds: int
    idle_rss_mb: float
    loaded_fds_max: int
    after_fds: int
    after_wait_s: float
    half_open: HalfOpenResult
    after_half_open_fds: int
    daemon_cpu_pct: float | None
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    errors_logged: int
    rss_from: Sample | None = None
    rss_end: Sample | None = None

    def rss_growth_pct(self) -> float | None:
        if self.rss_from is None or self.rss_end is None or not self.rss_from.rss_mb:
            return None
        return 100 * (self.rss_end.rss_mb - self.rss_from.rss_mb) / self.rss_from.rss_mb

    def half_open_delay_ms(self) -> tuple[float, float]:
        """(median with − median without, worst with − median without)."""
        base = statistics.median(self.half_open.without_ms)
        return statistics.median(self.half_open.with_ms) - base, max(self.half_open.with_ms) - base

    def history_filling(self) -> bool:
        """Is the RSS baseline taken while the daemon's update history is still filling up?

        Its ring (1,000 updates by default) grows for 1000 / rate seconds: growth measured from
        before that point is the ring, not a leak (a short smoke run)."""
        return self.rss_from is not None and self.rss_from.t < HISTORY_SIZE / self.args.rate

    def figures(self) -> dict[str, bool | None]:
        """Each figure: met, missed, or None (the run is too short to tell)."""
        growth = self.rss_growth_pct()
        _, worst = self.half_open_delay_ms()
        return {
            "rss": None if self.history_filling() else growth is not None and growth < RSS_FIGURE,
            "fds": abs(self.after_fds - self.idle_fds) <= FD_SLACK,
            "half_open": worst < HALF_OPEN_FIGURE_MS,
        }


def mark(ok: bool | None) -> str:
    if ok is None:
        return "n/a: the history was still filling (run too short)"
    return "met" if ok else "**missed**"


def ms_summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return (
        f"p50 {statistics.median(values):.1f} / p90 {p90:.1f} / max {max(values):.1f} ms "
        f"(n = {len(values)})"
    )


def counter(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def labelled(values: dict[str, float], name: str) -> str:
    parts = []
    for key, value in sorted(values.items()):
        if key.startswith(name + "{") and value:
            parts.append(f"{key[len(name) + 1 : -1].split('=', 1)[1].strip(chr(34))} {value:,.0f}")
    return ", ".join(parts) or "none"


def report(outcome: Outcome, command: str) -> str:
    a, c, h = outcome.args, outcome.client, outcome.half_open
    figures = outcome.figures()
    growth = outcome.rss_growth_pct()
    median_delay, worst_delay = outcome.half_open_delay_ms()
    window_min = c.get("window_s", 0) / 60
    churned = c.get("churned", 0)
    accepted = counter(outcome.metrics_after, "agentspoonsd_connections_accepted_total")
    rss_from, rss_end = outcome.rss_from, outcome.rss_end
    rows = [
        (
            "Clients held",
            f"{c.get('upgraded', 0):,} of {a.clients:,} upgraded in "
            f"{c.get('connect_all_s', 0):.1f} s, held {window_min:.1f} min; "
            f"{c.get('readers_closed', 0)} closed by the daemon",
            "",
        ),
        (
            "Churn",
            f"{churned:,} closed and reopened ({churned / max(1, c.get('window_s', 1)):.1f}/s, "
            f"pool {c.get('churn_pool', 0):,}); {c.get('churn_upgraded', 0):,} reopened, "
            f"{c.get('churn_failed', 0)} failed; reopen connect "
            f"p50 {c.get('churn_connect_ms', {}).get('p50', 0):.1f} / "
            f"p99 {c.get('churn_connect_ms', {}).get('p99', 0):.1f} ms; "
            f"daemon accepted {accepted:,.0f} upgrades in all",
            f"{a.churn:g}/s",
        ),
        (
            "Deliveries",
            f"{c.get('deliveries_per_s', 0):,.0f}/s, latency p50 "
            f"{c.get('latency_ms', {}).get('p50', 0):.1f} / p99 "
            f"{c.get('latency_ms', {}).get('p99', 0):.1f} ms, "
            f"lost {c.get('lost', 0):,} (seq gaps, all connections)",
            "",
        ),
        (
            "RSS growth",
            (
                f"{rss_from.rss_mb:.1f} MB at {rss_from.t / 60:.1f} min → {rss_end.rss_mb:.1f} MB "
                f"at {rss_end.t / 60:.1f} min: {growth:+.2f} % (idle before: "
                f"{outcome.idle_rss_mb:.1f} MB)"
            )
            if rss_from and rss_end and growth is not None
            else "not enough samples",
            f"< {RSS_FIGURE:g} %: {mark(figures['rss'])}",
        ),
        (
            "Open fds",
            f"idle {outcome.idle_fds}, under load up to {outcome.loaded_fds_max:,}, "
            f"{outcome.after_fds} once all clients left ({outcome.after_wait_s:.1f} s after), "
            f"{outcome.after_half_open_fds} after the half-open phase",
            f"idle ± {FD_SLACK}: {mark(figures['fds'])}",
        ),
        ("Legit connect, no half-open", ms_summary(h.without_ms), ""),
        (f"Legit connect, {a.half_open:,} half-open", ms_summary(h.with_ms), ""),
        (
            "… of which the first of each round",
            ", ".join(f"{v:.1f}" for v in h.burst_ms) + " ms (started when half of them are "
            "open: it queues behind the burst in the accept queue)",
            "",
        ),
        (
            "Half-open delay",
            f"median {median_delay:+.1f} ms, worst {worst_delay:+.1f} ms (vs the median without); "
            f"still stalled after the samples: "
            f"{', '.join(f'{n:,}' for n in h.open_after_samples)} of {a.half_open:,} per round; "
            f"{h.reaped if h.reaped is not None else '–'} reaped by "
            f"handshake_timeout ({HANDSHAKE_TIMEOUT:g} s) within {h.reap_wait_s or 0:.1f} s",
            f"< {HALF_OPEN_FIGURE_MS:g} ms: {mark(figures['half_open'])}",
        ),
        (
            "CPU",
            f"daemon {bench.fmt(outcome.daemon_cpu_pct, 0)} %, load client "
            f"{c.get('cpu_pct', 0):.0f} % of a core over the run",
            "",
        ),
        (
            "Daemon log",
            f"{outcome.errors_logged} error-level lines; disconnects: "
            f"{labelled(outcome.metrics_after, 'agentspoonsd_disconnects_total')}; refused: "
            f"{labelled(outcome.metrics_after, 'agentspoonsd_rejected_upgrades_total')}",
            "",
        ),
    ]
    series = ", ".join(f"{s.rss_mb:.0f}" for s in outcome.samples)
    fds = ", ".join(str(s.fds) for s in outcome.samples)
    stamp = datetime.now(UTC).strftime("%a %b %d %H:%M:%S UTC %Y")
    return "\n".join(
        [
            f"## {stamp} — `{command}`",
            "",
            *bench.machine_lines(bench.somaxconn()),
            "",
            f"- Soak: {a.clients:,} clients for {a.minutes:g} min, churn {a.churn:g}/s over the "
            f"last {a.churn_pool:,}, {a.rate:g} updates/s of one symbol; samples every "
            f"{a.sample_every:g} s; half-open: {a.half_open:,} connections, {a.samples} samples "
            f"× {a.rounds} rounds each way",
            "",
            "| Measure | Result | Figure |",
            "|---|---|---|",
            *(f"| {name} | {value} | {figure} |" for name, value, figure in rows),
            "",
            f"- RSS MB every {a.sample_every:g} s: {series}",
            f"- Open fds every {a.sample_every:g} s: {fds}",
            "",
        ]
    )


# ---------------------------------------------------------------- main


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def soak(args: argparse.Namespace, token: str) -> Outcome:
    bench.RUNS.mkdir(exist_ok=True)
    log_path = bench.RUNS / "soak.log"
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        config = Path(tmp) / "agentspoonsd.toml"
        config.write_text(daemon_config(args, hash_token(token)))
        executable = Path(sys.executable).with_name("agentspoonsd")
        cmd = [str(executable), "run", "--config", str(config)]
        with bench.server_process(cmd, log_path) as (proc, port):
            health = bench.wait_for_port(proc, log_path, service="http")
            bench.wait_ready(health)
            time.sleep(2.0)
            idle_fds, idle_rss = bench.open_fds(proc.pid), bench.rss_mb(proc.pid)
            print(f"soak: idle daemon: {idle_fds} fds, RSS {idle_rss:.1f} MB", file=sys.stderr)
            before = bench.metrics(health)
            soak_state = Soak(proc.pid, health, args.sample_every)
            client = run_loadclient(args, port, token, soak_state)
            marks = soak_state.marks
            window = marks.get("window_end", 0) - marks.get("window_start", 0)
            (bench.RUNS / "soak.json").write_text(json.dumps(client, indent=1))
            print("soak: the load client left; waiting for the daemon to let go", file=sys.stderr)
            after_fds, after_wait = wait_all_gone(proc.pid, health, idle_fds)
            print(f"soak: {after_fds} fds after {after_wait:.1f} s", file=sys.stderr)
            half = half_open_phase(args, port, token)
            after_half_fds, _ = wait_all_gone(proc.pid, health, idle_fds, timeout=30)
            after = bench.metrics(health)
            samples = [s for s in soak_state.samples if s.t <= window + 0.5]
            outcome = Outcome(
                args=args,
                client=client,
                samples=samples,
                idle_fds=idle_fds,
                idle_rss_mb=idle_rss,
                loaded_fds_max=max((s.fds for s in samples), default=0),
                after_fds=after_fds,
                after_wait_s=after_wait,
                half_open=half,
                after_half_open_fds=after_half_fds,
                daemon_cpu_pct=cpu_percent(samples),
                metrics_before=before,
                metrics_after=after,
                errors_logged=0,
            )
            if samples:
                outcome.rss_from = rss_at(samples, args.rss_from * 60)
                outcome.rss_end = samples[-1]
    outcome.errors_logged = sum(
        1 for e in log_events(log_path) if e.get("level") in ("error", "critical")
    )
    return outcome


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long clients are held")
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--churn", type=float, default=100.0, help="reconnects per second")
    parser.add_argument(
        "--churn-pool", type=int, help="connections that churn (default: half the clients)"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="updates per second")
    parser.add_argument("--connect-rate", type=float, default=2000.0, help="initial connects/s")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--rss-from", type=float, help="minute the RSS growth is measured from (default: 1/5)"
    )
    parser.add_argument("--half-open", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10, help="legit connects per round, each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample-gap", type=float, default=0.2, help="seconds between connects")
    parser.add_argument("--no-save", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.churn_pool is None:
        args.churn_pool = args.clients // 2
    if args.rss_from is None:
        args.rss_from = args.minutes / 5
    if not 0 < args.churn_pool <= args.clients or args.minutes <= 0 or args.rounds < 1:
        parser.error("need 0 < --churn-pool <= --clients, --minutes > 0, --rounds >= 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    raise_nofile()
    bench.build_loadclient()
    token = new_token()
    with bench.kernel_accept_queue(16384):
        outcome = soak(args, token)
    text = report(outcome, " ".join(["bench/soak.py", *argv]))
    print(text)
    if not args.no_save:
        bench.append_results(text)
        print(f"appended to {bench.RESULTS.relative_to(bench.ROOT)}", file=sys.stderr)
    return 1 if False in outcome.figures().values() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
