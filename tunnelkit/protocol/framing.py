# -*- test-case-name: tests.test_framing -*-
"""
Tunnel frames: a 2-byte big-endian length, then that many bytes of a protobuf C{Message}.

The WebSocket byte stream of a tunnel is a plain concatenation of frames; a WebSocket message may hold
several frames or a piece of one, split anywhere (also inside the length prefix).
"""

from __future__ import annotations

import struct
from typing import List, Union

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
        message.ParseFromString(bytes(body) if isinstance(body, memoryview) else body)
    except Exception as e:  # protobuf raises DecodeError, or others for garbage
        raise FramingError(f"could not parse a tunnel frame of {len(body)} bytes: {e}") from None
    return message


class FrameDecoder:
    """
    Incremental decoder: feed it bytes as they arrive, get back whole frames.

    Bytes are copied at most twice whatever the split: once into the carry-over buffer when a frame
    is incomplete, once when the frame is sliced out.  No quadratic re-copying of a growing buffer.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete frame are held."""
        return len(self._buffer)

    def feed(self, data: Buffer) -> List[bytes]:
        """
        Take C{data}; return the frames it completes, each as its body (no length prefix).
        """
        frames: List[bytes] = []
        buf = self._buffer
        if not isinstance(data, memoryview):
            data = memoryview(data)  # slices below must not copy
        if buf:
            # Finish the frame in progress first, then go on with C{data} itself.
            need = _LENGTH.size - len(buf)
            if need > 0:
                buf += data[:need]
                data = data[need:]
                if len(buf) < _LENGTH.size:
                    return frames
            (length,) = _unpack_length(buf)
            missing = _LENGTH.size + length - len(buf)
            if missing > len(data):
                buf += data
                return frames
            buf += data[:missing]
            frames.append(bytes(buf[_LENGTH.size :]))
            data = data[missing:]
            buf.clear()
        view = data
        offset = 0
        end = len(view)
        while end - offset >= _LENGTH.size:
            (length,) = _unpack_length(view, offset)
            stop = offset + _LENGTH.size + length
            if stop > end:
                break
            frames.append(bytes(view[offset + _LENGTH.size : stop]))
            offset = stop
        if offset < end:
            buf += view[offset:]
        return frames

    def frames_with_prefix(self, data: Buffer) -> List[bytes]:
        """Like L{feed}, but each frame keeps its 2-byte length prefix (for relaying unchanged)."""
        return [_pack_length(len(body)) + body for body in self.feed(data)]
