"""A real redis-server for the broker and cluster tests: a free port, a temporary directory, no
persistence. build/ensure-redis.sh installs Debian's package when it is missing."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def ensure_redis() -> str:
    """The redis-server executable, installed first if absent."""
    if shutil.which("redis-server") is None:
        subprocess.run(["sh", str(ROOT / "build" / "ensure-redis.sh")], check=True)
    found = shutil.which("redis-server")
    assert found is not None
    return found


class RedisServer:
    """One redis-server process; `stop` and `start` again keep its port (and lose its data)."""

    def __init__(self, directory: Path) -> None:
        self.executable = ensure_redis()
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it (SIGKILL: an outage, not a shutdown) and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
