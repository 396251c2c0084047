"""Comparison server for `make bench`: the daemon's job done with the `websockets` package.

Same contract as agentspoonsd, as far as the benchmark sees it: a bearer-token check on the
upgrade (401 otherwise), a `connected` greeting, then one `volatility_update` per symbol every
`--interval` seconds on an absolute schedule, with per-symbol `seq` and the outer `timestamp`
(ISO-8601 UTC with microseconds) taken at publish time. Each update is JSON-encoded once and
handed to `websockets.asyncio.server.broadcast()`, the package's recommended fan-out.

broadcast() bounds nothing, so a once-a-second sweep aborts a client whose transport holds more
than --max-backlog-bytes unsent. Runs in bench/.venv-bench (websockets is not a daemon
dependency). Prints the daemon's `listener_bound` log line with its port.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import random
import signal
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

COMPACT = (",", ":")  # the daemon's orjson output has no spaces: same bytes, same size


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log(event: str, **fields: object) -> None:
    print(json.dumps({"timestamp": iso_now(), "event": event, **fields}), flush=True)


class Market:
    """A random walk producing the same fields (so about the same message size) as the daemon."""

    def __init__(self, symbols: list[str], seed: int, extra: dict[str, object]) -> None:
        self._random = random.Random(seed)
        # The daemon's analytics fields from a sample update: every server sends the same size.
        self._extra = extra
        self._state = {s: {"price": 50000.0, "vol": 0.001, "seq": 0} for s in symbols}

    def next(self, symbol: str) -> dict[str, object]:
        s = self._state[symbol]
        returns = (self._random.random() - 0.5) * 2 * s["vol"]
        open_, close = s["price"], s["price"] * math.exp(returns)
        s["price"] = close
        s["vol"] = 0.9 * s["vol"] + 0.1 * abs(returns) + 1e-6
        s["seq"] += 1
        return {
            "timestamp": iso_now(),
            "symbol": symbol,
            "seq": s["seq"],
            "volatility": s["vol"],
            "price": close,
            "returns": returns,
            "open": open_,
            "high": max(open_, close) * (1 + self._random.random() * 1e-3),
            "low": min(open_, close) * (1 - self._random.random() * 1e-3),
            "close": close,
            "volume": self._random.random(),
            **self._extra,
        }


def presented_token(request: Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, credentials = header.strip().partition(" ")
        return credentials.strip() if scheme.lower() == "bearer" else None
    return dict(parse_qsl(urlsplit(request.path).query)).get("access_token")


def make_auth(expected_hex: str):
    expected = bytes.fromhex(expected_hex)

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        token = presented_token(request)
        digest = hashlib.sha256((token or "").encode()).digest()
        if token and hmac.compare_digest(digest, expected):
            return None  # proceed with the upgrade
        return connection.respond(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required\n")

    return process_request


def make_handler(symbols: list[str]):
    async def handler(connection: ServerConnection) -> None:
        greeting = {
            "type": "connected",
            "message": "AgentSpoons WebSocket Server",
            "timestamp": iso_now(),
            "symbols": symbols,
        }
        await connection.send(json.dumps(greeting, separators=COMPACT))
        async for _ in connection:  # clients send nothing the benchmark needs; keep reading
            pass

    return handler


async def publish(
    server: Server, symbols: list[str], interval: float, seed: int, extra: dict[str, object]
) -> None:
    """One update per symbol every `interval`, on an absolute schedule (lateness never adds up)."""
    market = Market(symbols, seed, extra)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tick = 0
    while True:
        tick += 1
        await asyncio.sleep(max(0.0, start + tick * interval - loop.time()))
        for symbol in symbols:
            message = {
                "type": "volatility_update",
                "data": market.next(symbol),
                "timestamp": iso_now(),
            }
            # One encode per update; text=True sends the UTF-8 bytes as a text frame as they are.
            data = json.dumps(message, separators=COMPACT).encode()
            broadcast(server.connections, data, text=True)


async def sweep_backlogs(server: Server, max_bytes: int) -> None:
    while True:
        await asyncio.sleep(1.0)
        for connection in list(server.connections):
            if connection.transport.get_write_buffer_size() > max_bytes:
                connection.transport.abort()


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(
        make_handler(args.symbols),
        args.host,
        args.port,
        process_request=make_auth(args.token_sha256),
        compression="deflate" if args.deflate == "true" else None,  # per connection
        backlog=args.listen_backlog,
    ) as server:
        host, port = server.sockets[0].getsockname()[:2]
        log("listener_bound", service="websocket", address=f"{host}:{port}")
        tasks = [
            asyncio.create_task(
                publish(server, args.symbols, args.interval, args.seed, args.extra_json)
            ),
            asyncio.create_task(sweep_backlogs(server, args.max_backlog_bytes)),
        ]
        await stop
        for task in tasks:
            task.cancel()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--symbols", type=lambda v: v.split(","), default=["BTC/USD"])
    parser.add_argument("--token-sha256", required=True)
    parser.add_argument("--max-backlog-bytes", type=int, default=1 << 20)
    parser.add_argument("--listen-backlog", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--deflate", choices=("true", "false"), default="false")
    parser.add_argument("--extra-json", type=lambda p: json.loads(Path(p).read_text()), default={})
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
