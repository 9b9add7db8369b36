"""
Tests of tunnelkit.service.cluster.node and the directory's rules, on an injected clock: heartbeats,
a killed node's peers recorded DISCONNECTED by exactly one survivor, a restarted node taking back only
its own rows, and the lifecycle lease (expiry runs on one node; it moves when that node dies).
"""

from __future__ import annotations

import time
from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.test_api_helpers import InMemoryService
from tunnelkit.service.cluster.directory import MemoryDirectory, NodeInfo, PeerRow, placement_winner
from tunnelkit.service.cluster.node import LIFECYCLE_LEASE, ClusterNode
from tunnelkit.testing import MemoryTunnelStore


class PlacementRuleTests(TestCase):
    def test_rules(self) -> None:
        self.assertEqual(placement_winner("b", None, False, False, 0.0), "b")  # not placed
        self.assertEqual(placement_winner("b", "b", True, True, 100.0), "b")  # mine already
        self.assertEqual(placement_winner("b", "a", True, True, 100.0), "a")  # a holds a peer
        self.assertEqual(placement_winner("b", "a", True, False, 1.0), "a")  # a's handshake may be running
        self.assertEqual(placement_winner("b", "a", True, False, 100.0), "b")  # a holds nothing any more
        self.assertEqual(placement_winner("b", "a", False, True, 1.0), "b")  # a is dead: the tunnel moves


class DirectoryTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = MemoryDirectory(self.clock)

    def result(self, d: Any) -> Any:
        return self.successResultOf(d)

    def test_peer_detached_only_if_still_its_channel(self) -> None:
        self.directory.peer_attached(PeerRow("rk", "source", "t", "a", "ch-1"))
        self.directory.peer_attached(PeerRow("rk", "source", "t", "b", "ch-2"))  # replaced on node b
        self.directory.peer_detached("rk", "source", "a", "ch-1")
        self.assertEqual(self.directory.peers[("rk", "source")].channel_id, "ch-2")
        self.directory.peer_detached("rk", "source", "b", "ch-2")
        self.assertEqual(self.directory.peers, {})

    def test_leases(self) -> None:
        self.assertTrue(self.result(self.directory.acquire_lease("x", "a", 5.0)))
        self.assertFalse(self.result(self.directory.acquire_lease("x", "b", 5.0)))
        self.clock.advance(4.0)
        self.assertTrue(self.result(self.directory.acquire_lease("x", "a", 5.0)))  # renewed
        self.clock.advance(4.0)
        self.assertFalse(self.result(self.directory.acquire_lease("x", "b", 5.0)))
        self.clock.advance(1.5)
        self.assertTrue(self.result(self.directory.acquire_lease("x", "b", 5.0)))  # a's ran out
        self.directory.release_lease("x", "b")
        self.assertTrue(self.result(self.directory.acquire_lease("x", "a", 5.0)))


class NodeTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.directory = MemoryDirectory(self.clock)
        self.store = MemoryTunnelStore()
        self.tunnel = self.store.open_tunnel(("SSH",), self.clock.seconds())

    def node(self, name: str, lifecycle: Any = None, store: Any = None) -> ClusterNode:
        node = ClusterNode(NodeInfo(name, f"{name}:7443"), self.directory, store or self.store, self.clock,
                           heartbeat=1.0, node_timeout=5.0, lifecycle=lifecycle)
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        return node

    def kill(self, node: ClusterNode) -> None:
        """As kill -9: the node just stops beating (nothing is removed)."""
        assert node._loop is not None
        node._loop.stop()
        node.running = False

    def test_killed_node_peers_disconnected_once(self) -> None:
        a, b, c = self.node("a"), self.node("b"), self.node("c")
        for side in ("source", "destination"):
            self.directory.peer_attached(PeerRow("rk", side, self.tunnel.tunnel_id, "a", f"ch-{side}"))
        self.kill(a)
        self.clock.pump([1.0] * 4)
        self.assertEqual(self.store.state_changes, [])  # 4 s: not yet taken for dead
        self.clock.pump([1.0] * 2)
        changes = [(side, connected) for (_, side, connected, _) in self.store.state_changes]
        self.assertEqual(sorted(changes), [("destination", False), ("source", False)])
        self.assertEqual(b.reaped + c.reaped, 2)  # exactly once over both survivors
        self.assertNotIn("a", self.directory.node_seen)

    def test_restart_takes_back_own_rows_only(self) -> None:
        a, b = self.node("a"), self.node("b")
        self.directory.peer_attached(PeerRow("rk1", "source", self.tunnel.tunnel_id, "a", "ch-1"))
        other = self.store.open_tunnel(("SSH",), self.clock.seconds())
        self.directory.peer_attached(PeerRow("rk2", "source", other.tunnel_id, "b", "ch-2"))
        self.kill(a)
        self.node("a")  # started again at once (before its old heartbeat is stale)
        self.assertEqual([(t, s, c) for (t, s, c, _) in self.store.state_changes],
                         [(self.tunnel.tunnel_id, "source", False)])
        self.assertIn(("rk2", "source"), self.directory.peers)
        del b

    def test_clean_stop_leaves(self) -> None:
        a, b = self.node("a"), self.node("b")
        self.directory.peer_attached(PeerRow("rk", "source", self.tunnel.tunnel_id, "a", "ch"))
        self.directory.place("rk", "a", 5.0)
        self.successResultOf(a.stopService())
        self.assertEqual(self.successResultOf(self.directory.place("rk", "b", 5.0)).node_id, "b")  # free at once
        self.clock.advance(1.0)  # b's next beat reaps a's peers
        self.assertEqual([(s, c) for (_, s, c, _) in self.store.state_changes], [("source", False)])
        self.assertEqual((list(self.directory.node_seen), self.directory.peers), (["b"], {}))
        self.successResultOf(b.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LifecycleLeaseTests(TestCase):
    """Two nodes on one database (here one SQLite file): expiry runs on one of them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())  # botocore signs with the real time
        self.directory = MemoryDirectory(self.clock)
        state = self.mktemp()
        self.a_service = InMemoryService(state, self.clock, start=False)
        self.b_service = InMemoryService(state, self.clock, start=False)
        self.addCleanup(self.a_service.stop)
        self.addCleanup(self.b_service.stop)

    def node(self, name: str, service: InMemoryService) -> ClusterNode:
        node = ClusterNode(NodeInfo(name, f"{name}:7443"), self.directory, service.store, self.clock,
                           heartbeat=1.0, node_timeout=5.0, lifecycle=service.control.lifecycle)
        node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        return node

    def closed(self, service: InMemoryService) -> List[Any]:
        return [call for call in service.events.calls if call[0] == "tunnel_closed"]

    def test_expiry_once_and_the_lease_moves(self) -> None:
        a = self.node("a", self.a_service)
        b = self.node("b", self.b_service)
        self.assertEqual((a.leader, b.leader), (True, False))
        # Opened through node b (which does not run the lifecycle): node a expires it.
        client = self.b_service.client()
        tunnel_id = client.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 1})["tunnelId"]
        self.clock.pump([1.0] * 61)
        self.assertEqual(self.closed(self.a_service), [("tunnel_closed", tunnel_id, "expired")])
        self.assertEqual(self.closed(self.b_service), [])
        # Node a dies: within the node timeout, b takes the lease and expires the next one.
        a._loop.stop()  # type: ignore[union-attr]
        a.running = False
        second = client.open_tunnel(timeoutConfig={"maxLifetimeTimeoutMinutes": 1})["tunnelId"]
        self.clock.pump([1.0] * 6)
        self.assertTrue(b.leader)
        self.assertEqual(self.directory.leases[LIFECYCLE_LEASE][0], "b")
        self.clock.pump([1.0] * 56)
        self.assertEqual(self.closed(self.b_service), [("tunnel_closed", second, "expired")])
        self.assertEqual(len(self.closed(self.a_service)), 1)
        a.lifecycle.stopService()  # type: ignore[union-attr]  # (the killed process's timers die with it)


class OptionsTests(TestCase):
    def parse(self, *args: str) -> Any:
        from tunnelkit.service import tap

        options = tap.Options()
        options.parseOptions(["--mode", "service", *args])
        return options

    def test_off_by_default(self) -> None:
        from tunnelkit.service.cluster import cluster_enabled

        options = self.parse()
        self.assertFalse(cluster_enabled(options))
        self.assertEqual((options["cluster-heartbeat"], options["cluster-node-timeout"]), (1.0, 5.0))

    def test_node_options(self) -> None:
        options = self.parse("--cluster-listen", "tcp:7443:interface=10.0.0.5", "--node-id", "node-a",
                             "--advertise", "10.0.0.5:7443", "--cluster-secret-file", "/etc/tunnelkit/secret",
                             "--cluster-heartbeat", "0.5", "--cluster-node-timeout", "3")
        self.assertEqual((options["node-id"], options["advertise"], options["cluster-node-timeout"]), ("node-a", "10.0.0.5:7443", 3.0))

    def test_bad_combinations(self) -> None:
        from twisted.python import usage

        for args, text in (
            (("--node-id", "a"), "--node-id is for a node of a cluster"),
            (("--cluster-listen", "tcp:7443"), "--cluster-secret-file"),
            (("--cluster-listen", "tcp:7443", "--cluster-secret-file", "f", "--cluster-heartbeat", "3"), "twice"),
            (("--node-id", "bad id"), "node id"),
            (("--advertise", "nohost"), "HOST:PORT"),
        ):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*args)
            self.assertIn(text, str(caught.exception))

    def test_secret_too_short(self) -> None:
        from tunnelkit.service.cluster.wire import ForwardRefused, load_secret

        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"short\n")
        with self.assertRaises(ForwardRefused) as caught:
            load_secret(path)
        self.assertIn("at least 16", str(caught.exception))
