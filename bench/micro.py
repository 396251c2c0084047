"""Micro-benchmarks behind constants and choices in the daemon's code (not part of `make bench`).

    .venv/bin/python bench/micro.py

- the WebSocket upgrade's request head, parsed by httptools (llhttp, what `upgrade.py` uses)
  and by h11 (a pure-Python parser), per request;
- the server side of a TLS handshake (`tls.TlsSession`, the daemon's), CPU per handshake, for an
  ECDSA P-256 and an RSA 2048 certificate;
- a tokens file at `tomlfile.MAX_TOKENS_FILE_BYTES` (1 MiB): how many entries it holds and how
  long `settings.read_tokens_file` takes to read it.

Each figure is the median of several repetitions, on one core of the machine it runs on; it
prints them and writes nothing. bench/README.md ("Figures behind the daemon's constants") says
which constant each one justifies.
"""

from __future__ import annotations

import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REQUEST = (
    b"GET /?symbols=BTC%2FUSD,ETH%2FUSD HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8765\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Origin: http://127.0.0.1:8766\r\n"
    b"Authorization: Bearer 0123456789abcdef0123456789abcdef0123456789a\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0\r\n\r\n"
)


def per_call(fn: Callable[[], object], calls: int, repeats: int = 7) -> float:
    """Median over `repeats` of the mean process CPU seconds per call of `fn`."""
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            fn()
        samples.append((time.process_time() - started) / calls)
    return statistics.median(samples)


def upgrade_heads() -> tuple[float, float]:
    import h11

    from agentspoonsd.upgrade import UpgradeParser

    def with_llhttp() -> object:
        return UpgradeParser().feed(REQUEST)

    def with_h11() -> object:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(REQUEST)
        return conn.next_event()

    return per_call(with_llhttp, 20_000), per_call(with_h11, 20_000)


def tls_handshake(key_type: str) -> float:
    import trustme

    from agentspoonsd.tls import TlsSession, server_context

    ca = trustme.CA(key_type=getattr(trustme.KeyType, key_type))
    leaf = ca.issue_cert("localhost", key_type=getattr(trustme.KeyType, key_type))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with tempfile.TemporaryDirectory() as directory:
        cert, key = Path(directory, "tls.crt"), Path(directory, "tls.key")
        leaf.cert_chain_pems[0].write_to_path(cert)
        leaf.private_key_pem.write_to_path(key)
        context = server_context(cert, key)

    server_cpu: list[float] = []

    def handshake() -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        session = TlsSession(context)
        spent = 0.0
        for _ in range(10):
            try:
                client.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if data := outgoing.read():
                started = time.process_time()
                session.receive(data)
                reply = session.outgoing()
                spent += time.process_time() - started
                incoming.write(reply)
            if done and session.established:
                break
        assert session.established
        server_cpu.append(spent)

    for _ in range(200):
        handshake()
    return statistics.median(server_cpu)


def tokens_file() -> tuple[int, float]:
    from agentspoonsd.auth import hash_token
    from agentspoonsd.settings import read_tokens_file
    from agentspoonsd.tomlfile import MAX_TOKENS_FILE_BYTES

    entry = (
        '[[tokens]]\nname = "desk-{i:05d}"\nsha256 = "{digest}"\n'
        'symbols = ["BTC/USD", "ETH/USD"]\nexpires = 2030-01-01T00:00:00Z\n\n'
    )
    text, count = "", 0
    while True:
        more = entry.format(i=count, digest=hash_token(f"token {count}"))
        if len((text + more).encode()) > MAX_TOKENS_FILE_BYTES:
            break
        text, count = text + more, count + 1
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "tokens.toml")
        path.write_text(text)
        path.chmod(0o600)
        samples = []
        for _ in range(5):
            started = time.process_time()
            read_tokens_file(path)
            samples.append(time.process_time() - started)
    return count, statistics.median(samples)


def main() -> None:
    llhttp, h11 = upgrade_heads()
    print(f"upgrade request head ({len(REQUEST)} B): httptools {llhttp * 1e6:.1f} µs, ", end="")
    print(f"h11 {h11 * 1e6:.1f} µs")
    for key_type in ("ECDSA", "RSA"):
        print(f"TLS handshake, server CPU ({key_type}): {tls_handshake(key_type) * 1e3:.2f} ms")
    count, seconds = tokens_file()
    print(f"tokens file of 1 MiB: {count} entries, read in {seconds:.2f} s")


if __name__ == "__main__":
    main()
