"""The opening handshake, sans-IO: every verdict of UpgradeParser and the answers it builds."""

from __future__ import annotations

import h11
import pytest

from agentspoonsd.upgrade import (
    MAX_REQUEST_HEAD,
    HandshakeError,
    UpgradeParser,
    UpgradeRequest,
    accept_response,
    negotiate_deflate,
    reject_response,
)

RFC_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example nonce
RFC_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def request(
    *,
    method: bytes = b"GET",
    target: bytes = b"/?access_token=x",
    version: bytes = b"1.1",
    drop: tuple[bytes, ...] = (),
    **overrides: bytes,
) -> bytes:
    headers = {
        b"Host": b"127.0.0.1:8765",
        b"Upgrade": b"websocket",
        b"Connection": b"Upgrade",
        b"Sec-WebSocket-Key": RFC_KEY,
        b"Sec-WebSocket-Version": b"13",
        b"Authorization": b"Bearer abc",
    }
    for name, value in overrides.items():
        headers[name.replace("_", "-").encode()] = value
    lines = [method + b" " + target + b" HTTP/" + version]
    lines += [name + b": " + value for name, value in headers.items() if name not in drop]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_a_valid_upgrade_is_accepted_whole() -> None:
    parsed = UpgradeParser().feed(request())
    assert parsed is not None
    assert parsed.target == "/?access_token=x"
    assert parsed.key == RFC_KEY
    assert (b"authorization", b"Bearer abc") in parsed.headers  # names lower-cased


def test_bytes_may_arrive_one_at_a_time() -> None:
    parser = UpgradeParser()
    data = request()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(r is None for r in results[:-1]) and results[-1] is not None


def test_header_tokens_are_case_insensitive_lists() -> None:
    data = request(Upgrade=b"WebSocket", Connection=b"keep-alive, Upgrade")
    assert UpgradeParser().feed(data) is not None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (request(method=b"POST"), 405),
        (request(version=b"1.0"), 400),
        (request(drop=(b"Host",)), 400),
        (request(drop=(b"Upgrade",)), 426),
        (request(Upgrade=b"h2c"), 426),
        (request(Connection=b"keep-alive"), 400),
        (request(Sec_WebSocket_Version=b"8"), 426),
        (request(drop=(b"Sec-WebSocket-Key",)), 400),
        (request(Sec_WebSocket_Key=b"c2hvcnQ="), 400),  # 5 bytes, not 16
        (request(Sec_WebSocket_Key=b"not base64!!"), 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426),  # a plain HTTP GET
        (request(Content_Length=b"5"), 400),  # a body, which would be read as frames
        (request(Transfer_Encoding=b"chunked"), 400),
        (request(Content_Length=b"5", Transfer_Encoding=b"chunked"), 400),  # framed twice
    ],
)
def test_refusals_carry_the_status_to_answer(data: bytes, status: int) -> None:
    with pytest.raises(HandshakeError) as refused:
        UpgradeParser().feed(data)
    assert refused.value.status == status


def test_an_empty_content_length_is_no_body() -> None:
    assert UpgradeParser().feed(request(Content_Length=b"0")) is not None


def test_426_names_what_is_expected() -> None:
    with pytest.raises(HandshakeError) as refused:
        UpgradeParser().feed(request(Sec_WebSocket_Version=b"8"))
    assert (b"Sec-WebSocket-Version", b"13") in refused.value.headers


def test_an_oversized_head_is_refused_however_it_arrives() -> None:
    huge = request(X_Padding=b"a" * MAX_REQUEST_HEAD)
    with pytest.raises(HandshakeError) as whole:
        UpgradeParser().feed(huge)
    assert whole.value.status == 431
    parser = UpgradeParser()
    with pytest.raises(HandshakeError) as piecewise:
        for i in range(0, len(huge), 1000):
            parser.feed(huge[i : i + 1000])
    assert piecewise.value.status == 431


def test_accept_response_is_rfc_6455() -> None:
    parsed = UpgradeParser().feed(request())
    assert parsed is not None
    response = accept_response(parsed)
    client = h11.Connection(h11.CLIENT)
    proposal = [("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade")]
    client.send(h11.Request(method="GET", target="/", headers=proposal))
    client.receive_data(response)
    event = client.next_event()
    assert isinstance(event, h11.InformationalResponse) and event.status_code == 101
    headers = dict(event.headers)
    assert headers[b"sec-websocket-accept"] == RFC_ACCEPT
    assert headers[b"upgrade"] == b"websocket"


def test_reject_response_is_well_formed_http() -> None:
    body = b'{"error":"missing_token"}'
    response = reject_response(401, body, b"application/json", ((b"WWW-Authenticate", b"Bearer"),))
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.receive_data(response)
    head = client.next_event()
    assert isinstance(head, h11.Response) and head.status_code == 401
    assert dict(head.headers)[b"www-authenticate"] == b"Bearer"
    assert dict(head.headers)[b"connection"] == b"close"
    data = client.next_event()
    assert isinstance(data, h11.Data) and data.data == body


@pytest.mark.parametrize(
    ("offer", "agreed"),
    [
        (b"permessage-deflate", b"permessage-deflate; server_no_context_takeover"),
        (
            b"permessage-deflate; client_max_window_bits",
            b"permessage-deflate; server_no_context_takeover; client_max_window_bits=15",
        ),
        (
            b"permessage-deflate; client_no_context_takeover",
            b"permessage-deflate; client_no_context_takeover; server_no_context_takeover",
        ),
        (
            b"x-webkit-deflate-frame, permessage-deflate",
            b"permessage-deflate; server_no_context_takeover",
        ),
        # The server's window must stay 15 bits: one compressed frame serves every client.
        (b"permessage-deflate; server_max_window_bits=10", None),
        (
            b"permessage-deflate; server_max_window_bits=10, permessage-deflate",
            b"permessage-deflate; server_no_context_takeover",
        ),
        (b"x-webkit-deflate-frame", None),
    ],
)
def test_deflate_negotiation(offer: bytes, agreed: bytes | None) -> None:
    request = UpgradeRequest("/", ((b"sec-websocket-extensions", offer),), b"k")
    result = negotiate_deflate(request, 65536)
    assert (result[1] if result else None) == agreed
    if result:
        assert result[0].enabled()
