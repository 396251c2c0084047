"""Server WebSocket frames, encoded once for every client (RFC 6455 §5.2; RFC 7692).

Server frames are unmasked, so one update's frame is the same bytes for every subscriber: the hub
encodes it here once (`encode_text_frame`, and `encode_deflate_frame` for the clients that
negotiated permessage-deflate) and the history keeps it. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import types

from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol


def encode_text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented server text frame carrying `payload` (UTF-8 JSON)."""
    return _encode_frame(payload, [])


def encode_deflate_frame(payload: bytes) -> bytes:
    """The same message compressed per RFC 7692 with no context takeover: a frame that every
    client which negotiated permessage-deflate (as `upgrade.negotiate_deflate` agrees it) can
    inflate, whatever it received before."""
    extension = PerMessageDeflate(server_no_context_takeover=True)
    extension.accept("permessage-deflate")
    return _encode_frame(payload, [extension])


def _encode_frame(payload: bytes, extensions: list[Extension]) -> bytes:
    protocol = FrameProtocol(client=False, extensions=extensions)
    try:
        return bytes(protocol.send_data(payload.decode(), fin=True))
    finally:
        release_frame_parser(protocol)


def release_frame_parser(protocol: FrameProtocol | None) -> None:
    """End `protocol`'s parser, so that the protocol is freed as soon as it is let go.

    wsproto's `FrameProtocol` parses with a generator that holds the protocol, which holds the
    generator: a cycle, left to the cyclic collector's full collections (a pause for every
    client). One such protocol per update encoded and per connection, at 100 reconnects/s, was
    ~4 MB of RSS a minute unless a full collection ran every 30 s. Closing the generator breaks
    the cycle. wsproto has no public call for it, so this reaches in, and does nothing if a later
    wsproto names things differently (a test notices the cycle coming back). Call it only once
    nothing is parsed with `protocol` any more.
    """
    parser = getattr(protocol, "_parse_more", None)
    if isinstance(parser, types.GeneratorType):
        parser.close()


def frame_payload(frame: bytes) -> bytes:
    """The payload of an unmasked, uncompressed frame made by `encode_text_frame`."""
    length = frame[1] & 0x7F
    return frame[2 + (2 if length == 126 else 8 if length == 127 else 0) :]
