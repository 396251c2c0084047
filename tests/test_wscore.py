"""agentspoonsd.wscore: the sans-IO client connection, against wsproto's server side."""

from __future__ import annotations

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from agentspoonsd.wscore import (
    ABNORMAL,
    Accepted,
    ClientCore,
    Closed,
    Message,
    PongReceived,
    Refused,
)


def pair(**options: int) -> tuple[ClientCore, WSConnection, Request]:
    """A client core and a server that has read its handshake."""
    core = ClientCore("h:1", "/?symbols=A", [(b"Authorization", b"Bearer t")], **options)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(core.data_to_send())
    (request,) = list(server.events())
    assert isinstance(request, Request)
    return core, server, request


def accepted(**options: int) -> tuple[ClientCore, WSConnection]:
    core, server, _ = pair(**options)
    assert core.receive(server.send(AcceptConnection())) == [Accepted()]
    return core, server


def test_handshake_carries_the_target_and_headers() -> None:
    _, _, request = pair()
    assert request.target == "/?symbols=A" and request.host == "h:1"
    assert (b"authorization", b"Bearer t") in [(k.lower(), v) for k, v in request.extra_headers]


def test_refusal_with_a_body_in_pieces() -> None:
    core, server, _ = pair()
    head = server.send(RejectConnection(status_code=401, headers=[(b"a", b"b")], has_body=True))
    first = server.send(RejectData(data=b'{"error": "invalid', body_finished=False))
    rest = server.send(RejectData(data=b'_token"}', body_finished=True))
    assert core.receive(head) == [] and core.receive(first) == []
    (refused,) = core.receive(rest)
    assert isinstance(refused, Refused) and refused.status == 401
    assert refused.body == b'{"error": "invalid_token"}' and (b"a", b"b") in refused.headers
    assert not core.can_send and core.receive(b"more") == []


def test_messages_whole_in_order_with_bytes_split_anywhere() -> None:
    core, server = accepted()
    wire = server.send(TextMessage(data="héllo", message_finished=False))
    wire += server.send(TextMessage(data=" wörld", message_finished=True))
    wire += server.send(BytesMessage(data=b"\x00\x01"))
    wire += server.send(Ping(payload=b"p"))
    wire += server.send(TextMessage(data="{}"))
    events = [e for i in range(len(wire)) for e in core.receive(wire[i : i + 1])]
    assert events == [Message("héllo wörld"), Message(b"\x00\x01"), Message("{}")]
    server.receive_data(core.data_to_send())  # the automatic pong
    assert [type(e).__name__ for e in server.events()] == ["Pong"]


def test_sends_pings_and_pongs() -> None:
    core, server = accepted()
    core.send_text('{"type": "ping"}')
    core.ping(b"k")
    server.receive_data(core.data_to_send())
    text, ping = list(server.events())
    assert isinstance(text, TextMessage) and text.data == '{"type": "ping"}'
    assert isinstance(ping, Ping)
    assert core.receive(server.send(ping.response())) == [PongReceived(b"k")]


def test_a_message_over_the_limit_is_refused_with_1009_not_reported() -> None:
    core, server = accepted(max_message=10)
    assert core.receive(server.send(TextMessage(data="x" * 11))) == []
    server.receive_data(core.data_to_send())
    (close,) = list(server.events())
    assert isinstance(close, CloseConnection) and close.code == 1009
    assert not core.can_send


def test_peer_close_is_answered_and_reported_once() -> None:
    core, server = accepted()
    assert core.receive(server.send(CloseConnection(code=4001, reason="revoked"))) == [
        Closed(4001, "revoked")
    ]
    server.receive_data(core.data_to_send())
    (answer,) = list(server.events())
    assert isinstance(answer, CloseConnection) and answer.code == 4001
    assert core.receive(b"") == [] and not core.can_send


def test_our_close_then_theirs_and_the_end_of_the_stream() -> None:
    core, server = accepted()
    core.close(1000)
    core.close(1000)  # once only
    server.receive_data(core.data_to_send())
    (close,) = list(server.events())
    assert core.close_sent and core.data_to_send() == b""
    assert core.receive(server.send(close.response())) == [Closed(1000)]
    assert core.data_to_send() == b""  # nothing to answer: we closed first


def test_end_of_stream_without_close_is_1006_even_mid_handshake() -> None:
    core, _, _ = pair()
    (closed,) = core.receive(b"")
    assert isinstance(closed, Closed) and closed.code == ABNORMAL
    garbage, _, _ = pair()
    (bad,) = garbage.receive(b"HTTP/1.1 nonsense\r\n\r\n")
    assert isinstance(bad, Closed) and bad.code == ABNORMAL
