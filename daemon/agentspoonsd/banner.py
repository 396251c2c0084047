"""The start banner: where to find the daemon that just started, in one log event.

``daemon_started`` carries these fields (`StartBanner.fields`), so a person reading the start of
the log, on a terminal or in the journal, can use the daemon at once:

``config``
    the config file in use (absolute), or ``built-in defaults``;
``websocket_url``
    ``ws://`` or ``wss://`` (TLS), at an address one can connect to: a wildcard bind address
    (0.0.0.0, ::) becomes the loopback address of its family;
``dashboard_url``
    the dashboard on the HTTP port, with ``#access_token=…`` only when the token is the
    ephemeral one the daemon made at start (the fragment never reaches a server; the page
    removes it from the address bar);
``watch``
    a command to paste into a shell: ``agentspoonsd watch URL``, prefixed with
    ``AGENTSPOONSD_TOKEN=…`` for the ephemeral token.

A configured token is never in the banner: the daemon holds only its digest. The ephemeral
token's values are `Disclosed`, the one deliberate exception to redaction, logged in this one
event. Pure: built from the settings and the ports actually bound; no I/O.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .logs import Disclosed
from .settings import Settings
from .tools import TOKEN_ENV, connect_host

BUILT_IN_DEFAULTS = "built-in defaults"
PROGRAM = "agentspoonsd"


@dataclass(frozen=True)
class StartBanner:
    """The banner's values; `fields` gives them as log fields."""

    config: str
    websocket_url: str
    dashboard_url: str
    watch: str

    def fields(self) -> dict[str, str]:
        """The log fields, in reading order (a `Disclosed` value stays one)."""
        return {
            "config": self.config,
            "websocket_url": self.websocket_url,
            "dashboard_url": self.dashboard_url,
            "watch": self.watch,
        }


def websocket_url(host: str, port: int, *, tls: bool) -> str:
    """The URL a client connects to for a WebSocket listener bound to `host`:`port`."""
    return f"{'wss' if tls else 'ws'}://{connect_host(host)}:{port}/"


def dashboard_url(host: str, port: int, token: str | None = None) -> str:
    """The dashboard on an HTTP listener bound to `host`:`port`; with `token`, a `Disclosed`
    URL whose fragment hands the page that token."""
    url = f"http://{connect_host(host)}:{port}/"
    return url if token is None else Disclosed(f"{url}#access_token={token}")


def watch_command(program: Sequence[str], url: str, token: str | None = None) -> str:
    """A shell command line that watches the stream at `url`; with `token`, a `Disclosed` one
    that passes it in the environment (`watch` reads ``$AGENTSPOONSD_TOKEN``)."""
    command = shlex.join([*program, "watch", url])
    return command if token is None else Disclosed(f"{TOKEN_ENV}={shlex.quote(token)} {command}")


def program_command(argv0: str, executable: str, *, frozen: bool) -> list[str]:
    """How this process was started, as the words of a command that starts it again.

    A frozen binary is `executable`; the ``agentspoonsd`` script is `argv0` as it was given
    (``.venv/bin/agentspoonsd`` from `make run` works from the same directory); anything else
    (``python -m agentspoonsd``) is `executable` ``-m agentspoonsd``."""
    if frozen:
        return [executable]
    if os.path.basename(argv0) == PROGRAM:
        return [argv0]
    return [executable, "-m", PROGRAM]


def start_banner(
    settings: Settings,
    config_path: Path | None,
    *,
    websocket_port: int,
    http_port: int,
    tls: bool,
    ephemeral_token: str | None,
    program: Sequence[str] = (PROGRAM,),
) -> StartBanner:
    """The banner of a daemon with `settings` (read from `config_path`), listening on the ports
    actually bound (port 0 and socket activation make them differ from the config).

    `ephemeral_token` is the token made at start, or None when tokens are configured or auth is
    off; it is the only token the banner may carry."""
    ws_url = websocket_url(settings.server.host, websocket_port, tls=tls)
    return StartBanner(
        config=str(config_path.absolute()) if config_path is not None else BUILT_IN_DEFAULTS,
        websocket_url=ws_url,
        dashboard_url=dashboard_url(settings.health.host, http_port, ephemeral_token),
        watch=watch_command(program, ws_url, ephemeral_token),
    )
