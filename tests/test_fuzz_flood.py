"""The mixed flood: every class of abuse at once against one daemon on its default limits, while a
bystander measures what it costs an ordinary client.

A flooder process (tests/flooder.py) cycles through requests followed by a reset, ping, pong and
empty-fragment floods, permessage-deflate bombs, failed authentications, half-open handshakes,
full-history requests dropped unread and garbage frames. The bystander, a `websockets` client in
its own thread, timestamps every update it receives. Then:

- the bystander received every update (no seq gap) and was never disconnected, and its median
  latency (receive time less the update's publish `timestamp`) moved by less than 20 ms;
- each abuser got its own answer: 1008 for floods, 1009 for bombs, 401/429 for bad tokens;
- afterwards the daemon holds the bystander alone (clients and the subscriber gauge back to 1),
  its RSS is within 5 MiB of what it was before the flood, and its log has no error.

The figures are printed (`-s` shows them).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import trio
from websockets.sync.client import connect

from daemon_process import DaemonProcess, config_text, http_get, new_token

INTERVAL = 0.1
WARMUP_SECONDS = 1.5  # one pass of every attack, so lazily made objects are not counted as growth
BASELINE_SECONDS = 3.0
FLOOD_SECONDS = 5.0
RSS_SLACK_KIB = 5 * 1024
FLOODER = Path(__file__).with_name("flooder.py")


class Bystander:
    """An ordinary client: connects once, reads every update and notes its latency."""

    def __init__(self, port: int, token: str) -> None:
        self.url = f"ws://127.0.0.1:{port}/"
        self.token = token
        self.latencies: list[tuple[float, float]] = []  # (received at, latency)
        self.seqs: dict[str, list[int]] = {}
        self.ended: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            with connect(
                self.url, additional_headers={"Authorization": f"Bearer {self.token}"}
            ) as ws:
                while not self._stop.is_set():
                    try:
                        text = ws.recv(timeout=0.5)
                    except TimeoutError:
                        continue
                    received = time.time()
                    message = json.loads(text)
                    if message["type"] != "volatility_update":
                        continue
                    published = datetime.fromisoformat(message["timestamp"]).timestamp()
                    self.latencies.append((time.monotonic(), received - published))
                    data = message["data"]
                    self.seqs.setdefault(data["symbol"], []).append(data["seq"])
        except Exception as exc:  # the assertion reports it
            self.ended = repr(exc)

    def median_ms(self, start: float, end: float) -> float:
        window = [lat for at, lat in self.latencies if start <= at < end]
        assert len(window) >= 10, f"only {len(window)} updates in the window"
        return statistics.median(window) * 1000

    def worst_ms(self, start: float, end: float) -> float:
        return max(lat for at, lat in self.latencies if start <= at < end) * 1000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def gauge(http_port: int, name: str) -> float:
    status, _, body = await http_get(http_port, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


async def run_flooder(port: int, token: str, seconds: float) -> dict[str, int]:
    done = await trio.run_process(
        [sys.executable, str(FLOODER), str(port), token, str(seconds)],
        capture_stdout=True,
        capture_stderr=True,
    )
    return json.loads(done.stdout)


def tally(outcomes: dict[str, int], attack: str) -> dict[str, int]:
    return {k.split(":", 1)[1]: v for k, v in outcomes.items() if k.startswith(attack + ":")}


async def test_a_mixed_flood_harms_no_bystander(tmp_path: Path) -> None:
    token = new_token()
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(
        config_text(tokens={"flood": token}, interval=INTERVAL).replace(
            "shutdown_timeout = 3.0\n", "shutdown_timeout = 3.0\nhandshake_timeout = 2.0\n"
        )
    )
    daemon = DaemonProcess(config)
    daemon.start()
    try:
        port, http_port = await daemon.ports()
        pid = daemon.proc.pid
        bystander = Bystander(port, token)
        bystander.start()

        await run_flooder(port, token, WARMUP_SECONDS)
        with trio.fail_after(15):
            while await gauge(http_port, "agentspoonsd_clients_connected") != 1:  # noqa: ASYNC110
                await trio.sleep(0.2)
        baseline_rss = rss_kib(pid)
        calm_start = time.monotonic()
        await trio.sleep(BASELINE_SECONDS)
        flood_start = time.monotonic()
        outcomes = await run_flooder(port, token, FLOOD_SECONDS)
        flood_end = time.monotonic()

        with trio.fail_after(15):  # half-open handshakes wait for their 2 s deadline
            while await gauge(http_port, "agentspoonsd_clients_connected") != 1:  # noqa: ASYNC110
                await trio.sleep(0.2)
        subscribers = await gauge(http_port, "agentspoonsd_subscribers")
        rss_after = rss_kib(pid)
        with trio.move_on_after(10):  # freed memory may take a collection to go back
            while rss_after > baseline_rss + RSS_SLACK_KIB:
                await trio.sleep(0.5)
                rss_after = rss_kib(pid)
        bystander.stop()

        calm = bystander.median_ms(calm_start, flood_start)
        flooded = bystander.median_ms(flood_start, flood_end)
        worst = bystander.worst_ms(flood_start, flood_end)
        attacks = sum(outcomes.values())
        print(
            f"\nmixed flood: {attacks} attacks in {FLOOD_SECONDS:.0f} s; bystander median "
            f"{calm:.2f} ms calm, {flooded:.2f} ms flooded (worst {worst:.1f} ms); RSS "
            f"{baseline_rss} KiB before, {rss_after} KiB after; outcomes {outcomes}"
        )

        assert bystander.ended is None, bystander.ended
        for symbol, seqs in bystander.seqs.items():
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{symbol}: a gap"
        assert flooded - calm < 20.0
        assert subscribers == 1
        assert rss_after <= baseline_rss + RSS_SLACK_KIB
        for flood in ("ping_flood", "pong_flood", "fragment_flood"):
            assert set(tally(outcomes, flood)) <= {"1008", "reset"}, outcomes
            assert tally(outcomes, flood).get("1008", 0) >= 1, outcomes
        assert set(tally(outcomes, "deflate_bomb")) <= {"1009", "reset"}, outcomes
        assert tally(outcomes, "deflate_bomb").get("1009", 0) >= 1, outcomes
        assert set(tally(outcomes, "bad_token")) <= {"401", "429"}, outcomes
        assert attacks >= 100
    finally:
        daemon.signal(2)
        await daemon.wait_exit()
    errors = [e for e in daemon.events if e.get("level") in ("error", "critical")]
    assert not errors, errors
    assert "Traceback" not in daemon.log_text
