"""Helpers shared by the dashboard's tests: a daemon on known ports, started synchronously.

The ports are picked before the daemon starts (not port 0, as the other end-to-end tests do):
the WebSocket's default Origin check admits the dashboard's own origin, which it derives from the
configured `[health] port`, so the browser's page must be served from that configured port.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from daemon_process import DaemonProcess, config_text

START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Ports:
    ws: int
    http: int


def free_ports() -> Ports:
    """Two loopback ports that were free a moment ago (held together, so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        ws, http = (sock.getsockname()[1] for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    return Ports(ws=ws, http=http)


def write_config(
    directory: Path, ports: Ports, tokens: dict[str, str], extra: str = "", name: str = "a"
) -> Path:
    """A test config (tests/daemon_process.py) moved onto `ports`; returns its path."""
    text = config_text(tokens=tokens, extra=extra)
    server = '[server]\nhost = "127.0.0.1"\nport = 0\n'
    health = '[health]\nhost = "127.0.0.1"\nport = 0\n'
    assert server in text and health in text
    text = text.replace(server, server.replace("port = 0", f"port = {ports.ws}"))
    text = text.replace(health, health.replace("port = 0", f"port = {ports.http}"))
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def start_daemon(
    directory: Path,
    ports: Ports,
    tokens: dict[str, str],
    extra: str = "",
    name: str = "a",
    env: dict[str, str] | None = None,
) -> DaemonProcess:
    """A daemon on `ports`, returned once /readyz answers 200 (it publishes updates)."""
    daemon = DaemonProcess(write_config(directory, ports, tokens, extra, name), env)
    daemon.start()
    try:
        wait_ready(daemon, ports)
    except BaseException:
        daemon.kill()
        raise
    return daemon


def wait_ready(daemon: DaemonProcess, ports: Ports) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    url = f"http://127.0.0.1:{ports.http}/readyz"
    while time.monotonic() < deadline:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited {daemon.proc.returncode}:\n{daemon.log_text}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"daemon not ready within {START_TIMEOUT} s:\n{daemon.log_text[-3000:]}")


def stop_daemon(daemon: DaemonProcess, timeout: float = 10.0) -> int:
    """SIGTERM (clients get 1001) and the exit status."""
    assert daemon.proc is not None
    daemon.proc.terminate()
    return daemon.proc.wait(timeout)
