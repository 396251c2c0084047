"""server.trusted_proxies end to end: the config keys, the in-process WebSocket server's limits
per forwarded client, and the daemon's log naming the forwarded client."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

import test_ws
from agentspoonsd.proxies import TrustedProxies
from agentspoonsd.reloading import RELOADABLE_SERVER_KEYS, limits_from
from agentspoonsd.settings import ConfigError, load_settings
from daemon_process import DaemonProcess, config_text, new_token
from test_config_files import check_config
from test_ws import TOKEN, Running

running = test_ws.running  # the in-process server fixture, shared

BEHIND_LOCALHOST = TrustedProxies.parse(["127.0.0.1"])
GOOD = f"/?access_token={TOKEN}"
BAD = "/?access_token=wrong"


def write(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "conf.toml"
    path.write_text("[server]\n" + server, encoding="utf-8")
    return path


# --- config ------------------------------------------------------------------------------------


def test_by_default_no_proxy_is_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTSPOONSD_SERVER__TRUSTED_PROXIES", raising=False)
    server = load_settings(None).server
    assert server.trusted_proxies == [] and server.forwarded_header == "x-forwarded-for"
    assert limits_from(load_settings(None)).proxies == TrustedProxies()


def test_trusted_proxies_reach_the_server_limits(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'trusted_proxies = ["10.0.0.0/8", " 192.0.2.1", "2001:DB8::/32", "::ffff:172.16.0.0/108"]\n'
        'forwarded_header = "forwarded"\n',
    )
    settings = load_settings(path)
    assert settings.server.trusted_proxies == [
        "10.0.0.0/8",
        "192.0.2.1/32",
        "2001:db8::/32",
        "172.16.0.0/12",
    ]
    assert limits_from(settings).proxies == TrustedProxies.parse(
        settings.server.trusted_proxies, "forwarded"
    )
    # a reload applies them (no config_reload_needs_restart for these keys)
    assert {"trusted_proxies", "forwarded_header"} <= RELOADABLE_SERVER_KEYS


def test_trusted_proxies_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTSPOONSD_SERVER__TRUSTED_PROXIES", '["127.0.0.1", "::1"]')
    assert load_settings(None).server.trusted_proxies == ["127.0.0.1/32", "::1/128"]


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ('trusted_proxies = ["10.0.0.1/8"]', "server.trusted_proxies: Value error, '10.0.0.1/8'"),
        ('trusted_proxies = ["10.0.0.0/8", "proxy.local"]', "'proxy.local'"),
        ('trusted_proxies = ["fe80::1%eth0"]', "zone"),
        ('trusted_proxies = "10.0.0.0/8"', "server.trusted_proxies: Input should be a valid list"),
        ('forwarded_header = "x-real-ip"', "server.forwarded_header: Input should be"),
    ],
)
def test_a_bad_proxy_setting_names_its_key(tmp_path: Path, server: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, server + "\n"))
    assert message in str(raised.value)


def test_check_config_exits_78_on_a_bad_trusted_proxy(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, 'trusted_proxies = ["10.0.0.300"]\n'))
    assert result.returncode == 78
    output = result.stderr + result.stdout
    assert "server.trusted_proxies" in output and "'10.0.0.300'" in output
    assert "Traceback" not in result.stderr


# --- the in-process server: limits count the forwarded client ----------------------------------


async def upgrade(
    port: int, target: str, *headers: bytes, source: str = "127.0.0.1"
) -> tuple[int, trio.SocketStream]:
    """One upgrade request from `source`; the HTTP status and the still open stream."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some()
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1]), stream


Hold = Callable[..., Awaitable[int]]


@contextlib.asynccontextmanager
async def holding(running: Running, target: str = GOOD) -> AsyncIterator[Hold]:
    """`hold(*headers, source=)`: upgrade and keep the connection open until the block ends;
    then wait until the server has forgotten every one of them."""
    async with contextlib.AsyncExitStack() as held:

        async def hold(*headers: bytes, source: str = "127.0.0.1") -> int:
            status, stream = await upgrade(running.port, target, *headers, source=source)
            held.push_async_callback(stream.aclose)
            return status

        yield hold
    with trio.fail_after(5):
        while running.stats.clients_connected:  # noqa: ASYNC110 (server state, no event)
            await trio.sleep(0.01)


def xff(value: str) -> bytes:
    return b"X-Forwarded-For: " + value.encode()


@pytest.mark.parametrize(
    "running", [{"max_connections_per_ip": 2, "proxies": BEHIND_LOCALHOST}], indirect=True
)
async def test_the_per_address_limit_counts_each_forwarded_client(running: Running) -> None:
    first, second = xff("198.51.100.1"), xff("6.6.6.6, 198.51.100.2")  # leftmost: a claim
    async with holding(running) as hold:
        assert [await hold(first), await hold(first)] == [101, 101]
        assert await hold(first) == 429
        assert [await hold(second), await hold(second)] == [101, 101]
        assert await hold(xff("6.6.6.6, 198.51.100.1")) == 429  # the same client, another claim
        assert [await hold(), await hold()] == [101, 101]  # the proxy's own address: its own
        assert await hold() == 429
    assert running.stats.rejected_upgrades["per_ip"] == 3
    # each connection was counted off where it was counted
    assert running.server.policy.admission.per_ip == {}
    async with holding(running) as hold:
        assert [await hold(first), await hold(first)] == [101, 101]


@pytest.mark.parametrize(
    "running", [{"max_auth_failures_per_minute": 2, "proxies": BEHIND_LOCALHOST}], indirect=True
)
async def test_failed_authentication_is_counted_per_forwarded_client(running: Running) -> None:
    first, second = xff("198.51.100.1"), xff("198.51.100.2")
    async with holding(running, BAD) as hold:
        assert [await hold(first), await hold(first)] == [401, 401]
        assert await hold(first) == 429
        assert [await hold(second), await hold(second)] == [401, 401]  # a budget of its own
        assert await hold() == 401  # the proxy's own address too
        assert await hold(second) == 429
    assert running.stats.rejected_upgrades["auth_rate_limited"] == 2


@pytest.mark.parametrize(
    "running",
    [{"max_connections_per_ip": 2, "max_auth_failures_per_minute": 2, "proxies": BEHIND_LOCALHOST}],
    indirect=True,
)
async def test_an_untrusted_peer_cannot_choose_its_address(running: Running) -> None:
    # 127.0.0.2 is not a trusted proxy: whatever each request claims, all are 127.0.0.2's
    async with holding(running) as hold:
        claims = [xff(f"198.51.100.{i}") for i in range(3)]
        assert [await hold(c, source="127.0.0.2") for c in claims] == [101, 101, 429]
        assert await hold(xff("198.51.100.9")) == 101  # from the proxy: believed
    async with holding(running, BAD) as hold:
        claims = [xff(f"203.0.113.{i}") for i in range(3)]
        assert [await hold(c, source="127.0.0.2") for c in claims] == [401, 401, 429]
        forwarded = b"Forwarded: for=203.0.113.50"
        assert await hold(forwarded, source="127.0.0.2") == 429


@pytest.mark.parametrize(
    "running",
    [{"max_connections_per_ip": 1, "proxies": TrustedProxies.parse(["127.0.0.1"], "forwarded")}],
    indirect=True,
)
async def test_only_the_configured_header_is_believed(running: Running) -> None:
    async with holding(running) as hold:
        assert await hold(b'Forwarded: for="[2001:db8::1]:443";proto=https') == 101
        # X-Forwarded-For is not what this proxy writes: a client's own, passed through
        assert await hold(b"Forwarded: for=[2001:db8::1]", xff("198.51.100.1")) == 429
        assert await hold(b"Forwarded: for=198.51.100.1") == 101


@pytest.mark.parametrize("running", [{"proxies": BEHIND_LOCALHOST}], indirect=True)
async def test_log_events_name_the_forwarded_client(running: Running) -> None:
    with capture_logs() as logs:
        async with holding(running) as hold:
            assert await hold(xff("198.51.100.7")) == 101
            assert await hold() == 101
        async with holding(running, BAD) as hold:
            assert await hold(xff("198.51.100.8")) == 401
    by_event: dict[str, list[dict]] = {}
    for entry in logs:
        by_event.setdefault(entry["event"], []).append(entry)
    connected = by_event["client_connected"]
    assert [e.get("client") for e in connected] == ["198.51.100.7", None]
    assert all(e["peer"].startswith("127.0.0.1:") for e in connected)
    disconnected = sorted(by_event["client_disconnected"], key=lambda e: "client" in e)
    assert [e.get("client") for e in disconnected] == [None, "198.51.100.7"]
    assert by_event["auth_failed"][0]["client"] == "198.51.100.8"


# --- the daemon ---------------------------------------------------------------------------------


async def test_the_daemon_logs_the_forwarded_client_and_reload_applies_the_list(
    tmp_path: Path,
) -> None:
    token = new_token()
    text = config_text(tokens={"t": token})
    path = tmp_path / "agentspoonsd.toml"
    path.write_text(text, encoding="utf-8")
    process = DaemonProcess(path)
    process.start()
    try:
        ws_port, _ = await process.ports()
        target = f"/?access_token={token}"
        status, stream = await upgrade(ws_port, target, xff("198.51.100.7"))
        await stream.aclose()
        assert status == 101
        event = await process.wait_for("client_disconnected")
        assert "client" not in event  # nothing trusted yet: the header means nothing

        trusted = '[server]\ntrusted_proxies = ["127.0.0.1/32"]\n'
        path.write_text(text.replace("[server]\n", trusted, 1), encoding="utf-8")
        process.signal(signal.SIGHUP)
        await process.wait_for("config_reloaded")
        status, stream = await upgrade(ws_port, target, xff("6.6.6.6, 198.51.100.7"))
        assert status == 101
        connected = await process.wait_for("client_connected", client="198.51.100.7")
        assert connected["peer"].startswith("127.0.0.1:")
        await stream.aclose()
        await process.wait_for("client_disconnected", client="198.51.100.7")
        status, stream = await upgrade(ws_port, "/?access_token=wrong", xff("198.51.100.9"))
        await stream.aclose()
        assert status == 401
        await process.wait_for("auth_failed", client="198.51.100.9")
        assert not [
            e
            for e in process.events
            if e.get("event") == "config_reload_needs_restart"
            and any("proxies" in key for key in e.get("keys", []))
        ]
        assert "6.6.6.6" not in json.dumps(process.events)  # a claim, never believed or logged
    finally:
        process.kill()
