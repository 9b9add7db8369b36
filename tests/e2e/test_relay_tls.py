"""
End-to-end tests of the data plane: the real service (SQLite store, generated CA, TLS listener on
an ephemeral loopback port, the control plane's operations) with real autobahn WebSocket clients
over TLS.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet import ssl
from twisted.trial.unittest import TestCase

from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.service.relay import Relay
from tunnelkit.service.tap import Options, TunnelService
from tunnelkit.testing import TunnelTestClient, connect_client, tunnel_frame, upgrade_request

MB = 1024 * 1024
CLIENT_TOKEN = "0b6c8f0e-41a5-4a8a-9a3c-2b9c7a6d5e4f"


class OffsetClock:
    """The reactor's clock, shifted forward by C{offset} seconds (to reach a deadline sooner)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def seconds(self) -> float:
        return reactor.seconds() + self.offset

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        return reactor.callLater(delay, f, *args, **kwargs)

    def getDelayedCalls(self) -> List[Any]:
        return reactor.getDelayedCalls()


class _RawResponse(Protocol):
    """Sends one request, collects the whole answer until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


class ServiceFixture(TestCase):
    """The whole service, in this process, on a TLS port."""

    timeout = 120
    service_options: List[str] = []

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.state_dir = tempfile.mkdtemp(prefix="tunnelkit-relay-e2e-")
        self.addCleanup(shutil.rmtree, self.state_dir, True)
        options = Options()
        options.parseOptions(
            ["--state-dir", self.state_dir, "--listen", "ssl:0:interface=127.0.0.1"]
            + self.service_options
        )
        self.clock = OffsetClock()
        self.service = TunnelService(options, reactor, self.clock)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        listener = self.service.listeners[0]
        port = yield listener.listening
        self.port = port.getHost().port
        with open(self.service.certificates.ca_cert, "rb") as f:
            self.ca = f.read()
        self.relay: Relay = self.service.control.events  # type: ignore[assignment]
        self.clients: List[TunnelTestClient] = []
        self.addCleanup(self._drop_clients)

    @defer.inlineCallbacks
    def _drop_clients(self) -> Any:
        waits = []
        for client in self.clients:
            if client.transport is not None and not client.closed.called:
                client.transport.abortConnection()
                waits.append(client.closed)
        yield defer.DeferredList(waits)
        yield self.wait_until(lambda: not self.relay.links)

    def api(self, operation: str, **body: Any) -> "defer.Deferred[Dict[str, Any]]":
        return self.service.control.call(operation, self.service.account, body)

    def open_tunnel(
        self, services: Tuple[str, ...] = ("SSH",), minutes: Optional[int] = None
    ) -> "defer.Deferred[Dict[str, Any]]":
        body: Dict[str, Any] = {"destinationConfig": {"services": list(services)}}
        if minutes is not None:
            body["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": minutes}
        return self.api("OpenTunnel", **body)

    @defer.inlineCallbacks
    def connect(self, mode: str, token: str, client_token: Optional[str] = None) -> Any:
        client = yield connect_client(self.port, mode, token, self.ca, client_token)
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def pair(self, services: Tuple[str, ...] = ("SSH",), client_tokens: bool = False) -> Any:
        tunnel = yield self.open_tunnel(services)
        source = yield self.connect(
            "source", tunnel["sourceAccessToken"], CLIENT_TOKEN if client_tokens else None
        )
        destination = yield self.connect(
            "destination", tunnel["destinationAccessToken"], "d" * 36 if client_tokens else None
        )
        return tunnel, source, destination

    @defer.inlineCallbacks
    def raw(self, request: bytes) -> Any:
        endpoint = SSL4ClientEndpoint(
            reactor,
            "127.0.0.1",
            self.port,
            ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate.loadPEM(self.ca)),
        )
        protocol = _RawResponse(request)
        yield connectProtocol(endpoint, protocol)
        answer = yield protocol.done
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    def wait_until(self, predicate: Any, timeout: float = 10.0) -> defer.Deferred:
        deadline = time.monotonic() + timeout

        def check() -> None:
            if predicate():
                loop.stop()
            elif time.monotonic() > deadline:
                loop.stop()
                raise AssertionError("condition not met in time")

        loop = task.LoopingCall(check)
        return loop.start(0.01, now=True)


class HandshakeTests(ServiceFixture):
    @defer.inlineCallbacks
    def test_accepted_with_service_ids(self) -> Any:
        tunnel, source, destination = yield self.pair(("SSH1", "HTTP1"))
        yield self.wait_until(lambda: source.messages and destination.messages)
        for client in (source, destination):
            self.assertEqual(
                list(client.messages[0].availableServiceIds), ["SSH1", "HTTP1"]
            )
            self.assertEqual(len(client.channel_id.split("-")), 5)
        described = (yield self.api("DescribeTunnel", tunnelId=tunnel["tunnelId"]))["tunnel"]
        self.assertEqual(described["sourceConnectionState"]["status"], "CONNECTED")
        self.assertEqual(described["destinationConnectionState"]["status"], "CONNECTED")

    @defer.inlineCallbacks
    def test_rejections(self) -> Any:
        tunnel = yield self.open_tunnel()
        token = tunnel["sourceAccessToken"]
        cases = [
            (upgrade_request("source", None), 401, "Missing access token"),
            (upgrade_request("source", token, path="/tunnel/x"), 400, "/tunnel"),
            (upgrade_request(None, token), 400, "local-proxy-mode"),
            (upgrade_request("source", token, extra=[("access-token", token)]), 400, "exactly once"),
            (upgrade_request("source", token, extra=[("x-pad", "p" * 4500)]), 431, "too large"),
            (upgrade_request("source", token, protocols=["chat"]), 400, "subprotocol"),
            (upgrade_request("source", token, extra=[("client-token", "bad")]), 400, "client token"),
            (upgrade_request("destination", token), 403, "local-proxy-mode is destination"),
            (upgrade_request("source", "A" * 16 + "." + "B" * 43), 401, "not valid"),
        ]
        for request, status, text in cases:
            got, headers, body = yield self.raw(request)
            self.assertEqual(got, status, body)
            self.assertIn(text, body.decode())
            self.assertIn("channel-id", headers)
        # None of those spent the token; it connects once, then is refused with the AWS text.
        first = yield self.connect("source", token)
        first.transport.loseConnection()
        yield first.closed
        got, headers, body = yield self.raw(upgrade_request("source", token))
        self.assertEqual(got, 401)
        self.assertEqual(
            body.decode().strip(),
            "Invalid access token: The access token was previously used and cannot be used again",
        )


class RelayTests(ServiceFixture):
    @defer.inlineCallbacks
    def test_100_mb_each_way_v3_multi_connection(self) -> Any:
        """Byte-exact: three simultaneous connections, 100 MB in each direction at once."""
        tunnel, source, destination = yield self.pair()
        per_connection = 100 * MB // 3
        connections = [1, 2, 3]
        source.send_frames(
            tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
        )
        for c in (2, 3):
            source.send_frames(
                tunnel_frame(type=Message.CONNECTION_START, streamId=1, serviceId="SSH", connectionId=c)
            )
        yield self.wait_until(lambda: len(destination.messages) >= 4)
        self.assertEqual(
            [m.type for m in destination.messages],
            [Message.SERVICE_IDS, Message.STREAM_START, Message.CONNECTION_START, Message.CONNECTION_START],
        )
        started = time.monotonic()
        arrived_there = destination.expect({c: per_connection for c in connections})
        arrived_here = source.expect({c: per_connection for c in connections})
        sent_there, sent_here = yield defer.gatherResults(
            [
                source.stream(connections, per_connection, seed=1),
                destination.stream(connections, per_connection, seed=2),
            ]
        )
        yield defer.gatherResults([arrived_there, arrived_here])
        elapsed = time.monotonic() - started
        for c in connections:
            self.assertEqual(destination.digests[c].hexdigest(), sent_there[c])
            self.assertEqual(source.digests[c].hexdigest(), sent_here[c])
        self.assertEqual(destination.received, {c: per_connection for c in connections})
        print(f"\n200 MB relayed over TLS in {elapsed:.1f} s ({200 / elapsed:.0f} MB/s, one process)")

    @defer.inlineCallbacks
    def test_slow_reader_bounded_buffers(self) -> Any:
        """A fast source and a destination that reads in short bursts: the relay holds <= 2 MB."""
        tunnel, source, destination = yield self.pair()
        tunnel_id = tunnel["tunnelId"]
        source.send_frames(
            tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
        )
        total = 24 * MB
        samples: List[int] = []
        sampler = task.LoopingCall(lambda: samples.append(self.relay.buffered_bytes(tunnel_id)))
        sampler.start(0.002)
        reader = destination.transport

        def read_a_little() -> None:
            reader.resumeProducing()
            reactor.callLater(0.001, reader.pauseProducing)

        reader.pauseProducing()
        slow = task.LoopingCall(read_a_little)
        slow.start(0.01)
        try:
            sent = yield source.stream([1], total, seed=3)
            yield destination.expect({1: total})
        finally:
            slow.stop()
            sampler.stop()
            reader.resumeProducing()
        self.assertEqual(destination.digests[1].hexdigest(), sent[1])
        paused = self.relay.metrics.value("tunnelkit_reads_paused_total", cause="backpressure")  # type: ignore[attr-defined]
        print(f"\nrelay buffered at most {max(samples) / 1024:.0f} KiB over {len(samples)} samples; "
              f"source paused {paused:.0f} times")
        self.assertGreater(paused, 0)
        self.assertLessEqual(max(samples), 2 * MB)


class PeerTests(ServiceFixture):
    @defer.inlineCallbacks
    def test_replacement(self) -> Any:
        tunnel, source, destination = yield self.pair(client_tokens=True)
        source.send_frames(tunnel_frame(type=Message.STREAM_START, streamId=5, serviceId="SSH", connectionId=1))
        yield self.wait_until(lambda: len(destination.messages) == 2)
        newer = yield self.connect("source", tunnel["sourceAccessToken"], CLIENT_TOKEN)
        was_clean, code, reason = yield source.closed
        self.assertEqual((code, reason), (1008, "Connection replaced by a new peer"))
        yield self.wait_until(lambda: len(destination.messages) == 3)
        self.assertEqual(
            destination.messages[2], Message(type=Message.STREAM_RESET, streamId=5, serviceId="SSH")
        )
        newer.send_frames(tunnel_frame(type=Message.STREAM_START, streamId=6, serviceId="SSH", connectionId=1))
        newer.send_frames(
            tunnel_frame(type=Message.DATA, streamId=6, serviceId="SSH", connectionId=1, payload=b"hi")
        )
        yield destination.expect({1: 2})
        described = (yield self.api("DescribeTunnel", tunnelId=tunnel["tunnelId"]))["tunnel"]
        self.assertEqual(described["sourceConnectionState"]["status"], "CONNECTED")

    @defer.inlineCallbacks
    def test_close_tunnel(self) -> Any:
        tunnel, source, destination = yield self.pair()
        started = time.monotonic()
        yield self.api("CloseTunnel", tunnelId=tunnel["tunnelId"])
        results = yield defer.gatherResults([source.closed, destination.closed])
        self.assertLess(source.close_frame_at - started, 1.0)
        self.assertLess(destination.close_frame_at - started, 1.0)
        for was_clean, code, reason in results:
            self.assertEqual((code, reason), (1000, "Tunnel closed"))
        described = (yield self.api("DescribeTunnel", tunnelId=tunnel["tunnelId"]))["tunnel"]
        self.assertEqual(described["sourceConnectionState"]["status"], "DISCONNECTED")

    @defer.inlineCallbacks
    def test_rotation(self) -> Any:
        tunnel, source, destination = yield self.pair()
        started = time.monotonic()
        rotated = yield self.api("RotateTunnelAccessToken", tunnelId=tunnel["tunnelId"], clientMode="SOURCE")
        was_clean, code, reason = yield source.closed
        self.assertLess(source.close_frame_at - started, 1.0)
        self.assertEqual((code, reason), (1008, "Access token rotated"))
        self.assertFalse(destination.closed.called)
        again = yield self.connect("source", rotated["sourceAccessToken"])
        self.assertTrue(again.opened.called)

    @defer.inlineCallbacks
    def test_expiry(self) -> Any:
        tunnel = yield self.open_tunnel(minutes=1)
        self.clock.offset = 59.5  # the tunnel's minute is nearly over
        source = yield self.connect("source", tunnel["sourceAccessToken"])
        started = time.monotonic()
        was_clean, code, reason = yield source.closed
        self.assertLess(source.close_frame_at - started, 1.5)
        self.assertEqual((code, reason), (1000, "Tunnel expired"))
