# -*- test-case-name: tests.test_metrics -*-
"""
The tunnel service's Prometheus metrics, in a registry of their own (never the process-global one,
so several services, or tests, can live in one process).

Names (all prefixed C{tunnelkit_}):
  - C{tunnels{status}}: tunnels by status (OPEN, CLOSED), as far as the store can count them
    (see L{tunnelkit.service.dataplane.tunnel_counter}); C{relay_tunnels}: tunnels with at least one
    peer connected here.
  - C{peers_connected{side}}: WebSockets connected, per side.
  - C{relayed_bytes_total{direction}}, C{relayed_frames_total{direction}}: tunnel frames relayed
    (C{source_to_destination}, C{destination_to_source}); bytes count frames with their length prefix.
  - C{dropped_frames_total{reason}}: frames not delivered (C{peer_absent}).
  - C{handshakes_total}: WebSocket handshakes accepted.
  - C{handshake_rejections_total{reason}}: handshakes refused, by reason (C{missing-token},
    C{token-used}, ...).
  - C{protocol_violations_total{rule}}: peers closed for breaking a protocol rule.
  - C{peers_closed_total{cause}}: WebSockets the service closed (C{replaced}, C{tunnel-closed},
    C{tunnel-expired}, C{token-rotated}, C{violation}, C{timeout}: silent past C{--peer-timeout}).
  - C{reads_paused_total{cause}}: times the relay stopped reading a peer (C{backpressure},
    C{bandwidth}).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import Interface, implementer

__all__ = ["ITunnelCounts", "IRelayMetrics", "RelayMetrics", "metrics_resource"]

log = Logger()

SOURCE_TO_DESTINATION = "source_to_destination"
DESTINATION_TO_SOURCE = "destination_to_source"


class ITunnelCounts(Interface):
    """A store that can count tunnels by status (for the C{tunnelkit_tunnels} gauge)."""

    def count_tunnels_by_status() -> Any:
        """A Deferred of C{{"OPEN": n, "CLOSED": m}} over every account."""


class IRelayMetrics(Interface):
    """What the relay records.  Counting calls are cheap: the relay calls them per WebSocket message."""

    def relayed(direction: str, frames: int, size: int) -> None:
        """C{frames} tunnel frames of C{size} bytes in all went C{direction}."""

    def dropped(reason: str, frames: int) -> None:
        """C{frames} frames were not delivered, for C{reason}."""

    def handshake_accepted() -> None:
        """A WebSocket handshake succeeded."""

    def handshake_rejected(reason: str) -> None:
        """A WebSocket handshake was refused for C{reason}."""

    def violation(rule: str) -> None:
        """A peer broke protocol rule C{rule} (and was closed)."""

    def peer_closed(cause: str) -> None:
        """The service closed a peer's WebSocket for C{cause}."""

    def reads_paused(cause: str) -> None:
        """The relay stopped reading a peer for C{cause}."""

    def peer_connected(side: str, delta: int) -> None:
        """A peer of C{side} connected (+1) or went away (-1)."""

    def relay_tunnels(count: int) -> None:
        """C{count} tunnels have at least one peer connected to this relay."""


class _TunnelStatusCollector:
    """Asks the store for tunnel counts at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("tunnelkit_tunnels", "Tunnels by status.", labels=["status"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tunnelkit_tunnels", "Tunnels by status.", labels=["status"])
        try:
            counts = dict(self._counts())
        except Exception:
            log.failure("Counting tunnels for /metrics failed")
            counts = {}
        for status, value in sorted(counts.items()):
            family.add_metric([status], value)
        yield family


class _RelayedCollector:
    """Reports the relay's plain frame and byte counts as Prometheus counters."""

    def __init__(self, relayed: Mapping[str, List[int]]) -> None:
        self._relayed = relayed

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[CounterMetricFamily]:
        return iter(self._families())

    def _families(self) -> List[CounterMetricFamily]:
        frames = CounterMetricFamily(
            "tunnelkit_relayed_frames", "Tunnel frames relayed, per direction.", labels=["direction"]
        )
        size = CounterMetricFamily(
            "tunnelkit_relayed_bytes",
            "Bytes of tunnel frames relayed (with their length prefix), per direction.",
            labels=["direction"],
        )
        for direction, (frame_count, byte_count) in sorted(self._relayed.items()):
            frames.add_metric([direction], frame_count)
            size.add_metric([direction], byte_count)
        return [frames, size]


@implementer(IRelayMetrics)
class RelayMetrics:
    """
    The relay's metrics in their own L{CollectorRegistry}.

    @ivar registry: what C{/metrics} serves.
    """

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        tunnel_counts: Optional[Callable[[], Mapping[str, int]]] = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        #: Called (if the counts have it) before each scrape: a Deferred that fires once they are current.
        self.refresh: Optional[Callable[[], Any]] = getattr(tunnel_counts, "refresh", None)
        r = self.registry
        if tunnel_counts is not None:
            r.register(_TunnelStatusCollector(tunnel_counts))
        self._peers = Gauge(
            "tunnelkit_peers_connected", "WebSocket peers connected, per side.", ["side"], registry=r
        )
        self._relay_tunnels = Gauge(
            "tunnelkit_relay_tunnels",
            "Tunnels with at least one peer connected to this relay.",
            registry=r,
        )
        # Relayed frames and bytes are counted per WebSocket message: plain integers here, turned
        # into counters when /metrics is read (no lock per message).
        self._relayed: Dict[str, List[int]] = {
            SOURCE_TO_DESTINATION: [0, 0],
            DESTINATION_TO_SOURCE: [0, 0],
        }
        r.register(_RelayedCollector(self._relayed))
        self._dropped = Counter(
            "tunnelkit_dropped_frames", "Tunnel frames not delivered, by reason.", ["reason"], registry=r
        )
        self._handshakes = Counter(
            "tunnelkit_handshakes", "WebSocket handshakes accepted.", registry=r
        )
        self._rejections = Counter(
            "tunnelkit_handshake_rejections", "WebSocket handshakes refused, by reason.", ["reason"],
            registry=r,
        )
        self._violations = Counter(
            "tunnelkit_protocol_violations", "Peers closed for breaking a protocol rule, by rule.",
            ["rule"], registry=r,
        )
        self._closed = Counter(
            "tunnelkit_peers_closed", "WebSockets closed by the service, by cause.", ["cause"], registry=r
        )
        self._paused = Counter(
            "tunnelkit_reads_paused", "Times the relay stopped reading a peer, by cause.", ["cause"],
            registry=r,
        )
        for side in ("source", "destination"):
            self._peers.labels(side)

    def relayed(self, direction: str, frames: int, size: int) -> None:
        counts = self._relayed[direction]
        counts[0] += frames
        counts[1] += size

    def dropped(self, reason: str, frames: int) -> None:
        self._dropped.labels(reason).inc(frames)

    def handshake_accepted(self) -> None:
        self._handshakes.inc()

    def handshake_rejected(self, reason: str) -> None:
        self._rejections.labels(reason).inc()

    def violation(self, rule: str) -> None:
        self._violations.labels(rule).inc()

    def peer_closed(self, cause: str) -> None:
        self._closed.labels(cause).inc()

    def reads_paused(self, cause: str) -> None:
        self._paused.labels(cause).inc()

    def peer_connected(self, side: str, delta: int) -> None:
        self._peers.labels(side).inc(delta)

    def relay_tunnels(self, count: int) -> None:
        self._relay_tunnels.set(count)

    def value(self, name: str, **labels: str) -> float:
        """The current value of sample C{name} with C{labels} (0 if absent): for tests and tools."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


class MetricsPage(Resource):
    """C{GET /metrics}: the registry in the Prometheus text format, rendered in the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, refresh: Optional[Callable[[], Any]] = None) -> None:
        super().__init__()
        self._registry = registry
        self._refresh = refresh

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        if self._refresh is None:
            return generate_latest(self._registry)
        # Read what the store counts first (off the reactor thread), then render.
        d = self._refresh()

        def render(_: Any) -> None:
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(generate_latest(self._registry))
                request.finish()

        d.addBoth(render)
        return NOT_DONE_YET


def metrics_resource(metrics: RelayMetrics) -> Resource:
    """A twisted.web resource serving C{metrics} in the Prometheus text format."""
    return MetricsPage(metrics.registry, metrics.refresh)
