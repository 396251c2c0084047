"""What a SIGHUP applies: derived from `Limits`, checked against what `limits_from` really reads,
and seen end to end in a real daemon's log."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

from trio_websocket import open_websocket_url

from agentspoonsd.limits import LIMITS_KEYS, Limits
from agentspoonsd.reloading import (
    LIVE_KEYS,
    RELOADABLE_SERVER_KEYS,
    changes_applied,
    changes_needing_restart,
    limits_from,
)
from agentspoonsd.settings import ServerSettings, Settings
from daemon_process import config_text, new_token

# Another valid value for every [server] key (and the other keys a Limits field may read): a key
# added to ServerSettings fails the first test until it is given one here.
OTHER_VALUE: dict[str, dict[str, Any]] = {
    "server": {
        "host": "127.0.0.2",
        "port": 9999,
        "max_connections": 7,
        "shutdown_timeout": 9.0,
        "handshake_timeout": 3.0,
        "max_backlog_bytes": 4096,
        "send_buffer_bytes": 4096,
        "max_message_size": 1024,
        "listen_backlog": 8,
        "workers": 3,
        "ping_interval": 5.0,
        "idle_timeout": 7.0,
        "max_client_messages_per_second": 3,
        "max_client_errors": 2,
        "max_client_frames_per_second": 50,
        "max_client_bytes_per_second": 2048,
        "allowed_origins": ["https://example.com"],
        "max_connections_per_ip": 3,
        "max_handshakes_per_ip": 5,
        "permessage_deflate": False,
        "trusted_proxies": ["10.0.0.0/8"],
        "forwarded_header": "forwarded",
        "public_url": "https://example.com/market/",
        "tls_cert": "/x/cert.pem",
        "tls_key": "/x/key.pem",
    },
    "auth": {"max_failures_per_minute": 3},
    "health": {"host": "127.0.0.3", "port": 9998},
}


def changed(key: str) -> Settings:
    section, name = key.split(".")
    update = {name: OTHER_VALUE[section][name]}
    if name in ("tls_cert", "tls_key"):  # set both or neither
        update = {k: OTHER_VALUE["server"][k] for k in ("tls_cert", "tls_key")}
    return Settings(**{section: update})


def test_limits_keys_are_exactly_what_limits_from_reads() -> None:
    assert set(OTHER_VALUE["server"]) == set(ServerSettings.model_fields)
    defaults = limits_from(Settings())
    keys = [f"{section}.{name}" for section, names in OTHER_VALUE.items() for name in names]
    read = {key for key in keys if limits_from(changed(key)) != defaults}
    assert read == LIMITS_KEYS


def test_limits_have_no_defaults_of_their_own() -> None:
    # Their defaults are the settings models': a second copy here could only drift.
    for field in dataclasses.fields(Limits):
        assert field.default is dataclasses.MISSING, field.name
        assert field.default_factory is dataclasses.MISSING, field.name


def test_heartbeat_idle_and_deflate_are_applied_by_a_reload() -> None:
    for name in ("ping_interval", "idle_timeout", "permessage_deflate", "max_client_errors"):
        assert name in RELOADABLE_SERVER_KEYS
        assert changes_applied(Settings(), changed(f"server.{name}")) == [f"server.{name}"]
        assert changes_needing_restart(Settings(), changed(f"server.{name}")) == []


def test_listener_and_page_keys_need_a_restart() -> None:
    # The listener is bound once; the dashboard's page takes its origins and URL at start.
    for name in ("host", "port", "listen_backlog", "allowed_origins", "public_url"):
        assert f"server.{name}" not in LIVE_KEYS
        assert changes_needing_restart(Settings(), changed(f"server.{name}")) == [f"server.{name}"]
    assert changes_needing_restart(Settings(), changed("health.port")) == ["health.port"]
    assert changes_applied(Settings(), changed("auth.max_failures_per_minute")) == [
        "auth.max_failures_per_minute"
    ]


async def test_a_reloaded_ping_interval_is_logged_as_applied_and_greets_new_clients(
    daemon_factory: Any, tmp_path: Path
) -> None:
    token = new_token()
    text = config_text(tokens={"t": token})
    daemon = daemon_factory(text)
    ws_port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{ws_port}/?access_token={token}"
    async with open_websocket_url(url) as ws:
        assert json.loads(await ws.get_message())["ping_interval"] == 20.0

    daemon.config_path.write_text(text.replace("[server]\n", "[server]\nping_interval = 7.5\n", 1))
    daemon.signal(signal.SIGHUP)
    reloaded = await daemon.wait_for("config_reloaded")
    assert reloaded["applied"] == ["server.ping_interval"]
    async with open_websocket_url(url) as ws:
        assert json.loads(await ws.get_message())["ping_interval"] == 7.5
    assert not [e for e in daemon.events if e.get("event") == "config_reload_needs_restart"]

    # A key that does need a restart is still reported as such, and not as applied.
    daemon.config_path.write_text(text.replace("[server]\n", "[server]\nlisten_backlog = 9\n", 1))
    daemon.signal(signal.SIGHUP)
    reloaded = await daemon.wait_for("config_reloaded", applied=["server.ping_interval"])
    restart = await daemon.wait_for("config_reload_needs_restart")
    assert restart["keys"] == ["server.listen_backlog"]
