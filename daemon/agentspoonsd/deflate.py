"""permessage-deflate (RFC 7692) with bounded inflation: no compressed message is a bomb.

wsproto's `PerMessageDeflate` inflates every chunk of a compressed frame in full: a 256 KiB
message of zeros becomes 256 MiB of text before anything can look at its size. `BoundedDeflate`
replaces its inbound side, sans-IO like the rest of wsproto (bytes in, bytes or a close code out):

- a message's inflated size is counted across its chunks, frames and fragments, and inflation
  asks zlib for at most one byte more than the message may still grow: past
  `max_message_size` the extension answers `CloseReason.MESSAGE_TOO_BIG`, which wsproto turns
  into a close event with code 1009. No more than `max_message_size + 1` bytes of a message are
  ever inflated, and no unconsumed input is kept between chunks.
- a message's payload on the wire is bounded too, by each frame's declared length as its header
  arrives (before any payload): at most `wire_limit(max_message_size)`, the worst-case size of
  a message of `max_message_size` bytes deflated, with room to spare. This also bounds
  uncompressed messages and compressed input that inflates to nothing.
- `stop_inflating` (called once the server has sent its close frame) turns every later
  compressed payload into nothing without inflating it: a peer that keeps sending after the
  close costs no inflation.

The outbound side (the greeting, replies) is wsproto's, unchanged.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

# The empty stored block a sender strips from the end of each compressed message (RFC 7692
# §7.2.2); the receiver appends it back before inflating the message's end.
_MESSAGE_TAIL = b"\x00\x00\xff\xff"
_RSV1_USED = RsvBits(True, False, False)


def wire_limit(max_message_size: int) -> int:
    """The most payload bytes a message may have on the wire, compressed or not.

    Deflate expands incompressible input by 5 bytes per stored block of up to 64 KiB (zlib's
    `deflateBound` is about n/4096 + 13 for raw deflate); n/64 + 1 KiB also covers senders that
    sync-flush every fragment.
    """
    return max_message_size + max_message_size // 64 + 1024


class BoundedDeflate(PerMessageDeflate):
    """A `PerMessageDeflate` whose inbound messages can never inflate past `max_message_size`.

    Guarantees, for every sequence of frames and chunks wsproto hands it: it holds at most one
    chunk of inflated output (at most `max_message_size + 1` bytes) and zlib's window; a message
    whose inflated size passes `max_message_size`, or whose payload on the wire passes
    `wire_limit(max_message_size)`, is answered with `CloseReason.MESSAGE_TOO_BIG` no later than
    the chunk that crosses the bound (the frame header, for the wire bound).
    """

    def __init__(
        self,
        max_message_size: int,
        *,
        client_no_context_takeover: bool = False,
        client_max_window_bits: int | None = None,
        server_no_context_takeover: bool = False,
        server_max_window_bits: int | None = None,
    ) -> None:
        super().__init__(
            client_no_context_takeover=client_no_context_takeover,
            client_max_window_bits=client_max_window_bits,
            server_no_context_takeover=server_no_context_takeover,
            server_max_window_bits=server_max_window_bits,
        )
        self.max_message_size = max_message_size
        self._wire_limit = wire_limit(max_message_size)
        self._in_control = False  # the current frame is a control frame (never compressed)
        self._compressed = False  # the current message is compressed (RSV1 on its first frame)
        self._inflated = 0  # inflated bytes of the current compressed message so far
        self._wire = 0  # declared payload bytes of the current message's frames so far
        self._stopped = False

    def stop_inflating(self) -> None:
        """Inflate nothing more: later compressed payloads are dropped, control frames still pass.

        For a connection that is closing: only the peer's close frame matters any more. The
        decompressor (and its 32 KiB window) is freed now."""
        self._stopped = True
        self._decompressor = None

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        # Message state is kept apart from control frames: a ping between two fragments of a
        # compressed message must not make the rest of that message look uncompressed.
        if opcode.iscontrol():
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR
            self._in_control = True
            return _RSV1_USED
        self._in_control = False
        if opcode is Opcode.CONTINUATION:
            if rsv.rsv1:  # only a message's first frame may carry RSV1 (RFC 7692 §6.1)
                return CloseReason.PROTOCOL_ERROR
        else:  # TEXT or BINARY: a new message (one while another is open is wsproto's error)
            self._compressed = rsv.rsv1
            self._inflated = 0
            self._wire = 0
            if rsv.rsv1 and self._decompressor is None and not self._stopped:
                bits = self.server_max_window_bits if proto.client else self.client_max_window_bits
                self._decompressor = zlib.decompressobj(-bits)
        self._wire += payload_length
        if self._wire > self._wire_limit:
            return CloseReason.MESSAGE_TOO_BIG
        return _RSV1_USED

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if self._in_control or not self._compressed:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if self._in_control or not fin or not self._compressed:
            return None
        self._compressed = False
        # No `flush()`: zlib already returned everything the input produced (the loop never
        # leaves input unconsumed), and `flush()` would inflate any leftover input unbounded.
        data = self._inflate(_MESSAGE_TAIL)
        no_context_takeover = (
            self.server_no_context_takeover if proto.client else self.client_no_context_takeover
        )
        if no_context_takeover:
            self._decompressor = None
        return data

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        """Inflate one chunk of the current message, at most one byte past its allowance."""
        decompressor = self._decompressor
        if self._stopped or decompressor is None:
            return b""
        allowance = self.max_message_size - self._inflated
        try:
            # max_length = allowance + 1: reaching it proves the message too big, and zlib
            # stops there instead of inflating the rest of the chunk.
            out = decompressor.decompress(data, allowance + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self.max_message_size:
            # The stream is abandoned mid-message: drop it (and its unconsumed input) now.
            self._decompressor = None
            self._stopped = True
            return CloseReason.MESSAGE_TOO_BIG
        return out
