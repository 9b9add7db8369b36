"""
Tests of tunnelkit.service.cluster.events: CloseTunnel, expiry and rotation told on one node close
the WebSockets another node holds (in-process carrier; the PostgreSQL one in tests/e2e/test_cluster_postgres.py).
"""

from __future__ import annotations

import txaio
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tunnelkit.service.cluster.events import (
    ClusterEvents,
    IEventCarrier,
    InProcessCarrier,
    TunnelEvent,
    decode_event,
    encode_event,
)
from tunnelkit.service.interfaces import ITunnelEvents
from tunnelkit.testing import RawPeer, ServiceHarness, upgrade_request


class EncodingTests(TestCase):
    def test_round_trip(self) -> None:
        for event in (
            TunnelEvent("node-a", "closed", "0b3f0c1e-7a49-4c1d-9f0e-3b7f2b8c1d2e", "expired"),
            TunnelEvent("node-b", "rotated", "t-1", "destination"),
        ):
            self.assertEqual(decode_event(encode_event(event)), event)
        self.assertLess(len(encode_event(TunnelEvent("n" * 64, "closed", "t" * 128, "closed"))), 8000)

    def test_unknown_events_refused(self) -> None:
        for payload in ('{"o":"a","k":"deleted","t":"t","d":"x"}', '{"o":"a","k":"rotated","t":"t","d":"both"}',
                        '[1]', '{"o":"a","k":"closed","t":"bad id with spaces","d":"closed"}', '{"o":1}'):
            self.assertRaises(ValueError, decode_event, payload)


class AcrossNodesTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        txaio.use_twisted()  # autobahn's close-handshake timers on the test's clock
        old = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", old)
        self.carrier = InProcessCarrier()
        self.a = ServiceHarness(self.clock)
        self.c = ServiceHarness(self.clock)
        self.events_a = ClusterEvents("node-a", self.a.events, self.carrier)
        self.events_c = ClusterEvents("node-c", self.c.events, self.carrier)
        self.tunnel = self.a.open_tunnel(("SSH",))
        self.source = RawPeer(self.a.site, upgrade_request("source", self.tunnel.source_token))
        self.destination = RawPeer(self.a.site, upgrade_request("destination", self.tunnel.destination_token))

    def test_interfaces(self) -> None:
        verifyObject(IEventCarrier, self.carrier)
        verifyObject(ITunnelEvents, self.events_a)

    def test_close_on_another_node_closes_both(self) -> None:
        self.events_c.tunnel_closed(self.tunnel.tunnel_id, "closed")
        self.assertEqual(self.source.close_frame(), (1000, "Tunnel closed"))
        self.assertEqual(self.destination.close_frame(), (1000, "Tunnel closed"))
        self.assertEqual((self.events_a.received, self.events_c.received), (1, 0))

    def test_expiry_on_another_node(self) -> None:
        self.events_c.tunnel_closed(self.tunnel.tunnel_id, "expired")
        self.assertEqual(self.source.close_frame(), (1000, "Tunnel expired"))

    def test_rotation_on_another_node_closes_that_side(self) -> None:
        self.events_c.token_rotated(self.tunnel.tunnel_id, "destination")
        self.assertEqual(self.destination.close_frame(), (1008, "Access token rotated"))
        self.assertIsNone(self.source.close_frame())

    def test_event_on_the_holding_node_told_once(self) -> None:
        self.events_a.tunnel_closed(self.tunnel.tunnel_id, "closed")
        self.assertEqual(self.source.close_frame(), (1000, "Tunnel closed"))
        self.assertEqual((self.events_a.received, self.events_c.received), (0, 1))
