"""wss://: the sans-IO TLS session, the server over TLS in-process, and the daemon's TLS config.

Certificates come from `trustme` (a throwaway CA per test). The TLS state machine is tested
against a real client `ssl.SSLObject` in memory, with no socket at all.
"""

from __future__ import annotations

import json
import signal
import ssl
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionRejected, open_websocket_url

from agentspoonsd.auth import new_token
from agentspoonsd.settings import ConfigError, load_settings
from agentspoonsd.tls import TlsConfigError, TlsError, TlsSession, server_context
from daemon_process import DaemonProcess, config_text
from helpers import TOKEN, Pki, Running, make_pki, next_update, serving, write_pki

# --- certificates ---------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


# --- the sans-IO session against an in-memory client ----------------------------------------------


class MemoryClient:
    """A TLS client on memory BIOs: what a browser's TLS stack does, minus the socket."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def hello(self) -> bytes:
        """The ClientHello: the first flight."""
        with pytest.raises(ssl.SSLWantReadError):
            self.ssl.do_handshake()
        return self.outgoing.read()

    def handshake(self, server: TlsSession) -> None:
        """Run the handshake to completion, shuttling bytes both ways."""
        for _ in range(10):
            try:
                self.ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            to_server = self.outgoing.read()
            if to_server:
                assert server.receive(to_server) == b""
            self.incoming.write(server.outgoing())
            if done and server.established:
                return
        raise AssertionError("the handshake did not complete")

    def send(self, data: bytes) -> bytes:
        self.ssl.write(data)
        return self.outgoing.read()

    def receive(self, ciphertext: bytes) -> bytes:
        """The plaintext in `ciphertext`; b"" when it ends with close_notify."""
        self.incoming.write(ciphertext)
        out = b""
        while True:
            try:
                chunk = self.ssl.read(65536)
            except ssl.SSLWantReadError:
                return out
            if not chunk:
                return out
            out += chunk


def established(pki: Pki, client_context: ssl.SSLContext | None = None):
    server = TlsSession(server_context(pki.cert_file, pki.key_file))
    client = MemoryClient(client_context or pki.client_context())
    client.handshake(server)
    return server, client


def test_handshake_then_data_both_ways(pki: Pki) -> None:
    server, client = established(pki)
    assert server.version in ("TLSv1.2", "TLSv1.3")
    assert client.ssl.getpeercert(binary_form=True) == pki.der
    assert server.receive(client.send(b"GET / HTTP/1.1\r\n")) == b"GET / HTTP/1.1\r\n"
    assert client.receive(server.encrypt(b"HTTP/1.1 101 Switching Protocols\r\n")) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
    )
    # Several records in one read, and a record split across reads.
    ciphertext = client.send(b"one") + client.send(b"two") + client.send(b"x" * 40_000)
    received = b"".join(
        server.receive(ciphertext[i : i + 997]) for i in range(0, len(ciphertext), 997)
    )
    assert received == b"onetwo" + b"x" * 40_000
    assert server.encrypt(b"") == b""  # nothing to say: no record
    big = bytes(range(256)) * 1000
    assert client.receive(server.encrypt(big)) == big


def test_tls_1_2_is_accepted(pki: Pki) -> None:
    context = pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = established(pki, context)
    assert server.version == "TLSv1.2"
    assert server.receive(client.send(b"ping")) == b"ping"


def tls_1_1_client(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # or OpenSSL 3 would not even offer TLS 1.1
    pki.ca.configure_trust(context)
    return context


def test_tls_1_1_is_refused_with_an_alert(pki: Pki) -> None:
    server = TlsSession(server_context(pki.cert_file, pki.key_file))
    client = MemoryClient(tls_1_1_client(pki))
    with pytest.raises(TlsError) as refused:
        server.receive(client.hello())
    assert refused.value.during_handshake and not refused.value.plain_http
    assert refused.value.reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION")
    alert = server.outgoing()
    assert alert[:1] == b"\x15"  # an alert record: protocol_version
    with pytest.raises(ssl.SSLError):
        client.receive(alert)


def test_garbage_and_plain_http_are_errors(pki: Pki) -> None:
    context = server_context(pki.cert_file, pki.key_file)
    with pytest.raises(TlsError) as garbage:
        TlsSession(context).receive(b"\x00\x01\x02 not TLS at all " * 4)
    assert garbage.value.during_handshake and not garbage.value.plain_http
    with pytest.raises(TlsError) as http:
        TlsSession(context).receive(b"GET /?access_token=x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert http.value.plain_http
    # After the handshake: a corrupted record is an error too, not a crash or silent data.
    server, client = established(pki)
    record = bytearray(client.send(b"hello"))
    record[-1] ^= 0xFF
    with pytest.raises(TlsError) as corrupted:
        server.receive(bytes(record))
    assert not corrupted.value.during_handshake


def test_close_notify_both_ways(pki: Pki) -> None:
    server, client = established(pki)
    # The peer's close_notify: the session reports the end of stream.
    last = client.send(b"last")
    with pytest.raises(ssl.SSLWantReadError):
        client.ssl.unwrap()
    assert server.receive(last + client.outgoing.read()) == b"last"  # data, then close_notify
    assert server.peer_closed
    # Ours: the client reads a clean end (b"" without an error).
    server, client = established(pki)
    assert not server.peer_closed
    notify = server.close()
    assert notify  # one alert record (encrypted, under TLS 1.3)
    assert client.receive(notify) == b""  # a clean end: no error, no data
    assert server.close() == b""  # said once
    assert TlsSession(server_context(pki.cert_file, pki.key_file)).close() == b""  # never started


def test_handshake_progresses_byte_by_byte(pki: Pki) -> None:
    server = TlsSession(server_context(pki.cert_file, pki.key_file))
    client = MemoryClient(pki.client_context())
    hello = client.hello()
    for i in range(len(hello) - 1):
        assert server.receive(hello[i : i + 1]) == b""
        assert server.outgoing() == b""  # nothing to answer until the hello is whole
    server.receive(hello[-1:])
    assert server.outgoing()[:1] == b"\x16"  # ServerHello: a handshake record


# --- the certificate and key files ----------------------------------------------------------------


def test_server_context_names_the_file_at_fault(pki: Pki, tmp_path: Path) -> None:
    context = server_context(pki.cert_file, pki.key_file)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    other = make_pki(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    cases = [
        (tmp_path / "missing.crt", pki.key_file, "tls_cert", "cannot read"),
        (pki.cert_file, tmp_path / "missing.key", "tls_key", "cannot read"),
        (tmp_path, pki.key_file, "tls_cert", "not a regular file"),
        (pki.key_file, pki.key_file, "tls_cert", "no PEM certificate"),
        (pki.cert_file, pki.cert_file, "tls_key", "no PEM private key"),
        (garbage, pki.key_file, "tls_cert", "not a valid PEM certificate"),
        (pki.cert_file, other.key_file, "tls_key", "does not belong"),
    ]
    for cert, key, at_fault, words in cases:
        with pytest.raises(TlsConfigError) as error:
            server_context(cert, key)
        assert error.value.key == at_fault, (cert, key)
        assert words in error.value.message


def test_an_encrypted_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.leaf.private_key_pem.bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsConfigError) as error:
        server_context(pki.cert_file, encrypted)
    assert error.value.key == "tls_key" and "encrypted" in error.value.message


def write_config(path: Path, server_lines: str) -> Path:
    path.write_text("[server]\n" + server_lines)
    return path


def test_settings_need_both_keys(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "agentspoonsd.toml"
    write_config(config, f'tls_cert = "{pki.cert_file}"\n')
    with pytest.raises(ConfigError) as only_cert:
        load_settings(config)
    assert f"{config}: server.tls_key:" in str(only_cert.value)
    write_config(config, f'tls_key = "{pki.key_file}"\n')
    with pytest.raises(ConfigError) as only_key:
        load_settings(config)
    assert "server.tls_cert is not set" in str(only_key.value)


def test_settings_check_the_files_and_resolve_them_next_to_the_config(
    tmp_path: Path, pki: Pki
) -> None:
    config = tmp_path / "agentspoonsd.toml"
    write_config(config, 'tls_cert = "pki/tls.crt"\ntls_key = "pki/missing.key"\n')
    with pytest.raises(ConfigError) as missing:
        load_settings(config)
    assert str(missing.value).startswith(f"{config}: server.tls_key: ")
    assert "missing.key: cannot read" in str(missing.value)
    write_config(config, 'tls_cert = "pki/tls.key"\ntls_key = "pki/tls.key"\n')
    with pytest.raises(ConfigError) as not_a_cert:
        load_settings(config)
    assert f"{config}: server.tls_cert: " in str(not_a_cert.value)
    write_config(config, 'tls_cert = "pki/tls.crt"\ntls_key = "pki/tls.key"\n')
    settings = load_settings(config)  # relative to the config file, wherever the cwd is
    assert settings.server.tls_cert == pki.cert_file and settings.server.tls_key == pki.key_file


# --- the server over TLS, in-process --------------------------------------------------------------


@pytest.fixture
async def running(request: pytest.FixtureRequest, pki: Pki) -> AsyncIterator[Running]:
    async with serving(pki, **getattr(request, "param", {})) as server:
        yield server


async def open_tls_stream(port: int, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
    await tls.do_handshake()
    return tls


async def test_tls_1_1_client_is_refused(running: Running) -> None:
    with pytest.raises(trio.BrokenResourceError) as refused:
        await open_tls_stream(running.port, tls_1_1_client(running.pki))
    assert isinstance(refused.value.__cause__, ssl.SSLError)
    assert running.stats.rejected_upgrades["tls_handshake"] == 1
    # TLS 1.2 is fine.
    context = running.pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with running.connect(context) as ws:
        assert json.loads(await ws.get_message())["type"] == "connected"


async def test_plain_ws_to_the_tls_port_fails_cleanly_and_alone(running: Running) -> None:
    async with running.connect() as good:
        await good.get_message()
        plain_url = f"ws://127.0.0.1:{running.port}/?access_token={TOKEN}"
        with pytest.raises(ConnectionRejected) as rejected, trio.fail_after(3):
            async with open_websocket_url(plain_url):
                pass
        assert rejected.value.status_code == 400
        assert json.loads(rejected.value.body)["error"] == "tls_required"
        # Not HTTP, not TLS: the connection is closed, nothing else.
        stream = await trio.open_tcp_stream("127.0.0.1", running.port)
        await stream.send_all(b"\x00\x01\x02\x03 garbage " * 10)
        with trio.fail_after(3):
            while await stream.receive_some():
                pass
        await stream.aclose()
        running.publish()
        assert (await next_update(good))["data"]["seq"] == 1
    assert running.stats.rejected_upgrades["tls_handshake"] == 2


@pytest.mark.parametrize("running", [{"handshake_timeout": 0.2}], indirect=True)
async def test_handshake_timeout_covers_a_stalled_tls_handshake(running: Running) -> None:
    hello = MemoryClient(running.pki.client_context()).hello()
    stalled = await trio.open_tcp_stream("127.0.0.1", running.port)
    await stalled.send_all(hello[: len(hello) // 2])  # half a ClientHello, then nothing
    # And one that completes TLS but never sends its upgrade request.
    silent = await open_tls_stream(running.port, running.pki.client_context())
    with trio.fail_after(3):
        assert await stalled.receive_some() == b""  # closed by the server after 0.2 s
        while await silent.receive_some():  # session tickets, then close_notify: a clean EOF
            pass
    await stalled.aclose()
    await silent.aclose()
    assert running.stats.rejected_upgrades["handshake_timeout"] == 2
    assert running.server.client_count == 0


# Twins of test_ws.py's tests run over TLS there too (its `BOTH`).


async def test_a_new_context_serves_new_connections_only(running: Running, tmp_path: Path) -> None:
    old = running.pki
    new = make_pki(tmp_path / "renewed")
    both = old.client_context()
    new.ca.configure_trust(both)
    async with running.connect() as established:
        await established.get_message()
        running.server.tls = server_context(new.cert_file, new.key_file)  # what SIGHUP does
        stream = await open_tls_stream(running.port, both)
        assert stream.getpeercert(binary_form=True) == new.der
        await stream.aclose()
        running.publish()
        assert (await next_update(established))["data"]["seq"] == 1


# --- the daemon: config errors and SIGHUP ---------------------------------------------------------


def tls_config(cert: Path | None, key: Path | None, token: str) -> str:
    lines = "".join(
        f'{name} = "{path}"\n' for name, path in (("tls_cert", cert), ("tls_key", key)) if path
    )
    return config_text(tokens={"t": token}).replace("[server]\n", "[server]\n" + lines, 1)


# daemon_factory: conftest.py


@pytest.mark.parametrize("which", ["only_cert", "missing_key_file"])
async def test_daemon_refuses_to_start_on_a_bad_tls_config(
    daemon_factory: Callable[..., DaemonProcess], pki: Pki, tmp_path: Path, which: str
) -> None:
    token = new_token()
    if which == "only_cert":
        text, key = tls_config(pki.cert_file, None, token), "server.tls_key"
    else:
        text, key = tls_config(pki.cert_file, tmp_path / "nope.key", token), "server.tls_key"
    daemon = daemon_factory(text)
    assert await daemon.wait_exit() == 78
    assert f"{key}:" in daemon.log_text


async def test_sighup_reloads_the_certificate(
    daemon_factory: Callable[..., DaemonProcess], pki: Pki, tmp_path: Path
) -> None:
    token = new_token()
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(tls_config(pki.cert_file, pki.key_file, token))
    daemon = daemon_factory(config)
    bound = await daemon.wait_for("listener_bound", service="websocket")
    assert bound["scheme"] == "wss"
    port, _ = await daemon.ports()
    url = f"wss://127.0.0.1:{port}/?access_token={token}"
    renewed = pki.ca.issue_cert("127.0.0.1", "localhost")  # same CA, a new certificate
    renewed_der = ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())
    async with open_websocket_url(url, pki.client_context()) as established:
        assert json.loads(await established.get_message())["type"] == "connected"
        stream = await open_tls_stream(port, pki.client_context())
        assert stream.getpeercert(binary_form=True) == pki.der
        await stream.aclose()

        write_pki(renewed, pki.cert_file, pki.key_file)  # renewed in place, as certbot does
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("tls_reloaded")
        stream = await open_tls_stream(port, pki.client_context())
        assert stream.getpeercert(binary_form=True) == renewed_der
        await stream.aclose()

        # A broken certificate on reload: rejected and logged, the current one stays.
        pki.cert_file.write_text("not a certificate\n")
        daemon.signal(signal.SIGHUP)
        rejected = await daemon.wait_for("config_reload_rejected")
        assert "server.tls_cert" in rejected["error"]
        stream = await open_tls_stream(port, pki.client_context())
        assert stream.getpeercert(binary_form=True) == renewed_der
        await stream.aclose()

        # The connection from before both reloads is still served.
        update = await next_update(established)
        assert update["type"] == "volatility_update"
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


def test_reload_swaps_the_context_and_reports_switching_tls(pki: Pki, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from agentspoonsd.daemon import Daemon
    from agentspoonsd.logs import LevelGate

    lines = f'tls_cert = "{pki.cert_file}"\ntls_key = "{pki.key_file}"\n'
    config = write_config(tmp_path / "agentspoonsd.toml", lines)
    daemon = Daemon(load_settings(config), config, LevelGate("info"))
    first = server_context(pki.cert_file, pki.key_file)
    websocket = SimpleNamespace(tls=first)
    swapped, needs_restart = daemon.reloader.reloaded_tls(websocket, load_settings(config))  # type: ignore[arg-type]
    assert needs_restart == [] and swapped is not first  # re-read, even at the same paths
    websocket.tls = swapped
    plain = load_settings(write_config(tmp_path / "plain.toml", "port = 0\n"))
    kept, needs_restart = daemon.reloader.reloaded_tls(websocket, plain)  # type: ignore[arg-type]
    assert needs_restart == ["server.tls_cert", "server.tls_key"] and kept is swapped
