"""Sans-IO: the client side of one WebSocket connection (wsproto underneath), no sockets, no clock.

Bytes from the peer go in (`ClientCore.receive`), connection events come out (`Accepted`,
`Refused`, `Message`, `Pong`, `Closed`); whatever must go to the peer (the handshake, a text
message, a ping, a close frame, and the automatic answers to the peer's pings and close frame)
comes out of `ClientCore.data_to_send`, in the order it was produced. The I/O layer
(`agentspoonsd.client`) moves bytes between this object and a stream, on any event loop.

Guarantees: a text message is reported whole (fragments joined), at most `max_message`
characters; a longer one is answered with close 1009 and not reported. A peer's ping is answered
with a pong, a peer's close frame with the same code (RFC 6455 §5.5.1). The end of the byte stream
before a close frame is reported as ``Closed(1006)``. After `Closed`, nothing more is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Accepted",
    "ClientCore",
    "Closed",
    "Event",
    "Message",
    "PongReceived",
    "Refused",
]

ABNORMAL = 1006  # RFC 6455: no close frame was received (never sent on the wire)
TOO_BIG = 1009
_MAX_REFUSAL_BODY = 64 * 1024  # a refusal's body is a short JSON object; more is not kept


@dataclass(frozen=True, slots=True)
class Accepted:
    """The server accepted the upgrade (101): messages may flow."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The server answered the upgrade with an HTTP status other than 101."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message: `str` for a text message, `bytes` for a binary one."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection ended: the peer's close frame, or `ABNORMAL` when the stream ended first
    (or the handshake could not be read)."""

    code: int
    reason: str = ""


Event = Accepted | Refused | Message | PongReceived | Closed


class ClientCore:
    """One client connection's protocol state. Not thread-safe; one I/O driver owns it."""

    def __init__(
        self,
        host: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        max_message: int = 64 * 1024 * 1024,
    ) -> None:
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._out = bytearray(
            self._ws.send(Request(host=host, target=target, extra_headers=list(headers)))
        )
        self._max_message = max_message
        self._parts: list[str | bytes | bytearray] = []
        self._size = 0
        self._too_big = False
        self._refusal: tuple[int, tuple[tuple[bytes, bytes], ...]] | None = None
        self._refusal_body = bytearray()
        self.accepted = False
        self.closed: Closed | None = None  # set once `Closed` was reported

    @property
    def can_send(self) -> bool:
        """True while messages may be sent (accepted, and no close frame sent or received)."""
        return self.closed is None and self._ws.state is ConnectionState.OPEN

    @property
    def close_sent(self) -> bool:
        return self._ws.state in (ConnectionState.LOCAL_CLOSING, ConnectionState.CLOSED)

    def data_to_send(self) -> bytes:
        """Everything produced so far that the peer has not been given; empties the outbox."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def send_text(self, text: str) -> None:
        """Queue a text message. Raises `LocalProtocolError` when the connection is not open."""
        if not self.can_send:
            raise LocalProtocolError("the connection is not open")
        self._out += self._ws.send(TextMessage(data=text))

    def ping(self, payload: bytes = b"") -> None:
        if self.can_send:
            self._out += self._ws.send(Ping(payload=payload))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Queue a close frame, unless one was sent already or the connection is not open."""
        if self.can_send:
            self._out += self._ws.send(CloseConnection(code=code, reason=reason))

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer (``b""``: the stream ended); return the events they make."""
        if self.closed is not None:
            return []
        if not data:
            return self._end(Closed(ABNORMAL, "the connection ended without a close frame"))
        events: list[Event] = []
        try:
            self._ws.receive_data(data)
            for event in self._ws.events():
                found = self._event(event)
                if found is not None:
                    events.append(found)
                    if isinstance(found, Closed | Refused):
                        self.closed = found if isinstance(found, Closed) else Closed(ABNORMAL)
                        break
        except RemoteProtocolError as exc:  # an unreadable handshake answer
            events += self._end(Closed(ABNORMAL, f"bad handshake answer: {exc}"))
        return events

    def _end(self, closed: Closed) -> list[Event]:
        self.closed = closed
        return [closed]

    def _event(self, event: object) -> Event | None:
        match event:
            case AcceptConnection():
                self.accepted = True
                return Accepted()
            case RejectConnection(status_code=status, headers=headers, has_body=has_body):
                self._refusal = (status, tuple(headers))
                return None if has_body else Refused(status, tuple(headers), b"")
            case RejectData(data=data, body_finished=finished):
                room = _MAX_REFUSAL_BODY - len(self._refusal_body)
                self._refusal_body += data[: max(0, room)]
                if not finished or self._refusal is None:
                    return None
                return Refused(*self._refusal, bytes(self._refusal_body))
            case TextMessage() | BytesMessage():
                return self._data(event)
            case Ping():
                if self._ws.state is ConnectionState.OPEN:
                    self._out += self._ws.send(event.response())
                return None
            case Pong(payload=payload):
                return PongReceived(bytes(payload))
            case CloseConnection(code=code, reason=reason):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:  # answer it
                    self._out += self._ws.send(event.response())
                return Closed(code, reason or "")
        return None

    def _data(self, event: TextMessage | BytesMessage) -> Message | None:
        if not self._too_big:
            self._parts.append(event.data)
            self._size += len(event.data)
            if self._size > self._max_message:
                self._too_big = True
                self._parts.clear()
                self.close(TOO_BIG, "message too big")
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        if self._too_big:
            self._too_big = False
            return None
        # A message's frames all have its first frame's type (wsproto rejects a continuation of
        # the other kind, RFC 6455 5.4), so the parts are all str or all bytes.
        if isinstance(event, TextMessage):
            return Message("".join(cast("list[str]", parts)))
        return Message(b"".join(cast("list[bytes | bytearray]", parts)))
