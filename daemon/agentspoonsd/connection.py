"""Sans-IO: one server-side WebSocket connection, from its first byte to its close.

`ServerConnection.receive(data, now)` takes what the peer sent and the time, and runs the
server's policy on it: the upgrade request (`upgrade.UpgradeParser`, then `admission.Admission`
and `routing.Router.welcome`), then wsproto's events: message assembly under
`max_message_size`, the per-second budgets of frames and bytes, requests (`routing.Router`),
pings, pongs and the closing handshake. Whatever goes to the peer is written, in order, to its
`Transport` (the I/O layer's outbox, the connection's only write path, which never blocks);
what the I/O layer must then do with the socket comes back as an `End`. Deadlines (an
unfinished handshake, a close the peer must answer) are entered in `Policy.deadlines` for the
I/O layer to enforce.

No sockets, no clock, no event loop: `ws` reads sockets, feeds this, and acts on what it says;
tests feed bytes and read the bytes written (tests/test_connection.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from . import protocol
from .admission import Admission, Refusal
from .closecodes import CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TOO_BIG
from .deflate import BoundedDeflate
from .httppolicy import client_key
from .limits import Limits
from .logthrottle import LogThrottle
from .routing import Budget, MessageAssembler, Router
from .upgrade import HandshakeError, UpgradeParser, UpgradeRequest, accept_response

if TYPE_CHECKING:
    from .auth import Grant, TokenStore
    from .hub import Hub
    from .metrics import Stats

__all__ = [
    "CLOSE_GRACE",
    "PING_FRAME",
    "RECV_SIZE",
    "End",
    "Limits",
    "Log",
    "Policy",
    "ServerConnection",
    "Transport",
]

RECV_SIZE = 65536  # the most one read takes: a closing peer may have one in flight
CLOSE_GRACE = 2.0  # seconds a peer gets to answer a close the server started
# A server ping frame: unmasked, no payload, the same bytes for every client.
PING_FRAME = b"\x89\x00"
# Events a stranger can cause at will (refusals, failed handshakes, floods) are logged at most
# this many times per address and window; the rest are summed up in one `log_suppressed`.
PEER_LOG_LIMIT = 5
PEER_LOG_INTERVAL = 10.0


class Log(Protocol):
    """The structured logger (structlog's bound logger): an event name and its fields."""

    def debug(self, event: str, **fields: Any) -> object: ...
    def info(self, event: str, **fields: Any) -> object: ...
    def warning(self, event: str, **fields: Any) -> object: ...


class Transport(Protocol):
    """A connection's single write path (`outbox.Outbox`): writes never block and never raise;
    a write that fails ends the connection (its I/O layer sets `finished`)."""

    sealed: bool  # no further writes accepted (a close frame or a refusal was the last)
    queued_bytes: int

    def write(self, data: bytes) -> None: ...
    def write_reply(self, parts: Sequence[bytes]) -> None: ...
    def seal(self, final: bytes, *, discard_unsent: bool = False) -> None: ...


@dataclass(frozen=True, slots=True)
class End:
    """What the I/O layer must do once `receive` returns this: stop reading and close the
    socket, once the outbox has delivered everything (`flush`) or at once."""

    reason: str  # disconnects{reason}, the log's reason
    flush: bool = True


class Policy:
    """What the connections of one server share and read at the moment they act: the limits and
    tokens in force (`limits` and `auth` are replaced wholesale on reload), the admission counts,
    the hub, the request router, the deadlines, the metrics and the log."""

    __slots__ = (
        "admission",
        "auth",
        "deadlines",
        "hub",
        "limits",
        "log",
        "peer_log",
        "router",
        "stats",
        "wall_clock",
    )

    def __init__(
        self,
        hub: Hub,
        auth: TokenStore,
        limits: Limits,
        stats: Stats,
        log: Log,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self.hub = hub
        self.auth = auth
        self.limits = limits
        self.stats = stats
        self.log = log
        self.wall_clock = wall_clock
        self.admission = Admission()
        self.router = Router(self)
        # When the I/O layer ends a connection that has not finished: its handshake's deadline,
        # or the grace of a close the server started. Only those connections are in it.
        self.deadlines: dict[ServerConnection, float] = {}
        self.peer_log = LogThrottle(PEER_LOG_LIMIT, PEER_LOG_INTERVAL)

    def log_peer(
        self, level: str, event: str, conn: ServerConnection, now: float, **fields: Any
    ) -> None:
        """Log `event` about `conn`, within its address's share (PEER_LOG_LIMIT per
        PEER_LOG_INTERVAL): one peer repeating a refused request cannot flood the log."""
        if self.log_admitted(client_key(conn.ip), now):
            getattr(self.log, level)(event, **conn.peer_fields(), **fields)

    def log_admitted(self, key: str, now: float) -> bool:
        """Whether a line about the address `key` may be logged now; logs the summary of what
        was held back from it when its window closed."""
        verdict = self.peer_log.admit(key, now)
        if verdict.suppressed:
            self._log_suppressed(key, verdict.suppressed)
        return verdict.emit

    def refused_at_accept(self, peer: str, refusal: Refusal, now: float) -> None:
        """Count and log a connection refused before its handshake (see `Admission.at_accept`)."""
        self.stats.rejected_upgrades[refusal.reason] += 1
        if self.log_admitted(client_key(peer.rpartition(":")[0].strip("[]")), now):
            self.log.warning(
                "upgrade_refused", peer=peer, reason=refusal.reason, status=refusal.status
            )

    def complete_upgrade(
        self, conn: ServerConnection, request: UpgradeRequest, now: float
    ) -> End | None:
        """Admit `conn`'s upgrade `request` (`Admission.at_upgrade`) and welcome it
        (`Router.welcome`), or refuse it."""
        # Behind a trusted proxy the client is the forwarded address: the per-address limits
        # count it (from here on, so it is final before the client is counted) and logs name it.
        conn.ip = self.limits.proxies.client_address(conn.ip, request.headers)
        verdict = self.admission.at_upgrade(conn.ip, request, self.auth, self.limits, now)
        if isinstance(verdict, Refusal):
            return self.refuse(conn, verdict, now)
        self.deadlines.pop(conn, None)
        self._handshake_over(conn)
        conn.grant = verdict
        conn.connected_at = conn.last_seen = now
        self.admission.connected(conn.ip, verdict.name)
        self.stats.connections_accepted += 1
        self.stats.clients_connected += 1
        self.router.welcome(conn, request, verdict, now)
        return None

    def refuse(self, conn: ServerConnection, refusal: Refusal, now: float) -> End:
        """Answer `conn`'s upgrade with `refusal`, counted and logged; the connection closes
        once it is delivered."""
        self.stats.rejected_upgrades[refusal.reason] += 1
        if refusal.auth_failure:
            self.stats.auth_failures[refusal.reason] += 1
            self.log_peer("warning", "auth_failed", conn, now, reason=refusal.reason)
        else:
            self.log_peer(
                refusal.level,
                "upgrade_refused",
                conn,
                now,
                reason=refusal.reason,
                status=refusal.status,
            )
        conn.send_refusal(refusal)
        return End("refused")

    def forget(self, conn: ServerConnection, reason: str, now: float) -> None:
        """The I/O layer has closed `conn`'s socket for `reason`: take the connection out of
        the counts, the metrics and the hub, and log its end."""
        self._handshake_over(conn)
        self.hub.unsubscribe_all(conn)
        if conn.connected_at is None:
            if reason == "handshake_timeout":
                self.stats.rejected_upgrades["handshake_timeout"] += 1
                self.log_peer("info", "handshake_timeout", conn, now)
            return
        token = conn.grant.name if conn.grant else None
        self.admission.disconnected(conn.ip, token)
        self.stats.clients_connected -= 1
        self.stats.disconnects[reason] += 1
        self.log.info(
            "client_disconnected",
            **conn.peer_fields(),
            token=token,
            reason=reason,
            duration_s=round(now - conn.connected_at, 3),
        )

    def _handshake_over(self, conn: ServerConnection) -> None:
        """`conn` no longer counts as handshaking (upgraded, or gone)."""
        if conn.handshaking is not None:
            self.admission.handshake_over(conn.handshaking)
            conn.handshaking = None

    def summarise_suppressed_logs(self, now: float, *, everything: bool = False) -> None:
        """Log what was held back from each address whose window closed by `now` (all of them
        with `everything`: at shutdown)."""
        for key, count in self.peer_log.flush(now, everything=everything):
            self._log_suppressed(key, count)

    def _log_suppressed(self, key: str, count: int) -> None:
        self.log.warning(
            "log_suppressed", client=key, count=count, interval_s=self.peer_log.interval
        )


class ServerConnection:
    """One WebSocket peer's protocol state and the server's policy for it.

    Made when the connection is accepted at `now` (it counts as handshaking from then on, see
    `Admission`, until its upgrade or `handshake_timeout`); `Policy.forget` it once the I/O
    layer has closed its socket. `finished` is the I/O
    layer's: once set, nothing more is written and the hub never holds the connection again.
    """

    __slots__ = (
        "assembler",
        "budget",
        "bytes_after_close",
        "conn",
        "connected_at",
        "deflate",
        "drop_reason",
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
        "policy",
        "send_frame",
        "send_reply",
    )

    def __init__(self, peer: str, policy: Policy, outbox: Transport, now: float) -> None:
        self.peer = peer  # the socket's address and port, as logged
        self.ip = peer.rpartition(":")[0].strip("[]")  # the client's: a proxy's forward applied
        self.policy = policy
        # The request parser is dropped once the upgrade is answered: nothing after needs it.
        self.handshake: UpgradeParser | None = UpgradeParser()
        # The key it counts under in the handshakes per address, until it is upgraded.
        self.handshaking: str | None = policy.admission.handshake_started(self.ip)
        self.conn: Connection | None = None
        self.finished = False  # the socket is closed and the server has forgotten this client
        self.connected_at: float | None = None  # time of the upgrade
        self.assembler: MessageAssembler | None = None
        self.budget: Budget | None = None
        self.deflate = False  # negotiated permessage-deflate: the hub sends compressed frames
        self.inflater: BoundedDeflate | None = None  # its inbound side, when negotiated
        self.bytes_after_close = 0  # received since the server sent its close frame
        self.last_seen = 0.0  # time the peer last sent anything
        # What the peer sent in the whole second `inbound_second` (see Limits: the flood budget).
        self.inbound_second = -1
        self.inbound_frames = 0
        self.inbound_bytes = 0
        # A ping of ours is unanswered: only the pong to it says the peer read up to there.
        self.ping_outstanding = False
        self.drop_reason: str | None = None
        self.grant: Grant | None = None
        self.outbox = outbox
        # The hub's entry point: a pre-encoded frame goes straight into the single write path.
        self.send_frame = outbox.write
        self.send_reply = outbox.write_reply  # a replay: exempt from the cap up to its size
        # The handshake deadline covers a refusal's delivery too.
        policy.deadlines[self] = now + policy.limits.handshake_timeout

    def peer_fields(self) -> dict[str, str]:
        """Log fields naming this connection: `peer`, the socket's address and port, and
        `client`, the address a trusted proxy forwarded for it, only when that is another."""
        if self.ip == self.peer.rpartition(":")[0].strip("[]"):
            return {"peer": self.peer}
        return {"peer": self.peer, "client": self.ip}

    # ---------------------------------------------------------------- what the peer sends

    def receive(self, data: bytes, now: float) -> End | None:
        """Bytes as read from the socket at `now` (b"": the peer's end of stream).

        An upgraded peer's bytes count against its budget first: past it they are dropped
        unparsed (see `drop`). TLS: the I/O layer counts the ciphertext (`within_budget`,
        `drop`) and feeds the plaintext to `receive_plaintext` instead."""
        self.last_seen = now
        if data and self.connected_at is not None and not self.within_budget(now, 0, len(data)):
            return self.drop(len(data))
        return self.receive_plaintext(data, now)

    def drop(self, size: int) -> End | None:
        """Read and dropped, never parsed: a flooder is drained while its close frame leaves,
        so that it can see the 1008, up to the allowance of a closing peer; then it is cut."""
        self.bytes_after_close += size
        if self.bytes_after_close > self.policy.limits.max_message_size + RECV_SIZE:
            return End("flood")
        return None

    def receive_plaintext(self, data: bytes, now: float) -> End | None:
        """Run the upgrade parser or wsproto on `data`; b"" is the peer's end of stream."""
        conn = self.conn
        if conn is not None:
            if conn.state is ConnectionState.LOCAL_CLOSING and data:
                # The server sent its close: only the peer's close frame matters now (nothing
                # is inflated, see `close`). A peer still sending after what it may have had
                # in flight (one message, one read) is read no more and cut once flushed.
                self.bytes_after_close += len(data)
                if self.bytes_after_close > self.policy.limits.max_message_size + RECV_SIZE:
                    return End("close_unanswered")
            conn.receive_data(data or None)  # None: the peer closed, wsproto sees 1006
            return self._handle_events(conn, now)
        if not data:
            return End("closed", flush=False)  # gone before completing a request
        if self.handshake is not None:
            return self._feed_handshake(self.handshake, data, now)
        return None

    def _feed_handshake(self, parser: UpgradeParser, data: bytes, now: float) -> End | None:
        try:
            request = parser.feed(data)
        except HandshakeError as exc:
            refusal = Refusal(exc.status, "bad_request", exc.message, exc.headers, level="info")
            return self.policy.refuse(self, refusal, now)
        if request is None:
            return None
        return self.policy.complete_upgrade(self, request, now)

    def _handle_events(self, conn: Connection, now: float) -> End | None:
        """React to what wsproto parsed: messages, pings, the closing handshake."""
        for event in conn.events():
            if self.finished or not self.within_budget(now, 1, 0):
                return None
            if isinstance(event, (TextMessage, BytesMessage)):
                if conn.state is ConnectionState.OPEN:
                    self.policy.router.on_message(self, event, now)
            elif isinstance(event, Ping):
                self.send_event(event.response())
            elif isinstance(event, Pong):
                # The answer to our ping says it read every byte up to it: serve it ahead of
                # clients that have not. Any other pong (unsolicited ones are allowed) costs
                # nothing: the reordering runs at most once per ping sent.
                if self.ping_outstanding:
                    self.ping_outstanding = False
                    self.policy.hub.confirm_reading(self)
            elif isinstance(event, CloseConnection):
                if conn.state is ConnectionState.REMOTE_CLOSING:
                    self.send_event(event.response())
                elif conn.state is ConnectionState.OPEN:  # wsproto saw a protocol error
                    if event.code == CLOSE_TOO_BIG:  # deflate.BoundedDeflate's bounds
                        self.policy.router.message_too_large(self, now)
                    else:
                        self.close(event.code, event.reason or "")
                return End(f"close_{event.code}")
        return None

    def within_budget(self, now: float, frames: int, size: int) -> bool:
        """Count `frames` and `size` bytes from an upgraded peer against its budget for this
        second; False past either limit, after starting a 1008 close the first time.

        Every frame counts, whatever its kind: a flood of pings, pongs, empty fragments or
        bytes costs the server parsing time per frame, and no message budget sees them. Past
        the budget nothing more is parsed this second; the close handshake gets its grace.
        """
        second = int(now)
        if second != self.inbound_second:
            self.inbound_second, self.inbound_frames, self.inbound_bytes = second, 0, 0
        self.inbound_frames += frames
        self.inbound_bytes += size
        limits = self.policy.limits
        if self.inbound_frames > limits.max_client_frames_per_second:
            kind = "frames"
        elif self.inbound_bytes > limits.max_client_bytes_per_second:
            kind = "bytes"
        else:
            return True
        if self.outbox.sealed:  # closing already (this flood's close, or another)
            return False
        self.policy.stats.floods[kind] += 1
        self.policy.log_peer(
            "warning",
            "client_flood",
            self,
            now,
            token=self.grant.name if self.grant else None,
            kind=kind,
            frames=self.inbound_frames,
            bytes=self.inbound_bytes,
        )
        self.linger_close(CLOSE_POLICY, f"{kind} per second over limit", "flood", now)
        return False

    # ---------------------------------------------------------------- what the server sends

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

    def send_refusal(self, refusal: Refusal) -> None:
        """Answer the upgrade with `refusal`; nothing is written after it."""
        self.handshake = None
        self.outbox.seal(refusal.response())

    def send_message(self, message: dict[str, Any]) -> None:
        if self.conn is not None and self.conn.state is ConnectionState.OPEN:
            self.outbox.write(self.conn.send(TextMessage(orjson.dumps(message).decode())))

    def send_reply_message(self, message: dict[str, Any]) -> None:
        """Send `message` as a reply: exempt from the backlog cap up to its size (a history
        page, under 256 KiB)."""
        if self.conn is not None and self.conn.state is ConnectionState.OPEN:
            self.send_reply([self.conn.send(TextMessage(protocol.encode(message).decode()))])

    def send_event(self, event: Event) -> None:
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
        self,
        code: int,
        reason: str,
        drop_reason: str,
        now: float,
        *,
        discard_unsent: bool = False,
    ) -> None:
        """Close on the server's initiative, giving the peer until `now + CLOSE_GRACE` to
        answer (a deadline the I/O layer enforces, `drop_reason` its reason)."""
        self.drop_reason = self.drop_reason or drop_reason
        self.close(code, reason, discard_unsent=discard_unsent)
        grace_ends = now + CLOSE_GRACE
        deadlines = self.policy.deadlines
        deadlines[self] = min(deadlines.get(self, grace_ends), grace_ends)

    def heartbeat(self, now: float) -> None:
        """The server's ping round: ping an upgraded client, or close it (1001, with a grace,
        as for shutdown) when nothing came from it for `idle_timeout`. Any bytes from the peer
        (a pong included) count as life."""
        if self.connected_at is None or self.outbox.sealed:
            return
        if now - self.last_seen > self.policy.limits.idle_timeout:
            self.linger_close(CLOSE_GOING_AWAY, "idle timeout", "idle_timeout", now)
        else:
            self.ping_outstanding = True
            self.send_frame(PING_FRAME)
