#!/usr/bin/env python3
"""Watch an agentspoonsd daemon with the `websockets` package (pip install websockets).

    AGENTSPOONSD_TOKEN=<token> python client.py [ws://127.0.0.1:8765/] [--symbol BTC/USD ...]
                                                [--count N]

Prints one line per update and exits after N updates (default: never). The wire protocol is in
docs/PROTOCOL.md; client.js beside this file is the same program for Node.js.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def show(message: dict[str, Any], last_seq: dict[str, int]) -> None:
    """Print one server message (docs/PROTOCOL.md lists them all)."""
    kind = message["type"]
    if kind == "connected":
        print(f"connected: token={message['token']} symbols={','.join(message['symbols'])}")
    elif kind == "history":
        seqs = [update["seq"] for update in message["updates"]]
        span = f"seq {seqs[0]}..{seqs[-1]}" if seqs else "none"
        print(f"history {message['symbol']}: {len(seqs)} updates, {span}")
    elif kind == "volatility_update":
        data = message["data"]
        symbol, seq = data["symbol"], data["seq"]
        previous = last_seq.get(symbol)
        if previous is not None and seq != previous + 1:
            # Reconnect with ?resume=SYMBOL:<previous> to get the missed ones back.
            print(f"gap {symbol}: missed {seq - previous - 1} updates after seq {previous}")
        last_seq[symbol] = seq
        print(
            f"update {symbol} seq={seq} close={fmt(data['close'], 2)}"
            f" volatility={fmt(data['volatility'], 6)} garch={data['garch_forecast']['status']}"
        )
    elif kind == "error":
        print(f"error {message['code']}: {message['message']}", file=sys.stderr)
    # Other types (replies to requests this client does not send, new ones): ignored.


async def watch(url: str, token: str, symbols: list[str], count: int) -> int:
    if symbols:  # the initial subscription; without it, every symbol the token may see
        url += "?symbols=" + ",".join(quote(s, safe="") for s in symbols)
    last_seq: dict[str, int] = {}
    seen = 0
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        try:
            async for raw in ws:  # ends when the server closes the connection
                message = json.loads(raw)
                show(message, last_seq)
                if message["type"] == "connected" and message["symbols"]:
                    # A request: the newest updates the daemon keeps of the first symbol.
                    request = {"type": "history", "symbol": message["symbols"][0], "limit": 5}
                    await ws.send(json.dumps(request))
                elif message["type"] == "volatility_update":
                    seen += 1
                    if seen == count:
                        return 0  # leaving `async with` closes the connection normally (1000)
        except ConnectionClosedError:  # closed with an error code, or without a close frame
            pass
    print(f"closed {ws.close_code} {ws.close_reason or ''}".rstrip(), file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default="ws://127.0.0.1:8765/")
    parser.add_argument("--symbol", action="append", default=[], help="repeat for several")
    parser.add_argument("--count", type=int, default=0, help="exit after N updates")
    args = parser.parse_args()
    token = os.environ.get("AGENTSPOONSD_TOKEN")
    if not token:
        parser.error("set AGENTSPOONSD_TOKEN to a token of the daemon")
    try:
        return asyncio.run(watch(args.url, token, args.symbol, args.count))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
