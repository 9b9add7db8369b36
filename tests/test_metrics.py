"""
Tests for L{tunnelkit.service.metrics}: a registry per service, and the Prometheus text at /metrics.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from tunnelkit.service.metrics import IRelayMetrics, RelayMetrics, metrics_resource


def scrape(resource: Resource) -> str:
    request = DummyRequest([b""])
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
    return b"".join(request.written).decode()


class MetricsTests(SynchronousTestCase):
    def test_interface(self) -> None:
        verifyObject(IRelayMetrics, RelayMetrics())

    def test_registries_are_separate(self) -> None:
        one, two = RelayMetrics(), RelayMetrics()
        one.handshake_rejected("token-used")
        self.assertEqual(one.value("tunnelkit_handshake_rejections_total", reason="token-used"), 1.0)
        self.assertEqual(two.value("tunnelkit_handshake_rejections_total", reason="token-used"), 0.0)

    def test_text(self) -> None:
        metrics = RelayMetrics(tunnel_counts=lambda: {"OPEN": 4, "CLOSED": 1})
        metrics.relayed("source_to_destination", 3, 300)
        metrics.peer_connected("source", 1)
        metrics.violation("unknown_field")
        metrics.dropped("peer_absent", 2)
        metrics.relay_tunnels(1)
        text = scrape(metrics_resource(metrics))
        for line in [
            'tunnelkit_tunnels{status="OPEN"} 4.0',
            'tunnelkit_tunnels{status="CLOSED"} 1.0',
            'tunnelkit_relayed_bytes_total{direction="source_to_destination"} 300.0',
            'tunnelkit_relayed_frames_total{direction="source_to_destination"} 3.0',
            'tunnelkit_peers_connected{side="source"} 1.0',
            'tunnelkit_peers_connected{side="destination"} 0.0',
            'tunnelkit_protocol_violations_total{rule="unknown_field"} 1.0',
            'tunnelkit_dropped_frames_total{reason="peer_absent"} 2.0',
            "tunnelkit_relay_tunnels 1.0",
        ]:
            self.assertIn(line, text)

    def test_failing_counts_are_logged_not_fatal(self) -> None:
        def broken() -> dict:
            raise RuntimeError("database gone")

        text = scrape(metrics_resource(RelayMetrics(tunnel_counts=broken)))
        self.assertIn("# TYPE tunnelkit_tunnels gauge", text)
        self.assertNotIn('tunnelkit_tunnels{', text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
