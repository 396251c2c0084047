"""TLS without sockets: the server side of one connection as a pure state machine.

A `TlsSession` is an `ssl.SSLObject` between two `ssl.MemoryBIO`s. It never touches a socket:
the dispatcher feeds it the ciphertext a socket returned (`receive`, which answers with the
plaintext it completes), encrypts what the connection writes (`encrypt`), and sends whatever the
session itself produced (handshake records, session tickets, alerts: `outgoing`). So TLS fits the
server's design unchanged: no task per connection, one epoll set, one write path per client.

Record order is the one invariant a caller must keep: every ciphertext byte the session returns
(from `encrypt`, `outgoing` or `close`) must reach the peer, in the order returned. A record can
never be dropped or reordered once produced (its sequence number is in its MAC), which is why a
connection's outbox queues plaintext and encrypts only when the socket can take the result.

`server_context` builds the daemon's `ssl.SSLContext` from `server.tls_cert` / `server.tls_key`:
TLS 1.2 or newer, Python's modern cipher defaults, no client certificates, no renegotiation.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path

from .tomlfile import FileRefused, read_bounded

READ_SIZE = 65536  # plaintext taken from the session per read call
_HTTP_METHOD = re.compile(rb"^[A-Z]{3,7} ")  # how a plain HTTP request to a TLS port begins
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
MAX_PEM_BYTES = 1 << 20  # a chain of a few certificates is ~10 KB
_PEM_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


class TlsConfigError(Exception):
    """The certificate or key cannot be used. `key` is the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key  # "tls_cert" or "tls_key"
        self.message = message


class TlsError(Exception):
    """The peer broke TLS: a bad record, a refused handshake, or not TLS at all.

    `reason` is OpenSSL's short name (UNSUPPORTED_PROTOCOL, WRONG_VERSION_NUMBER, …);
    `plain_http` is True when the peer sent a plain HTTP request instead of a ClientHello.
    Any alert the session produced for the peer is left in `outgoing()`.
    """

    def __init__(self, reason: str, *, during_handshake: bool, plain_http: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.during_handshake = during_handshake
        self.plain_http = plain_http


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context for `cert_file` (PEM chain, leaf first) and `key_file` (PEM, unencrypted).

    Raises TlsConfigError naming the key at fault: an unreadable file, a file without the
    expected PEM block, an encrypted key, or a key that does not match the certificate.
    """
    cert_pem = _read(cert_file, "tls_cert")
    key_pem = _read(key_file, "tls_key")
    if _PEM_CERT not in cert_pem:
        raise TlsConfigError("tls_cert", f"{cert_file}: no PEM certificate in the file")
    if not _PEM_KEY.search(key_pem):
        raise TlsConfigError("tls_key", f"{key_file}: no PEM private key in the file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # Python's modern ciphers, no compression
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE  # clients authenticate with tokens, not certificates
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])  # WebSocket is HTTP/1.1: never let h2 be assumed
    try:
        # The certificates alone first, so a broken one is blamed on tls_cert, not on the key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=cert_pem.decode("ascii", "replace")
        )
    except (ssl.SSLError, ValueError) as exc:
        detail = getattr(exc, "reason", None) or exc
        raise TlsConfigError(
            "tls_cert", f"{cert_file}: not a valid PEM certificate ({detail})"
        ) from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _EncryptedKey:
        raise TlsConfigError(
            "tls_key", f"{key_file}: the key is encrypted; give the daemon an unencrypted key"
        ) from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            message = f"{key_file}: this key does not belong to the certificate in tls_cert"
        else:
            message = f"{key_file}: not a usable private key ({reason})"
        raise TlsConfigError("tls_key", message) from None
    except OSError as exc:  # the file changed between the two reads
        raise TlsConfigError("tls_cert", f"cannot read: {exc.strerror or exc}") from None
    return context


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and block the daemon.
    raise _EncryptedKey


def _read(file: Path, key: str) -> bytes:
    """The PEM file, read without waiting on a FIFO and at most MAX_PEM_BYTES of it."""
    try:
        return read_bounded(Path(file), MAX_PEM_BYTES)[0]
    except FileRefused as exc:
        reason = "cannot read: No such file or directory" if exc.missing else str(exc)
        raise TlsConfigError(key, f"{file}: {reason}") from None


class TlsSession:
    """The server side of one TLS connection, driven by bytes in and bytes out."""

    __slots__ = ("_first", "_incoming", "_outgoing", "_ssl", "established", "peer_closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._first = b""  # the first bytes the peer sent, to recognise plain HTTP
        self.established = False  # the handshake is complete
        self.peer_closed = False  # the peer sent close_notify: nothing more will come

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext from the peer; return the plaintext it completes (often b"").

        Drives the handshake until it completes, then decrypts. Records for the peer that this
        produced wait in `outgoing()`: send them after every call. Raises TlsError.
        """
        if len(self._first) < 8:
            self._first += data[: 8 - len(self._first)]
        self._incoming.write(data)
        ssl_object = self._ssl
        if not self.established:
            try:
                ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            except ssl.SSLError as exc:
                raise TlsError(
                    exc.reason or type(exc).__name__,
                    during_handshake=True,
                    plain_http=exc.reason == "HTTP_REQUEST"
                    or bool(_HTTP_METHOD.match(self._first)),
                ) from None
            self.established = True
        chunks = []
        while True:
            try:
                chunk = ssl_object.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            except ssl.SSLError as exc:
                raise TlsError(exc.reason or type(exc).__name__, during_handshake=False) from None
            if not chunk:  # close_notify
                self.peer_closed = True
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def outgoing(self) -> bytes:
        """Ciphertext the session produced for the peer and nobody has sent yet (often b"")."""
        return self._outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        """The ciphertext for `data`, after anything the session had pending. Raises TlsError."""
        if data:
            try:
                self._ssl.write(data)
            except ssl.SSLError as exc:
                raise TlsError(exc.reason or type(exc).__name__, during_handshake=False) from None
        return self._outgoing.read()

    def encryptor(self) -> tuple[Callable[[bytes], int], Callable[[], bytes]]:
        """`encrypt` as two bound C-level calls, for the broadcast's hot path: `write(data)`
        (raises ssl.SSLError), then `read()` for the ciphertext. Same order rules."""
        return self._ssl.write, self._outgoing.read

    def close(self) -> bytes:
        """The close_notify alert (after anything pending); b"" when the session cannot send it.

        The peer's close_notify is not awaited: the caller closes the socket next.
        """
        if self.established:
            try:
                self._ssl.unwrap()
            except ssl.SSLWantReadError:
                pass  # close_notify sent; the peer's would be read next, and is not needed
            except ssl.SSLError:
                pass
        return self._outgoing.read()

    @property
    def version(self) -> str | None:
        """The negotiated protocol ("TLSv1.3"), once established."""
        return self._ssl.version()
