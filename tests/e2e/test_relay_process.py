"""
End-to-end: C{tunnelkit --mode service} as its own process, driven through its API with boto3 (the
way a user does), with two WebSocket clients over TLS relaying through it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.testing import ServiceProcess, connect_client, tunnel_frame

MB = 1024 * 1024


class ServiceProcessTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.service = ServiceProcess(["--metrics-listen", "tcp:0:interface=127.0.0.1"])
        self.addCleanup(self.service.stop)
        self.metrics_port = self.service.metrics_port

    @defer.inlineCallbacks
    def test_relay_and_close_through_the_api(self) -> Any:
        service = self.service
        tunnel = service.open_tunnel(["SSH", "HTTP"])
        source = yield connect_client(service.tls_port, "source", tunnel["sourceAccessToken"], service.ca)
        destination = yield connect_client(
            service.tls_port, "destination", tunnel["destinationAccessToken"], service.ca
        )
        self.addCleanup(lambda: source.transport.abortConnection() if not source.closed.called else None)
        self.addCleanup(
            lambda: destination.transport.abortConnection() if not destination.closed.called else None
        )
        described = service.api.describe_tunnel(tunnelId=tunnel["tunnelId"])["tunnel"]
        self.assertEqual(described["sourceConnectionState"]["status"], "CONNECTED")
        self.assertEqual(described["destinationConnectionState"]["status"], "CONNECTED")

        source.send_frames(
            tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="HTTP", connectionId=1)
        )
        arrived = destination.expect({1: 8 * MB})
        sent = yield source.stream([1], 8 * MB, service_id="HTTP", seed=11)
        yield arrived
        self.assertEqual(destination.digests[1].hexdigest(), sent[1])
        self.assertEqual(list(destination.messages[0].availableServiceIds), ["SSH", "HTTP"])

        service.api.close_tunnel(tunnelId=tunnel["tunnelId"])
        for client in (source, destination):
            was_clean, code, reason = yield client.closed
            self.assertEqual((code, reason), (1000, "Tunnel closed"))
        described = service.api.describe_tunnel(tunnelId=tunnel["tunnelId"])["tunnel"]
        self.assertEqual(described["status"], "CLOSED")

    @defer.inlineCallbacks
    def test_metrics_endpoint(self) -> Any:
        from twisted.web.client import Agent, readBody
        from twisted.internet import reactor

        tunnel = self.service.open_tunnel()
        client = yield connect_client(
            self.service.tcp_port, "source", tunnel["sourceAccessToken"]
        )
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.metrics_port}/metrics".encode()
        )
        on_api = yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{self.service.tcp_port}/metrics".encode())
        self.assertEqual(on_api.code, 404)
        yield readBody(on_api)
        body = (yield readBody(response)).decode()
        self.assertEqual(response.code, 200)
        self.assertIn('tunnelkit_peers_connected{side="source"} 1.0', body)
        self.assertIn("tunnelkit_handshakes_total 1.0", body)
        self.assertIn('tunnelkit_tunnels{status="OPEN"} 1.0', body)
        client.transport.loseConnection()
        yield client.closed
