"""
Tests of tunnelkit.transport.websocket: the local proxy's WebSocket client, run in memory (iosim)
against an autobahn server or a raw HTTP answer, on an injected clock.
"""

import os
import struct

import txaio
import txaio.testutil
from autobahn.websocket.xormasker import create_xor_masker
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunnelkit.protocol.framing import Message, encode_message
from tunnelkit.transport.websocket import (
    PING_PERIOD,
    SUBPROTOCOL,
    ITunnelWebSocketHandler,
    TunnelWebSocketFactory,
    masked_frame,
    tunnel_url,
)

txaio.use_twisted()

TOKEN = "AQGAAXiVzSmRL1VaJ22G7eRb-source"
CLIENT_TOKEN = "2da438cf-9a30-4148-b236-c338182f243c"


@implementer(ITunnelWebSocketHandler)
class Handler:
    def __init__(self):
        self.opened = []
        self.messages = []
        self.ended = []

    def websocket_opened(self, websocket):
        self.opened.append(websocket)

    def messages_received(self, messages):
        self.messages.append(list(messages))

    def websocket_ended(self, websocket, ended):
        self.ended.append(ended)


class Server(WebSocketServerProtocol):
    """A test tunnel service: records the request, answers as told."""

    def onConnect(self, request):
        self.factory.requests.append(request)
        self.factory.servers.append(self)
        self.received = []
        self.pings = []
        answer = self.factory.answer
        if isinstance(answer, ConnectionDeny):
            raise answer
        return answer

    def onMessage(self, payload, isBinary):
        self.received.append((payload, isBinary))

    def onPing(self, payload):
        self.pings.append(payload)
        super().onPing(payload)


class RawAnswer(Protocol):
    """Answers the upgrade with fixed bytes (for non-101 answers with a body), or never."""

    def __init__(self, answer):
        self.answer = answer

    def dataReceived(self, data):
        if self.answer is not None:
            self.transport.write(self.answer)
            self.answer = None


class ClientSetup:
    """A client factory and an autobahn test server on an injected clock."""

    def setUp(self):
        self.clock = Clock()
        loop = txaio.testutil.replace_loop(self.clock)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.handler = Handler()
        self.factory = TunnelWebSocketFactory(
            tunnel_url(False, "127.0.0.1", 8080, "source"), TOKEN, CLIENT_TOKEN, self.handler, self.clock
        )
        self.server_factory = WebSocketServerFactory("ws://127.0.0.1:8080")
        self.server_factory.protocol = Server
        self.server_factory.requests = []
        self.server_factory.servers = []
        self.server_factory.answer = SUBPROTOCOL

    def connect(self, server=None):
        make_server = server or (lambda: self.server_factory.buildProtocol(None))
        client, server_protocol, self.pump = connectedServerAndClient(
            make_server, lambda: self.factory.buildProtocol(None), clock=self.clock
        )
        self.pump.flush()
        self.client = client
        return server_protocol


class WebSocketClientTests(ClientSetup, TestCase):
    def test_interface(self):
        verifyObject(ITunnelWebSocketHandler, self.handler)

    def test_handshake_and_pings(self):
        self.connect()
        (request,) = self.server_factory.requests
        self.assertEqual(request.path, "/tunnel")
        self.assertEqual(request.params, {"local-proxy-mode": ["source"]})
        self.assertEqual(request.headers["access-token"], TOKEN)
        self.assertEqual(request.headers["client-token"], CLIENT_TOKEN)
        self.assertEqual(request.protocols, [SUBPROTOCOL])
        self.assertNotIn("sec-websocket-extensions", request.headers)
        self.assertEqual(self.handler.opened, [self.client])
        server = self.server_factory.servers[0]
        self.clock.advance(1.5)
        self.assertEqual(server.pings, [b"0"])
        self.clock.advance(PING_PERIOD)
        self.pump.flush()
        self.assertEqual(server.pings, [b"0", str(int((PING_PERIOD + 1.5) * 1000)).encode()])
        self.assertFalse(repr(self.factory).count(TOKEN))

    def test_no_client_token_header_when_none(self):
        self.factory.client_token = None
        self.connect()
        self.assertNotIn("client-token", self.server_factory.requests[0].headers)

    def test_frames_in_and_out(self):
        self.connect()
        server = self.server_factory.servers[0]
        stream = encode_message(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH1"]))
        stream += encode_message(Message(type=Message.DATA, streamId=1, payload=b"x" * 100, serviceId="SSH1"))
        server.sendMessage(stream[:3], isBinary=True)  # split inside the second frame's... prefix
        server.sendMessage(stream[3:20], isBinary=True)
        server.sendMessage(stream[20:], isBinary=True)
        self.pump.flush()
        types = [[m.type for m in batch] for batch in self.handler.messages]
        self.assertEqual(types, [[Message.SERVICE_IDS], [Message.DATA]])
        self.assertEqual(self.handler.messages[1][0].payload, b"x" * 100)

        # batching: a boundary ends the message; others merge up to 131076 bytes
        self.client.send_frames(b"A" * 10, True)
        self.client.send_frames(b"B" * 10, False)
        self.client.send_frames(b"C" * 70000, False)
        self.client.send_frames(b"D" * 70000, False)
        self.client.flush()
        self.pump.flush()
        self.assertEqual(
            [(len(p), p[:1]) for p, binary in server.received],
            [(10, b"A"), (70010, b"B"), (70000, b"D")],
        )
        self.assertTrue(all(binary for _, binary in server.received))

    def test_text_message_closes(self):
        self.connect()
        self.server_factory.servers[0].sendMessage(b"hello", isBinary=False)
        self.pump.flush()
        self.clock.advance(5)
        self.pump.flush()
        (ended,) = self.handler.ended
        self.assertEqual(ended.kind, "retry")

    def test_garbage_frame_reconnects(self):
        self.connect()
        self.server_factory.servers[0].sendMessage(b"\x00\x03\xff\xff\xff", isBinary=True)
        self.pump.flush()
        (ended,) = self.handler.ended
        self.assertEqual(ended.kind, "retry")
        self.assertIn("bad data", ended.message)

    def close_from_server(self, code):
        self.connect()
        self.server_factory.servers[0].sendCloseFrame(code=code, reasonUtf8=b"bye now", isReply=False)
        self.pump.flush()
        self.clock.advance(5)
        self.pump.flush()
        (ended,) = self.handler.ended
        return ended

    def test_close_1000_ends(self):
        ended = self.close_from_server(1000)
        self.assertEqual((ended.kind, ended.code), ("closed", 1000))
        self.assertIn("Web socket close received. Code: 1000; Reason: bye now", ended.message)

    def test_close_1008_replaced(self):
        self.assertEqual(self.close_from_server(1008).kind, "replaced")

    def test_close_1011_retries(self):
        self.assertEqual(self.close_from_server(1011).kind, "retry")

    def test_refused_with_body(self):
        body = b"Invalid access token: The access token was previously used and cannot be used again"
        answer = (
            b"HTTP/1.1 403 Forbidden\r\nchannel-id: abc\r\nContent-Length: %d\r\n\r\n" % len(body)
        ) + body
        self.connect(lambda: RawAnswer(answer))
        self.clock.advance(1)
        self.pump.flush()
        (ended,) = self.handler.ended
        self.assertEqual((ended.kind, ended.code), ("rejected", 403))
        self.assertIn('(HTTP/1.1 403 Forbidden) "Invalid access token: The access token was previously used', ended.message)
        self.assertEqual(self.handler.opened, [])

    def test_refusal_reason(self):
        for header, reason in ((b"X-Tunnelkit-Refusal: token-used\r\n", "token-used"), (b"", None),
                               (b"x-tunnelkit-refusal: Not A Label!\r\n", None)):
            answer = b"HTTP/1.1 401 Unauthorized\r\n" + header + b"Content-Length: 2\r\n\r\nno"
            self.handler.ended = []
            self.connect(lambda: RawAnswer(answer))
            self.clock.advance(1)
            self.pump.flush()
            (ended,) = self.handler.ended
            self.assertEqual((ended.kind, ended.code, ended.reason), ("rejected", 401, reason))

    def test_refused_by_autobahn_server(self):
        self.server_factory.answer = ConnectionDeny(401, "Unauthorized")
        self.connect()
        self.clock.advance(1)
        self.pump.flush()
        (ended,) = self.handler.ended
        self.assertEqual((ended.kind, ended.code), ("rejected", 401))

    def test_5xx_retries(self):
        self.connect(lambda: RawAnswer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"))
        self.clock.advance(1)
        self.pump.flush()
        (ended,) = self.handler.ended
        self.assertEqual((ended.kind, ended.code), ("retry", 503))

    def test_no_subprotocol_retries(self):
        self.server_factory.answer = None
        self.connect()
        self.clock.advance(2)
        self.pump.flush()
        (ended,) = self.handler.ended
        self.assertEqual(ended.kind, "retry")
        self.assertIn("No websocket subprotocol returned", ended.message)
        self.assertEqual(self.handler.opened, [])

    def test_untrusted_certificate_explained(self):
        """A TLS verification failure says to give the CA, without OpenSSL 3's empty function name."""
        self.connect(lambda: RawAnswer(None))  # TLS fails before the upgrade's answer
        client = self.client
        client.wasNotCleanReason = "SSL error: certificate verify failed (in )"
        ended = client._outcome(False, None, None)
        self.assertEqual(ended.kind, "retry")
        self.assertIn("certificate verify failed (the service's certificate is not trusted", ended.message)
        self.assertIn("-c/--capath", ended.message)
        self.assertNotIn("(in )", ended.message)

    def test_plain_upgrade_dropped_suggests_tls(self):
        """A ws:// upgrade the far end drops (a TLS port, say) suggests wss://."""
        self.connect(lambda: RawAnswer(None))
        self.client.wasNotCleanReason = "peer dropped the TCP connection without previous WebSocket closing handshake"
        ended = self.client._outcome(False, None, None)
        self.assertIn("use wss://HOST:PORT or HOST:PORT in -e", ended.message)

    def test_tls_upgrade_dropped_asks_for_the_address(self):
        self.factory.isSecure = True
        self.connect(lambda: RawAnswer(None))
        self.client.wasNotCleanReason = "peer dropped the TCP connection without previous WebSocket closing handshake"
        ended = self.client._outcome(False, None, None)
        self.assertIn("is -e the tunnel service's address? if it listens without TLS, use ws://", ended.message)

    def test_handshake_timeout(self):
        self.connect(lambda: RawAnswer(None))
        self.clock.advance(29)
        self.assertEqual(self.handler.ended, [])
        self.clock.advance(2)
        self.pump.flush()
        (ended,) = self.handler.ended
        self.assertEqual(ended.kind, "retry")
        self.assertIn("no answer", ended.message)
        self.assertEqual(self.clock.getDelayedCalls(), [])


def server_frame(payload, opcode=0x2):
    """An unmasked, final WebSocket frame as a service sends it."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, size))
    elif size < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


class MaskedFrameTests(TestCase):
    def test_same_as_autobahn(self):
        mask = b"\x9a\x01\xff\x3c"
        for size in (0, 1, 3, 63, 64, 65, 1000, 64512, 129052):
            payload = os.urandom(size)
            expected = create_xor_masker(mask, size).process(payload) if size else b""
            self.assertEqual(masked_frame(b"HDR", mask, [payload]), b"HDR" + expected)
            half = size // 2
            parts = [payload[:half], memoryview(payload)[half:]]
            self.assertEqual(masked_frame(b"", mask, parts), expected)

    def test_inputs_untouched(self):
        payload = bytes(range(256)) * 4
        copy = bytes(bytearray(payload))
        masked = masked_frame(b"", b"\x01\x02\x03\x04", [payload])
        self.assertEqual(payload, copy)
        self.assertNotEqual(masked, payload)
        self.assertEqual(masked_frame(b"", b"\x01\x02\x03\x04", [masked]), payload)


class FastReadTests(ClientSetup, TestCase):
    """Whole unmasked binary frames take the fast path, split anywhere; others autobahn's parser."""

    def test_frames_split_anywhere(self):
        self.connect()
        big = os.urandom(64512)
        frames = [
            encode_message(Message(type=Message.DATA, streamId=1, payload=big, serviceId="A")),
            encode_message(Message(type=Message.DATA, streamId=1, payload=b"small", serviceId="A")),
        ]
        raw = server_frame(frames[0] + frames[1]) + server_frame(frames[1])
        raw += server_frame(b"ping!", opcode=0x9) + server_frame(frames[0])
        for step in (1, 7, 1000, 65536, len(raw)):
            self.handler.messages = []
            for offset in range(0, len(raw), step):
                self.client.dataReceived(raw[offset : offset + step])
            payloads = [m.payload for batch in self.handler.messages for m in batch]
            self.assertEqual(payloads, [big, b"small", b"small", big], step)
        self.assertEqual(self.client.data, b"")
        self.assertEqual(self.handler.ended, [])

    def test_masked_frame_from_service_fails(self):
        self.connect()
        frame = bytearray(server_frame(b"\x00\x02\x08\x05"))
        frame[1] |= 0x80
        self.client.dataReceived(bytes(frame[:2]) + b"\x00\x00\x00\x00" + bytes(frame[2:]))
        self.pump.flush()
        self.clock.advance(5)
        self.pump.flush()
        self.assertEqual(self.handler.messages, [])
        (ended,) = self.handler.ended
        self.assertEqual(ended.kind, "retry")


class AllocatorTests(TestCase):
    def test_tune_allocator(self):
        import platform

        from tunnelkit.transport.websocket import tune_allocator

        self.assertEqual(tune_allocator(), platform.libc_ver()[0] == "glibc")


class BinaryFrameHeaderTests(TestCase):
    """L{binary_frame_header}: the fast paths' reading of a WebSocket frame header."""

    def test_lengths(self):
        from tunnelkit.transport.websocket import binary_frame_header

        self.assertEqual(binary_frame_header(b"\x82\x05hello", 0, masked=False), (2, 5))
        self.assertEqual(binary_frame_header(b"xx\x82\x7e\x01\x00", 2, masked=False), (6, 256))
        self.assertEqual(binary_frame_header(b"\x82\x7f" + (70000).to_bytes(8, "big"), 0, masked=False), (10, 70000))
        self.assertEqual(binary_frame_header(b"\x82\x85abcd", 0, masked=True), (6, 5))
        self.assertEqual(binary_frame_header(b"\x82\xfe\x01\x00abcd", 0, masked=True), (8, 256))

    def test_incomplete(self):
        from tunnelkit.transport.websocket import FRAME_INCOMPLETE, binary_frame_header

        for data in (b"", b"\x82", b"\x82\x7e\x01", b"\x82\x7f\x00\x00", b"\x82\x85ab"):
            self.assertEqual(binary_frame_header(data, 0, masked=data[1:2] == b"\x85"), (FRAME_INCOMPLETE, 0))

    def test_not_plain(self):
        from tunnelkit.transport.websocket import FRAME_NOT_PLAIN, binary_frame_header

        for data, masked in (
            (b"\x81\x05hello", False),  # text
            (b"\x02\x05hello", False),  # not final
            (b"\x89\x00", False),  # ping
            (b"\x82\x85abcd", False),  # masked toward a client
            (b"\x82\x05hello", True),  # unmasked toward a server
            (b"\x82\x7e\x00\x05", False),  # 16-bit length that fits in 7 bits
            (b"\x82\x7f" + (100).to_bytes(8, "big"), False),  # 64-bit length that fits in 16 bits
            (b"\x82\x7f" + (131077).to_bytes(8, "big"), False),  # larger than the protocol allows
        ):
            self.assertEqual(binary_frame_header(data, 0, masked), (FRAME_NOT_PLAIN, 0), data)


class MaskingKeyTests(SynchronousTestCase):
    def test_four_random_bytes_each_from_a_pool(self):
        from tunnelkit.transport.websocket import _MaskingKeys

        keys = _MaskingKeys()
        drawn = [keys() for _ in range(3 * _MaskingKeys.POOL // 4 + 1)]  # three pools and a bit
        self.assertEqual({len(k) for k in drawn}, {4})
        self.assertGreater(len(set(drawn)), len(drawn) * 0.99)  # 32-bit keys: collisions are rare
        self.assertEqual(keys._at, 4)  # the fourth pool, one key in
