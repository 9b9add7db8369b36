"""
Two whole service nodes (C{tunnelkit.service.tap.TunnelService} in cluster mode) in this process on
the real reactor, on one SQLite file with an in-memory directory and in-process events (the
PostgreSQL ones: tests.e2e.test_cluster_nodes): real TCP on 127.0.0.1 with ports the nodes bound
themselves.  A destination that reaches node B is forwarded to node A, which holds the source; bytes
flow both ways; CloseTunnel on node B closes both; node B sees the real client address.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.service import tap
from tunnelkit.service.cluster.directory import MemoryDirectory
from tunnelkit.service.cluster.events import InProcessCarrier
from tunnelkit.testing import connect_client, tunnel_frame


def _deadline(d: defer.Deferred, seconds: float) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


class TwoServiceNodes(TestCase):
    timeout = 60
    listen = "tcp"  # the cluster listener's endpoint type

    def setUp(self) -> Any:
        state = self.mktemp()
        os.makedirs(state)
        secret = os.path.join(state, "cluster-secret")
        with open(secret, "w") as f:
            f.write("a-cluster-secret-of-enough-bytes\n")
        self.directory = MemoryDirectory(reactor)
        self.carrier = InProcessCarrier()
        self.nodes: Dict[str, tap.TunnelService] = {}
        for name in ("node-a", "node-b"):
            options = tap.Options()
            options.parseOptions([
                "--mode", "service", "--state-dir", state, "--listen", "tcp:0:interface=127.0.0.1",
                "--no-console", "--allow-slow-websocket", "--audit-log", "",
                "--cluster-listen", f"{self.listen}:0:interface=127.0.0.1", "--node-id", name,
                "--cluster-secret-file", secret, "--cluster-heartbeat", "0.2", "--cluster-node-timeout", "1",
            ])
            service = tap.TunnelService(options, reactor, cluster_backends=(self.directory, self.carrier))
            service.startService()
            self.addCleanup(service.stopService)
            self.nodes[name] = service
        self.a, self.b = self.nodes["node-a"], self.nodes["node-b"]

    def port(self, service: tap.TunnelService) -> int:
        return int(service.listeners[0].port.getHost().port)  # type: ignore[union-attr]

    def open_tunnel(self, service: tap.TunnelService) -> Any:
        return defer.maybeDeferred(
            service.control.call, "OpenTunnel", service.account, {"destinationConfig": {"services": ["SSH"]}}
        )

    @defer.inlineCallbacks
    def test_forwarded_destination_bytes_flow_and_close_anywhere(self) -> Any:
        tunnel = yield self.open_tunnel(self.a)
        source = yield _deadline(connect_client(self.port(self.a), "source", tunnel["sourceAccessToken"]), 10)
        destination = yield _deadline(connect_client(self.port(self.b), "destination", tunnel["destinationAccessToken"]), 10)
        self.assertEqual((self.a.cluster.gate.forwarded, self.b.cluster.gate.forwarded), (0, 1))
        link = self.a.cluster.events.local.links[tunnel["tunnelId"]]
        self.assertEqual(set(link.peers), {"source", "destination"})
        self.assertEqual(link.peers["destination"].transport.getPeer().host, "127.0.0.1")
        self.assertNotIn(tunnel["tunnelId"], self.b.cluster.events.local.links)
        # 4 MB each way through the splice (backpressure on real sockets).
        source.send_frames(tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1))
        to_destination = destination.expect({1: 4 << 20})
        sent = yield source.stream([1], 4 << 20)
        got = yield _deadline(to_destination, 30)
        self.assertEqual(got[1], 4 << 20)
        self.assertEqual(destination.digests[1].hexdigest(), sent[1])
        to_source = source.expect({1: 4 << 20})
        sent = yield destination.stream([1], 4 << 20)
        yield _deadline(to_source, 30)
        self.assertEqual(source.digests[1].hexdigest(), sent[1])
        # CloseTunnel through node B (which holds nothing of it): both peers on node A close.
        yield defer.maybeDeferred(self.b.control.call, "CloseTunnel", self.b.account, {"tunnelId": tunnel["tunnelId"]})
        closed: List[Any] = yield _deadline(defer.gatherResults([source.closed, destination.closed]), 5)
        self.assertEqual([code for _, code, _ in closed], [1000, 1000])

    @defer.inlineCallbacks
    def test_both_on_one_node_not_forwarded(self) -> Any:
        tunnel = yield self.open_tunnel(self.b)
        source = yield _deadline(connect_client(self.port(self.b), "source", tunnel["sourceAccessToken"]), 10)
        destination = yield _deadline(connect_client(self.port(self.b), "destination", tunnel["destinationAccessToken"]), 10)
        self.assertEqual((self.a.cluster.gate.forwarded, self.b.cluster.gate.forwarded), (0, 0))
        yield defer.maybeDeferred(self.a.control.call, "CloseTunnel", self.a.account, {"tunnelId": tunnel["tunnelId"]})
        yield _deadline(defer.gatherResults([source.closed, destination.closed]), 5)


class TwoServiceNodesTLS(TwoServiceNodes):
    """The same with C{--cluster-listen ssl:...}: the nodes forward over TLS, the MAC bound to it."""

    listen = "ssl"

    def test_advertised_as_tls(self) -> None:
        self.assertTrue(self.a.cluster.gate.node.address.startswith("tls:127.0.0.1:"))
