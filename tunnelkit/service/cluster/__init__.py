# -*- test-case-name: tests.test_cluster_node,tests.test_cluster_forward,tests.test_cluster_events -*-
"""
Several service nodes working as one (issue 13): node identity and the cluster listener, the shared
directory of nodes and peers, forwarding a peer to the node that holds its tunnel, control events on
every node, exactly-once lifecycle, and surviving the loss of a node.

Off unless C{--cluster-listen} is given: a single node (SQLite) behaves exactly as without this
package.  The parts:
  - L{tunnelkit.service.cluster.directory}: L{INodeDirectory} (in memory; PostgreSQL in
    L{tunnelkit.service.cluster.postgres});
  - L{tunnelkit.service.cluster.wire}: the internal forwarding handshake (sans I/O);
  - L{tunnelkit.service.cluster.forward}: the gate before the relay and the cluster listener;
  - L{tunnelkit.service.cluster.events}: CloseTunnel/expiry/rotation on every node;
  - L{tunnelkit.service.cluster.node}: heartbeat, reaping dead nodes, the lifecycle lease.
"""

from __future__ import annotations

import re
import socket
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger

from tunnelkit.config import number, server_endpoint
from tunnelkit.errors import ConfigError
from tunnelkit.service.cluster.directory import INodeDirectory, NodeInfo
from tunnelkit.service.cluster.events import ClusterEvents, IEventCarrier
from tunnelkit.service.cluster.forward import TLS_PREFIX, ClusterListenerFactory, ForwardingGate
from tunnelkit.service.cluster.node import ClusterNode
from tunnelkit.service.cluster.wire import ForwardRefused, load_secret
from tunnelkit.service.lifecycle import TunnelLifecycle
from tunnelkit.service.listeners import is_tls, listen_description, listener_endpoint

__all__ = ["ClusterOptions", "Cluster", "build_cluster", "cluster_backends", "cluster_enabled", "node_id", "advertise_address"]

log = Logger()

_NODE_ID_RE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")
_ADDRESS_RE = re.compile(r"\A(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})\Z")


def node_id(text: str) -> str:
    """Coerce: a node id, 1-64 of A-Z a-z 0-9 . _ -."""
    if not _NODE_ID_RE.match(text):
        raise ValueError(f"a node id is 1-64 of A-Z a-z 0-9 . _ -, got {text!r}")
    return text


def advertise_address(text: str) -> str:
    """Coerce: C{host:port} (C{[v6]:port}) other nodes connect to."""
    match = _ADDRESS_RE.match(text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"give HOST:PORT, e.g. 10.0.0.5:7443, got {text!r}")
    return text


def _endpoint(text: str) -> str:
    return server_endpoint(text)


_endpoint.coerceDoc = ""  # type: ignore[attr-defined]


class ClusterOptions:
    """Mixin for the service's C{usage.Options}: running as one node of several."""

    optParameters: List[Sequence[Any]] = [
        [
            "cluster-listen",
            None,
            None,
            "Run as a node of a cluster: accept peers forwarded by the other nodes on this Twisted "
            "endpoint, e.g. ssl:7443:interface=10.0.0.5 (TLS with the generated certificate: the "
            "peers' bytes, tokens included, are encrypted between nodes) or tcp:... on a private "
            "network; reachable by the nodes only; needs --cluster-secret-file and a shared --store "
            "postgresql://... Default: off, one node.",
            _endpoint,
        ],
        [
            "node-id",
            None,
            None,
            "This node's id in the cluster, stable across restarts (default: the host name).",
            node_id,
        ],
        [
            "advertise",
            None,
            None,
            "HOST:PORT the other nodes connect to for --cluster-listen (default: its interface "
            "and port).",
            advertise_address,
        ],
        [
            "cluster-secret-file",
            None,
            None,
            "File holding the cluster secret (the same on every node, at least 16 bytes): nodes "
            "prove they hold it before forwarding a peer.",
        ],
        [
            "cluster-heartbeat",
            None,
            1.0,
            "Seconds between a node's heartbeats in the shared database.",
            number(0.1),
        ],
        [
            "cluster-node-timeout",
            None,
            5.0,
            "Seconds without a heartbeat after which a node is taken for dead: its peers are "
            "recorded DISCONNECTED and its tunnels move to the nodes their peers reach.",
            number(0.5),
        ],
    ]

    def check_cluster_options(self) -> None:
        """Cross-checks (called from the service options' C{postOptions})."""
        from twisted.python import usage

        options: Any = self
        if not options.get("cluster-listen"):
            for name in ("node-id", "advertise", "cluster-secret-file"):
                if options.get(name):
                    raise usage.UsageError(f"--{name} is for a node of a cluster: give --cluster-listen too")
            return
        if not options.get("cluster-secret-file"):
            raise usage.UsageError("--cluster-listen needs --cluster-secret-file FILE (the same secret on every node)")
        if options["cluster-node-timeout"] < 2 * options["cluster-heartbeat"]:
            raise usage.UsageError(
                "--cluster-node-timeout must be at least twice --cluster-heartbeat (a node is not taken for "
                "dead for one late heartbeat)"
            )


def cluster_enabled(options: Mapping[str, Any]) -> bool:
    """Whether C{options} make this service a node of a cluster."""
    return bool(options.get("cluster-listen"))


def _interface_address(description: str, port: int) -> Optional[str]:
    match = re.search(r"(?:^|:)interface=((?:\\.|[^:])*)", description)
    interface = match.group(1).replace("\\:", ":") if match else ""
    if interface in ("", "0.0.0.0", "::"):
        return None
    return f"[{interface}]:{port}" if ":" in interface else f"{interface}:{port}"


class Cluster(MultiService):
    """
    This node's cluster parts, as one service: the cluster listener, then (once it listens and the
    node's address is known) the heartbeat.  Give the relay's factory's site and the store; then
    use L{events} as the control plane's L{ITunnelEvents} and L{gate} on C{/tunnel}.
    """

    def __init__(
        self,
        options: Mapping[str, Any],
        reactor: Any,
        clock: Any,
        relay: Any,
        store: Any,
        directory: INodeDirectory,
        carrier: IEventCarrier,
        secret: Optional[bytes] = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.listen = options["cluster-listen"]
        self.listen_description = self.listen
        self.node_id = options.get("node-id") or default_node_id()
        self.advertised = options.get("advertise")
        if secret is None:
            try:
                secret = load_secret(options["cluster-secret-file"])
            except ForwardRefused as e:
                raise ConfigError(str(e)) from None
        self.secret = secret
        self.directory = directory
        self.carrier = carrier
        heartbeat = float(options.get("cluster-heartbeat") or 1.0)
        self.node_timeout = float(options.get("cluster-node-timeout") or 5.0)
        node = NodeInfo(self.node_id, self.advertised or "")
        self.gate = ForwardingGate(node, directory, secret, reactor, self.node_timeout)
        self.events = ClusterEvents(self.node_id, relay, carrier)
        self.node = ClusterNode(node, directory, store, clock, heartbeat, self.node_timeout)
        self.store = store
        reconnected = getattr(carrier, "on_reconnect", None)
        if reconnected is not None:
            reconnected.append(self.resync)
        relay.placement = self.node
        self.factory: Optional[ClusterListenerFactory] = None
        self.clock = clock
        self.port: Any = None

    def serve(self, site: Any, root: Any, certificates: Any = None) -> None:
        """
        Serve forwarded peers into C{site}; put the gate on C{root}'s C{/tunnel}.  An C{ssl:}
        C{--cluster-listen} naming no certificate uses the node's generated one (C{certificates}).
        """
        self.factory = ClusterListenerFactory(site, self.secret, self.clock)
        root.children[b"tunnel"].gate = self.gate
        if certificates is not None:
            self.listen_description = listen_description(self.listen, certificates)

    def take_lifecycle(self, lifecycle: TunnelLifecycle) -> None:
        """Run C{lifecycle} (expiry, purge) only while this node holds the cluster's lease."""
        self.node.lifecycle = lifecycle

    def startService(self) -> None:
        super().startService()
        assert self.factory is not None, "Cluster.serve first"
        endpoint, _ = listener_endpoint(self.reactor, self.listen_description, library="pyopenssl")
        listening = endpoint.listen(self.factory)
        failed: List[Any] = []
        listening.addCallbacks(self._listening, failed.append)
        if failed:
            raise ConfigError(
                f"--cluster-listen {self.listen}: cannot listen: {failed[0].getErrorMessage().rstrip('.')}; "
                "choose another port"
            )

    def _listening(self, port: Any) -> None:
        self.port = port
        address = self.advertised or _interface_address(self.listen, port.getHost().port)
        if address is None:
            raise ConfigError(
                f"--cluster-listen {self.listen} listens on every interface: give --advertise HOST:PORT, the "
                "address the other nodes reach this node at"
            )
        if is_tls(self.listen):
            address = TLS_PREFIX + address  # the other nodes connect with TLS
        node = NodeInfo(self.node_id, address)
        self.gate.node = node
        self.node.node = node
        log.info("Cluster node {node_id}: forwarded peers on {address}", node_id=self.node_id, address=address)
        self.node.startService()
        start = getattr(self.carrier, "start", None)
        if start is not None:  # PostgreSQL LISTEN (retries by itself until the database answers)
            start()

    def resync(self) -> Deferred:
        """
        After the event carrier was lost a while: close this node's WebSockets of tunnels the store
        says are closed (their CloseTunnel or expiry may have been missed).
        """
        relay = self.events.local
        checks = []
        for tunnel_id, link in list(getattr(relay, "links", {}).items()):
            d = maybeDeferred(self.store.get_tunnel, link.account_id, tunnel_id)

            def check(tunnel: Any, tunnel_id: str = tunnel_id) -> None:
                if tunnel is None or tunnel.status != "OPEN":
                    log.info("Tunnel {tunnel_id} closed while the cluster events were cut: closing its connections",
                             tunnel_id=tunnel_id)
                    relay.tunnel_closed(tunnel_id, "closed")
            d.addCallback(check)
            d.addErrback(lambda f: log.failure("Could not check a tunnel after the cluster events came back", f))
            checks.append(d)
        return gatherResults(checks)

    def stopService(self) -> Deferred:
        super().stopService()
        stop = getattr(self.carrier, "stop", None)
        if stop is not None:
            stop()
        d = self.node.stopService() if self.node.running else succeed(None)
        runner = getattr(self.directory, "runner", None)
        if runner is not None:
            d.addBoth(lambda _: runner.close())
        port, self.port = self.port, None
        if port is not None:
            d.addBoth(lambda _: port.stopListening())
        return d


def build_cluster(
    options: Mapping[str, Any],
    reactor: Any,
    clock: Any,
    relay: Any,
    store: Any,
    backends: Optional[Any] = None,
    notifier: Any = None,
) -> Cluster:
    """
    This node's L{Cluster}, on C{backends} (a directory, an event carrier and optionally a shared
    notification queue) or, by default, on the store's PostgreSQL database (L{cluster_backends}).

    @raise ConfigError: the store is not a shared PostgreSQL one, or the secret is unusable.
    """
    if backends is None:
        backends = cluster_backends(options, store, reactor)
    directory, carrier = backends[:2]
    cluster = Cluster(options, reactor, clock, relay, store, directory, carrier)
    if notifier is not None and len(backends) > 2 and backends[2] is not None:
        cluster.node.notifications = (backends[2], notifier)
    return cluster


def cluster_backends(options: Mapping[str, Any], store: Any, reactor: Any) -> Tuple[Any, ...]:
    """
    The directory, event carrier and shared notification queue on C{store}'s PostgreSQL database.

    @raise ConfigError: the store is not a PostgreSQL one.
    """
    from tunnelkit.service.cluster.postgres import backends_for_store

    directory, carrier = backends_for_store(store, reactor)
    from tunnelkit.service.cluster.notifications import PostgresNotificationQueue

    name = options.get("node-id") or default_node_id()
    timeout = float(options.get("cluster-node-timeout") or 5.0)
    return directory, carrier, PostgresNotificationQueue(directory.runner, name, timeout)


def default_node_id() -> str:
    """The node id when C{--node-id} is not given: the host name."""
    return node_id(socket.gethostname().split(".")[0][:64] or "node")
