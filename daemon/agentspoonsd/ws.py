"""The WebSocket server: accept, authenticate the upgrade, serve each client.

This module is the thin Trio layer that owns the sockets: epoll, accept, dispatch, deadlines,
heartbeat timers, TLS, and writing out. The protocol and the server's policy for each
connection are sans-IO, in `connection.ServerConnection` (the handshake, wsproto, budgets,
closing), `admission.Admission` (who may connect) and `routing.Router` (what a client's
requests get): a `Peer` is a `ServerConnection` with a socket. One dispatcher task reads every
client (see `WebSocketServer`), and each client has one `Outbox`, its only write path: broadcast
frames from the hub, replies, pongs and close frames all go through it.

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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVarTuple, cast

import orjson
import trio

from .admission import Refusal
from .auth import TokenStore
from .closecodes import CLOSE_GOING_AWAY, CLOSE_TOKEN_REVOKED, CLOSE_TRY_AGAIN_LATER
from .connection import (
    CLOSE_GRACE,
    RECV_SIZE,
    End,
    Limits,
    Log,
    Policy,
    ServerConnection,
)
from .frames import release_frame_parser
from .httppolicy import format_address
from .hub import Hub
from .metrics import Stats
from .outbox import Outbox, TlsOutbox
from .tls import TlsError, TlsSession
from .upgrade import reject_response

__all__ = ["Limits", "Peer", "WebSocketServer"]

_Args = TypeVarTuple("_Args")  # a spawned function's arguments

# Handshakes run inline at accept, in rounds of about this long, each ended by a checkpoint: a
# publication waits at most one round behind a reconnect storm. Shorter rounds connect a storm
# more slowly (whatever else is ready, the new clients' pongs above all, gets a turn between
# rounds); longer ones delay ticks until they are skipped. The figures behind the choice (bench
# B, several round lengths): bench/README.md, "Figures behind the daemon's constants".
ACCEPT_ROUND_SECONDS = 0.04
DISPATCH_BATCH = 128  # ready sockets handled per dispatcher round
# TLS handshake steps (key exchange, signature: the costly part of a handshake, bench/micro.py)
# per dispatcher or accept round: a wss:// reconnect storm must not hold the event loop away
# from the fan-out for long.
TLS_HANDSHAKES_PER_ROUND = 16
REAP_INTERVAL = 0.25  # how often handshake and close deadlines are enforced
_UNAVAILABLE = Refusal(
    503, "unavailable", "server is not accepting connections", ((b"Retry-After", b"5"),)
)


class Peer(ServerConnection):
    """One WebSocket peer with its socket: a `ServerConnection` fed from the socket, writing
    through the connection's `Outbox` (a `TlsOutbox` with a `TlsSession` for wss://), and ended
    by closing the socket when the connection says so."""

    __slots__ = ("_server", "fd", "reading", "sock", "tls")

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        server: WebSocketServer,
        tls: ssl.SSLContext | None,
        now: float,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept: a closed socket's fileno() is -1
        self._server = server
        self.reading = True  # registered in the server's epoll set
        # wss://: the connection's TLS state machine; its outbox encrypts at send time.
        self.tls: TlsSession | None = None
        cap = server.limits.max_backlog_bytes
        outbox: Outbox
        if tls is None:
            outbox = Outbox(
                sock,
                max_bytes=cap,
                spawn=server.spawn,
                on_overflow=self._on_overflow,
                on_failure=self._on_failure,
            )
        else:
            self.tls = TlsSession(tls)
            outbox = TlsOutbox(
                sock,
                self.tls,
                max_bytes=cap,
                spawn=server.spawn,
                on_overflow=self._on_overflow,
                on_failure=self._on_failure,
            )
        super().__init__(peer, server.policy, outbox, now)

    def on_readable(self) -> None:
        """Take what the socket holds and run the connection's state machine on it."""
        data = _recv_now(self.sock)
        if data is None:
            return  # nothing yet (the usual case right after accept)
        now = trio.current_time()
        if self.tls is None or not data:
            end = self.receive(data, now)
        else:
            end = self._receive_tls(self.tls, data, now)
        if end is not None:
            self.act(end)

    def _receive_tls(self, tls: TlsSession, data: bytes, now: float) -> End | None:
        """Count `data` against the budget, decrypt it and run the connection on the plaintext.

        What the TLS session has to send (handshake records, session tickets) is written first;
        the peer's close_notify counts as its end of stream.
        """
        self.last_seen = now
        if self.connected_at is not None and not self.within_budget(now, 0, len(data)):
            return self.drop(len(data))
        if not tls.established:
            self._server.tls_handshakes += 1
        try:
            plaintext = tls.receive(data)
        except TlsError as exc:
            return self._tls_failed(exc, now)
        cast(TlsOutbox, self.outbox).send_tls_output()
        if self.finished:
            return None
        end = self.receive_plaintext(plaintext, now) if plaintext else None
        if end is None and tls.peer_closed and not self.finished and self.reading:
            end = self.receive_plaintext(b"", now)
        return end

    def _tls_failed(self, exc: TlsError, now: float) -> End:
        """End a connection whose peer broke TLS: send its alert (or, to a plain HTTP request,
        a plain 400) and close. Only this connection is affected."""
        outbox = cast(TlsOutbox, self.outbox)
        policy = self.policy
        if self.connected_at is None:
            reason = "tls_handshake" if exc.during_handshake else "tls_error"
            policy.stats.rejected_upgrades[reason] += 1
            policy.log_peer(
                "info",
                "tls_handshake_failed" if exc.during_handshake else "tls_error",
                self,
                now,
                reason=exc.reason,
                plain_http=exc.plain_http,
            )
        else:
            policy.log.info("tls_error", peer=self.peer, reason=exc.reason)
        self.handshake = None
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
        return End("tls_error")

    def act(self, end: End) -> None:
        """Do what the connection said: close now, or once everything written is delivered."""
        if self.finished:
            return
        if end.flush:
            self.finish_when_flushed(end.reason)
        else:
            self.abort(end.reason)

    def finish_when_flushed(self, reason: str) -> None:
        """Close once the outbox has delivered everything (a close frame, a refusal).

        Reading stops now: nothing the peer sends matters any more, and a socket at EOF would
        stay readable forever. A peer that never takes the bytes is cut by its deadline.
        """
        self.stop_reading()
        outbox = cast(Outbox, self.outbox)
        if not outbox.busy:
            self.abort(reason)
            return
        self.drop_reason = self.drop_reason or reason
        self.policy.deadlines.setdefault(self, trio.current_time() + CLOSE_GRACE)
        self._server.spawn(self._finish_after_flush, outbox, reason)

    async def _finish_after_flush(self, outbox: Outbox, reason: str) -> None:
        await outbox.flushed()
        self.abort(reason)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self._server.unregister(self.fd)

    def abort(self, reason: str) -> None:
        """Stop serving this client now and close its socket. Synchronous and idempotent."""
        if self.finished:
            return
        self.finished = True
        reason = self.drop_reason = self.drop_reason or reason
        self.stop_reading()
        self._server.discard(self)
        outbox = cast(Outbox, self.outbox)
        if self.tls is not None:
            cast(TlsOutbox, outbox).close_notify()
        outbox.detach()
        if self.conn is not None:  # wsproto's parser cycle (see release_frame_parser)
            release_frame_parser(getattr(self.conn, "_proto", None))
        trio.lowlevel.notify_closing(self.sock)  # wakes a drain task waiting on the socket
        self.sock.close()
        self.policy.forget(self, reason, trio.current_time())

    def _on_overflow(self) -> None:
        self.policy.stats.backlog_overflows += 1
        self.policy.log.warning(
            "client_backlog_overflow",
            **self.peer_fields(),
            token=self.grant.name if self.grant else None,
            queued_bytes=self.outbox.queued_bytes,
        )
        self.linger_close(
            CLOSE_TRY_AGAIN_LATER,
            "backlog over limit",
            "backlog_overflow",
            trio.current_time(),
            discard_unsent=True,
        )

    def _on_failure(self) -> None:
        self.abort("socket_error")


class AcceptFailures:
    """Failed accept() calls, logged at most once a second with how many failed since the last
    line: out of file descriptors, a listener stays readable and fails ten times a second until
    a connection ends."""

    def __init__(self, log: Log) -> None:
        self._log = log
        self._count = 0  # failures not logged yet
        self._logged = -1.0

    def failed(self, exc: OSError, now: float) -> None:
        self._count += 1
        if now - self._logged >= 1.0:
            self._log.warning("accept_failed", error=str(exc), failures=self._count)
            self._logged = now
            self._count = 0


class WebSocketServer:
    """Serves WebSocket clients on a listening socket the daemon bound (without one, a fan-out
    worker's, those its master hands over: `adopt_accepted`, `adopt_upgrade`).

    Connections are served without a task each: every client socket is registered once in one
    level-triggered epoll set, and a single dispatcher task waits for that set to become readable
    and runs each ready client's sans-IO state machine synchronously (`Peer.on_readable`). A task
    per connection would cost about 3 KB of frames and an epoll_ctl pair per read; here a
    connection is its objects and its socket. The only tasks besides the dispatcher are an
    outbox's drain task, which exists while that client lags, and one per closing client
    waiting for its last bytes to leave.

    `auth`, `limits` and `tls` (the SSLContext of wss://, None for ws://) are replaced wholesale
    on reload; each new connection reads the current ones and established connections are left
    alone (a TLS connection keeps the certificate it was served).
    """

    def __init__(
        self,
        listener: socket.socket | None,
        hub: Hub,
        auth: TokenStore,
        limits: Limits,
        stats: Stats,
        log: Log,
        *,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._listener = listener
        self.tls = tls
        self.tls_handshakes = 0  # TLS handshake steps in the current dispatch or accept round
        self.policy = Policy(hub, auth, limits, stats, log, wall_clock)
        self._log = log
        self._clients: dict[int, Peer] = {}  # by file descriptor
        self._poller: select.epoll | None = None
        self._nursery: trio.Nursery | None = None
        self._accept_failures = AcceptFailures(log)
        self._accepting: trio.CancelScope | None = None
        self._idle = trio.Event()
        self._idle.set()
        self.listening = False

    @property
    def auth(self) -> TokenStore:
        return self.policy.auth

    @auth.setter
    def auth(self, auth: TokenStore) -> None:
        self.policy.auth = auth

    @property
    def limits(self) -> Limits:
        return self.policy.limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self.policy.limits = limits

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def spawn(self, fn: Callable[[*_Args], Awaitable[object]], *args: *_Args) -> None:
        """Start a task for a connection (an outbox's drain, a close waiting for it)."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

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
                client.abort("aborted")
            self._nursery = None
            self._poller.close()
            self._poller = None

    async def _reap_loop(self) -> None:
        """Abort clients whose deadline passed: unfinished handshakes, unanswered closes.

        One task for all connections instead of a cancel scope with a deadline per connection,
        which costs as much as the rest of a handshake's bookkeeping. Precision: REAP_INTERVAL.
        """
        deadlines = self.policy.deadlines
        while True:
            await trio.sleep(REAP_INTERVAL)
            now = trio.current_time()
            self.policy.admission.forget_old_auth_failures(now)
            self._summarise_suppressed_logs(now)
            for client in [c for c, deadline in deadlines.items() if deadline <= now]:
                del deadlines[client]
                # A lingering close already carries its reason; otherwise this was the handshake.
                cast(Peer, client).abort(client.drop_reason or "handshake_timeout")

    def _summarise_suppressed_logs(self, now: float, *, everything: bool = False) -> None:
        self.policy.summarise_suppressed_logs(now, everything=everything)

    async def _heartbeat_loop(self) -> None:
        """Every `ping_interval`, each client's heartbeat (`ServerConnection.heartbeat`): a
        ping, or the close of a client silent past `idle_timeout`. The ping is one pre-built
        frame."""
        while True:
            await trio.sleep(self.limits.ping_interval)
            now = trio.current_time()
            for client in list(self._clients.values()):
                client.heartbeat(now)

    async def _dispatch_loop(self, poller: select.epoll) -> None:
        """Run the state machine of every client whose socket is readable, forever.

        Each round handles at most DISPATCH_BATCH ready sockets (fewer once it has run
        TLS_HANDSHAKES_PER_ROUND TLS handshake steps) and then waits on Trio's own epoll again,
        which is a checkpoint: the hub and the accept loop get their turn between
        rounds. Sockets stay ready (level-triggered) until read, so nothing is missed.
        """
        while True:
            await trio.lowlevel.wait_readable(poller)
            self.tls_handshakes = 0
            for fd, _ in poller.poll(0, DISPATCH_BATCH):
                client = self._clients.get(fd)
                if client is not None:
                    client.on_readable()
                    if self.tls_handshakes >= TLS_HANDSHAKES_PER_ROUND:
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
        if self._listener is not None:
            trio.lowlevel.notify_closing(self._listener)
            self._listener.close()
        for client in list(self._clients.values()):
            if client.conn is None:
                client.abort("shutdown")  # mid-handshake: nothing to close politely
            else:
                client.close(code, "server shutting down")
        await self._idle.wait()

    async def _accept_loop(self) -> None:
        if (listener := self._listener) is None:  # a worker's: connections are handed over
            await trio.sleep_forever()
        while True:
            await trio.lowlevel.wait_readable(listener)
            # Accept in rounds so a reconnect storm is taken in quickly, yet each round ends
            # with a checkpoint and the fan-out keeps its turn.
            self.tls_handshakes = 0
            round_ends = time.perf_counter() + ACCEPT_ROUND_SECONDS
            while time.perf_counter() < round_ends:
                if self.tls_handshakes >= TLS_HANDSHAKES_PER_ROUND:
                    break
                try:
                    sock, address = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    self._accept_failures.failed(exc, trio.current_time())
                    await trio.sleep(0.1)
                    break
                peer = format_address(address)
                if self._admit_connection(sock, peer):
                    self._adopt(sock, peer)

    def _admit_connection(self, sock: socket.socket, peer: str) -> bool:
        """Whether a connection just accepted may start its handshake (`Admission.at_accept`);
        else it is answered and closed at once, before anything is read or allocated for it."""
        ip = peer.rpartition(":")[0].strip("[]")
        refusal = self.policy.admission.at_accept(ip, len(self._clients), self.limits)
        if refusal is None:
            return True
        self.policy.refused_at_accept(peer, refusal, trio.current_time())
        _send_and_close(sock, refusal.response())
        return False

    def adopt_accepted(self, sock: socket.socket) -> None:
        """Serve a connection another process accepted (the master of fan-out workers) as one
        accepted here: admitted, then TLS when this server has it, the handshake and the rest.
        503 while not accepting (not started, draining). Takes ownership of `sock`."""
        peer = self._adoptable(sock)
        if peer is not None and self._admit_connection(sock, peer):
            self._adopt(sock, peer)

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
        peer = self._adoptable(sock)
        if peer is not None and self._admit_connection(sock, peer):
            self._adopt(sock, peer, received)

    def _adoptable(self, sock: socket.socket) -> str | None:
        """The peer of a connection handed over, or None once it is closed (gone already, or
        answered 503 while this server is not accepting)."""
        try:
            peer = format_address(sock.getpeername())
        except OSError:  # gone already
            sock.close()
            return None
        if self._nursery is None or not self.listening:
            self.policy.stats.rejected_upgrades[_UNAVAILABLE.reason] += 1
            _send_and_close(sock, _UNAVAILABLE.response())
            return None
        return peer

    def _adopt(self, sock: socket.socket, peer: str, received: bytes | None = None) -> None:
        """Start serving an admitted connection; `received`: the bytes of its request already
        read elsewhere (an adopted upgrade, always plain), None for one accepted here."""
        assert self._poller is not None and self._nursery is not None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.limits.send_buffer_bytes:
            # Bounds what the kernel holds for a client that stops reading; the rest waits in
            # the outbox, under max_backlog_bytes (queued as references to the shared frames).
            # A smaller buffer also lowers the readers' latency while some clients stall (bench
            # C: bench/README.md, "Figures behind the daemon's constants").
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes)
        now = trio.current_time()
        client = Peer(sock, peer, self, self.tls if received is None else None, now)
        if not self._clients:
            self._idle = trio.Event()
        self._clients[client.fd] = client
        self._poller.register(client.fd, select.EPOLLIN)
        if received is not None:
            end = client.receive(received, now)
            if end is not None:
                client.act(end)
            return
        # The request has usually arrived with the connection: read it now, not a round later.
        client.on_readable()

    def discard(self, client: Peer) -> None:
        """Forget `client` (its socket is being closed): `Peer.abort`'s part of the server."""
        del self._clients[client.fd]
        self.policy.deadlines.pop(client, None)
        if not self._clients:
            self._idle.set()

    def unregister(self, fd: int) -> None:
        """Stop watching `fd` for reads (`Peer.stop_reading`)."""
        if self._poller is not None:
            self._poller.unregister(fd)

    def close_token_connections(
        self,
        names: set[str] | frozenset[str],
        code: int = CLOSE_TOKEN_REVOKED,
        reason: str = "token revoked",
    ) -> dict[str, int]:
        """Close every established connection whose token is in `names` (a revocation).

        Each gets a close frame with `code` and a grace, like any server-initiated close. One
        pass over the connections whatever the number of names; returns how many were closed
        per name (names without a connection are absent)."""
        closed: dict[str, int] = {}
        now = trio.current_time()
        for client in list(self._clients.values()):
            grant = client.grant
            if grant is not None and grant.name in names and not client.outbox.sealed:
                client.linger_close(code, reason, "token_revoked", now)
                closed[grant.name] = closed.get(grant.name, 0) + 1
        return closed


def _send_and_close(sock: socket.socket, answer: bytes) -> None:
    """Refuse a connection nothing was allocated for: one best-effort send, then close."""
    try:
        sock.setblocking(False)
        sock.send(answer)  # best effort: it fits the empty socket buffer
    except OSError:
        pass
    sock.close()


def _recv_now(sock: socket.socket) -> bytes | None:
    """What the socket holds right now; None when nothing is there yet (b"" at EOF)."""
    try:
        return sock.recv(RECV_SIZE)
    except BlockingIOError:
        return None
    except OSError:
        return b""
