"""
Three real service nodes on one real PostgreSQL (tunnelkit.testing.postgres), on 127.0.0.1 with ports
they bound themselves: a source on node a and a destination on node b (reached directly) exchange
bytes through the forwarded peer; CloseTunnel on node c ends both within a second; kill -9 of the node
holding a tunnel: the survivors record its peers DISCONNECTED within the node timeout, the peers
reconnect (client tokens) to surviving nodes and bytes flow again; the killed node restarted resets
nothing of the others'.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, List

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.trial.unittest import TestCase

from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.testing import connect_client, tunnel_frame
from tunnelkit.testing.cluster import ClusterNodes, connect_retrying
from tunnelkit.testing.postgres import shared_server, skip_reason
from tunnelkit.testing.process import Processes


def _later(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def exchange(source: Any, destination: Any, connection: int, size: int = 256 << 10) -> Any:
    """C{size} bytes each way on a new connection; checks their digests."""
    source.send_frames(tunnel_frame(type=Message.STREAM_START, streamId=connection, serviceId="SSH",
                                    connectionId=connection))
    arrived = destination.expect({connection: size})
    sent = yield source.stream([connection], size, stream_id=connection)
    yield arrived.addTimeout(20, reactor)
    assert destination.digests[connection].hexdigest() == sent[connection]
    back = source.expect({connection: size})
    sent = yield destination.stream([connection], size, stream_id=connection)
    yield back.addTimeout(20, reactor)
    assert source.digests[connection].hexdigest() == sent[connection]


class ClusterNodesTests(TestCase):
    skip = skip_reason()
    timeout = 180

    def setUp(self) -> None:
        server = shared_server()
        dsn = server.create_database()
        self.addCleanup(server.drop_database, dsn)
        procs = Processes("tunnelkit-cluster-")
        self.addCleanup(procs.cleanup)
        self.cluster = ClusterNodes(procs, dsn, ["a", "b", "c"], heartbeat=0.5, node_timeout=2.0)
        self.nodes = self.cluster.nodes

    @defer.inlineCallbacks
    def wait_states(self, node: str, tunnel_id: str, wanted: tuple, within: float) -> Any:
        deadline = time.monotonic() + within
        while True:
            states = self.cluster.states(node, tunnel_id)
            if states == wanted:
                return states
            if time.monotonic() > deadline:
                self.fail(f"states {states}, not {wanted}, after {within} s")
            yield _later(0.05)

    @defer.inlineCallbacks
    def test_peers_meet_across_nodes_close_anywhere_and_survive_a_node(self) -> Any:
        a, b, c = self.nodes["a"], self.nodes["b"], self.nodes["c"]
        # 1. The source reaches node a, the destination node b: bytes flow; CloseTunnel on node c.
        tunnel = self.cluster.open_tunnel("a")
        source = yield connect_client(a.port, "source", tunnel["sourceAccessToken"])
        destination = yield connect_client(b.port, "destination", tunnel["destinationAccessToken"])
        yield self.wait_states("c", tunnel["tunnelId"], ("CONNECTED", "CONNECTED"), 5)
        yield exchange(source, destination, 1)
        started = time.monotonic()
        self.cluster.api("c").close_tunnel(tunnelId=tunnel["tunnelId"])
        ended: List[Any] = yield defer.gatherResults([source.closed, destination.closed]).addTimeout(5, reactor)
        took = max(source.close_frame_at, destination.close_frame_at) - started
        self.assertEqual([code for _, code, _ in ended], [1000, 1000])
        self.assertLess(took, 1.0, f"CloseTunnel on node c took {took:.3f} s to close both peers")

        # 2. Kill -9 the node holding a tunnel (both peers on node a, the destination through b).
        tunnel = self.cluster.open_tunnel("b")
        tokens = {"source": str(uuid.uuid4()), "destination": str(uuid.uuid4())}
        source = yield connect_client(a.port, "source", tunnel["sourceAccessToken"], client_token=tokens["source"])
        destination = yield connect_client(b.port, "destination", tunnel["destinationAccessToken"],
                                           client_token=tokens["destination"])
        yield exchange(source, destination, 2)
        killed = time.monotonic()
        a.child.kill()
        yield defer.gatherResults([source.closed, destination.closed]).addTimeout(5, reactor)
        yield self.wait_states("c", tunnel["tunnelId"], ("DISCONNECTED", "DISCONNECTED"), 2.0 + 3.0)
        noticed = time.monotonic() - killed
        source = yield connect_retrying(b.port, "source", tunnel["sourceAccessToken"], tokens["source"], 10)
        destination = yield connect_retrying(c.port, "destination", tunnel["destinationAccessToken"],
                                             tokens["destination"], 10)
        back = time.monotonic() - killed
        yield exchange(source, destination, 3)
        yield self.wait_states("c", tunnel["tunnelId"], ("CONNECTED", "CONNECTED"), 5)
        self.assertLess(back, 10.0)

        # 3. The killed node comes back: it resets nothing of the tunnel the others hold now.
        a.restart()
        yield _later(1.5)  # a few of its heartbeats
        self.assertEqual(self.cluster.states("a", tunnel["tunnelId"]), ("CONNECTED", "CONNECTED"))
        yield exchange(source, destination, 4, size=4096)
        self.cluster.api("a").close_tunnel(tunnelId=tunnel["tunnelId"])
        yield defer.gatherResults([source.closed, destination.closed]).addTimeout(5, reactor)
        print(f"\n  node loss: DISCONNECTED recorded {noticed:.2f} s after kill -9, both peers back {back:.2f} s after; "
              f"CloseTunnel on another node closed both in {took * 1000:.0f} ms")


class ClusterNotificationTests(TestCase):
    """
    A destination token queued on a node that is killed (the broker was down) is delivered by exactly
    one survivor once the broker is back, and the killed node restarted does not publish it again.
    """

    skip = skip_reason()
    timeout = 120

    @defer.inlineCallbacks
    def test_notification_taken_over_once(self) -> Any:
        from tests.e2e.mosquitto import MOSQUITTO, Mosquitto

        if MOSQUITTO is None:
            raise unittest.SkipTest("mosquitto is not installed")
        broker = Mosquitto(reactor)
        self.addCleanup(broker.cleanup)
        yield broker.start()
        server = shared_server()
        dsn = server.create_database()
        self.addCleanup(server.drop_database, dsn)
        procs = Processes("tunnelkit-cluster-")
        self.addCleanup(procs.cleanup)
        cluster = ClusterNodes(procs, dsn, ["a", "b", "c"], heartbeat=0.5, node_timeout=2.0,
                               extra=["--mqtt", broker.endpoint])
        topic = "'$aws/things/thing1/tunnels/notify'"

        def published() -> int:
            return sum(1 for line in broker.output.splitlines() if "Received PUBLISH" in line and topic in line)

        yield broker.stop()  # an outage: node a can only queue the token
        answer = cluster.api("a").open_tunnel(destinationConfig={"thingName": "thing1", "services": ["SSH"]})
        cluster.nodes["a"].child.wait_for_log("Queued the destination token of tunnel " + answer["tunnelId"])
        cluster.nodes["a"].child.kill()
        yield broker.start()
        deadline = time.monotonic() + 60
        while not published() and time.monotonic() < deadline:
            yield _later(0.1)
        self.assertEqual(published(), 1)
        cluster.nodes["a"].restart()
        yield _later(3.0)  # its heartbeats, its notifier's start and its MQTT connection
        self.assertEqual(published(), 1, broker.output[-3000:])
