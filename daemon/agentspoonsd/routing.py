"""Sans-IO: what the server answers an upgraded client (docs/PROTOCOL.md "Client → server").

`Router` greets a connection once its upgrade is admitted (the `connected` message, the
subscriptions its URL asks for, the resumptions it asks for) and answers each text message it
sends: ping, subscribe, unsubscribe, history, resume. Every request is charged against the
connection's per-second `Budget`, and every error reply against its error window. Replies are
written to the connection (`ServerConnection.send_message`), subscriptions are the hub's; the
time is an argument. No sockets, no event loop.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from wsproto.events import BytesMessage, TextMessage

from . import protocol
from .closecodes import CLOSE_POLICY, CLOSE_TOO_BIG
from .protocol import ErrorCode, RequestError
from .upgrade import UpgradeRequest, negotiate_deflate

if TYPE_CHECKING:
    from .auth import Grant
    from .connection import Policy, ServerConnection

__all__ = ["ERROR_WINDOW", "Budget", "MessageAssembler", "Router"]

ERROR_WINDOW = 10.0  # seconds over which a client's errors are counted


class Budget:
    """A client's request rate and recent errors; made on its first message (most never send)."""

    __slots__ = ("errors", "second", "sent")

    def __init__(self) -> None:
        self.second = -1  # the whole second `sent` counts
        self.sent = 0
        self.errors: deque[float] = deque()


class Router:
    """The request policy of one server, shared by its connections: reads the limits in force
    from `policy` at each decision (a reload replaces them)."""

    __slots__ = ("_policy",)

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    def welcome(
        self, conn: ServerConnection, request: UpgradeRequest, grant: Grant, now: float
    ) -> None:
        """Complete an admitted upgrade: 101, a ping and `connected` (see
        `ServerConnection.accept`), then an error per unusable symbol of the URL, then the
        subscriptions and resumptions it asks for (docs/PROTOCOL.md "Connecting")."""
        policy = self._policy
        hub = policy.hub
        available = [s for s in hub.symbols if grant.allows(s)]
        errors: list[dict[str, Any]] = []
        try:
            options = protocol.parse_connect_target(request.target)
        except RequestError as exc:
            options, errors = protocol.ConnectOptions(None, ()), [exc.reply]
        if not available:  # a token scoped to nothing is told so, not sent a silent stream
            errors.insert(0, protocol.no_symbols_error(grant.name, hub.symbols))
        resume = []
        for symbol, seq in options.resume:
            problem = self._symbol_problem(grant, symbol)
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
                problem = self._symbol_problem(grant, symbol)
                if problem is None:
                    initial.append(symbol)
                else:
                    errors.append(problem)
        initial = [s for s in initial if s not in resumed]  # resume wins over a plain subscribe
        subscribed = [s for s in hub.symbols if s in resumed or s in initial]
        limits = policy.limits
        deflate = (
            negotiate_deflate(request, limits.max_message_size)
            if limits.permessage_deflate
            else None
        )
        conn.accept(
            request,
            protocol.connected_message(
                policy.wall_clock(),
                token=grant.name,
                symbols=subscribed,
                available=available,
                history_size=hub.history.size,
                ping_interval=limits.ping_interval,
                idle_timeout=limits.idle_timeout,
            ),
            deflate,
        )
        policy.log.info(
            "client_connected", **conn.peer_fields(), token=grant.name, symbols=len(subscribed)
        )
        if conn.finished:  # the 101 could not be written: the peer is already gone
            return
        for error in errors:
            self.send_error(conn, error, now)
        hub.subscribe(conn, initial)
        for symbol, seq in resume:
            hub.resume(conn, symbol, seq)

    def on_message(
        self, conn: ServerConnection, event: TextMessage | BytesMessage, now: float
    ) -> None:
        """Take one data frame of an open connection: a request once its text is whole."""
        if conn.assembler is None:  # most clients never send anything: allocate on first use
            conn.assembler = MessageAssembler(self._policy.limits.max_message_size)
        assembler = conn.assembler
        text = assembler.feed(event)
        if assembler.too_large:
            self.message_too_large(conn, now)
        elif isinstance(event, BytesMessage):
            if event.message_finished:
                self.send_error(
                    conn,
                    protocol.error_message(
                        ErrorCode.BINARY_UNSUPPORTED,
                        "binary messages are not supported; send JSON text",
                    ),
                    now,
                )
        elif text is not None:
            self.on_request(conn, text, now)

    def message_too_large(self, conn: ServerConnection, now: float) -> None:
        """Answer a message over `max_message_size`: an error reply, then close 1009."""
        limit = self._policy.limits.max_message_size
        conn.send_message(
            protocol.error_message(
                ErrorCode.MESSAGE_TOO_LARGE, f"messages are limited to {limit} bytes"
            )
        )
        conn.linger_close(CLOSE_TOO_BIG, "message too large", "message_too_large", now)

    def on_request(self, conn: ServerConnection, text: str, now: float) -> None:
        """Answer one text message of an upgraded client (docs/PROTOCOL.md "Client → server")."""
        if not self.charge(conn, now):
            return
        hub = self._policy.hub
        try:
            request = protocol.parse_request(text, history_size=hub.history.size)
        except RequestError as exc:
            self.send_error(conn, exc.reply, now)
            return
        grant = conn.grant
        assert grant is not None
        if isinstance(request, protocol.Ping):
            conn.send_message(protocol.pong_message(self._policy.wall_clock()))
        elif isinstance(request, protocol.Subscribe):
            wanted = self._expand(grant, request.symbols)
            if self._report_problems(conn, grant, wanted, now):
                return
            hub.subscribe(conn, wanted)
            conn.send_message(protocol.subscribed_message(hub.subscriptions(conn)))
        elif isinstance(request, protocol.Unsubscribe):
            if protocol.ALL in request.symbols:
                hub.unsubscribe_all(conn)
            else:
                unknown = [s for s in request.symbols if s not in hub.symbol_set]
                if unknown:
                    self._report_problems(conn, grant, unknown[:1], now)
                    return
                hub.unsubscribe(conn, request.symbols)
            conn.send_message(protocol.unsubscribed_message(hub.subscriptions(conn)))
        elif isinstance(request, protocol.HistoryRequest):
            if self._report_problems(conn, grant, [request.symbol], now):
                return
            reply, count = hub.history_page(request.symbol, request.limit, request.before_seq)
            if not self.charge(conn, now, protocol.request_cost(request, count) - 1):
                return
            conn.send_reply_message(reply)  # under 256 KiB, exempt from the backlog cap
        else:  # Resume
            symbols = [symbol for symbol, _ in request.positions]
            if self._report_problems(conn, grant, symbols, now):
                return
            current = hub.subscriptions(conn)
            taken = [s for s in symbols if s in current]
            if taken:
                self.send_error(
                    conn,
                    protocol.error_message(
                        ErrorCode.ALREADY_SUBSCRIBED,
                        f"already receiving {taken[0]!r}: resume is for symbols not subscribed",
                        symbol=taken[0],
                    ),
                    now,
                )
                return
            replayed = sum(hub.replay_size(symbol, seq) for symbol, seq in request.positions)
            if not self.charge(conn, now, protocol.request_cost(request, replayed) - 1):
                return
            after = [s for s in hub.symbols if s in current or s in symbols]
            conn.send_message(protocol.subscribed_message(after))
            for symbol, seq in request.positions:
                hub.resume(conn, symbol, seq)

    def _symbol_problem(self, grant: Grant, symbol: str) -> dict[str, Any] | None:
        """The error for a symbol this connection may not use, or None."""
        if symbol not in self._policy.hub.symbol_set:
            return protocol.error_message(
                ErrorCode.UNKNOWN_SYMBOL, f"no such symbol: {symbol!r}", symbol=symbol
            )
        if not grant.allows(symbol):
            return protocol.error_message(
                ErrorCode.FORBIDDEN_SYMBOL, f"this token may not see {symbol!r}", symbol=symbol
            )
        return None

    def _expand(self, grant: Grant, symbols: tuple[str, ...]) -> list[str]:
        if protocol.ALL in symbols:
            return [s for s in self._policy.hub.symbols if grant.allows(s)]
        return list(symbols)

    def _report_problems(
        self, conn: ServerConnection, grant: Grant, symbols: list[str], now: float
    ) -> bool:
        """Send the error for the first unusable symbol; True when there was one."""
        for symbol in symbols:
            problem = self._symbol_problem(grant, symbol)
            if problem is not None:
                self.send_error(conn, problem, now)
                return True
        return False

    def charge(self, conn: ServerConnection, now: float, cost: int = 1) -> bool:
        """Count `cost` (see `protocol.request_cost`) against the client's per-second budget;
        False (and an error) once this second's budget is spent.

        A request is admitted while any of the budget is left, and what it costs beyond the
        budget is owed: each new second pays back one budget, so a replay worth five seconds of
        messages leaves the client rate-limited for about five seconds. `cost` 0 admits."""
        budget = conn.budget
        if budget is None:
            budget = conn.budget = Budget()
        if cost <= 0:
            return True
        per_second = self._policy.limits.max_client_messages_per_second
        second = int(now)
        if second != budget.second:
            budget.sent = max(0, budget.sent - per_second * (second - budget.second))
            budget.second = second
        if budget.sent < per_second:
            budget.sent += cost
            return True
        self.send_error(
            conn,
            protocol.error_message(
                ErrorCode.RATE_LIMITED, f"more than {per_second} messages per second"
            ),
            now,
        )
        return False

    def send_error(self, conn: ServerConnection, reply: dict[str, Any], now: float) -> None:
        """Send an error reply; past `max_client_errors` in ERROR_WINDOW, close with 1008."""
        policy = self._policy
        policy.stats.client_errors += 1
        policy.log.debug("client_message_rejected", **conn.peer_fields(), code=reply["code"])
        conn.send_message(reply)
        budget = conn.budget
        if budget is None:
            budget = conn.budget = Budget()
        errors = budget.errors
        errors.append(now)
        while errors and errors[0] <= now - ERROR_WINDOW:
            errors.popleft()
        if len(errors) > policy.limits.max_client_errors:
            policy.log.info("client_too_many_errors", **conn.peer_fields(), errors=len(errors))
            conn.linger_close(CLOSE_POLICY, "too many errors", "too_many_errors", now)


class MessageAssembler:
    """Joins fragmented messages, enforcing the inbound size limit as the bytes arrive."""

    __slots__ = ("_max_size", "_parts", "_size", "too_large")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._size = 0
        self._parts: list[str] = []
        self.too_large = False

    def feed(self, event: TextMessage | BytesMessage) -> str | None:
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
