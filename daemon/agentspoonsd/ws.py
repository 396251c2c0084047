"""The WebSocket server: accept, authenticate the upgrade, serve each client.

The protocol is wsproto (sans-IO); this module is the thin Trio layer that owns the sockets. One
dispatcher task reads every client (see `WebSocketServer`), and each client has one `Outbox`, its
only write path: broadcast frames from the hub, replies, pongs and close frames all go through it.

A refused upgrade is an HTTP answer (401, 503, 400), never an accepted socket that closes later.

wss://: with a TLS context, each client also has a `tls.TlsSession` (an SSLObject on memory
BIOs) that the dispatcher drives like the rest: received bytes are decrypted before the upgrade
parser and wsproto see them, and the client's outbox (`TlsOutbox`) encrypts whatever it sends.
The handshake deadline covers the TLS handshake, which comes first.

One origin: the HTTP port hands its `GET /ws` connections over (`WebSocketServer.adopt_upgrade`),
and from there they are served exactly as connections accepted here: the same admission, limits,
authentication and fan-out. They are always plain (ws://): TLS for them ends at a reverse proxy.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import trio
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from . import protocol
from .auth import AuthFailure, Grant, TokenStore, presented_token
from .deflate import BoundedDeflate
from .httppolicy import client_key
from .hub import Hub, release_frame_parser
from .logthrottle import LogThrottle
from .metrics import Stats
from .outbox import Outbox, TlsOutbox
from .protocol import ErrorCode, RequestError
from .proxies import TrustedProxies
from .tls import TlsError, TlsSession
from .upgrade import (
    HandshakeError,
    Headers,
    UpgradeParser,
    UpgradeRequest,
    accept_response,
    negotiate_deflate,
    reject_response,
)

RECV_SIZE = 65536
# Handshakes run inline at accept, in rounds of about this long, each ended by a checkpoint: a
# publication waits at most one round behind a reconnect storm. Measured (bench B: 10,000
# clients connecting during a 10/s broadcast), time to connect them all: rounds of 64 handshakes
# 2.2 s, of 20 ms 2.1 s, of 40 ms 1.7-1.9 s with the fan-out's p99 still ~50 ms, of 1,024
# handshakes (~80 ms) 1.6 s but with ticks late enough to be skipped. Short rounds lose because
# whatever else is ready (the new clients' pongs, above all) gets a turn between rounds.
ACCEPT_ROUND_SECONDS = 0.04
DISPATCH_BATCH = 128  # ready sockets handled per dispatcher round
# TLS handshake steps (key exchange, signature: ~1 ms of CPU each) per dispatcher or accept
# round: a wss:// reconnect storm must not hold the event loop away from the fan-out for long.
TLS_HANDSHAKES_PER_ROUND = 16

CLOSE_GRACE = 2.0  # seconds a peer gets to answer a close the server started
REAP_INTERVAL = 0.25  # how often handshake and close deadlines are enforced

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class Limits:
    """The reloadable limits of the WebSocket server (from [server])."""

    max_connections: int
    max_backlog_bytes: int
    max_message_size: int
    handshake_timeout: float
    ping_interval: float = 20.0
    idle_timeout: float = 60.0
    max_client_messages_per_second: int = 20
    max_client_errors: int = 10  # within ERROR_WINDOW seconds, then close 1008
    permessage_deflate: bool = True  # accept RFC 7692 compression when a client offers it
    allowed_origins: frozenset[str] | None = None  # None: any Origin (and requests without one)
    send_buffer_bytes: int | None = None  # SO_SNDBUF of each client socket; None: the kernel's
    max_connections_per_ip: int | None = None  # established and handshaking alike
    # Connections from one address (IPv6: one /64) that have not completed their upgrade yet.
    max_handshakes_per_ip: int | None = 1024
    max_auth_failures_per_minute: int = 20  # per IP; past it upgrades get 429 for a while
    proxies: TrustedProxies = field(default_factory=TrustedProxies)  # who forwards for clients
    # Everything a peer sends, counted per whole second: frames (pings, pongs, fragments and
    # empty ones alike) and bytes as received. Past either, the peer is closed 1008.
    max_client_frames_per_second: int = 1000
    max_client_bytes_per_second: int = 4 << 20


# A server ping frame: unmasked, no payload, the same bytes for every client.
PING_FRAME = b"\x89\x00"
ERROR_WINDOW = 10.0  # seconds over which a client's errors are counted
# Addresses (IPv6: /64 networks) whose failed authentications are remembered for a minute. Past
# it, a failing attempt from an address not yet tracked gets 429 at once: a guesser spread over
# many addresses costs bounded memory, and a valid token is let in all the same.
MAX_TRACKED_FAILING_ADDRESSES = 65536
# Events a stranger can cause at will (refusals, failed handshakes, floods) are logged at most
# this many times per address and window; the rest are summed up in one `log_suppressed`.
PEER_LOG_LIMIT = 5
PEER_LOG_INTERVAL = 10.0


class _Budget:
    """A client's message rate and recent errors; made on its first message (most never send)."""

    __slots__ = ("errors", "second", "sent")

    def __init__(self) -> None:
        self.second = -1  # the whole second `sent` counts
        self.sent = 0
        self.errors: deque[float] = deque()


class Client:
    """One WebSocket peer: its socket, its wsproto state and its single write path."""

    __slots__ = (
        "_deadlines",
        "_finish",
        "_log",
        "_stats",
        "assembler",
        "budget",
        "bytes_after_close",
        "conn",
        "connected_at",
        "deflate",
        "drop_reason",
        "fd",
        "finished",
        "grant",
        "handshake",
        "handshaking",
        "inbound_bytes",
        "inbound_frames",
        "inbound_second",
        "inflater",
        "ip",
        "last_seen",
        "outbox",
        "peer",
        "ping_outstanding",
        "reading",
        "send_frame",
        "send_reply",
        "sock",
        "tls",
    )

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        outbox_cap: int,
        spawn: Any,
        stats: Stats,
        log: Any,
        deadlines: dict[Client, float],
        finish: Callable[[Client, str], None],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept: a closed socket's fileno() is -1
        self.ip = peer.rpartition(":")[0].strip("[]")
        self._finish = finish  # the server's: forget this client and close its socket
        self._deadlines = deadlines  # the server's: when to abort a client that has not finished
        self.peer = peer
        self._stats = stats
        self._log = log
        # The request parser is dropped once the upgrade is answered: nothing after needs it.
        self.handshake: UpgradeParser | None = UpgradeParser()
        # The key it counts under in the server's handshakes per address, until it is upgraded.
        self.handshaking: str | None = None
        self.conn: Connection | None = None
        self.finished = False  # the socket is closed and the server has forgotten this client
        self.reading = True  # registered in the server's epoll set
        self.connected_at: float | None = None  # trio time of the upgrade
        self.assembler: _MessageAssembler | None = None
        self.budget: _Budget | None = None
        self.deflate = False  # negotiated permessage-deflate: the hub sends compressed frames
        self.inflater: BoundedDeflate | None = None  # its inbound side, when negotiated
        self.bytes_after_close = 0  # received since the server sent its close frame
        self.last_seen = 0.0  # trio time the peer last sent anything
        # What the peer sent in the whole second `inbound_second` (see Limits: the flood budget).
        self.inbound_second = -1
        self.inbound_frames = 0
        self.inbound_bytes = 0
        # A ping of ours is unanswered: only the pong to it says the peer read up to there.
        self.ping_outstanding = False
        self.drop_reason: str | None = None
        self.grant: Grant | None = None
        # wss://: the connection's TLS state machine; its outbox encrypts at send time.
        self.tls: TlsSession | None = None
        if tls is None:
            self.outbox = Outbox(
                sock,
                max_bytes=outbox_cap,
                spawn=spawn,
                on_overflow=self._on_overflow,
                on_failure=self._on_failure,
            )
        else:
            self.tls = TlsSession(tls)
            self.outbox = TlsOutbox(
                sock,
                self.tls,
                max_bytes=outbox_cap,
                spawn=spawn,
                on_overflow=self._on_overflow,
                on_failure=self._on_failure,
            )
        # The hub's entry point: a pre-encoded frame goes straight into the single write path.
        self.send_frame = self.outbox.write
        self.send_reply = self.outbox.write_reply  # a replay: exempt from the cap up to its size

    def accept(
        self,
        request: UpgradeRequest,
        greeting: dict[str, Any],
        deflate: tuple[BoundedDeflate, bytes] | None = None,
    ) -> None:
        """Answer the upgrade with 101, a ping and `greeting` in one write: one syscall.

        The ping comes first, not after `ping_interval`: its pong (see `Hub.confirm_reading`)
        tells the clients that read from those that never do, within a round trip. Before the
        greeting, so a client has answered it before it sees any message: a client library
        that fails to answer a ping once it has started closing (trio-websocket 0.12) cannot
        meet one after reading the greeting and closing.

        `deflate`: the extension `negotiate_deflate` agreed, and its response header value.
        """
        self.handshake = None
        if deflate is None:
            self.conn = Connection(ConnectionType.SERVER)
            response = accept_response(request)
        else:
            extension, header = deflate
            self.deflate = True
            self.inflater = extension
            self.conn = Connection(ConnectionType.SERVER, extensions=[extension])
            response = accept_response(request, header)
        greeting_frame = self.conn.send(TextMessage(orjson.dumps(greeting).decode()))
        self.ping_outstanding = True
        self.outbox.write(response + PING_FRAME + greeting_frame)

    def refuse(self, status: int, body: bytes, headers: Headers = ()) -> None:
        """Answer the upgrade with an HTTP error; the connection closes once it is delivered."""
        self.handshake = None
        self.outbox.seal(reject_response(status, body, b"application/json", headers))

    def send_message(self, message: dict[str, Any]) -> None:
        if self.conn is not None and self.conn.state is ConnectionState.OPEN:
            self.outbox.write(self.conn.send(TextMessage(orjson.dumps(message).decode())))

    def send_event(self, event: Any) -> None:
        """Send a wsproto event (pong, close reply) if the connection's state still allows it."""
        if self.conn is None:
            return
        try:
            data = self.conn.send(event)
        except LocalProtocolError:
            return  # the connection is already past the state where this event makes sense
        self.outbox.write(data)

    def close(self, code: int, reason: str = "", *, discard_unsent: bool = False) -> None:
        """Start the closing handshake: the close frame is the last thing written.

        From then on only the peer's close frame matters: nothing it sends is inflated."""
        if self.conn is not None and self.conn.state is ConnectionState.OPEN:
            self.outbox.seal(
                self.conn.send(CloseConnection(code, reason)), discard_unsent=discard_unsent
            )
            if self.inflater is not None:
                self.inflater.stop_inflating()

    def linger_close(
        self, code: int, reason: str, drop_reason: str, *, discard_unsent: bool = False
    ) -> None:
        """Close on the server's initiative, giving the peer a bounded grace to answer."""
        self.drop_reason = self.drop_reason or drop_reason
        self.close(code, reason, discard_unsent=discard_unsent)
        grace_ends = trio.current_time() + CLOSE_GRACE
        self._deadlines[self] = min(self._deadlines.get(self, grace_ends), grace_ends)

    def abort(self, reason: str) -> None:
        """Stop serving this client now and close its socket. Synchronous and idempotent."""
        self._finish(self, reason)

    def _on_overflow(self) -> None:
        self._stats.backlog_overflows += 1
        self._log.warning(
            "client_backlog_overflow",
            **_peer_fields(self),
            token=self.grant.name if self.grant else None,
            queued_bytes=self.outbox.queued_bytes,
        )
        self.linger_close(
            CLOSE_TRY_AGAIN_LATER, "backlog over limit", "backlog_overflow", discard_unsent=True
        )

    def _on_failure(self) -> None:
        self.abort("socket_error")


class WebSocketServer:
    """Serves WebSocket clients on a listening socket the daemon bound.

    Connections are served without a task each: every client socket is registered once in one
    level-triggered epoll set, and a single dispatcher task waits for that set to become readable
    and runs each ready client's sans-IO state machine synchronously (handshake parser, then
    wsproto). A task per connection would cost about 3 KB of frames and an epoll_ctl pair per
    read; here a connection is its objects and its socket. The only tasks besides the dispatcher
    are an outbox's drain task, which exists while that client lags, and one per closing client
    waiting for its last bytes to leave.

    `auth`, `limits` and `tls` (the SSLContext of wss://, None for ws://) are replaced wholesale
    on reload; each new connection reads the current ones and established connections are left
    alone (a TLS connection keeps the certificate it was served).
    """

    def __init__(
        self,
        listener: socket.socket,
        hub: Hub,
        auth: TokenStore,
        limits: Limits,
        stats: Stats,
        log: Any,
        *,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._listener = listener
        self.tls = tls
        self._tls_handshakes = 0  # TLS handshake steps in the current dispatch or accept round
        self._hub = hub
        self.auth = auth
        self.limits = limits
        self._stats = stats
        self._log = log
        self._wall_clock = wall_clock
        self._clients: dict[int, Client] = {}  # by file descriptor
        self._deadlines: dict[Client, float] = {}  # handshakes and lingering closes
        self._poller: select.epoll | None = None
        self._nursery: trio.Nursery | None = None
        self._established = 0  # clients past the upgrade
        self._per_ip: dict[str, int] = {}  # established clients by address
        self._handshaking: dict[str, int] = {}  # not yet upgraded, by client_key of the peer
        self._accept_errors = 0  # accept() failures not logged yet (logged once a second)
        self._accept_error_logged = -1.0
        self._per_token: dict[str, int] = {}  # established clients by token name
        self._auth_failures: dict[str, deque[float]] = {}  # by client_key, the last minute's
        self._peer_log = LogThrottle(PEER_LOG_LIMIT, PEER_LOG_INTERVAL)
        self._accepting: trio.CancelScope | None = None
        self._idle = trio.Event()
        self._idle.set()
        self.listening = False

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve clients until cancelled or drained.

        Cancelling `run` aborts every connection at once (each socket is closed before `run`
        returns); use `drain` first for a clean close. The listener is left open for the caller.
        """
        self._poller = select.epoll()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reap_loop)
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(self._dispatch_loop, self._poller)
                with trio.CancelScope() as self._accepting:
                    self.listening = True
                    task_status.started()
                    try:
                        await self._accept_loop()
                    finally:
                        self.listening = False
                # Drained: stop accepting but keep serving the clients still closing.
                await trio.sleep_forever()
        finally:
            self._summarise_suppressed_logs(0.0, everything=True)
            for client in list(self._clients.values()):
                self._finish(client, "aborted")
            self._nursery = None
            self._poller.close()
            self._poller = None

    async def _reap_loop(self) -> None:
        """Abort clients whose deadline passed: unfinished handshakes, unanswered closes.

        One task for all connections instead of a cancel scope with a deadline per connection,
        which costs as much as the rest of a handshake's bookkeeping. Precision: REAP_INTERVAL.
        """
        while True:
            await trio.sleep(REAP_INTERVAL)
            now = trio.current_time()
            self._forget_old_auth_failures(now)
            self._summarise_suppressed_logs(now)
            for client in [c for c, deadline in self._deadlines.items() if deadline <= now]:
                del self._deadlines[client]
                # A lingering close already carries its reason; otherwise this was the handshake.
                self._finish(client, client.drop_reason or "handshake_timeout")

    def _log_peer(self, level: str, event: str, client: Client, **fields: Any) -> None:
        """Log `event` about `client`, within its address's share (PEER_LOG_LIMIT per
        PEER_LOG_INTERVAL): one peer repeating a refused request cannot flood the log."""
        key = client_key(client.ip)
        verdict = self._peer_log.admit(key, trio.current_time())
        if verdict.suppressed:
            self._log_suppressed(key, verdict.suppressed)
        if verdict.emit:
            getattr(self._log, level)(event, **_peer_fields(client), **fields)

    def _log_suppressed(self, key: str, count: int) -> None:
        self._log.warning(
            "log_suppressed", client=key, count=count, interval_s=self._peer_log.interval
        )

    def _summarise_suppressed_logs(self, now: float, *, everything: bool = False) -> None:
        for key, count in self._peer_log.flush(now, everything=everything):
            self._log_suppressed(key, count)

    async def _heartbeat_loop(self) -> None:
        """Every `ping_interval`: ping each client, and close those silent past `idle_timeout`.

        The ping is one pre-built frame; any bytes from the peer (a pong included) count as
        life. Closing is the polite 1001 with a grace, as for shutdown.
        """
        while True:
            await trio.sleep(self.limits.ping_interval)
            now = trio.current_time()
            idle_timeout = self.limits.idle_timeout
            for client in list(self._clients.values()):
                if client.connected_at is None or client.outbox.sealed:
                    continue
                if now - client.last_seen > idle_timeout:
                    client.linger_close(CLOSE_GOING_AWAY, "idle timeout", "idle_timeout")
                else:
                    client.ping_outstanding = True
                    client.send_frame(PING_FRAME)

    async def _dispatch_loop(self, poller: select.epoll) -> None:
        """Run the state machine of every client whose socket is readable, forever.

        Each round handles at most DISPATCH_BATCH ready sockets (fewer once it has run
        TLS_HANDSHAKES_PER_ROUND TLS handshake steps) and then waits on Trio's own epoll again,
        which is a checkpoint: the hub and the accept loop get their turn between
        rounds. Sockets stay ready (level-triggered) until read, so nothing is missed.
        """
        while True:
            await trio.lowlevel.wait_readable(poller)
            self._tls_handshakes = 0
            for fd, _ in poller.poll(0, DISPATCH_BATCH):
                client = self._clients.get(fd)
                if client is not None:
                    self._on_readable(client)
                    if self._tls_handshakes >= TLS_HANDSHAKES_PER_ROUND:
                        break  # the rest stay ready (level-triggered): next round

    async def wait_idle(self) -> None:
        """Return once no client is connected (none at all, mid-handshake ones included)."""
        await self._idle.wait()

    async def drain(self, code: int = CLOSE_GOING_AWAY) -> None:
        """Close the listener, send every client a close frame with `code`, wait until all are gone.

        The caller bounds the wait; whatever is left is aborted when `run` is cancelled.
        """
        if self._accepting is not None:
            self._accepting.cancel()
        self.listening = False
        # Final: close the listening socket so new connections are refused at once instead of
        # waiting in the kernel's accept queue for a server that is going away.
        trio.lowlevel.notify_closing(self._listener)
        self._listener.close()
        for client in list(self._clients.values()):
            if client.conn is None:
                self._finish(client, "shutdown")  # mid-handshake: nothing to close politely
            else:
                client.close(code, "server shutting down")
        await self._idle.wait()

    async def _accept_loop(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._listener)
            # Accept in rounds so a reconnect storm is taken in quickly, yet each round ends
            # with a checkpoint and the fan-out keeps its turn.
            self._tls_handshakes = 0
            round_ends = time.perf_counter() + ACCEPT_ROUND_SECONDS
            while time.perf_counter() < round_ends:
                if self._tls_handshakes >= TLS_HANDSHAKES_PER_ROUND:
                    break
                try:
                    sock, address = self._listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    self._accept_failed(exc)
                    await trio.sleep(0.1)
                    break
                peer = _format_peer(address)
                if self._admit_connection(sock, peer):
                    self._adopt(sock, peer)

    def _accept_failed(self, exc: OSError) -> None:
        """Log a failed accept() at most once a second, with how many failed since the last
        line: out of file descriptors, the listener stays readable and fails ten times a
        second until a connection ends."""
        self._accept_errors += 1
        now = trio.current_time()
        if now - self._accept_error_logged >= 1.0:
            self._log.warning("accept_failed", error=str(exc), failures=self._accept_errors)
            self._accept_error_logged = now
            self._accept_errors = 0

    def _admit_connection(self, sock: socket.socket, peer: str) -> bool:
        """Whether a connection just accepted may start its handshake; else it is answered and
        closed at once, before anything is read or allocated for it.

        A connection counts against `max_connections` and its address's limits from accept
        on, not from its upgrade: a stranger holding handshakes open cannot push the server
        past its capacity or crowd out other addresses for longer than `handshake_timeout`.
        """
        limits = self.limits
        ip = peer.rpartition(":")[0].strip("[]")
        key = client_key(ip)
        handshaking = self._handshaking.get(key, 0)
        if len(self._clients) >= limits.max_connections:
            refusal = (503, "capacity", "server is at max_connections")
        elif (
            limits.max_handshakes_per_ip is not None and handshaking >= limits.max_handshakes_per_ip
        ):
            refusal = (429, "handshakes_per_ip", "too many handshakes from this address")
        elif (
            limits.max_connections_per_ip is not None
            and self._per_ip.get(ip, 0) + handshaking >= limits.max_connections_per_ip
        ):
            refusal = (429, "per_ip", "too many connections from this address")
        else:
            return True
        status, reason, message = refusal
        self._stats.rejected_upgrades[reason] += 1
        verdict = self._peer_log.admit(key, trio.current_time())
        if verdict.suppressed:
            self._log_suppressed(key, verdict.suppressed)
        if verdict.emit:
            self._log.warning("upgrade_refused", peer=peer, reason=reason, status=status)
        _answer_and_close(sock, status, reason, message)
        return False

    def adopt_upgrade(self, sock: socket.socket, received: bytes) -> None:
        """Serve a connection another server accepted and read a request from (the HTTP port's
        `/ws`: see `httpserver.Upgrade`) as if it had been accepted here with `received` read.

        It is admitted like an accepted connection (`max_connections`, the per-address
        connection and handshake limits, answered 503/429 and closed past them), then its
        request goes through the same handshake parser, Origin check, authentication and
        limits, and the client joins the same hub. Plain (ws://) whatever this port serves: a
        request that arrived in clear has no TLS to continue. While the server is not accepting
        (not started, draining) the answer is 503. Takes ownership of `sock` in every case.
        """
        try:
            peer = _format_peer(sock.getpeername())
        except OSError:  # gone already
            sock.close()
            return
        if self._nursery is None or not self.listening:
            self._stats.rejected_upgrades["unavailable"] += 1
            _answer_and_close(sock, 503, "unavailable", "server is not accepting connections")
            return
        if self._admit_connection(sock, peer):
            self._adopt(sock, peer, received)

    def _adopt(self, sock: socket.socket, peer: str, received: bytes | None = None) -> None:
        """Start serving an admitted connection; `received`: the bytes of its request already
        read elsewhere (an adopted upgrade, always plain), None for one accepted here."""
        assert self._poller is not None and self._nursery is not None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.limits.send_buffer_bytes:
            # Bounds what the kernel holds for a client that stops reading; the rest waits in
            # the outbox, under max_backlog_bytes (queued as references to the shared frames).
            # Measured (bench C, 1,000 of 10,000 clients never reading, stalled clients written
            # last, see Hub.confirm_reading): the readers' p99 is 65-68 ms with the kernel's
            # autotuning or 128 KiB, 54-56 ms with 32 KiB.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes)
        client = Client(
            sock,
            peer,
            self.limits.max_backlog_bytes,
            self._nursery.start_soon,
            self._stats,
            self._log,
            self._deadlines,
            self._finish,
            self.tls if received is None else None,
        )
        if not self._clients:
            self._idle = trio.Event()
        self._clients[client.fd] = client
        client.handshaking = key = client_key(client.ip)
        self._handshaking[key] = self._handshaking.get(key, 0) + 1
        self._poller.register(client.fd, select.EPOLLIN)
        # The handshake deadline covers a refusal's delivery too; `_reap_loop` enforces it.
        self._deadlines[client] = trio.current_time() + self.limits.handshake_timeout
        if received is not None:
            client.last_seen = trio.current_time()
            self._on_plaintext(client, received)
            return
        # The request has usually arrived with the connection: read it now, not a round later.
        self._on_readable(client)

    def _finish(self, client: Client, reason: str) -> None:
        """Forget `client` and close its socket. Synchronous and idempotent."""
        if client.finished:
            return
        client.finished = True
        client.drop_reason = client.drop_reason or reason
        reason = client.drop_reason
        self._stop_reading(client)
        del self._clients[client.fd]
        self._deadlines.pop(client, None)
        self._handshake_over(client)
        self._hub.unsubscribe_all(client)
        if not self._clients:
            self._idle.set()
        if client.tls is not None:
            client.outbox.close_notify()  # type: ignore[attr-defined]
        client.outbox.detach()
        if client.conn is not None:  # wsproto's parser cycle (see release_frame_parser)
            release_frame_parser(getattr(client.conn, "_proto", None))
        trio.lowlevel.notify_closing(client.sock)  # wakes a drain task waiting on the socket
        client.sock.close()
        if client.connected_at is None:
            if reason == "handshake_timeout":
                self._stats.rejected_upgrades["handshake_timeout"] += 1
                self._log_peer("info", "handshake_timeout", client)
            return
        self._established -= 1
        _decrement(self._per_ip, client.ip)
        if client.grant is not None:
            _decrement(self._per_token, client.grant.name)
        self._stats.clients_connected -= 1
        self._stats.disconnects[reason] += 1
        self._log.info(
            "client_disconnected",
            **_peer_fields(client),
            token=client.grant.name if client.grant else None,
            reason=reason,
            duration_s=round(trio.current_time() - client.connected_at, 3),
        )

    def _handshake_over(self, client: Client) -> None:
        """`client` no longer counts as handshaking (upgraded, or gone)."""
        if client.handshaking is not None:
            _decrement(self._handshaking, client.handshaking)
            client.handshaking = None

    def _stop_reading(self, client: Client) -> None:
        if client.reading and self._poller is not None:
            client.reading = False
            self._poller.unregister(client.fd)

    def _finish_when_flushed(self, client: Client, reason: str) -> None:
        """Close once the outbox has delivered everything (a close frame, a refusal).

        Reading stops now: nothing the peer sends matters any more, and a socket at EOF would
        stay readable forever. A peer that never takes the bytes is cut by its deadline.
        """
        self._stop_reading(client)
        if not client.outbox.busy:
            self._finish(client, reason)
            return
        client.drop_reason = client.drop_reason or reason
        self._deadlines.setdefault(client, trio.current_time() + CLOSE_GRACE)
        assert self._nursery is not None
        self._nursery.start_soon(self._finish_after_flush, client, reason)

    async def _finish_after_flush(self, client: Client, reason: str) -> None:
        await client.outbox.flushed()
        self._finish(client, reason)

    def _on_readable(self, client: Client) -> None:
        """Take what the socket holds and run the client's state machine on it."""
        data = _recv_now(client.sock)
        if data is None:
            return  # nothing yet (the usual case right after accept)
        now = client.last_seen = trio.current_time()
        if (
            data
            and client.connected_at is not None
            and not self._within_budget(client, now, 0, len(data))
        ):
            # Read and dropped, never parsed: a flooder is drained while its close frame
            # leaves, so that it can see the 1008, up to the allowance of a closing peer.
            client.bytes_after_close += len(data)
            if client.bytes_after_close > self.limits.max_message_size + RECV_SIZE:
                self._finish_when_flushed(client, "flood")
            return
        if client.tls is not None and data:
            self._on_ciphertext(client, data)
        else:
            self._on_plaintext(client, data)

    def _on_plaintext(self, client: Client, data: bytes) -> None:
        """Run the upgrade parser or wsproto on `data`; b"" is the peer's end of stream."""
        conn = client.conn
        if conn is not None:
            if conn.state is ConnectionState.LOCAL_CLOSING and data:
                # The server sent its close: only the peer's close frame matters now (nothing
                # is inflated, see Client.close). A peer still sending after what it may have
                # had in flight (one message, one read) is read no more and cut once flushed.
                client.bytes_after_close += len(data)
                if client.bytes_after_close > self.limits.max_message_size + RECV_SIZE:
                    self._finish_when_flushed(client, "close_unanswered")
                    return
            conn.receive_data(data or None)  # None: the peer closed, wsproto sees 1006
            self._handle_events(client)
        elif not data:
            self._finish(client, "closed")  # gone before completing a request
        elif client.handshake is not None:
            self._feed_handshake(client, data)

    def _on_ciphertext(self, client: Client, data: bytes) -> None:
        """Decrypt `data` and run the client's state machine on the plaintext, if any.

        What the TLS session has to send (handshake records, session tickets) is written first;
        the peer's close_notify counts as its end of stream.
        """
        tls = client.tls
        assert tls is not None
        if not tls.established:
            self._tls_handshakes += 1
        try:
            plaintext = tls.receive(data)
        except TlsError as exc:
            self._tls_failed(client, exc)
            return
        client.outbox.send_tls_output()  # type: ignore[attr-defined]
        if client.finished:
            return
        if plaintext:
            self._on_plaintext(client, plaintext)
        if tls.peer_closed and not client.finished and client.reading:
            self._on_plaintext(client, b"")

    def _tls_failed(self, client: Client, exc: TlsError) -> None:
        """End a connection whose peer broke TLS: send its alert (or, to a plain HTTP request,
        a plain 400) and close. Only this connection is affected."""
        outbox: TlsOutbox = client.outbox  # type: ignore[assignment]
        if client.connected_at is None:
            reason = "tls_handshake" if exc.during_handshake else "tls_error"
            self._stats.rejected_upgrades[reason] += 1
            self._log_peer(
                "info",
                "tls_handshake_failed" if exc.during_handshake else "tls_error",
                client,
                reason=exc.reason,
                plain_http=exc.plain_http,
            )
        else:
            self._log.info("tls_error", peer=client.peer, reason=exc.reason)
        client.handshake = None
        if exc.plain_http:
            outbox.write_raw(
                reject_response(
                    400,
                    orjson.dumps(
                        {"error": "tls_required", "message": "this port serves wss:// (TLS)"}
                    ),
                    b"application/json",
                )
            )
        else:
            outbox.send_tls_output()  # the alert (protocol_version, bad_record_mac, …)
        if not client.finished:
            self._finish_when_flushed(client, "tls_error")

    def _feed_handshake(self, client: Client, data: bytes) -> None:
        assert client.handshake is not None
        try:
            request = client.handshake.feed(data)
        except HandshakeError as exc:
            self._stats.rejected_upgrades["bad_request"] += 1
            self._log_peer(
                "info", "upgrade_refused", client, reason="bad_request", status=exc.status
            )
            self._reject(client, exc.status, "bad_request", exc.message, exc.headers)
            return
        if request is not None:
            self._answer(client, request)

    def _answer(self, client: Client, request: UpgradeRequest) -> None:
        # Behind a trusted proxy the client is the forwarded address: the per-address limits
        # count it (from here on, so it is final before the client is counted) and logs name it.
        client.ip = self.limits.proxies.client_address(client.ip, request.headers)
        verdict = self._admit_upgrade(client, request)
        if verdict is None:
            return
        del self._deadlines[client]
        self._handshake_over(client)
        client.grant = verdict
        client.connected_at = client.last_seen = trio.current_time()
        self._established += 1
        self._per_ip[client.ip] = self._per_ip.get(client.ip, 0) + 1
        self._per_token[verdict.name] = self._per_token.get(verdict.name, 0) + 1
        self._stats.connections_accepted += 1
        self._stats.clients_connected += 1
        hub = self._hub
        available = [s for s in hub.symbols if verdict.allows(s)]
        errors: list[dict[str, Any]] = []
        try:
            options = protocol.parse_connect_target(request.target)
        except RequestError as exc:
            options, errors = protocol.ConnectOptions(None, ()), [exc.reply]
        if not available:  # a token scoped to nothing is told so, not sent a silent stream
            errors.insert(0, protocol.no_symbols_error(verdict.name, hub.symbols))
        resume = []
        for symbol, seq in options.resume:
            problem = self._symbol_problem(verdict, symbol)
            if problem is None:
                resume.append((symbol, seq))
            else:
                errors.append(problem)
        resumed = {symbol for symbol, _ in resume}
        if options.symbols is None:  # the default: everything allowed, unless resuming
            initial = [] if options.resume else available
        else:
            initial = []
            for symbol in options.symbols:
                problem = self._symbol_problem(verdict, symbol)
                if problem is None:
                    initial.append(symbol)
                else:
                    errors.append(problem)
        initial = [s for s in initial if s not in resumed]  # resume wins over a plain subscribe
        subscribed = [s for s in hub.symbols if s in resumed or s in initial]
        limits = self.limits
        deflate = (
            negotiate_deflate(request, limits.max_message_size)
            if limits.permessage_deflate
            else None
        )
        client.accept(
            request,
            protocol.connected_message(
                self._wall_clock(),
                token=verdict.name,
                symbols=subscribed,
                available=available,
                history_size=hub.history.size,
                ping_interval=limits.ping_interval,
                idle_timeout=limits.idle_timeout,
            ),
            deflate,
        )
        self._log.info(
            "client_connected", **_peer_fields(client), token=verdict.name, symbols=len(subscribed)
        )
        if client.finished:  # the 101 could not be written: the peer is already gone
            return
        for error in errors:
            self._client_error(client, error)
        hub.subscribe(client, initial)
        for symbol, seq in resume:
            hub.resume(client, symbol, seq)

    def _admit_upgrade(self, client: Client, request: UpgradeRequest) -> Grant | None:
        """The grant for this upgrade, or None after answering it with a refusal.

        In order: the browser's Origin (403: cross-site WebSocket hijacking), total capacity
        (503), the token (401; 429 instead once the address failed too often), then the
        address's and the token's connection limits (429). Every refusal is an HTTP answer
        before the upgrade, counted in `rejected_upgrades{reason}` and logged without secrets.

        The failed-authentication limit only ever refuses failing attempts: a valid token is
        let in whatever its address did, so a stranger sharing an address (a NAT, a proxy)
        cannot lock its legitimate users out by guessing.
        """
        limits = self.limits
        origin = _header(request.headers, b"origin")
        if (
            origin is not None
            and limits.allowed_origins is not None
            and origin.decode("latin-1").lower().rstrip("/") not in limits.allowed_origins
        ):
            self._refuse(client, 403, "origin", "this Origin may not connect")
            return None
        if self._established >= limits.max_connections:
            self._refuse(client, 503, "capacity", "server is at max_connections", retry=5)
            return None
        verdict = self.auth.authenticate(presented_token(request.target, request.headers))
        if isinstance(verdict, AuthFailure):
            self._refuse_authentication(client, verdict)
            return None
        per_ip = limits.max_connections_per_ip
        if per_ip is not None and self._per_ip.get(client.ip, 0) >= per_ip:
            self._refuse(client, 429, "per_ip", "too many connections from this address", retry=5)
            return None
        per_token = getattr(verdict, "max_connections", None)
        if per_token is not None and self._per_token.get(verdict.name, 0) >= per_token:
            self._refuse(client, 429, "per_token", "too many connections for this token", retry=5)
            return None
        return verdict

    def _refuse_authentication(self, client: Client, verdict: AuthFailure) -> None:
        """401 for a missing or invalid token, or 429 once the address has failed
        `max_auth_failures_per_minute` times in the last minute (no guessing at full speed).

        An expired token gets the same answer as an unknown one: whether a token ever existed
        is for the log and the metrics, not for whoever presents it."""
        now = trio.current_time()
        key = client_key(client.ip)
        failures = self._auth_failures.get(key)
        if failures is None:
            if len(self._auth_failures) >= MAX_TRACKED_FAILING_ADDRESSES:
                self._refuse(client, 429, "auth_rate_limited", "too many failed attempts", retry=60)
                return
            failures = self._auth_failures[key] = deque()
        while failures and failures[0] <= now - 60.0:
            failures.popleft()
        if len(failures) >= self.limits.max_auth_failures_per_minute:
            retry = max(1, int(failures[0] + 60.0 - now) + 1)
            self._refuse(client, 429, "auth_rate_limited", "too many failed attempts", retry=retry)
            return
        failures.append(now)
        self._stats.auth_failures[verdict.value] += 1
        self._stats.rejected_upgrades[verdict.value] += 1
        self._log_peer("warning", "auth_failed", client, reason=verdict.value)
        missing = verdict is AuthFailure.MISSING
        challenge = b'Bearer realm="agentspoonsd"'
        if not missing:
            challenge += b', error="invalid_token"'
        self._reject(
            client,
            401,
            AuthFailure.MISSING.value if missing else AuthFailure.INVALID.value,
            "a valid bearer token is required",
            headers=((b"WWW-Authenticate", challenge),),
        )

    def _refuse(
        self,
        client: Client,
        status: int,
        reason: str,
        message: str,
        *,
        retry: int | None = None,
    ) -> None:
        self._stats.rejected_upgrades[reason] += 1
        self._log_peer("warning", "upgrade_refused", client, reason=reason, status=status)
        headers = ((b"Retry-After", str(retry).encode()),) if retry is not None else ()
        self._reject(client, status, reason, message, headers=headers)

    def close_token_connections(
        self, names: set[str] | frozenset[str], code: int = 4001, reason: str = "token revoked"
    ) -> int:
        """Close every established connection whose token is in `names` (a revocation).

        Each gets a close frame with `code` and a grace, like any server-initiated close; returns
        how many were closed."""
        closing = [
            c
            for c in self._clients.values()
            if c.grant is not None and c.grant.name in names and not c.outbox.sealed
        ]
        for client in closing:
            client.linger_close(code, reason, "token_revoked")
        return len(closing)

    def _forget_old_auth_failures(self, now: float) -> None:
        for ip in [ip for ip, f in self._auth_failures.items() if not f or f[-1] <= now - 60.0]:
            del self._auth_failures[ip]

    def _symbol_problem(self, grant: Grant, symbol: str) -> dict[str, Any] | None:
        """The error for a symbol this connection may not use, or None."""
        if symbol not in self._hub.symbol_set:
            return protocol.error_message(
                ErrorCode.UNKNOWN_SYMBOL, f"no such symbol: {symbol!r}", symbol=symbol
            )
        if not grant.allows(symbol):
            return protocol.error_message(
                ErrorCode.FORBIDDEN_SYMBOL, f"this token may not see {symbol!r}", symbol=symbol
            )
        return None

    def _reject(
        self,
        client: Client,
        status: int,
        code: str,
        message: str,
        headers: Headers = (),
    ) -> None:
        client.refuse(status, orjson.dumps({"error": code, "message": message}), headers)
        if not client.finished:
            self._finish_when_flushed(client, "refused")

    def _handle_events(self, client: Client) -> None:
        """React to what wsproto parsed: messages, pings, the closing handshake."""
        conn = client.conn
        assert conn is not None
        now = trio.current_time()
        for event in conn.events():
            if client.finished or not self._within_budget(client, now, 1, 0):
                return
            if isinstance(event, Message):
                if conn.state is ConnectionState.OPEN:
                    self._on_message(client, event)
            elif isinstance(event, Ping):
                client.send_event(event.response())
            elif isinstance(event, Pong):
                # The answer to our ping says it read every byte up to it: serve it ahead of
                # clients that have not. Any other pong (unsolicited ones are allowed) costs
                # nothing: the reordering runs at most once per ping sent.
                if client.ping_outstanding:
                    client.ping_outstanding = False
                    self._hub.confirm_reading(client)
            elif isinstance(event, CloseConnection):
                if conn.state is ConnectionState.REMOTE_CLOSING:
                    client.send_event(event.response())
                elif conn.state is ConnectionState.OPEN:  # wsproto saw a protocol error
                    if event.code == CLOSE_TOO_BIG:  # deflate.BoundedDeflate's bounds
                        self._message_too_large(client)
                    else:
                        client.close(event.code, event.reason or "")
                if not client.finished:
                    self._finish_when_flushed(client, f"close_{event.code}")
                return

    def _within_budget(self, client: Client, now: float, frames: int, size: int) -> bool:
        """Count `frames` and `size` bytes from an upgraded peer against its budget for this
        second; False past either limit, after starting a 1008 close the first time.

        Every frame counts, whatever its kind: a flood of pings, pongs, empty fragments or
        bytes costs the server parsing time per frame, and no message budget sees them. Past
        the budget nothing more is parsed this second; the close handshake gets its grace.
        """
        second = int(now)
        if second != client.inbound_second:
            client.inbound_second, client.inbound_frames, client.inbound_bytes = second, 0, 0
        client.inbound_frames += frames
        client.inbound_bytes += size
        limits = self.limits
        if client.inbound_frames > limits.max_client_frames_per_second:
            kind = "frames"
        elif client.inbound_bytes > limits.max_client_bytes_per_second:
            kind = "bytes"
        else:
            return True
        if client.outbox.sealed:  # closing already (this flood's close, or another)
            return False
        self._stats.floods[kind] += 1
        self._log_peer(
            "warning",
            "client_flood",
            client,
            token=client.grant.name if client.grant else None,
            kind=kind,
            frames=client.inbound_frames,
            bytes=client.inbound_bytes,
        )
        client.linger_close(CLOSE_POLICY, f"{kind} per second over limit", "flood")
        return False

    def _on_message(self, client: Client, event: Message) -> None:
        if client.assembler is None:  # most clients never send anything: allocate on first use
            client.assembler = _MessageAssembler(self.limits.max_message_size)
        assembler = client.assembler
        text = assembler.feed(event)
        if assembler.too_large:
            self._message_too_large(client)
        elif isinstance(event, BytesMessage):
            if event.message_finished:
                self._client_error(
                    client,
                    protocol.error_message(
                        protocol.ErrorCode.BINARY_UNSUPPORTED,
                        "binary messages are not supported; send JSON text",
                    ),
                )
        elif text is not None:
            self._on_request(client, text)

    def _message_too_large(self, client: Client) -> None:
        """Answer a message over `max_message_size`: an error reply, then close 1009."""
        limit = self.limits.max_message_size
        client.send_message(
            protocol.error_message(
                ErrorCode.MESSAGE_TOO_LARGE, f"messages are limited to {limit} bytes"
            )
        )
        client.linger_close(CLOSE_TOO_BIG, "message too large", "message_too_large")

    def _on_request(self, client: Client, text: str) -> None:
        """Answer one client text message (docs/PROTOCOL.md "Client → server")."""
        if not self._admit(client):
            return
        hub = self._hub
        try:
            request = protocol.parse_request(text, history_size=hub.history.size)
        except RequestError as exc:
            self._client_error(client, exc.reply)
            return
        grant = client.grant
        assert grant is not None
        if isinstance(request, protocol.Ping):
            client.send_message(protocol.pong_message(self._wall_clock()))
        elif isinstance(request, protocol.Subscribe):
            wanted = self._expand(grant, request.symbols)
            if self._report_problems(client, grant, wanted):
                return
            hub.subscribe(client, wanted)
            client.send_message(protocol.subscribed_message(hub.subscriptions(client)))
        elif isinstance(request, protocol.Unsubscribe):
            if protocol.ALL in request.symbols:
                hub.unsubscribe_all(client)
            else:
                unknown = [s for s in request.symbols if s not in hub.symbol_set]
                if unknown:
                    self._client_error(client, self._symbol_problem(grant, unknown[0]))  # type: ignore[arg-type]
                    return
                hub.unsubscribe(client, request.symbols)
            client.send_message(protocol.unsubscribed_message(hub.subscriptions(client)))
        elif isinstance(request, protocol.HistoryRequest):
            if self._report_problems(client, grant, [request.symbol]):
                return
            reply, count = hub.history_page(request.symbol, request.limit, request.before_seq)
            if not self._admit(client, protocol.request_cost(request, count) - 1):
                return
            if client.conn is not None and client.conn.state is ConnectionState.OPEN:
                frame = client.conn.send(TextMessage(protocol.encode(reply).decode()))
                client.send_reply([frame])  # under 256 KiB, exempt from the backlog cap
        else:  # Resume
            symbols = [symbol for symbol, _ in request.positions]
            if self._report_problems(client, grant, symbols):
                return
            current = hub.subscriptions(client)
            taken = [s for s in symbols if s in current]
            if taken:
                self._client_error(
                    client,
                    protocol.error_message(
                        ErrorCode.ALREADY_SUBSCRIBED,
                        f"already receiving {taken[0]!r}: resume is for symbols not subscribed",
                        symbol=taken[0],
                    ),
                )
                return
            replayed = sum(hub.replay_size(symbol, seq) for symbol, seq in request.positions)
            if not self._admit(client, protocol.request_cost(request, replayed) - 1):
                return
            after = [s for s in hub.symbols if s in current or s in symbols]
            client.send_message(protocol.subscribed_message(after))
            for symbol, seq in request.positions:
                hub.resume(client, symbol, seq)

    def _expand(self, grant: Grant, symbols: tuple[str, ...]) -> list[str]:
        if protocol.ALL in symbols:
            return [s for s in self._hub.symbols if grant.allows(s)]
        return list(symbols)

    def _report_problems(self, client: Client, grant: Grant, symbols: list[str]) -> bool:
        """Send the error for the first unusable symbol; True when there was one."""
        for symbol in symbols:
            problem = self._symbol_problem(grant, symbol)
            if problem is not None:
                self._client_error(client, problem)
                return True
        return False

    def _admit(self, client: Client, cost: int = 1) -> bool:
        """Count `cost` (see `protocol.request_cost`) against the client's per-second budget;
        False (and an error) once this second's budget is spent.

        A request is admitted while any of the budget is left, and what it costs beyond the
        budget is owed: each new second pays back one budget, so a replay worth five seconds of
        messages leaves the client rate-limited for about five seconds. `cost` 0 admits."""
        budget = client.budget
        if budget is None:
            budget = client.budget = _Budget()
        if cost <= 0:
            return True
        per_second = self.limits.max_client_messages_per_second
        second = int(trio.current_time())
        if second != budget.second:
            budget.sent = max(0, budget.sent - per_second * (second - budget.second))
            budget.second = second
        if budget.sent < per_second:
            budget.sent += cost
            return True
        self._client_error(
            client,
            protocol.error_message(
                ErrorCode.RATE_LIMITED,
                f"more than {self.limits.max_client_messages_per_second} messages per second",
            ),
        )
        return False

    def _client_error(self, client: Client, reply: dict[str, Any]) -> None:
        """Send an error reply; past `max_client_errors` in ERROR_WINDOW, close with 1008."""
        self._stats.client_errors += 1
        self._log.debug("client_message_rejected", **_peer_fields(client), code=reply["code"])
        client.send_message(reply)
        budget = client.budget
        if budget is None:
            budget = client.budget = _Budget()
        now = trio.current_time()
        errors = budget.errors
        errors.append(now)
        while errors and errors[0] <= now - ERROR_WINDOW:
            errors.popleft()
        if len(errors) > self.limits.max_client_errors:
            self._log.info("client_too_many_errors", **_peer_fields(client), errors=len(errors))
            client.linger_close(CLOSE_POLICY, "too many errors", "too_many_errors")


class _MessageAssembler:
    """Joins fragmented messages, enforcing the inbound size limit as the bytes arrive."""

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._size = 0
        self._parts: list[str] = []
        self.too_large = False

    def feed(self, event: Message) -> str | None:
        """The whole text once its last fragment arrives; None before, and for binary."""
        self._size += len(event.data)
        if self._size > self._max_size:
            self.too_large = True
            self._parts.clear()
            return None
        if isinstance(event, TextMessage):
            self._parts.append(event.data)
        if not event.message_finished:
            return None
        self._size = 0
        text = "".join(self._parts)
        self._parts.clear()
        return text if isinstance(event, TextMessage) else None


def _answer_and_close(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """Refuse a connection nothing was allocated for: one best-effort send, then close."""
    answer = reject_response(
        status,
        orjson.dumps({"error": reason, "message": message}),
        b"application/json",
        ((b"Retry-After", b"5"),),
    )
    try:
        sock.setblocking(False)
        sock.send(answer)  # best effort: it fits the empty socket buffer
    except OSError:
        pass
    sock.close()


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value.strip()
    return None


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _recv_now(sock: socket.socket) -> bytes | None:
    """What the socket holds right now; None when nothing is there yet (b"" at EOF)."""
    try:
        return sock.recv(RECV_SIZE)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _peer_fields(client: Client) -> dict[str, str]:
    """Log fields naming a connection: `peer`, the socket's address and port, and `client`, the
    address a trusted proxy forwarded for it, only when that is another address."""
    if client.ip == client.peer.rpartition(":")[0].strip("[]"):
        return {"peer": client.peer}
    return {"peer": client.peer, "client": client.ip}


def _format_peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
