"""
Tests for L{tunnelkit.protocol.framing}: byte-exact vectors, the encoder's limits, and the
incremental decoder over every way a byte stream can be split.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.errors import FramingError, ProtocolError
from tunnelkit.protocol.framing import (
    MAX_MESSAGE_SIZE,
    MAX_PAYLOAD_SIZE,
    MAX_WEBSOCKET_FRAME,
    FrameDecoder,
    Message,
    encode_frame,
    encode_message,
    parse_message,
)

# Reference section 1.5 (protoc --encode against AWS's Message.proto) and localproxy-observed.md.
VECTORS = [
    (
        Message(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1),
        "000b 0802 1001 2a03535348 3801",
    ),
    (
        Message(type=Message.DATA, streamId=1, payload=b"hi", serviceId="SSH", connectionId=1),
        "000f 0801 1001 22026869 2a03535348 3801",
    ),
    (
        Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH1", "HTTP1"]),
        "000f 0805 320453534831 32054854545031",
    ),
    (Message(type=Message.STREAM_RESET, streamId=1), "0004 0803 1001"),
    (Message(type=Message.SESSION_RESET), "0002 0804"),
    # An empty SERVICE_IDS: what the service sends for a tunnel without services.
    (Message(type=Message.SERVICE_IDS), "0002 0805"),
    # V1 style (localproxy -y V1): no service id, no connection id.
    (Message(type=Message.STREAM_START, streamId=1), "0004 0802 1001"),
    (Message(type=Message.DATA, streamId=1, payload=b"hi"), "0008 0801 1001 22026869"),
    # V3 connection messages.
    (
        Message(type=Message.CONNECTION_START, streamId=1, serviceId="SSH", connectionId=2),
        "000b 0806 1001 2a03535348 3802",
    ),
    (
        Message(type=Message.CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1),
        "000b 0807 1001 2a03535348 3801",
    ),
]


def frame_stream(seed: int, total: int) -> tuple[bytes, list[bytes]]:
    """At least C{total} bytes of random frames (bodies of 0 to 2,000 random bytes, a few big ones)."""
    rng = random.Random(seed)
    bodies: list[bytes] = []
    size = 0
    while size < total:
        length = rng.choice((0, 1, 2, rng.randrange(2000), rng.randrange(2000), MAX_MESSAGE_SIZE))
        body = rng.randbytes(length)
        bodies.append(body)
        size += 2 + length
    return b"".join(encode_frame(body) for body in bodies), bodies


class VectorTests(SynchronousTestCase):
    """The encoder produces, and the decoder reads, the reference's bytes exactly."""

    def test_encode(self) -> None:
        for message, wire in VECTORS:
            self.assertEqual(encode_message(message), bytes.fromhex(wire), message)

    def test_decode(self) -> None:
        decoder = FrameDecoder()
        stream = b"".join(bytes.fromhex(wire) for _, wire in VECTORS)
        bodies = decoder.feed(stream)
        self.assertEqual([parse_message(body) for body in bodies], [m for m, _ in VECTORS])
        self.assertEqual(decoder.buffered, 0)

    def test_frames_with_prefix(self) -> None:
        """The frames come back unchanged, prefix included, for relaying."""
        stream = b"".join(bytes.fromhex(wire) for _, wire in VECTORS)
        decoder = FrameDecoder()
        frames = decoder.frames_with_prefix(stream[:7]) + decoder.frames_with_prefix(stream[7:])
        self.assertEqual(frames, [bytes.fromhex(wire) for _, wire in VECTORS])


class EncoderTests(SynchronousTestCase):
    def test_largest_frame(self) -> None:
        body = b"x" * MAX_MESSAGE_SIZE
        self.assertEqual(encode_frame(body), b"\xff\xff" + body)

    def test_too_large(self) -> None:
        """A body that a 2-byte length cannot describe is refused with a clear message."""
        error = self.assertRaises(FramingError, encode_frame, b"x" * (MAX_MESSAGE_SIZE + 1))
        self.assertIn("65536 bytes", str(error))
        self.assertIsInstance(error, ProtocolError)

    def test_largest_data_message_fits(self) -> None:
        """A DATA message with the largest payload and a long service id fits one frame."""
        message = Message(
            type=Message.DATA,
            streamId=2**31 - 1,
            payload=b"x" * MAX_PAYLOAD_SIZE,
            serviceId="s" * 128,
            connectionId=2**32 - 1,
        )
        frame = encode_message(message)
        self.assertLessEqual(len(frame), MAX_MESSAGE_SIZE + 2)
        self.assertLessEqual(2 * len(frame), MAX_WEBSOCKET_FRAME)

    def test_empty_body(self) -> None:
        self.assertEqual(encode_frame(b""), b"\x00\x00")


class ParseTests(SynchronousTestCase):
    def test_parse_memoryview(self) -> None:
        body = bytes.fromhex(VECTORS[0][1])[2:]
        self.assertEqual(parse_message(memoryview(body)), VECTORS[0][0])

    def test_garbage(self) -> None:
        """Bytes that are not a Message raise FramingError naming the frame's size."""
        for garbage in (b"\x08", b"\xff\xff\xff", b"\x22\x05ab"):
            error = self.assertRaises(FramingError, parse_message, garbage)
            self.assertIn(f"{len(garbage)} bytes", str(error))

    def test_empty_body_is_type_zero(self) -> None:
        """An empty body parses as a message of type 0, which the rules then refuse."""
        self.assertEqual(parse_message(b"").type, 0)


class DecoderTests(SynchronousTestCase):
    def test_every_split(self) -> None:
        """A frame stream split in two at every byte position decodes to the same frames."""
        stream = b"".join(bytes.fromhex(wire) for _, wire in VECTORS)
        expected = [bytes.fromhex(wire)[2:] for _, wire in VECTORS]
        for cut in range(len(stream) + 1):
            decoder = FrameDecoder()
            self.assertEqual(decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]), expected, cut)
            self.assertEqual(decoder.buffered, 0)

    def test_every_split_three_pieces(self) -> None:
        """Split at every pair of positions (both inside prefixes and bodies)."""
        stream = b"".join(bytes.fromhex(wire) for _, wire in VECTORS[:4])
        expected = [bytes.fromhex(wire)[2:] for _, wire in VECTORS[:4]]
        for first in range(len(stream) + 1):
            for second in range(first, len(stream) + 1):
                decoder = FrameDecoder()
                frames = (
                    decoder.feed(stream[:first])
                    + decoder.feed(stream[first:second])
                    + decoder.feed(stream[second:])
                )
                self.assertEqual(frames, expected)

    def test_one_byte_at_a_time(self) -> None:
        stream, bodies = frame_stream(1, 20_000)
        decoder = FrameDecoder()
        frames = []
        for index in range(len(stream)):
            frames += decoder.feed(stream[index : index + 1])
        self.assertEqual(frames, bodies)

    def test_megabyte_random_splits(self) -> None:
        """1 MB of random frames, split at random points, in bytes, bytearray and memoryview pieces."""
        stream, bodies = frame_stream(2, 1_000_000)
        rng = random.Random(3)
        decoder = FrameDecoder()
        frames = []
        offset = 0
        kinds = (bytes, bytearray, memoryview)
        while offset < len(stream):
            size = rng.choice((1, 2, 3, rng.randrange(1500), rng.randrange(140_000)))
            piece = rng.choice(kinds)(stream[offset : offset + size])
            frames += decoder.feed(piece)
            offset += size
        self.assertEqual(len(frames), len(bodies))
        self.assertEqual(frames, bodies)
        self.assertEqual(decoder.buffered, 0)

    def test_buffered(self) -> None:
        """C{buffered} counts the bytes of the frame in progress."""
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b"\x00"), [])
        self.assertEqual(decoder.buffered, 1)
        self.assertEqual(decoder.feed(b"\x03ab"), [])
        self.assertEqual(decoder.buffered, 4)
        self.assertEqual(decoder.feed(b"c\x00"), [b"abc"])
        self.assertEqual(decoder.buffered, 1)

    def test_frames_are_bytes(self) -> None:
        """Frames never alias the caller's buffer: reusing the buffer does not change them."""
        buffer = bytearray(b"\x00\x02hi\x00\x02yo")
        decoder = FrameDecoder()
        frames = decoder.feed(buffer)
        buffer[2:4] = b"XX"
        self.assertEqual(frames, [b"hi", b"yo"])
        self.assertTrue(all(type(frame) is bytes for frame in frames))

    def test_reused_buffer_across_pieces(self) -> None:
        """A caller that reuses one bytearray for every read still gets the right frames."""
        stream, bodies = frame_stream(4, 50_000)
        buffer = bytearray(1000)
        decoder = FrameDecoder()
        frames = []
        for offset in range(0, len(stream), 1000):
            piece = stream[offset : offset + 1000]
            buffer[: len(piece)] = piece
            frames += decoder.feed(memoryview(buffer)[: len(piece)])
            buffer[:] = b"\xee" * len(buffer)
        self.assertEqual(frames, bodies)

    def test_empty_feed(self) -> None:
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b""), [])
        decoder.feed(b"\x00")
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.buffered, 1)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        bodies=st.lists(st.binary(max_size=300), max_size=20),
        cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    )
    def test_any_chunking(self, bodies: list[bytes], cuts: list[int]) -> None:
        """Any frames, cut anywhere, come out whole and in order."""
        stream = b"".join(encode_frame(body) for body in bodies)
        points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
        decoder = FrameDecoder()
        frames = []
        for start, stop in zip(points, points[1:]):
            frames += decoder.feed(stream[start:stop])
        self.assertEqual(frames, bodies)
        self.assertEqual(decoder.buffered, 0)

    @settings(max_examples=200, deadline=None)
    @given(
        message_type=st.integers(min_value=0, max_value=7),
        stream_id=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        ignorable=st.booleans(),
        payload=st.binary(max_size=2000),
        service_id=st.text(max_size=20),
        available=st.lists(st.text(max_size=10), max_size=4),
        connection_id=st.integers(min_value=0, max_value=2**32 - 1),
        cut=st.integers(min_value=0, max_value=3000),
    )
    def test_message_round_trip(
        self,
        message_type: int,
        stream_id: int,
        ignorable: bool,
        payload: bytes,
        service_id: str,
        available: list[str],
        connection_id: int,
        cut: int,
    ) -> None:
        """Every field of every message survives encode, a split, decode and parse."""
        message = Message(
            type=message_type,
            streamId=stream_id,
            ignorable=ignorable,
            payload=payload,
            serviceId=service_id,
            availableServiceIds=available,
            connectionId=connection_id,
        )
        wire = encode_message(message)
        decoder = FrameDecoder()
        bodies = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
        self.assertEqual([parse_message(body) for body in bodies], [message])
