"""
Tests of tunnelkit.service.cluster.postgres on a real PostgreSQL (tunnelkit.testing.postgres): the
directory's rules as the in-memory one has them, races between nodes decided once, and the
LISTEN/NOTIFY carrier (delivery, reconnection after the server dropped its connection).
"""

from __future__ import annotations

import time
from typing import Any, List

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tunnelkit.service.cluster import schema
from tunnelkit.service.cluster.directory import INodeDirectory, NodeInfo, PeerRow
from tunnelkit.service.cluster.events import IEventCarrier, TunnelEvent
from tunnelkit.testing.postgres import fresh_database, skip_reason

A = NodeInfo("a", "127.0.0.1:7001")
B = NodeInfo("b", "127.0.0.1:7002")


def _connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


class _Base(TestCase):
    skip = skip_reason()

    def setUp(self) -> None:
        self.dsn = fresh_database(self)
        setup = _connect(self.dsn)
        setup.execute(schema.SQL)
        setup.close()

    def age(self, node_id: str, seconds: float) -> None:
        """Make C{node_id}'s last heartbeat C{seconds} older (instead of waiting)."""
        db = _connect(self.dsn)
        db.execute("UPDATE cluster_nodes SET heartbeat_at = heartbeat_at - make_interval(secs => %s) "
                   "WHERE node_id = %s", (seconds, node_id))
        db.execute("UPDATE cluster_placements SET placed_at = placed_at - make_interval(secs => %s) "
                   "WHERE node_id = %s", (seconds, node_id))
        db.close()


class DirectoryTests(_Base):
    def setUp(self) -> None:
        super().setUp()
        from tunnelkit.service.cluster.postgres import PostgresDirectory
        from tunnelkit.service.dbrunner import SynchronousRunner

        self.runner = SynchronousRunner(lambda: _connect(self.dsn))
        self.addCleanup(self.runner.close)
        self.directory = PostgresDirectory(self.runner)
        self.call(self.directory.heartbeat(A))
        self.call(self.directory.heartbeat(B))

    def call(self, d: defer.Deferred) -> Any:
        return self.successResultOf(d)

    def test_interface(self) -> None:
        verifyObject(INodeDirectory, self.directory)

    def test_placement(self) -> None:
        place = self.directory.place
        self.assertEqual(self.call(place("rk", "a", 5.0)), A)
        self.assertEqual(self.call(place("rk", "b", 5.0)), A)  # a's handshake may still be running
        self.call(self.directory.peer_attached(PeerRow("rk", "source", "t1", "a", "ch-1")))
        self.age("a", 100.0)
        self.call(self.directory.heartbeat(A))  # alive, holding a peer: it stays
        self.assertEqual(self.call(place("rk", "b", 5.0)), A)
        self.call(self.directory.peer_detached("rk", "source", "a", "ch-1"))
        self.assertEqual(self.call(place("rk", "b", 5.0)), B)  # a holds nothing any more: it moves
        self.age("b", 6.0)  # b dead
        self.assertEqual(self.call(place("rk", "a", 5.0)), A)

    def test_reap_once_and_take_own(self) -> None:
        for side in ("source", "destination"):
            self.call(self.directory.peer_attached(PeerRow("rk", side, "t1", "a", f"ch-{side}")))
        self.call(self.directory.peer_attached(PeerRow("rk2", "source", "t2", "b", "ch")))
        self.assertEqual(self.call(self.directory.reap(5.0)), [])
        self.age("a", 6.0)
        rows = self.call(self.directory.reap(5.0))
        self.assertEqual(sorted(r.side for r in rows), ["destination", "source"])
        self.assertEqual(self.call(self.directory.reap(5.0)), [])  # each row once
        self.assertEqual([n.node_id for n, live in self.call(self.directory.nodes(5.0))], ["b"])
        self.assertEqual([r.tunnel_id for r in self.call(self.directory.take_own("b"))], ["t2"])
        self.assertEqual(self.call(self.directory.take_own("b")), [])

    def test_peer_replaced_on_another_node(self) -> None:
        self.call(self.directory.peer_attached(PeerRow("rk", "source", "t1", "a", "ch-1")))
        self.call(self.directory.peer_attached(PeerRow("rk", "source", "t1", "b", "ch-2")))
        self.call(self.directory.peer_detached("rk", "source", "a", "ch-1"))  # the old one goes
        self.assertEqual([r.channel_id for r in self.call(self.directory.take_own("b"))], ["ch-2"])

    def test_leases(self) -> None:
        lease = self.directory.acquire_lease
        self.assertTrue(self.call(lease("lifecycle", "a", 5.0)))
        self.assertFalse(self.call(lease("lifecycle", "b", 5.0)))
        self.assertTrue(self.call(lease("lifecycle", "a", 5.0)))
        db = _connect(self.dsn)
        db.execute("UPDATE cluster_leases SET expires_at = clock_timestamp() - interval '1 second'")
        db.close()
        self.assertTrue(self.call(lease("lifecycle", "b", 5.0)))
        self.call(self.directory.leave("b"))
        self.assertTrue(self.call(lease("lifecycle", "a", 5.0)))


class RaceTests(_Base):
    """Two nodes' threads racing for the same tunnels: both get the same answer, every time."""

    timeout = 60

    @defer.inlineCallbacks
    def test_placement_race(self) -> Any:
        from tunnelkit.service.cluster.postgres import PostgresDirectory
        from tunnelkit.service.dbrunner import ThreadedRunner

        directories = []
        for _ in range(2):
            runner = ThreadedRunner(reactor, lambda: _connect(self.dsn), threads=2)
            self.addCleanup(runner.close)
            directories.append(PostgresDirectory(runner))
        yield directories[0].heartbeat(A)
        yield directories[1].heartbeat(B)
        for n in range(50):
            answers = yield defer.gatherResults([directories[0].place(f"rk{n}", "a", 5.0),
                                                 directories[1].place(f"rk{n}", "b", 5.0)])
            self.assertEqual(answers[0], answers[1])


class CarrierTests(_Base):
    timeout = 30

    @defer.inlineCallbacks
    def test_delivery_and_reconnection(self) -> Any:
        from tunnelkit.service.cluster.postgres import PostgresCarrier
        from tunnelkit.service.dbrunner import ThreadedRunner

        runner = ThreadedRunner(reactor, lambda: _connect(self.dsn), threads=1)
        self.addCleanup(runner.close)
        carrier = PostgresCarrier(lambda: _connect(self.dsn), runner, reactor)
        verifyObject(IEventCarrier, carrier)
        got: List[Any] = []
        carrier.subscribe(got.append)
        reconnected: List[bool] = []
        carrier.on_reconnect.append(lambda: reconnected.append(True))
        yield carrier.start()
        self.addCleanup(carrier.stop)
        event = TunnelEvent("a", "closed", "t1", "closed")
        started = time.monotonic()
        yield carrier.publish(event)
        while not got and time.monotonic() - started < 5:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(got, [event])
        # The server ends the listening connection: the carrier listens again and says so.
        db = _connect(self.dsn)
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'")
        db.close()
        while not reconnected and time.monotonic() - started < 10:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((reconnected, carrier.connections), ([True], 2))
        second = TunnelEvent("b", "rotated", "t1", "source")
        yield carrier.publish(second)
        while len(got) < 2 and time.monotonic() - started < 10:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(got, [event, second])


class NotificationQueueTests(_Base):
    """The shared notification queue: each row retried by one node; a dead node's taken over once."""

    def setUp(self) -> None:
        super().setUp()
        from tunnelkit.service.cluster.notifications import PostgresNotificationQueue
        from tunnelkit.service.dbrunner import SynchronousRunner

        db = _connect(self.dsn)
        db.execute(schema.NOTIFICATIONS_SQL)
        db.close()
        self.queues = {}
        for name in ("a", "b", "c"):
            runner = SynchronousRunner(lambda: _connect(self.dsn))
            self.addCleanup(runner.close)
            self.queues[name] = PostgresNotificationQueue(runner, name, 5.0)

    def call(self, d: defer.Deferred) -> Any:
        return self.successResultOf(d)

    def expire_claims(self, node_id: str) -> None:
        db = _connect(self.dsn)
        db.execute("UPDATE cluster_notifications SET claimed_until = clock_timestamp() - interval '1 second' "
                   "WHERE claimed_by = %s", (node_id,))
        db.close()

    def test_interface(self) -> None:
        from tunnelkit.service.notify import INotificationQueue

        verifyObject(INotificationQueue, self.queues["a"])

    def test_claims(self) -> None:
        a, b, c = self.queues["a"], self.queues["b"], self.queues["c"]
        first = self.call(a.put("t1", "thing1", b"token-1", 10.0))
        second = self.call(a.put("t1", "thing1", b"token-2", 11.0))  # a rotation replaces it
        self.assertGreater(second.seq, first.seq)
        self.call(a.put("t2", "thing2", b"other", 12.0))
        self.assertEqual([(i.tunnel_id, i.payload) for i in self.call(a.pending())], [("t1", b"token-2"), ("t2", b"other")])
        self.assertEqual(self.call(b.pending()), [])  # not b's
        self.assertEqual(self.call(b.claim_orphans()), [])  # a's claims are fresh
        self.call(a.renew())
        self.expire_claims("a")  # a died (no renewal)
        taken = self.call(b.claim_orphans()) + self.call(c.claim_orphans())
        self.assertEqual(sorted(i.tunnel_id for i in taken), ["t1", "t2"])  # each once, to one of them
        self.assertEqual(self.call(a.pending()), [])  # a restarted finds nothing of its own any more
        self.assertFalse(self.call(b.remove("t1", first.seq)))  # a replaced notification stays
        self.assertTrue(self.call(b.remove("t1", second.seq)))  # delivered
        self.assertTrue(self.call(c.remove("t2")))  # tunnel closed
