"""End to end: the real daemon in a subprocess, real WebSocket clients, real HTTP requests."""

from __future__ import annotations

import json
import signal

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from daemon_process import config_text, http_get, new_token, token_block
from helpers import bearer, next_update

SHUTDOWN_TIMEOUT = 3.0  # config_text's server.shutdown_timeout


# daemon_factory: conftest.py


async def test_stream_health_metrics_and_sigterm(daemon_factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"dashboard": token}))
    ws_port, http_port = await daemon.ports()

    async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/", extra_headers=bearer(token)) as ws:
        connected = json.loads(await ws.get_message())
        assert connected["type"] == "connected"
        assert connected["message"] == "AgentSpoons WebSocket Server"
        assert connected["timestamp"].endswith("Z")
        assert connected["symbols"] == ["BTC/USD", "ETH/USD"]

        last_seq = {"BTC/USD": 0, "ETH/USD": 0}
        for _ in range(6):
            update = await next_update(ws)
            data = update["data"]
            assert set(data) >= {
                "timestamp",
                "volatility",
                "price",
                "returns",
                "open",
                "high",
                "low",
                "close",
                "volume",
                "symbol",
                "seq",
            }
            assert data["low"] <= min(data["open"], data["close"])
            assert data["high"] >= max(data["open"], data["close"])
            assert data["price"] == data["close"]
            assert data["volatility"] >= 0
            # Per-symbol seq strictly increases by one: no gap, no repeat.
            if last_seq[data["symbol"]]:
                assert data["seq"] == last_seq[data["symbol"]] + 1
            last_seq[data["symbol"]] = data["seq"]
        assert all(seq > 0 for seq in last_seq.values())

        status, _, body = await http_get(http_port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, _, body = await http_get(http_port, "/readyz")
        assert status == 200, body
        status, headers, body = await http_get(http_port, "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        metrics = body.decode()
        assert "agentspoonsd_clients_connected 1.0" in metrics
        assert "agentspoonsd_updates_published_total" in metrics
        assert "agentspoonsd_last_update_age_seconds" in metrics

        with trio.fail_after(SHUTDOWN_TIMEOUT):
            daemon.signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 1001
    assert await daemon.wait_exit(SHUTDOWN_TIMEOUT + 1) == 0

    connected_log = await daemon.wait_for("client_connected")
    assert connected_log["token"] == "dashboard" and connected_log["peer"].startswith("127.0.0.1:")
    disconnected = await daemon.wait_for("client_disconnected")
    assert disconnected["token"] == "dashboard" and disconnected["duration_s"] >= 0
    assert token not in daemon.log_text


async def test_upgrade_auth_header_query_wrong_missing(daemon_factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"reader": token}))
    ws_port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{ws_port}/"

    async with open_websocket_url(url, extra_headers=bearer(token)) as ws:
        assert json.loads(await ws.get_message())["type"] == "connected"
    async with open_websocket_url(f"{url}?access_token={token}") as ws:
        assert json.loads(await ws.get_message())["type"] == "connected"

    for headers, target, reason in [
        ([], url, "missing_token"),
        (bearer(new_token()), url, "invalid_token"),
        ([], f"{url}?access_token=wrong", "invalid_token"),
    ]:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(target, extra_headers=headers):
                pass
        assert rejected.value.status_code == 401
        challenge = dict(rejected.value.headers)[b"www-authenticate"]
        assert challenge.startswith(b"Bearer")
        await daemon.wait_for("auth_failed", reason=reason)
    assert "wrong" not in daemon.log_text and token not in daemon.log_text


async def test_bad_client_message_gets_error_and_connection_stays(daemon_factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}))
    ws_port, _ = await daemon.ports()
    async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/", extra_headers=bearer(token)) as ws:
        await ws.get_message()  # connected
        for text, code in [
            ("not json", "invalid_json"),
            ("[1, 2]", "invalid_message"),
            ('{"type": "teleport"}', "unknown_type"),
        ]:
            await ws.send_message(text)
            while (reply := json.loads(await ws.get_message()))["type"] == "volatility_update":
                pass
            assert reply == {"type": "error", "code": code, "message": reply["message"]}
        await ws.send_message(b"\x00binary")
        while (reply := json.loads(await ws.get_message()))["type"] == "volatility_update":
            pass
        assert reply["code"] == "binary_unsupported"
        await ws.send_message('{"type": "ping"}')
        while (reply := json.loads(await ws.get_message()))["type"] == "volatility_update":
            pass
        assert reply["type"] == "pong"
        assert (await next_update(ws))["type"] == "volatility_update"  # still streaming


async def test_sighup_adds_token_without_dropping_connections(daemon_factory) -> None:
    first, second = new_token(), new_token()
    text = config_text(tokens={"first": first})
    daemon = daemon_factory(text)
    ws_port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{ws_port}/"

    async with open_websocket_url(url, extra_headers=bearer(first)) as ws:
        await ws.get_message()
        seq_before = (await next_update(ws))["data"]["seq"]
        with pytest.raises(ConnectionRejected):
            async with open_websocket_url(url, extra_headers=bearer(second)):
                pass

        # An invalid file is rejected and the old config stays.
        daemon.config_path.write_text(text + "\n[server]\nport = 'eighty'\n")
        daemon.signal(signal.SIGHUP)
        rejected = await daemon.wait_for("config_reload_rejected")
        assert "server" in rejected["error"]

        daemon.config_path.write_text(text + token_block("second", second))
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("config_reloaded", tokens=2)
        async with open_websocket_url(url, extra_headers=bearer(second)) as ws2:
            assert json.loads(await ws2.get_message())["token"] == "second"

        # The first connection lived through both reloads, with no gap in its stream.
        seen = [(await next_update(ws))["data"] for _ in range(4)]
        by_symbol = [d["seq"] for d in seen if d["symbol"] == "BTC/USD"]
        assert by_symbol == list(range(by_symbol[0], by_symbol[0] + len(by_symbol)))
        assert by_symbol[0] > seq_before


async def test_ephemeral_token_logged_once_and_usable(daemon_factory) -> None:
    daemon = daemon_factory(config_text())
    ws_port, _ = await daemon.ports()
    await daemon.wait_for("auth_ephemeral_token")
    event = await daemon.wait_for("daemon_started")
    token = event["dashboard_url"].split("#access_token=", 1)[1]
    async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/", extra_headers=bearer(token)) as ws:
        assert json.loads(await ws.get_message())["token"] == "ephemeral"
    # In the start banner's one line only (its dashboard URL and its watch command).
    assert [line for line in daemon.raw_lines if token in line] == [
        line for line in daemon.raw_lines if '"daemon_started"' in line
    ]


async def test_auth_disabled_is_explicit_and_warned(daemon_factory) -> None:
    daemon = daemon_factory(config_text(auth_enabled=False))
    ws_port, _ = await daemon.ports()
    await daemon.wait_for("auth_disabled")
    async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/") as ws:
        assert json.loads(await ws.get_message())["token"] == "anonymous"
        assert (await next_update(ws))["type"] == "volatility_update"


async def test_environment_overrides_file(daemon_factory) -> None:
    token = new_token()
    daemon = daemon_factory(
        config_text(tokens={"t": token}),
        env={"AGENTSPOONSD_GENERATOR__SYMBOLS": '["SOL/USD"]'},
    )
    ws_port, _ = await daemon.ports()
    async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/", extra_headers=bearer(token)) as ws:
        assert json.loads(await ws.get_message())["symbols"] == ["SOL/USD"]
        assert (await next_update(ws))["data"]["symbol"] == "SOL/USD"


async def test_sigint_also_closes_clients_with_1001(daemon_factory) -> None:
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"t": token}))
    ws_port, _ = await daemon.ports()
    async with open_websocket_url(f"ws://127.0.0.1:{ws_port}/", extra_headers=bearer(token)) as ws:
        await ws.get_message()
        daemon.signal(signal.SIGINT)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        assert closed.value.reason.code == 1001
    assert await daemon.wait_exit(SHUTDOWN_TIMEOUT + 1) == 0


def test_default_allowed_origins_are_the_dashboards_own() -> None:
    from agentspoonsd.reloading import allowed_origins
    from agentspoonsd.settings import Settings

    default = allowed_origins(Settings(health={"port": 9000}))
    assert default is not None
    assert {"http://localhost:9000", "http://127.0.0.1:9000"} <= default
    assert "http://evil.example:9000" not in default
    assert allowed_origins(Settings(server={"allowed_origins": ["*"]})) is None
    configured = allowed_origins(Settings(server={"allowed_origins": ["https://A.example/"]}))
    assert configured == frozenset({"https://a.example"})
    bound = allowed_origins(Settings(health={"port": 0}), http_port=43210)
    assert bound is not None and "http://127.0.0.1:43210" in bound


async def test_default_origins_follow_the_bound_http_port(daemon_factory) -> None:
    """`[health] port = 0`: the dashboard is served from the port the kernel picked, and that is
    the origin its WebSocket is let in from."""
    token = new_token()
    daemon = daemon_factory(config_text(tokens={"dashboard": token}))
    ws_port, http_port = await daemon.ports()
    url = f"ws://127.0.0.1:{ws_port}/"
    own = [(b"Origin", f"http://127.0.0.1:{http_port}".encode()), *bearer(token)]
    async with open_websocket_url(url, extra_headers=own) as ws:
        assert json.loads(await ws.get_message())["type"] == "connected"
    other = [(b"Origin", b"http://127.0.0.1:1"), *bearer(token)]
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(url, extra_headers=other):
            pass
    assert rejected.value.status_code == 403


async def test_garbage_collection_loop_collects_cycles_and_stops_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import gc
    import weakref

    from agentspoonsd.daemon import collect_garbage_loop

    class Node:
        pass

    gc.disable()  # only the loop may collect during this test
    try:
        cycle = Node()
        cycle.me = cycle  # type: ignore[attr-defined]
        alive = weakref.ref(cycle)
        del cycle
        with trio.move_on_after(45) as scope:
            await collect_garbage_loop(30.0)
        assert scope.cancelled_caught  # it runs until cancelled, and then stops
        assert alive() is None  # collected by the loop's first round
    finally:
        gc.enable()
