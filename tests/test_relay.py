"""
Tests for L{tunnelkit.service.relay}: the handshake rules, relaying, peers, closing, flow control
and limits, with the real site and autobahn protocol over in-memory transports and a L{Clock}.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional

import txaio
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunnelkit.protocol.flowcontrol import (
    ANNOUNCE,
    EOF,
    EXTENSIONS_HEADER,
    OFFERED,
    WINDOW_UPDATE,
    announcement_frame,
    eof_frame,
    window_update_frame,
)
from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.service.interfaces import SOURCE, ITunnelEvents, ITunnelStateObserver, ITunnelStore
from tunnelkit.service.relay import (
    MAX_REQUEST_SIZE,
    HandshakeRejected,
    PeerProtocol,
    Relay,
    TokenBucket,
    check_handshake,
    new_channel_id,
)
from tunnelkit.testing import (
    V3,
    MemoryTunnelStore,
    RawPeer,
    ServiceHarness,
    tunnel_frame,
    upgrade_request,
)

DATA = Message.DATA
STREAM_START = Message.STREAM_START
STREAM_RESET = Message.STREAM_RESET
CONNECTION_START = Message.CONNECTION_START
CONNECTION_RESET = Message.CONNECTION_RESET
SERVICE_IDS = Message.SERVICE_IDS

CHANNEL_ID = re.compile(r"\A[0-9a-f]{16}-[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{16}-[0-9a-f]{8}\Z")
CLIENT_TOKEN = "2da438cf-9a30-4148-b236-c338182f243c"


def start(stream: int = 1, service: str = "SSH", connection: int = 1) -> bytes:
    return tunnel_frame(type=STREAM_START, streamId=stream, serviceId=service, connectionId=connection)


def data(payload: bytes, stream: int = 1, service: str = "SSH", connection: int = 1) -> bytes:
    return tunnel_frame(
        type=DATA, streamId=stream, serviceId=service, connectionId=connection, payload=payload
    )


class ServiceTestCase(SynchronousTestCase):
    """A harness on a L{Clock}, with autobahn's timers on the same clock."""

    options: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        txaio.use_twisted()
        old = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", old)
        self.harness = ServiceHarness(self.clock, self.options)
        self.relay: Relay = self.harness.events  # type: ignore[assignment]
        self.store: MemoryTunnelStore = self.harness.store
        self._ports = iter(range(40000, 50000))

    def connect(self, mode: str, token: Optional[str], **kwargs: Any) -> RawPeer:
        return RawPeer(self.harness.site, upgrade_request(mode, token, **kwargs), next(self._ports))

    def pair(self, services: tuple = ("SSH",), client_tokens: bool = False) -> tuple:
        tunnel = self.harness.open_tunnel(services)
        extra = [("client-token", CLIENT_TOKEN)] if client_tokens else []
        source = self.connect("source", tunnel.source_token, extra=extra)
        destination = self.connect(
            "destination", tunnel.destination_token, extra=[("client-token", "d" * 32)] if client_tokens else []
        )
        self.assertEqual((source.status, destination.status), (101, 101))
        source.take_frames()
        destination.take_frames()
        return tunnel, source, destination


class HandshakeCheckTests(SynchronousTestCase):
    """L{check_handshake} alone: each rejection, with its status."""

    def check(self, request: bytes, path: str = "/tunnel", params: Any = None, protocols: Any = (V3,)) -> Any:
        if params is None:
            params = {"local-proxy-mode": ["source"]}
        return check_handshake(request, path, params, protocols)

    def rejected(self, status: int, reason: str, *args: Any, **kwargs: Any) -> HandshakeRejected:
        error = self.assertRaises(HandshakeRejected, self.check, *args, **kwargs)
        self.assertEqual((error.status, error.reason), (status, reason), error.text)
        return error

    def test_accepts_the_reference_request(self) -> None:
        checked = self.check(upgrade_request("source", "tok", extra=[("client-token", CLIENT_TOKEN)]))
        self.assertEqual(
            (checked.mode, checked.access_token, checked.client_token, checked.subprotocol, checked.version),
            ("source", "tok", CLIENT_TOKEN, V3, 3),
        )

    def test_cookie_token(self) -> None:
        request = upgrade_request("source", None, extra=[("Cookie", "a=b; awsiot-tunnel-token=tok; c=d")])
        self.assertEqual(self.check(request).access_token, "tok")

    def test_too_large(self) -> None:
        request = upgrade_request("source", "tok", extra=[("x-pad", "p" * MAX_REQUEST_SIZE)])
        self.rejected(431, "request-too-large", request)

    def test_exactly_at_the_limit(self) -> None:
        request = upgrade_request("source", "tok")
        pad = MAX_REQUEST_SIZE - len(request) - len("x-pad: \r\n")
        request = upgrade_request("source", "tok", extra=[("x-pad", "p" * pad)])
        self.assertEqual(len(request), MAX_REQUEST_SIZE)
        self.check(request)
        request = upgrade_request("source", "tok", extra=[("x-pad", "p" * (pad + 1))])
        self.rejected(431, "request-too-large", request)

    def test_bad_path(self) -> None:
        self.rejected(400, "bad-path", upgrade_request("source", "tok"), path="/tunnel/x")

    def test_mode_missing_wrong_or_repeated(self) -> None:
        request = upgrade_request("source", "tok")
        self.rejected(400, "bad-mode", request, params={})
        self.rejected(400, "bad-mode", request, params={"local-proxy-mode": ["Source"]})
        self.rejected(400, "bad-mode", request, params={"local-proxy-mode": ["source", "source"]})

    def test_missing_token(self) -> None:
        self.rejected(401, "missing-token", upgrade_request("source", None))
        self.rejected(401, "missing-token", upgrade_request("source", ""))

    def test_token_twice(self) -> None:
        self.rejected(
            400, "duplicate-token", upgrade_request("source", "a", extra=[("access-token", "b")])
        )
        self.rejected(400, "duplicate-token", upgrade_request("source", "a,b"))
        self.rejected(
            400, "duplicate-token", upgrade_request("source", "a", extra=[("Cookie", "awsiot-tunnel-token=a")])
        )
        self.rejected(
            400,
            "duplicate-token",
            upgrade_request(
                "source", None, extra=[("Cookie", "awsiot-tunnel-token=a"), ("Cookie", "awsiot-tunnel-token=b")]
            ),
        )

    def test_client_token(self) -> None:
        self.rejected(
            400, "bad-client-token", upgrade_request("source", "a", extra=[("client-token", "short")])
        )
        self.rejected(
            400,
            "bad-client-token",
            upgrade_request("source", "a", extra=[("client-token", CLIENT_TOKEN), ("client-token", CLIENT_TOKEN)]),
        )
        self.rejected(
            400, "bad-client-token", upgrade_request("source", "a", extra=[("client-token", "x" * 31 + "!")])
        )

    def test_subprotocols(self) -> None:
        request = upgrade_request("source", "a")
        self.rejected(400, "no-subprotocol", request, protocols=[])
        self.rejected(400, "no-subprotocol", request, protocols=["chat"])
        for offered, version in [
            ("aws.iot.securetunneling-1.0", 1),
            ("aws.iot.securetunneling-2.0", 2),
            ("aws.iot.securedtunneling-1.0", 1),
        ]:
            checked = self.check(request, protocols=["chat", offered])
            self.assertEqual((checked.subprotocol, checked.version), (offered, version))
        both = self.check(request, protocols=["aws.iot.securetunneling-1.0", V3])
        self.assertEqual(both.subprotocol, V3)

    def test_channel_ids(self) -> None:
        ids = {new_channel_id(1.5) for _ in range(100)}
        self.assertEqual(len(ids), 100)
        for channel in ids:
            self.assertRegex(channel, CHANNEL_ID)


class HandshakeTests(ServiceTestCase):
    """Handshakes through the site, as clients see them."""

    def assertRefused(self, peer: RawPeer, status: int, text: str, reason: str) -> None:
        self.assertEqual(peer.status, status, peer.body)
        self.assertIn(text, peer.body.decode())
        self.assertRegex(peer.headers["channel-id"], CHANNEL_ID)
        self.assertEqual(peer.headers["content-type"], "text/plain; charset=utf-8")
        self.assertEqual(peer.headers["x-tunnelkit-refusal"], reason)  # what a tunnelkit client acts on
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(
            self.relay.metrics.value("tunnelkit_handshake_rejections_total", reason=reason), 1.0  # type: ignore[attr-defined]
        )

    def test_interfaces(self) -> None:
        verifyObject(ITunnelEvents, self.relay)
        verifyObject(ITunnelStore, self.store)

    def test_accepted(self) -> None:
        tunnel = self.harness.open_tunnel(["SSH1", "HTTP1"])
        peer = self.connect("source", tunnel.source_token)
        self.assertEqual(peer.status, 101)
        self.assertEqual(peer.headers["sec-websocket-protocol"], V3)
        self.assertRegex(peer.headers["channel-id"], CHANNEL_ID)
        self.assertEqual(
            peer.take_messages(), [tunnel_frame(type=SERVICE_IDS, availableServiceIds=["SSH1", "HTTP1"])]
        )
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, "source"), (True, self.clock.seconds()))
        self.assertIsInstance(peer.protocol, PeerProtocol)

    def test_empty_service_ids(self) -> None:
        tunnel = self.harness.open_tunnel([])
        for mode, token in [("source", tunnel.source_token), ("destination", tunnel.destination_token)]:
            peer = self.connect(mode, token, protocols=["aws.iot.securetunneling-1.0"])
            self.assertEqual(peer.headers["sec-websocket-protocol"], "aws.iot.securetunneling-1.0")
            self.assertEqual(peer.take_messages(), [b"\x00\x02\x08\x05"])

    def test_rejections(self) -> None:
        tunnel = self.harness.open_tunnel(["SSH"])
        self.assertRefused(self.connect("source", None), 401, "Missing access token", "missing-token")
        self.assertRefused(
            self.connect("source", tunnel.source_token, path="/tunnel/x"), 400, "/tunnel", "bad-path"
        )
        self.assertRefused(self.connect(None, tunnel.source_token), 400, "local-proxy-mode", "bad-mode")
        self.assertRefused(
            self.connect("source", tunnel.source_token, extra=[("access-token", "x")]),
            400,
            "exactly once",
            "duplicate-token",
        )
        self.assertRefused(
            self.connect("source", tunnel.source_token, extra=[("x-pad", "p" * 5000)]),
            431,
            "Request too large",
            "request-too-large",
        )
        self.assertRefused(
            self.connect("source", tunnel.source_token, protocols=["chat"]), 400, "subprotocol", "no-subprotocol"
        )
        self.assertRefused(
            self.connect("source", tunnel.source_token, extra=[("client-token", "x")]),
            400,
            "client token",
            "bad-client-token",
        )
        self.assertRefused(self.connect("source", "nonsense"), 401, "Invalid access token", "unknown-token")
        self.assertRefused(
            self.connect("destination", tunnel.source_token), 403, "local-proxy-mode is destination", "mode-mismatch"
        )
        # None of these spent the token:
        self.assertEqual(self.connect("source", tunnel.source_token).status, 101)

    def test_token_used_once(self) -> None:
        tunnel = self.harness.open_tunnel(["SSH"])
        first = self.connect("source", tunnel.source_token)
        first.lose()
        self.assertRefused(
            self.connect("source", tunnel.source_token),
            401,
            "Invalid access token: The access token was previously used and cannot be used again",
            "token-used",
        )

    def test_client_token_reconnects(self) -> None:
        tunnel = self.harness.open_tunnel(["SSH"])
        extra = [("client-token", CLIENT_TOKEN)]
        self.assertEqual(self.connect("source", tunnel.source_token, extra=extra).status, 101)
        self.assertEqual(self.connect("source", tunnel.source_token, extra=extra).status, 101)
        self.assertRefused(
            self.connect("source", tunnel.source_token, extra=[("client-token", "e" * 40)]),
            401,
            "Invalid client token: The provided client token does not match",
            "client-token-mismatch",
        )

    def test_closed_rotated_expired(self) -> None:
        closed = self.harness.open_tunnel(["SSH"])
        self.store.close_tunnel(closed.tunnel_id)
        self.assertRefused(self.connect("source", closed.source_token), 410, "closed", "tunnel-closed")
        rotated = self.harness.open_tunnel(["SSH"])
        fresh = self.store.rotate(rotated.tunnel_id, "source")
        self.assertRefused(self.connect("source", rotated.source_token), 401, "revoked", "token-rotated")
        self.assertEqual(self.connect("source", fresh).status, 101)
        expiring = self.harness.open_tunnel(["SSH"], lifetime_minutes=1)
        self.clock.advance(61)
        self.assertRefused(self.connect("source", expiring.source_token), 410, "lifetime", "tunnel-expired")

    def test_not_a_websocket(self) -> None:
        peer = RawPeer(
            self.harness.site,
            b"GET /tunnel?local-proxy-mode=source HTTP/1.1\r\nHost: 127.0.0.1\r\naccess-token: x\r\n\r\n",
        )
        self.assertTrue(400 <= (peer.status or 0) < 500, peer.status)

    def test_store_failure_is_500(self) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise OSError("disk on fire")

        self.store.claim_peer = broken  # type: ignore[method-assign]
        peer = self.connect("source", "tok")
        self.assertEqual(peer.status, 500)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class RelayTests(ServiceTestCase):
    def test_relays_both_ways_byte_exact(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(start() + data(b"hello"))
        self.assertEqual(destination.take_messages(), [start(), data(b"hello")])
        destination.send(data(b"world") + data(b"!"))
        self.assertEqual(source.take_messages(), [data(b"world") + data(b"!")])
        metrics = self.relay.metrics
        self.assertEqual(
            metrics.value("tunnelkit_relayed_frames_total", direction="source_to_destination"), 2.0  # type: ignore[attr-defined]
        )
        self.assertEqual(
            metrics.value("tunnelkit_relayed_bytes_total", direction="destination_to_source"),  # type: ignore[attr-defined]
            float(len(data(b"world") + data(b"!"))),
        )

    def test_message_ends_after_each_start(self) -> None:
        tunnel, source, destination = self.pair()
        second = tunnel_frame(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=2)
        source.send(start() + data(b"x") + second + data(b"y", connection=2))
        self.assertEqual(
            destination.take_messages(), [start(), data(b"x") + second, data(b"y", connection=2)]
        )

    def test_frames_split_across_messages(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(start())
        destination.take_messages()
        stream = data(b"a" * 1000) + data(b"b" * 10)
        for cut in (1, 2, 500):
            source.send(stream[:cut])
            source.send(stream[cut:])
            self.assertEqual(b"".join(destination.take_messages()), stream)

    def test_batches_up_to_the_limit(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(start())
        destination.take_messages()
        big = data(b"z" * 64512)
        # Two 64.5 KB frames fit one message; a third does not.
        source.send_raw(b"".join(_client(big) for _ in range(3)))
        messages = destination.take_messages()
        self.assertEqual([len(m) for m in messages], [2 * len(big), len(big)])
        self.assertEqual(b"".join(messages), big * 3)

    def test_fragmented_messages_and_pings_between(self) -> None:
        from tunnelkit.testing import client_frame

        tunnel, source, destination = self.pair()
        stream = start() + data(b"f" * 3000)
        source.send_raw(
            client_frame(stream[:100], opcode=2, fin=False)
            + client_frame(b"ping", opcode=9)
            + client_frame(stream[100:2000], opcode=0, fin=False)
            + client_frame(stream[2000:], opcode=0, fin=True)
        )
        self.assertEqual(destination.take_messages(), [start(), data(b"f" * 3000)])
        source.poll()
        self.assertIn((10, b"ping"), source.controls)

    def test_every_length_encoding(self) -> None:
        """Messages around the 7-bit, 16-bit and 64-bit WebSocket length boundaries."""
        tunnel, source, destination = self.pair()
        source.send(start())
        destination.take_messages()
        messages = [_data_filling(n) for n in (len(data(b"")), 125, 126, 127, 1000)]
        for total in (65535, 65536, 65537, 131076):
            messages.append(_data_filling(total))
        self.assertEqual([len(m) for m in messages[1:4]], [125, 126, 127])
        self.assertEqual([len(m) for m in messages[-4:]], [65535, 65536, 65537, 131076])
        for message in messages:
            source.send(message)
        self.assertEqual(b"".join(destination.take_messages()), b"".join(messages))
        self.assertFalse(source.transport.disconnecting)

    def test_input_split_anywhere(self) -> None:
        from tunnelkit.testing import client_frame

        tunnel, source, destination = self.pair()
        big = data(b"s" * 60000)
        stream = start() + big + data(b"t" * 10)
        # Tunnel frames split across WebSocket messages, and the wire split across reads.
        wire = client_frame(stream[:30000]) + client_frame(stream[30000:]) + client_frame(b"")
        for cut in range(0, len(wire), 997):
            source.send_raw(wire[cut : cut + 997])
        self.assertEqual(b"".join(destination.take_messages()), stream)

    def test_input_split_in_small_steps(self) -> None:
        """Reads that end inside a header, inside a mask, or a few bytes into the next frame."""
        from tunnelkit.testing import client_frame

        tunnel, source, destination = self.pair()
        stream = start() + data(b"a" * 10) + data(b"b" * 1000) + data(b"c" * 64000) + data(b"d" * 5)
        wire = client_frame(stream[:20]) + client_frame(stream[20:1100]) + client_frame(b"")
        wire += client_frame(stream[1100:60000]) + client_frame(stream[60000:])
        for step in (1, 5, 13, 4093):
            for cut in range(0, len(wire), step):
                source.send_raw(wire[cut : cut + step])
            self.assertEqual(b"".join(destination.take_messages()), stream, step)
            self.assertEqual(self.relay.buffered_bytes(tunnel.tunnel_id), 0)

    def test_unmasked_client_frame(self) -> None:
        tunnel, source, destination = self.pair()
        frame = start()
        source.send_raw(bytes([0x82, len(frame)]) + frame)
        self.assertEqual(source.close_frame()[0], 1002)  # type: ignore[index]
        self.assertEqual(destination.take_messages(), [])

    def test_pings_get_pongs(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(b"1700000000000", opcode=9)
        source.poll()
        self.assertIn((10, b"1700000000000"), source.controls)

    def test_frames_while_the_peer_is_absent(self) -> None:
        tunnel = self.harness.open_tunnel(["SSH"])
        source = self.connect("source", tunnel.source_token)
        source.take_messages()
        second = tunnel_frame(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=2)
        source.send(start() + data(b"lost") + second)
        self.assertEqual(
            source.take_messages(),
            [
                tunnel_frame(type=STREAM_RESET, streamId=1, serviceId="SSH"),
                tunnel_frame(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=2),
            ],
        )
        self.assertEqual(
            self.relay.metrics.value("tunnelkit_dropped_frames_total", reason="peer_absent"), 3.0  # type: ignore[attr-defined]
        )

    def test_violator_closed_other_side_keeps_working(self) -> None:
        tunnel, source, destination = self.pair(("SSH",))
        source.send(start())
        destination.take_messages()
        destination.send(start())  # a destination may not start streams
        code, reason = destination.close_frame()  # type: ignore[misc]
        self.assertEqual(code, 1008)
        self.assertIn("source_only_type", reason)
        self.assertEqual(
            self.relay.metrics.value("tunnelkit_protocol_violations_total", rule="source_only_type"), 1.0  # type: ignore[attr-defined]
        )
        self.assertFalse(source.transport.disconnecting)
        # The close handshake completes; the source then hears its stream was reset.
        destination.send(b"\x03\xe8", opcode=8)
        self.assertTrue(destination.transport.disconnecting)
        destination.lose()
        self.assertEqual(source.take_frames(), [Message(type=STREAM_RESET, streamId=1, serviceId="SSH")])
        source.send(start(2))
        self.assertEqual(source.take_frames(), [Message(type=STREAM_RESET, streamId=2, serviceId="SSH")])

    def test_start_without_service_id_on_two_services(self) -> None:
        """
        Issue 10: a STREAM_START without a service id on a tunnel of two services used to reach the
        destination, which then exited.  The relay closes the sender; the destination hears nothing.
        """
        for frame in (
            tunnel_frame(type=STREAM_START, streamId=1, connectionId=1),
            tunnel_frame(type=CONNECTION_START, streamId=1, connectionId=2),
        ):
            tunnel, source, destination = self.pair(("SSH", "WEB"))
            source.send(frame)
            code, reason = source.close_frame()  # type: ignore[misc]
            self.assertEqual(code, 1008)
            self.assertIn("missing_service_id", reason)
            self.assertEqual(destination.take_messages(), [])
            self.assertFalse(destination.transport.disconnecting)

    def test_frames_before_the_violation_are_delivered(self) -> None:
        tunnel, source, destination = self.pair(("SSH",))
        source.send(start() + data(b"ok") + data(b"bad", service="OTHER"))
        self.assertEqual(destination.take_messages(), [start(), data(b"ok")])
        self.assertEqual(source.close_frame()[0], 1008)  # type: ignore[index]

    def test_text_and_garbage_close_the_sender(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(b"hello", opcode=1)
        self.assertEqual(source.close_frame()[0], 1008)  # type: ignore[index]
        tunnel, source, destination = self.pair()
        source.send(b"\x00\x03\xff\xff\xff")
        self.assertEqual(source.close_frame()[0], 1008)  # type: ignore[index]

    def test_oversized_message(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(b"\x00" * 131077)
        self.assertEqual(source.close_frame()[0], 1009)  # type: ignore[index]


class ExtensionTests(ServiceTestCase):
    """tunnelkit's extensions (flowcontrol): the 101 header, announcements, forwarding only between announced peers."""

    def announce(self, peer: RawPeer, window: int = 1000) -> None:
        peer.send(announcement_frame(window))

    def test_the_101_offers_the_extensions(self) -> None:
        tunnel, source, destination = self.pair()
        self.assertEqual(source.headers[EXTENSIONS_HEADER.lower()], OFFERED)

    def test_announcements_exchanged_once_both_announced(self) -> None:
        tunnel, source, destination = self.pair()
        self.announce(source, 1000)
        self.assertEqual(destination.take_frames(), [])
        self.assertEqual(source.take_frames(), [])
        self.announce(destination, 2000)
        (to_source,) = source.take_frames()
        (to_destination,) = destination.take_frames()
        self.assertEqual((to_source.type, to_source.payload), (ANNOUNCE, b"flow-control/1;window=2000;blocked half-close/1"))
        self.assertEqual(to_destination.payload, b"flow-control/1;window=1000;blocked half-close/1")
        # now window updates and EOFs pass, untouched and counted
        source.send(start() + window_update_frame(1, "SSH", 1, 1000))
        self.assertEqual([m.type for m in destination.take_frames()], [STREAM_START, WINDOW_UPDATE])
        destination.send(eof_frame(1, "SSH", 1))
        self.assertEqual([m.type for m in source.take_frames()], [EOF])

    def test_not_forwarded_to_a_peer_that_did_not_announce(self) -> None:
        tunnel, source, destination = self.pair()
        self.announce(source)
        source.send(start() + window_update_frame(1, "SSH", 1, 1000) + data(b"x") + eof_frame(1, "SSH", 1))
        self.assertEqual([m.type for m in destination.take_frames()], [STREAM_START, DATA])
        self.assertEqual(
            self.relay.metrics.value("tunnelkit_dropped_frames_total", reason="extension_not_announced"), 2.0  # type: ignore[attr-defined]
        )
        self.assertFalse(source.transport.disconnecting)

    def test_withdrawn_when_the_partner_goes(self) -> None:
        tunnel, source, destination = self.pair()
        self.announce(source)
        self.announce(destination, 2000)
        source.take_frames()
        destination.take_frames()
        destination.lose()
        withdrawal = [m for m in source.take_frames() if m.type == ANNOUNCE]
        self.assertEqual([(m.payload, m.ignorable) for m in withdrawal], [(b"", True)])
        # nothing more passes toward the (absent) destination, and the source is not closed for it
        source.send(window_update_frame(1, "SSH", 1, 10))
        self.assertFalse(source.transport.disconnecting)


def _data_filling(total: int) -> bytes:
    """Valid DATA frames adding up to exactly C{total} bytes."""
    full = data(b"f" * 64512)
    frames = b""
    while total - len(frames) > len(full) + 64:
        frames += full
    left = total - len(frames)
    for size in range(left, -1, -1):
        last = data(b"z" * size)
        if len(last) == left:
            return frames + last
    raise AssertionError(f"cannot fill {total}")


def _client(payload: bytes) -> bytes:
    from tunnelkit.testing import client_frame

    return client_frame(payload)


class PeerTests(ServiceTestCase):
    def test_replacement(self) -> None:
        tunnel, source, destination = self.pair(client_tokens=True)
        source.send(start(7))
        destination.take_messages()
        newer = self.connect("source", tunnel.source_token, extra=[("client-token", CLIENT_TOKEN)])
        self.assertEqual(newer.status, 101)
        self.assertEqual(source.close_frame(), (1008, "Connection replaced by a new peer"))
        self.assertEqual(destination.take_frames(), [Message(type=STREAM_RESET, streamId=7, serviceId="SSH")])
        # The old connection's end changes nothing; the new one relays.
        source.send(b"\x03\xe8", opcode=8)
        self.assertTrue(source.transport.disconnecting)
        source.lose()
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, "source")[0], True)
        newer.take_messages()
        newer.send(start(8))
        self.assertEqual(destination.take_frames(), [Message(type=STREAM_START, streamId=8, serviceId="SSH", connectionId=1)])

    def test_disconnect_resets_the_other_side(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(start(3))
        destination.take_messages()
        destination.lose()
        self.assertEqual(source.take_frames(), [Message(type=STREAM_RESET, streamId=3, serviceId="SSH")])
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, "destination"), (False, self.clock.seconds()))

    def test_destination_reset_forgets_the_stream(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(start(3))
        destination.send(tunnel_frame(type=STREAM_RESET, streamId=3, serviceId="SSH"))
        destination.lose()
        self.assertEqual(source.take_frames(), [Message(type=STREAM_RESET, streamId=3, serviceId="SSH")])

    def test_close_tunnel(self) -> None:
        tunnel, source, destination = self.pair()
        self.relay.tunnel_closed(tunnel.tunnel_id, "closed")
        self.assertEqual(source.close_frame(), (1000, "Tunnel closed"))
        self.assertEqual(destination.close_frame(), (1000, "Tunnel closed"))
        # Without a close reply the connection is ended within a second (gracefully: the close
        # frame may still be unread at the peer), and nothing stays scheduled once it is gone.
        self.clock.advance(1.0)
        self.assertTrue(source.transport.disconnecting)
        self.assertTrue(destination.transport.disconnecting)
        source.lose()
        destination.lose()
        self.clock.advance(2.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expiry(self) -> None:
        tunnel = self.harness.open_tunnel(["SSH"], lifetime_minutes=2)
        source = self.connect("source", tunnel.source_token)
        for step in (20, 20, 20, 20, 20, 19):
            self.clock.advance(step)
            source.send(b"", opcode=0xA)  # a live peer: it answers the service's pings
        self.assertIsNone(source.close_frame())
        self.clock.advance(1)
        self.assertEqual(source.close_frame(), (1000, "Tunnel expired"))
        source.lose()
        self.assertEqual(self.relay.links, {})
        self.clock.advance(2)  # autobahn's close-handshake timer bucket
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rotation_closes_one_side(self) -> None:
        tunnel, source, destination = self.pair()
        self.relay.token_rotated(tunnel.tunnel_id, "destination")
        self.assertEqual(destination.close_frame(), (1008, "Access token rotated"))
        self.assertIsNone(source.close_frame())

    def test_shutdown(self) -> None:
        tunnel, source, destination = self.pair()
        self.relay.shutdown()
        self.assertEqual(source.close_frame(), (1001, "Service shutting down"))
        self.assertEqual(destination.close_frame(), (1001, "Service shutting down"))
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, "source")[0], False)
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, "destination")[0], False)
        changes = len(self.store.state_changes)
        source.lose()
        destination.lose()
        self.assertEqual(len(self.store.state_changes), changes)  # the store may be closed by now
        self.assertEqual(self.relay.links, {})

    def test_rotation_with_new_services(self) -> None:
        tunnel, source, destination = self.pair(("SSH",))
        fresh = self.store.rotate(tunnel.tunnel_id, "destination", services=["SSH", "VNC"])
        self.relay.token_rotated(tunnel.tunnel_id, "destination")
        destination.lose()
        newer = self.connect("destination", fresh)
        self.assertEqual(newer.take_frames(), [Message(type=SERVICE_IDS, availableServiceIds=["SSH", "VNC"])])
        source.send(start(service="VNC"))
        self.assertEqual(newer.take_frames(), [Message(type=STREAM_START, streamId=1, serviceId="VNC", connectionId=1)])

    def test_silent_peer_pinged_then_dropped(self) -> None:
        """A peer that vanished without a FIN is DISCONNECTED within a bounded time (issue 11 item 6)."""
        tunnel, source, destination = self.pair()
        source.send(start())
        destination.take_frames()
        self.clock.advance(20)  # both heard since attach: no ping yet
        self.assertEqual(source.controls + destination.controls, [])
        for _ in range(2):
            destination.send(b"", opcode=0xA)  # the destination answers (a pong) each time; the source is silent
            self.clock.advance(20)
            source.poll()
            self.assertEqual(source.controls[-1][0], 0x9)  # pinged
        self.assertFalse(source.transport.disconnecting)
        destination.send(b"", opcode=0xA)
        self.clock.advance(20)  # 60 s of silence: reset
        self.assertTrue(source.transport.disconnecting)
        source.lose()
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, "source")[0], False)
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, "destination")[0], True)
        (reset,) = destination.take_frames()
        self.assertEqual((reset.type, reset.streamId, reset.serviceId), (STREAM_RESET, 1, "SSH"))
        destination.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the liveness loop stopped with the last peer

    def test_pong_keeps_a_peer(self) -> None:
        tunnel, source, destination = self.pair()
        for _ in range(10):
            self.clock.advance(20)
            source.send(b"", opcode=0xA)
            destination.send(b"", opcode=0xA)
        self.assertFalse(source.transport.disconnecting or destination.transport.disconnecting)

    def test_paused_peer_is_not_dropped(self) -> None:
        tunnel, source, destination = self.pair()
        source.protocol.pause_reading("backpressure")  # type: ignore[attr-defined]
        destination_alive = lambda: destination.send(b"", opcode=0xA)  # noqa: E731
        for _ in range(6):
            destination_alive()
            self.clock.advance(20)
        self.assertFalse(source.transport.disconnecting)

    def test_events_for_unknown_tunnels(self) -> None:
        self.relay.tunnel_closed("nope", "closed")
        self.relay.token_rotated("nope", "source")


class FlowControlTests(ServiceTestCase):
    def test_full_sink_pauses_the_other_reader(self) -> None:
        tunnel, source, destination = self.pair()
        sink = destination.transport.producer
        self.assertIsNotNone(sink)
        sink.pauseProducing()
        sink.pauseProducing()  # Twisted repeats this on every write while full
        self.assertEqual(source.transport.producerState, "paused")
        self.assertTrue(source.protocol.reading_paused)  # type: ignore[attr-defined]
        self.assertEqual(destination.transport.producerState, "producing")
        sink.resumeProducing()
        self.assertEqual(source.transport.producerState, "producing")
        self.assertEqual(
            self.relay.metrics.value("tunnelkit_reads_paused_total", cause="backpressure"), 1.0  # type: ignore[attr-defined]
        )

    def test_sink_leaving_resumes_the_reader(self) -> None:
        tunnel, source, destination = self.pair()
        destination.transport.producer.pauseProducing()
        destination.lose()
        self.assertEqual(source.transport.producerState, "producing")

    def test_replacement_while_full(self) -> None:
        tunnel, source, destination = self.pair(client_tokens=True)
        destination.transport.producer.pauseProducing()
        newer = self.connect("destination", tunnel.destination_token, extra=[("client-token", "d" * 32)])
        self.assertEqual(newer.status, 101)
        self.assertEqual(source.transport.producerState, "producing")
        # The replaced connection's buffer no longer pauses anyone.
        destination.transport.producer.resumeProducing()
        destination.transport.producer.pauseProducing()
        self.assertEqual(source.transport.producerState, "producing")

    def test_buffered_bytes(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(start() + data(b"q" * 1000)[:500])
        self.assertEqual(self.relay.buffered_bytes(tunnel.tunnel_id), 500)


class LimitTests(ServiceTestCase):
    options = {
        "tunnel-bandwidth": 1_000_000,
        "handshakes-per-second": 2,
        "max-websockets-per-account": 3,
    }

    def test_bandwidth(self) -> None:
        tunnel, source, destination = self.pair()
        source.send(start())
        chunk = data(b"b" * 60000)
        for _ in range(5):  # 300 KB: the 262 KB burst is spent
            source.send(chunk)
        self.assertEqual(source.transport.producerState, "paused")
        self.clock.advance(0.05)
        self.assertEqual(source.transport.producerState, "producing")
        self.assertEqual(len(b"".join(destination.take_messages())), len(start()) + 5 * len(chunk))

    def test_handshake_rate(self) -> None:
        """Accepted handshakes per tunnel are limited; only valid tokens spend that budget."""
        tunnel = self.harness.open_tunnel(["SSH"])
        client = [("client-token", CLIENT_TOKEN)]
        statuses = [self.connect("source", tunnel.source_token, extra=client).status for _ in range(3)]
        self.assertEqual(statuses, [101, 101, 429])
        # The refused attempt did not count: once the budget refills, the same token reconnects.
        self.assertEqual(self.connect("destination", self.harness.open_tunnel().destination_token).status, 101)
        self.clock.advance(0.5)
        self.assertEqual(self.connect("source", tunnel.source_token, extra=client).status, 101)

    def flood(self, token: str, count: int, port: int) -> list:
        """C{count} handshakes with a wrong secret for C{token}'s tunnel, from another address."""
        statuses = []
        wrong = token[:17] + ("A" if token[17] != "A" else "B") + token[18:]
        for _ in range(count):
            peer = RawPeer(self.harness.site, upgrade_request("source", wrong), port, host="127.0.0.2")
            statuses.append(peer.status)
        return statuses

    def test_flood_of_bad_secrets_never_refuses_the_valid_token(self) -> None:
        """Failed attempts for a tunnel id cost its real peers nothing (issue 11 item 1)."""
        tunnel = self.harness.open_tunnel(["SSH"])
        statuses = self.flood(tunnel.source_token, 50, 45000)
        self.assertEqual(statuses[:4], [401, 401, 401, 401])
        self.assertEqual(statuses[-1], 429)  # the flooding address spent its budget
        self.assertEqual(self.connect("destination", tunnel.destination_token).status, 101)
        self.assertEqual(self.connect("source", tunnel.source_token).status, 101)

    def test_failures_per_key_from_many_addresses(self) -> None:
        """A failure flood spread over addresses gets 429 per key; the valid token still passes."""
        tunnel = self.harness.open_tunnel(["SSH"])
        wrong = tunnel.source_token[:-1] + ("A" if tunnel.source_token[-1] != "A" else "B")
        statuses = [
            RawPeer(self.harness.site, upgrade_request("source", wrong), 45000, host=f"127.0.1.{n}").status
            for n in range(1, 60)
        ]
        self.assertEqual(statuses[0], 401)
        self.assertEqual(statuses[-1], 429)
        self.assertEqual(self.connect("source", tunnel.source_token).status, 101)

    def test_failures_from_one_address(self) -> None:
        """Malformed requests count against the address too; other addresses are not affected."""
        statuses = [
            RawPeer(self.harness.site, upgrade_request(None, "x"), 45000, host="127.0.0.3").status
            for _ in range(30)
        ]
        self.assertEqual((statuses[0], statuses[-1]), (400, 429))
        self.clock.advance(1.0)
        self.assertEqual(self.connect("source", self.harness.open_tunnel().source_token).status, 101)

    def test_failures_per_ipv6_network(self) -> None:
        """An IPv6 client's failure budget is its /64's: it cannot dodge it by changing addresses."""
        statuses = [
            RawPeer(self.harness.site, upgrade_request(None, "x"), 45000, host=f"2001:db8:0:1::{n:x}").status
            for n in range(1, 31)
        ]
        self.assertEqual((statuses[0], statuses[-1]), (400, 429))
        tunnel = self.harness.open_tunnel()
        other_network = RawPeer(self.harness.site, upgrade_request("source", tunnel.source_token), 45000,
                                host="2001:db8:0:2::1")
        self.assertEqual(other_network.status, 101)

    def test_failures_counted_per_proxy_protocol_client(self) -> None:
        """
        Behind a haproxy: listener the failure budget is the client's (the PROXY header's address):
        one client spending it does not get a valid client behind the same HAProxy refused.
        """
        from twisted.internet import endpoints
        from twisted.internet.testing import MemoryReactor

        from tunnelkit.service.api import ServiceSite

        reactor = MemoryReactor()
        endpoints.serverFromString(reactor, "haproxy:tcp:0").listen(
            ServiceSite(self.harness.root, reactor=self.clock).proxied()
        )
        factory = reactor.tcpServers[0][1]

        def through_haproxy(client: str, request: bytes) -> RawPeer:
            header = f"PROXY TCP4 {client} 10.0.0.1 40000 8443\r\n".encode()
            return RawPeer(factory, header + request, 50000, host="10.0.0.2")  # HAProxy's own address

        statuses = [through_haproxy("203.0.113.5", upgrade_request(None, "x")).status for _ in range(30)]
        self.assertEqual((statuses[0], statuses[-1]), (400, 429))
        tunnel = self.harness.open_tunnel(["SSH"])
        valid = through_haproxy("198.51.100.7", upgrade_request("source", tunnel.source_token))
        self.assertEqual(valid.status, 101)
        self.assertEqual(valid.protocol.getPeer().host, "198.51.100.7")  # the PROXY wrapper, as the relay sees it

    def test_websockets_per_account(self) -> None:
        one = self.harness.open_tunnel()
        two = self.harness.open_tunnel()
        self.assertEqual(self.connect("source", one.source_token, extra=[("client-token", CLIENT_TOKEN)]).status, 101)
        self.assertEqual(self.connect("destination", one.destination_token).status, 101)
        self.assertEqual(self.connect("source", two.source_token).status, 101)
        self.assertEqual(self.relay.websockets_of("123456789012"), 3)
        refused = self.connect("destination", two.destination_token)
        self.assertEqual(refused.status, 429)
        self.assertIn("limit is 3", refused.body.decode())
        # Replacing one's own connection is not a new one.
        self.clock.advance(1)
        again = self.connect("source", one.source_token, extra=[("client-token", CLIENT_TOKEN)])
        self.assertEqual(again.status, 101)

    def test_refused_by_the_account_limit_keeps_the_token(self) -> None:
        """The per-account limit is checked before the token is spent (issue 11 item 2)."""
        peers = [self.connect("source", self.harness.open_tunnel().source_token) for _ in range(3)]
        self.assertEqual([peer.status for peer in peers], [101, 101, 101])
        late = self.harness.open_tunnel()
        self.assertEqual(self.connect("destination", late.destination_token).status, 429)
        peers[0].lose()
        self.assertEqual(self.connect("destination", late.destination_token).status, 101)


class TokenBucketTests(SynchronousTestCase):
    def test_take_and_refill(self) -> None:
        clock = Clock()
        bucket = TokenBucket(100, 50, clock)
        self.assertEqual(bucket.take(50), 0.0)
        self.assertAlmostEqual(bucket.take(10), 0.1)
        clock.advance(0.1)
        self.assertFalse(bucket.try_take(1))
        clock.advance(0.02)
        self.assertTrue(bucket.try_take(1))
        clock.advance(10)
        self.assertTrue(bucket.full)

    def test_bad_parameters(self) -> None:
        self.assertRaises(ValueError, TokenBucket, 0, 1, Clock())


class StateChangeTests(ServiceTestCase):
    """The relay tells L{Relay.state_changes} of each connection state, once the store holds it (review 12)."""

    def test_told_after_recording(self) -> None:
        told = []

        @implementer(ITunnelStateObserver)
        class Observer:
            def tunnel_changed(observer, account_id: Optional[str], tunnel_id: str) -> None:
                told.append((account_id, tunnel_id, self.store.connection_state(tunnel_id, SOURCE)[0]))

        verifyObject(ITunnelStateObserver, self.relay.state_changes)
        self.relay.state_changes.add(Observer())  # type: ignore[attr-defined]
        tunnel = self.harness.open_tunnel(["SSH"])
        source = self.connect("source", tunnel.source_token)
        self.assertEqual(source.status, 101)
        self.assertEqual(told, [("123456789012", tunnel.tunnel_id, True)])
        source.lose()
        self.assertEqual(told[1:], [("123456789012", tunnel.tunnel_id, False)])
