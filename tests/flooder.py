"""A mixed flood of abusive peers against one daemon, run as its own process by the tests.

    python tests/flooder.py PORT TOKEN SECONDS

For SECONDS it cycles through the classes of abuse the hardening work closed, one connection at a
time, paced so that the flooder itself is no CPU hog (the bystander's latency must measure the
daemon, not the machine): requests followed at once by a reset, frame floods (pings, pongs, empty
fragments), permessage-deflate bombs, failed authentications, half-open handshakes, full-history
requests dropped unread, garbage after the upgrade. It prints one JSON object: how often each
attack ran and what the daemon answered (HTTP status or close code).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
PACE = 0.004  # seconds between attacks
HALF_OPEN_HELD = 200  # stalled handshakes kept open at once (the daemon's deadline reaps them)


def upgrade(target: str, *headers: bytes) -> bytes:
    return (
        b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: "
        + KEY
        + b"\r\nSec-WebSocket-Version: 13\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload) ^ int.from_bytes(key)).to_bytes(n) if n else b""
    return head + mask + masked


def bomb() -> bytes:
    """A compressed message of ~64 KiB that inflates to 64 MiB of spaces."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b" " * (1 << 20)
    data = b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush(
        zlib.Z_SYNC_FLUSH
    )
    return frame(0x1, data[:-4], rsv1=True)  # RFC 7692: the trailing 00 00 ff ff is dropped


class Flooder:
    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.outcomes: Counter[str] = Counter()
        self.half_open: list[socket.socket] = []
        self.unparsed: dict[int, bytes] = {}  # by socket: server bytes read with the 101
        self.bomb = bomb()
        self.pings = frame(0x9, b"p" * 64) * 1500
        self.pongs = frame(0xA, b"") * 1500
        self.fragments = frame(0x1, b"", fin=False) + frame(0x0, b"", fin=False) * 1500
        self.attacks: list[Callable[[], str]] = [
            self.resume_then_reset,
            self.subscribe_then_reset,
            self.ping_flood,
            self.pong_flood,
            self.fragment_flood,
            self.deflate_bomb,
            self.bad_token,
            self.half_open_handshake,
            self.history_then_reset,
            self.garbage,
        ]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=3)
        return sock

    def upgraded(self, query: str = "", *headers: bytes) -> socket.socket:
        sock = self.connect()
        sock.sendall(upgrade(f"/?access_token={self.token}{query}", *headers))
        received = b""
        while b"\r\n\r\n" not in received:  # the 101 (its ping and greeting may follow)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(received[:40])
            received += chunk
        if not received.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(received[:40])
        self.unparsed[sock.fileno()] = received.partition(b"\r\n\r\n")[2]  # frames already
        return sock

    @staticmethod
    def reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def close_code(self, sock: socket.socket) -> str:
        """Read the server's frames until its close frame or the end; its code, or how it
        ended."""
        data = self.unparsed.pop(sock.fileno(), b"")
        try:
            while True:
                while len(data) >= 2:  # whole unmasked frames at the start of `data`
                    length, offset = data[1] & 0x7F, 2
                    if length >= 126:
                        offset = 4 if length == 126 else 10
                        if len(data) < offset:
                            break
                        length = int.from_bytes(data[2:offset])
                    if len(data) < offset + length:
                        break
                    if data[0] & 0x0F == 0x8:
                        payload = data[offset : offset + length]
                        return str(int.from_bytes(payload[:2])) if length >= 2 else "1005"
                    data = data[offset + length :]
                chunk = sock.recv(65536)
                if not chunk:
                    return "eof"
                data += chunk
        except TimeoutError:
            return "timeout"
        except ConnectionResetError:
            return "reset"
        finally:
            sock.close()

    def resume_then_reset(self) -> str:
        sock = self.upgraded("&symbols=")
        request = {"type": "resume", "from": {"BTC/USD": 0, "ETH/USD": 0}}
        sock.sendall(frame(0x1, json.dumps(request).encode()))
        self.reset(sock)
        return "reset"

    def subscribe_then_reset(self) -> str:
        sock = self.upgraded("&symbols=")
        sock.sendall(frame(0x1, b'{"type":"subscribe","symbols":["*"]}'))
        self.reset(sock)
        return "reset"

    def history_then_reset(self) -> str:
        sock = self.upgraded()
        sock.sendall(frame(0x1, b'{"type":"history","symbol":"BTC/USD","limit":1000}'))
        self.reset(sock)
        return "reset"

    def flood(self, sock: socket.socket, frames: bytes) -> str:
        """Send `frames` (1,500 of them) three times over: whichever second they fall in, one
        of the daemon's per-second budgets sees more than 1,000."""
        try:
            for _ in range(3):
                sock.sendall(frames)
        except OSError:
            pass  # cut off already: the close frame is read below, or lost with the reset
        return self.close_code(sock)

    def ping_flood(self) -> str:
        sock = self.upgraded()
        return self.flood(sock, self.pings)

    def pong_flood(self) -> str:
        sock = self.upgraded()
        return self.flood(sock, self.pongs)

    def fragment_flood(self) -> str:
        sock = self.upgraded()
        return self.flood(sock, self.fragments)

    def deflate_bomb(self) -> str:
        sock = self.upgraded("", b"Sec-WebSocket-Extensions: permessage-deflate")
        sock.sendall(self.bomb)
        return self.close_code(sock)

    def bad_token(self) -> str:
        sock = self.connect()
        sock.sendall(upgrade("/?access_token=not-a-token"))
        try:
            head = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            head = b""
        sock.close()
        return head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "closed"

    def half_open_handshake(self) -> str:
        sock = self.connect()
        sock.sendall(b"GET /?access_token=" + self.token.encode()[:5])
        self.half_open.append(sock)
        if len(self.half_open) > HALF_OPEN_HELD:
            self.half_open.pop(0).close()
        return "held"

    def garbage(self) -> str:
        sock = self.upgraded()
        sock.sendall(os.urandom(4096))
        return self.close_code(sock)

    def run(self, seconds: float) -> dict[str, object]:
        ends = time.monotonic() + seconds
        for attack in itertools.cycle(self.attacks):
            if time.monotonic() >= ends:
                break
            try:
                outcome = attack()
            except (OSError, ConnectionError) as exc:
                outcome = f"{type(exc).__name__}{exc.args[:1]}"
            self.outcomes[f"{attack.__name__}:{outcome}"] += 1
            time.sleep(PACE)
        for sock in self.half_open:
            sock.close()
        return dict(self.outcomes)


if __name__ == "__main__":
    port, token, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    print(json.dumps(Flooder(port, token).run(seconds)), flush=True)
