# -*- test-case-name: tests.test_dataplane -*-
"""
Mounting the data plane on the service's web site: C{GET /tunnel} (the WebSocket relay, see
L{tunnelkit.service.relay}), beside the API's C{POST /} on the same listener.  The relay's Prometheus
metrics are not on that site: L{metrics_site} serves them on a listener of their own
(C{--metrics-listen}, off by default), since they count tunnels of every account and show attacks in
progress.

The control plane's C{makeService} mixes L{DataPlaneOptions} into its options and calls
L{mount_data_plane} with its root resource and store; it keeps the returned L{ITunnelEvents} to tell
the relay about CloseTunnel, expiry and rotation.

Why a C{twisted.web} resource and not a separate autobahn listener: the API and the relay share one
port (AWS's clients know one endpoint per plane, and an operator opens one firewall hole).
C{twisted.web} parses the request first; autobahn's L{WebSocketResource} hands autobahn a rebuilt copy
of it, in which repeated headers are joined with commas.  The relay's checks work on that copy: a
comma in an C{access-token} or C{client-token} value counts as a second value (tokens never contain
one), and the 4096-byte limit is measured on the rebuilt request line and headers, which are the
received ones up to whitespace around header values.  (C{twisted.web} itself refuses requests whose
headers exceed 16 KiB, with a 400.)  The resource also detaches the HTTP channel, which registered
itself as the connection's producer, so that the relay can register its own.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from tunnelkit.config import number
from tunnelkit.service.interfaces import ITunnelEvents, ITunnelStore
from tunnelkit.service.metrics import ITunnelCounts, RelayMetrics, metrics_resource
from tunnelkit.service.pairing import Relay, RelayLimits
from tunnelkit.service.relay import build_factory
from tunnelkit.transport.websocket import tune_allocator

log = Logger()

__all__ = [
    "DataPlaneOptions",
    "mount_data_plane",
    "TunnelResource",
    "limits_from_options",
    "MAX_SERVICES_LIMIT",
    "tunnel_counter",
    "metrics_site",
]

#: The most services a tunnel may have, whatever the configuration says.
MAX_SERVICES_LIMIT = 32


class DataPlaneOptions:
    """
    Mixin for the service's C{usage.Options}: the data plane's limits.  Values are read back with
    L{limits_from_options}; C{max-services-per-tunnel} is enforced by OpenTunnel.  (The service's
    options also mix in L{tunnelkit.transport.nvx.NvxOptions}, and its C{makeService} checks NVX.)
    """

    optParameters: List[Sequence[Any]] = [
        [
            "max-services-per-tunnel",
            None,
            3,
            f"Most services (destinationConfig.services) a tunnel may have, 1-{MAX_SERVICES_LIMIT}.",
            number(1, MAX_SERVICES_LIMIT, whole=True),
        ],
        [
            "tunnel-bandwidth",
            None,
            0,
            "Bytes per second each tunnel may relay, both directions together (0: unlimited).",
            number(0, whole=True),
        ],
        [
            "handshakes-per-second",
            None,
            10.0,
            "WebSocket handshakes per second allowed per tunnel, beyond which they get 429 (0: no limit).",
            number(0),
        ],
        [
            "failed-handshakes-per-address",
            None,
            10.0,
            "Failed WebSocket handshakes per second one client address (IPv6: one /64) may make "
            "(burst of twice as many); beyond them its attempts get 429 before their token is looked "
            "at (0: no limit). Clients behind one NAT address, or a reverse proxy that is not a "
            "haproxy: listener, share it: there use 0 (--failed-handshakes-per-key still stops floods).",
            number(0),
        ],
        [
            "failed-handshakes-per-key",
            None,
            10.0,
            "Failed handshakes per second counted per tunnel (token routing key), burst of twice as "
            "many; beyond them failing attempts get 429. A valid token is never refused by it (0: no limit).",
            number(0),
        ],
        [
            "ping-interval",
            None,
            20.0,
            "Seconds a connected peer may be silent before the service pings it (min 1).",
            number(1),
        ],
        [
            "peer-timeout",
            None,
            60.0,
            "Seconds of silence (no frame, no pong) after which a peer is taken for gone: reset, "
            "recorded DISCONNECTED, the other side sent STREAM_RESET (min 2; longer than --ping-interval).",
            number(2),
        ],
        [
            "max-websockets-per-account",
            None,
            2000,
            "Open tunnel WebSockets allowed per account (0: unlimited).",
            number(0, whole=True),
        ],
        [
            "relay-buffer",
            None,
            131072,
            "Bytes the relay buffers toward one peer before it stops reading the other; also the "
            "largest socket read (min 65536; above 131072 each read costs the process a fresh "
            "memory mapping, about 70 us).",
            number(65536, whole=True),
        ],
    ]


def _option(options: Mapping[str, Any], name: str, default: Any) -> Any:
    for key in (name, name.replace("-", "_")):
        if key in options and options[key] is not None:
            return options[key]
    return default


def limits_from_options(options: Mapping[str, Any]) -> RelayLimits:
    """The relay limits in parsed L{DataPlaneOptions} (missing keys take the defaults)."""
    bandwidth = int(_option(options, "tunnel-bandwidth", 0))
    per_account = int(_option(options, "max-websockets-per-account", 2000))
    return RelayLimits(
        tunnel_bandwidth=bandwidth or None,
        handshakes_per_second=float(_option(options, "handshakes-per-second", 10.0)),
        failed_handshakes_per_address=float(_option(options, "failed-handshakes-per-address", 10.0)),
        failed_handshakes_per_key=float(_option(options, "failed-handshakes-per-key", 10.0)),
        max_websockets_per_account=per_account or None,
        relay_buffer=int(_option(options, "relay-buffer", 131072)),
        ping_interval=float(_option(options, "ping-interval", 20.0)),
        peer_timeout=float(_option(options, "peer-timeout", 60.0)),
    )


class TunnelResource(WebSocketResource):
    """
    autobahn's WebSocket resource, plus: detach the HTTP channel from the connection's producer slot
    before autobahn takes the connection over (the relay registers its own producer there).
    """

    #: On a node of a cluster, decides before the token is spent whether the upgrade is served here or
    #: forwarded to the node holding its tunnel (L{tunnelkit.service.cluster.forward.ForwardingGate}).
    gate: Any = None

    def render(self, request: Any) -> Any:
        transport = request.channel.transport
        if transport is not None and getattr(transport, "producer", True) is not None:
            # HTTPChannel registered itself in connectionMade; a TCP or TLS transport has exactly
            # one producer slot.  (StringTransport raises when none is registered.)
            try:
                transport.unregisterProducer()
            except RuntimeError:
                pass
        if self.gate is not None:
            return self.gate.render(request, super().render)
        return super().render(request)


def tunnel_counter(store: Any) -> Optional[Callable[[], Mapping[str, int]]]:
    """
    How C{/metrics} counts tunnels by status: the store's L{ITunnelCounts}, if it provides it.  The
    counts are read by C{counts.refresh()} (a Deferred: the metrics page calls it before each scrape)
    and the collector reports the last ones read.
    """
    if not ITunnelCounts.providedBy(store):
        return None
    last: Dict[str, int] = {}

    def refresh() -> Any:
        d = store.count_tunnels_by_status()

        def got(result: Mapping[str, int]) -> None:
            last.clear()
            last.update(result)

        d.addCallback(got)
        d.addErrback(lambda f: log.failure("Counting tunnels for /metrics failed", f))
        return d

    def counts() -> Mapping[str, int]:
        return dict(last)

    counts.refresh = refresh  # type: ignore[attr-defined]
    return counts


def mount_data_plane(
    root: Resource,
    store: ITunnelStore,
    clock: IReactorTime,
    options: Mapping[str, Any],
) -> Relay:
    """
    Put C{/tunnel} under C{root} (the metrics: L{metrics_site}).

    @param store: checks tokens and records connection states.
    @param clock: the reactor (or a L{twisted.internet.task.Clock} in tests).
    @param options: parsed L{DataPlaneOptions} (a plain mapping works; missing keys take defaults).
    @return: the relay, to tell about closed tunnels and rotated tokens.
    """
    tune_allocator()  # the relay's 129 KB messages: see tune_allocator
    metrics = RelayMetrics(tunnel_counts=tunnel_counter(store))
    relay = Relay(store, clock, limits_from_options(options), metrics)
    root.putChild(b"tunnel", TunnelResource(build_factory(relay)))
    return relay


def metrics_site(relay: Relay, reactor: Any = None) -> Site:
    """A site serving C{relay}'s metrics at C{GET /metrics} (for C{--metrics-listen})."""
    root = Resource()
    root.putChild(b"metrics", metrics_resource(relay.metrics))  # type: ignore[arg-type]
    site = Site(root, reactor=reactor)
    site.noisy = False
    return site
