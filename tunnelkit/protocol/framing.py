# -*- test-case-name: tests.test_framing -*-
"""
Tunnel frames: a 2-byte big-endian length, then that many bytes of a protobuf C{Message}.

The WebSocket byte stream of a tunnel is a plain concatenation of frames; a WebSocket message may hold
several frames or a piece of one, split anywhere (also inside the length prefix).
"""

from __future__ import annotations

import struct
from typing import List, Union, cast

from tunnelkit.errors import FramingError
from tunnelkit.protocol.message_pb2 import Message

__all__ = [
    "LENGTH_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_WEBSOCKET_FRAME",
    "FrameDecoder",
    "encode_frame",
    "encode_message",
    "parse_message",
    "Message",
]

#: Bytes of the length prefix.
LENGTH_SIZE = 2
#: The largest protobuf message a frame can hold.
MAX_MESSAGE_SIZE = 0xFFFF
#: The largest DATA payload a peer may send (63 KiB).
MAX_PAYLOAD_SIZE = 64512
#: The largest WebSocket frame payload either side may send.
MAX_WEBSOCKET_FRAME = 131076

_LENGTH = struct.Struct(">H")
_unpack_length = _LENGTH.unpack_from
_pack_length = _LENGTH.pack

Buffer = Union[bytes, bytearray, memoryview]


def encode_frame(body: bytes) -> bytes:
    """
    Prefix a serialized message with its length.

    @raise FramingError: if C{body} is longer than a frame can carry.
    """
    if len(body) > MAX_MESSAGE_SIZE:
        raise FramingError(
            f"message of {len(body)} bytes is larger than the {MAX_MESSAGE_SIZE}-byte frame limit"
        )
    return _pack_length(len(body)) + body


def encode_message(message: Message) -> bytes:
    """Serialize C{message} and frame it."""
    return encode_frame(message.SerializeToString())


def parse_message(body: Buffer) -> Message:
    """
    Parse the protobuf body of one frame (without its length prefix).

    @raise FramingError: if the bytes are not a valid C{Message}.
    """
    message = Message()
    try:
        message.ParseFromString(cast(bytes, body))  # any bytes-like object: no copy
    except Exception as e:  # protobuf raises DecodeError, or others for garbage
        raise FramingError(f"could not parse a tunnel frame of {len(body)} bytes: {e}") from None
    return message


class FrameDecoder:
    """
    Incremental decoder: feed it bytes as they arrive, get back whole frames.

    Each frame's body is copied exactly once, whatever the split: frames inside one piece are sliced
    out of it; a frame spread over several pieces is kept as a list of slices (of immutable
    C{bytes} pieces, without copying them) and joined once when its last byte arrives.  Mutable
    pieces (C{bytearray}, writable views) are copied when a part of them must be kept.
    """

    __slots__ = ("_high", "_parts", "_missing", "_held")

    def __init__(self) -> None:
        self._high = -1  # the first byte of a split length prefix, or -1
        self._parts: List[Buffer] = []  # body so far of the frame in progress
        self._missing = 0  # body bytes that frame still needs (0: none in progress)
        self._held = 0  # bytes held of the frame in progress, its prefix included

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete frame are held."""
        return self._held

    def feed(self, data: Buffer) -> List[bytes]:
        """
        Take C{data}; return the frames it completes, each as its body (no length prefix).
        """
        frames: List[bytes] = []
        missing = self._missing
        if missing:
            size = len(data)
            if size < missing:
                # The frame in progress goes on: keep the piece, nothing else to do.
                if size:
                    self._parts.append(data if type(data) is bytes else bytes(data))
                    self._missing = missing - size
                    self._held += size
                return frames
        view = data if isinstance(data, memoryview) else memoryview(data)
        end = len(view)
        offset = 0
        if missing:
            parts = self._parts
            parts.append(view[:missing])
            frames.append(b"".join(parts))
            parts.clear()
            self._missing = 0
            self._held = 0
            offset = missing
        elif self._high >= 0:
            if not end:
                return frames
            length = (self._high << 8) | view[0]
            self._high = -1
            self._held = 0
            offset = 1
            if end - offset < length:
                self._keep(view, offset, length)
                return frames
            frames.append(bytes(view[offset : offset + length]))
            offset += length
        while end - offset >= 2:
            (length,) = _unpack_length(view, offset)
            start = offset + 2
            stop = start + length
            if stop > end:
                self._keep(view, start, length)
                return frames
            frames.append(bytes(view[start:stop]))
            offset = stop
        if offset < end:
            self._high = view[offset]
            self._held = 1
        return frames

    def _keep(self, view: memoryview, start: int, length: int) -> None:
        """Hold C{view[start:]}, the beginning of a frame of C{length} body bytes."""
        piece: Buffer = view[start:]
        if not (view.readonly and type(view.obj) is bytes):
            piece = bytes(piece)  # the caller may reuse a mutable buffer
        held = len(piece)
        self._parts.append(piece)
        self._missing = length - held
        self._held = 2 + held

    def frames_with_prefix(self, data: Buffer) -> List[bytes]:
        """Like L{feed}, but each frame keeps its 2-byte length prefix (for relaying unchanged)."""
        return [_pack_length(len(body)) + body for body in self.feed(data)]
