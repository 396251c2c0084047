"""Replays a client asked for never get it cut as a slow consumer.

The real daemon as a subprocess, a persisted history of `HISTORY` realistic updates (~1 KB
each, far more than the backlog cap of `BACKLOG` bytes), and a client with a tiny receive
buffer that reads slowly: it resumes from the oldest seq (on connect and by message) or asks for
the whole history, with permessage-deflate on and off. It must get every update it asked for,
in order, and never a 1013 close; a bystander must keep getting every live update meanwhile.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from agentspoonsd import protocol
from agentspoonsd.history import HistoryStore
from agentspoonsd.market.bar import Bar
from daemon_process import DaemonProcess, config_text, new_token
from helpers import bearer

SYMBOL = "BTC/USD"
HISTORY = 1000
FIRST_SEQ = 5_000_000
BACKLOG = 128 * 1024  # server.max_backlog_bytes: the replay is ~8 times as big
INTERVAL = 0.25  # seconds between live updates


def realistic_bar(rng: random.Random, moment: datetime) -> Bar:
    """A bar whose analytics are ~1 KB of varied numbers (they compress like real ones)."""
    price = 60_000 * (1 + rng.gauss(0, 0.01))
    return Bar(
        symbol=SYMBOL,
        timestamp=moment,
        open=price,
        high=price * 1.001,
        low=price * 0.999,
        close=price * (1 + rng.gauss(0, 0.0005)),
        volume=rng.uniform(1, 100),
        returns=rng.gauss(0, 0.001),
        volatility=rng.uniform(0.1, 0.9),
        analytics={
            "estimators": {f"estimator_{k}": rng.random() for k in range(20)},
            "estimators_annualized": {f"estimator_{k}": rng.random() for k in range(20)},
        },
    )


def write_history(directory: Path) -> None:
    """`HISTORY` stored updates of SYMBOL, seq FIRST_SEQ on: the daemon loads them at start."""
    rng = random.Random(15)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    store = HistoryStore(directory, HISTORY)
    for i in range(HISTORY):
        moment = start + timedelta(minutes=i)
        message = protocol.update_message(realistic_bar(rng, moment), FIRST_SEQ + i, moment)
        store.append(SYMBOL, protocol.encode(message))
    store.close()


@dataclass
class Live:
    process: DaemonProcess
    port: int
    token: str


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    directory = tmp_path_factory.mktemp("replay")
    write_history(directory / "history")
    token = new_token()
    extra = f'\n[history]\nsize = {HISTORY}\npersist = true\ndir = "{directory / "history"}"\n'
    text = config_text(tokens={"test": token}, interval=INTERVAL, symbols=(SYMBOL,), extra=extra)
    text = text.replace(
        "[server]\n",
        f"[server]\nmax_backlog_bytes = {BACKLOG}\nsend_buffer_bytes = 4096\n"
        "max_client_messages_per_second = 1000\n",
        1,
    )
    path = directory / "agentspoonsd.toml"
    path.write_text(text)
    process = DaemonProcess(path)
    process.start()
    try:
        ws_port, _ = trio.run(process.ports)
        yield Live(process, ws_port, token)
    finally:
        process.kill()


class Bystander:
    """A client subscribed to SYMBOL that reads everything at once; it must miss nothing."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.seqs: list[int] = []
        self.ended: str | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        headers = bearer(self.live.token)
        url = f"ws://127.0.0.1:{self.live.port}/?symbols={SYMBOL}"
        try:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                json.loads(await ws.get_message())
                task_status.started()
                while True:
                    message = json.loads(await ws.get_message())
                    if message["type"] == "volatility_update":
                        self.seqs.append(message["data"]["seq"])
        except ConnectionClosed as exc:
            self.ended = f"closed: {exc.reason}"

    def check(self) -> None:
        assert self.ended is None, self.ended
        assert len(self.seqs) >= 2, "the bystander got no live updates meanwhile"
        assert self.seqs == list(range(self.seqs[0], self.seqs[0] + len(self.seqs)))


class SlowReader:
    """A WebSocket client with a tiny receive buffer that takes a few KB at a time."""

    def __init__(self, live: Live, *, deflate: bool) -> None:
        self.live = live
        self.deflate = deflate
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.stream: trio.SocketStream | None = None
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._parts: list[str] = []
        self._early: list[Any] = []  # events read with the 101, not handled yet

    async def connect(self, target: str) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        await sock.connect(("127.0.0.1", self.live.port))
        self.stream = trio.SocketStream(sock)
        extensions = [PerMessageDeflate()] if self.deflate else []
        headers = [(b"authorization", f"Bearer {self.live.token}".encode())]
        await self._send(
            Request(host="127.0.0.1", target=target, extensions=extensions, extra_headers=headers)
        )
        while True:
            events = await self._events()
            for index, event in enumerate(events):
                if isinstance(event, RejectConnection):
                    raise AssertionError(f"upgrade refused: {event.status_code}")
                if isinstance(event, AcceptConnection):
                    assert bool(event.extensions) == self.deflate
                    # What came in the same read (the ping, the greeting, the start of the
                    # replay, perhaps a message's first part) is read by read_until.
                    self._early = events[index + 1 :]
                    return

    async def send(self, message: dict[str, Any]) -> None:
        await self._send(TextMessage(json.dumps(message)))

    async def _send(self, event: Any) -> None:
        assert self.stream is not None
        await self.stream.send_all(self.ws.send(event))

    async def _events(self) -> list[Any]:
        assert self.stream is not None
        if self._early:
            early, self._early = self._early, []
            return early
        data = await self.stream.receive_some(2048)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def read_until(self, done: Any, *, pause: float = 0.002, limit: float = 60) -> None:
        """Read slowly (2 KB, then a pause) until `done(messages)` or a close."""
        with trio.fail_after(limit):
            while not done(self.messages) and self.close_code is None:
                for event in await self._events():
                    if isinstance(event, TextMessage):
                        self._parts.append(event.data)
                        if event.message_finished:
                            self.messages.append(orjson.loads("".join(self._parts)))
                            self._parts.clear()
                    elif isinstance(event, Ping):
                        await self._send(event.response())
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                await trio.sleep(pause)

    def updates(self) -> list[int]:
        return [m["data"]["seq"] for m in self.messages if m["type"] == "volatility_update"]

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


def reached_live(messages: list[dict[str, Any]]) -> bool:
    """The replay is over and a live update (seq past the stored ones) arrived."""
    return any(
        m["type"] == "volatility_update" and m["data"]["seq"] >= FIRST_SEQ + HISTORY + 1
        for m in messages
    )


async def replay(live: Live, *, deflate: bool, by_message: bool) -> SlowReader:
    """A slow client resuming SYMBOL from before the oldest retained seq; the bystander too."""
    bystander = Bystander(live)
    reader = SlowReader(live, deflate=deflate)
    async with trio.open_nursery() as nursery:
        await nursery.start(bystander.run)
        oldest = FIRST_SEQ - 1  # what a client that saw nothing stored would send: the full ring
        if by_message:
            await reader.connect("/?symbols=")
            await reader.send({"type": "resume", "from": {SYMBOL: oldest + 1}})
        else:
            await reader.connect(f"/?resume={SYMBOL}:{oldest + 1}")
        try:
            await reader.read_until(reached_live)
        finally:
            await reader.aclose()
        nursery.cancel_scope.cancel()
    bystander.check()
    return reader


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
@pytest.mark.parametrize("by_message", [False, True], ids=["on_connect", "by_message"])
async def test_full_history_resume_to_a_slow_reader_completes_without_1013(
    live: Live, deflate: bool, by_message: bool
) -> None:
    reader = await replay(live, deflate=deflate, by_message=by_message)
    assert reader.close_code is None, f"the replay got the client closed {reader.close_code}"
    seqs = reader.updates()
    # Every retained update after FIRST_SEQ (all retained ones after a `reset`, once live updates
    # have pushed FIRST_SEQ out of the ring), then the live ones, each once and in order.
    resets = [m for m in reader.messages if m["type"] == "reset"]
    assert seqs[0] == (resets[0]["oldest_seq"] if resets else FIRST_SEQ + 1)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap or a repeat"
    assert seqs[-1] > FIRST_SEQ + HISTORY and len(seqs) > HISTORY - 100


def history_pages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "history"]


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
async def test_full_history_request_to_a_slow_reader_is_paged_without_1013(
    live: Live, deflate: bool
) -> None:
    """An old client's `limit` of the whole history gets the newest page, under 256 KiB, with
    `more` and the cursor; following it yields every retained update once."""
    bystander = Bystander(live)
    reader = SlowReader(live, deflate=deflate)
    pages: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(bystander.run)
        await reader.connect("/?symbols=")
        request: dict[str, Any] = {"type": "history", "symbol": SYMBOL, "limit": HISTORY}
        try:
            while True:
                await reader.send(request)
                await reader.read_until(lambda m: len(history_pages(m)) > len(pages))
                assert reader.close_code is None, f"closed {reader.close_code}"
                page = history_pages(reader.messages)[len(pages)]
                assert page["type"] == "history", page
                assert len(orjson.dumps(page)) <= protocol.MAX_HISTORY_REPLY_BYTES
                pages.append(page)
                if not page["more"]:
                    break
                request = {**request, "before_seq": page["before_seq"]}
                assert len(pages) < 50
            await trio.sleep(2 * INTERVAL)  # the bystander keeps getting live updates
        finally:
            await reader.aclose()
        nursery.cancel_scope.cancel()
    bystander.check()
    assert len(pages) > 1, "the whole history fitted one page: the test proves nothing"
    assert pages[0]["updates"] and pages[0]["more"] is True
    seqs = [u["seq"] for page in reversed(pages) for u in page["updates"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The ring holds HISTORY; a few may be evicted by live updates while the pages are read.
    assert len(seqs) > HISTORY - 50
