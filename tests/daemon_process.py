"""The end-to-end harness: the real daemon as a subprocess, its JSON log followed line by line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agentspoonsd.auth import hash_token, new_token


def token_block(name: str, token: str, symbols: list[str] | None = None) -> str:
    listed = ", ".join(json.dumps(s) for s in (symbols or ["*"]))
    return (
        f'[[auth.tokens]]\nname = "{name}"\nsha256 = "{hash_token(token)}"\nsymbols = [{listed}]\n'
    )


def config_text(
    *,
    tokens: dict[str, str] | None = None,
    interval: float = 0.2,
    symbols: tuple[str, ...] = ("BTC/USD", "ETH/USD"),
    extra: str = "",
    auth_enabled: bool = True,
) -> str:
    """A daemon config on loopback, free ports (0), fast ticks."""
    listed = ", ".join(json.dumps(s) for s in symbols)
    text = (
        '[server]\nhost = "127.0.0.1"\nport = 0\nshutdown_timeout = 3.0\n\n'
        f"[generator]\ninterval = {interval}\nsymbols = [{listed}]\nseed = 7\n\n"
        '[health]\nhost = "127.0.0.1"\nport = 0\n\n'
        f"[auth]\nenabled = {'true' if auth_enabled else 'false'}\n"
    )
    for name, token in (tokens or {}).items():
        text += token_block(name, token)
    return text + extra


class DaemonProcess:
    """`agentspoonsd run --config PATH` in a subprocess; stdout parsed as JSON log events."""

    def __init__(
        self, config_path: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> None:
        self.config_path = config_path
        self.prefix = prefix  # a command that execs the daemon, e.g. prlimit
        self.env = {**os.environ, **(env or {})}
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                *(sys.executable, "-m", "agentspoonsd", "run", "--config", str(self.config_path)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw_lines.append(text)
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(text))

    async def wait_for(self, event: str, within: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first log event named `event` whose fields match; fails after `within` seconds."""
        with anyio.move_on_after(within):
            while True:
                for entry in self.events:
                    if entry.get("event") == event and all(
                        entry.get(k) == v for k, v in fields.items()
                    ):
                        return entry
                if self.proc is not None and self.proc.poll() is not None and not self._reading:
                    break
                await anyio.sleep(0.02)
        raise AssertionError(f"no {event} {fields} in log:\n" + "\n".join(self.raw_lines[-30:]))

    @property
    def _reading(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    async def ports(self) -> tuple[int, int]:
        ws = await self.wait_for("listener_bound", service="websocket")
        http = await self.wait_for("listener_bound", service="http")
        return int(ws["address"].rsplit(":", 1)[1]), int(http["address"].rsplit(":", 1)[1])

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self, within: float = 10.0) -> int:
        """The exit status; fails if the process is still running after `within` seconds."""
        assert self.proc is not None
        await anyio.to_thread.run_sync(self.proc.wait, within)
        if self._reader is not None:
            await anyio.to_thread.run_sync(self._reader.join, 2.0)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    @property
    def log_text(self) -> str:
        return "\n".join(self.raw_lines)


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A real HTTP GET to 127.0.0.1:port; returns status, headers, body (errors included)."""

    def get() -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    return await anyio.to_thread.run_sync(get)


__all__ = ["DaemonProcess", "config_text", "http_get", "new_token", "token_block"]
