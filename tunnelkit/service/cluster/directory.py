# -*- test-case-name: tests.test_cluster_directory -*-
"""
The cluster directory: which service nodes are alive, which node a tunnel is placed on, and which
node holds each side's WebSocket.

Every node of a cluster shares one directory (PostgreSQL: L{tunnelkit.service.cluster.postgres}; in
memory for unit tests: L{MemoryDirectory}).  Keys are a tunnel's token routing key
(L{tunnelkit.service.tokens.routing_key}): every token of a tunnel shares it and it is readable from
the upgrade request before the token is checked, so a node decides where a peer goes without
spending its token.

Rules (L{placement_winner} is the one place that decides):
  - a node is I{live} while its last heartbeat is younger than the cluster's node timeout;
  - a tunnel is I{placed} on one node.  A node that gets a peer asks to place the tunnel on itself:
    it stays where it is when the placed node is live and either holds a peer of the tunnel or
    placed it less than L{PLACEMENT_GRACE} seconds ago (a handshake still in progress there);
    otherwise the asking node takes it (the holder is dead, or holds nothing of it any more): the
    tunnel moves;
  - a peer row (routing key, side) names the node and channel holding that side; a row is removed by
    its own node when the peer goes (only if the channel still matches: a newer peer may have
    replaced it), or by a live node that reaps a dead node's rows (each row is removed once, by the
    node whose delete found it, which then records that side DISCONNECTED).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

__all__ = [
    "PLACEMENT_GRACE",
    "IDLE_PLACEMENT",
    "NodeInfo",
    "PeerRow",
    "INodeDirectory",
    "MemoryDirectory",
    "placement_winner",
]

#: Seconds a fresh placement holds even though its node holds no peer yet (its handshake may take up
#: to the front door's 10 s head deadline plus the token check).
PLACEMENT_GRACE = 15.0
#: Seconds after which the placement of a tunnel no node holds a peer of is forgotten (at a reap).
IDLE_PLACEMENT = 3600.0


@dataclass(frozen=True)
class NodeInfo:
    """A service node: its id and the internal address (C{host:port}) other nodes forward to."""

    node_id: str
    address: str


@dataclass(frozen=True)
class PeerRow:
    """One side of one tunnel held by a node."""

    routing_key: str
    side: str
    tunnel_id: str
    node_id: str
    channel_id: str


def placement_winner(
    asking: str,
    holder: Optional[str],
    holder_live: bool,
    holder_has_peers: bool,
    placed_age: float,
    grace: float = PLACEMENT_GRACE,
) -> str:
    """
    Who holds a tunnel after node C{asking} asks for it (pure: both directories apply this).

    @param holder: the node it is placed on now (None: not placed).
    @param placed_age: seconds since C{holder} placed it (or last confirmed it).
    """
    if holder is None or holder == asking or not holder_live:
        return asking
    if holder_has_peers or placed_age < grace:
        return holder
    return asking


class INodeDirectory(Interface):
    """
    The cluster's shared record of nodes, placements and peers.  Every method returns a Deferred
    (a database call never blocks the reactor).  Times are the directory's own clock (the
    database's), so nodes need not agree on the time.
    """

    def heartbeat(node: NodeInfo) -> Deferred:
        """Record that C{node} is alive now (registers it on first call)."""

    def leave(node_id: str) -> Deferred:
        """
        C{node_id} stops cleanly: it counts as dead at once (its placements and leases are free), and
        its peer rows stay for the next reap of a live node, which records them DISCONNECTED (the
        stopping node's own writes may not all land).
        """

    def nodes(timeout: float) -> Deferred:
        """Fires with a list of (L{NodeInfo}, live) for every known node."""

    def place(routing_key: str, node_id: str, timeout: float) -> Deferred:
        """
        Ask to place the tunnel of C{routing_key} on C{node_id} (see L{placement_winner}; C{timeout}:
        the node timeout deciding liveness).  Fires with the L{NodeInfo} of the node that holds it.
        """

    def peer_attached(row: PeerRow) -> Deferred:
        """C{row.node_id} now holds C{row.side} of the tunnel (replaces any row of that side)."""

    def peer_detached(routing_key: str, side: str, node_id: str, channel_id: str) -> Deferred:
        """The peer on C{channel_id} went; remove its row if it is still that one's."""

    def take_own(node_id: str) -> Deferred:
        """
        At start: remove and fire with the L{PeerRow}s left by an earlier run of C{node_id} (its
        peers are gone with that process).
        """

    def reap(timeout: float) -> Deferred:
        """
        Remove the peer rows of every node whose heartbeat is older than C{timeout} seconds, and
        those nodes once they hold nothing; fires with the removed L{PeerRow}s (each row is
        returned to exactly one caller).
        """

    def acquire_lease(name: str, node_id: str, ttl: float) -> Deferred:
        """
        Take or renew the lease C{name} for C{ttl} seconds: fires with True when C{node_id} holds
        it (it was free, expired, or C{node_id}'s already), else False.
        """

    def release_lease(name: str, node_id: str) -> Deferred:
        """Give the lease up if C{node_id} holds it."""


@implementer(INodeDirectory)
class MemoryDirectory:
    """
    L{INodeDirectory} in memory, on an injected clock: one instance shared by the nodes of a unit
    test (every call fires at once).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.node_seen: Dict[str, Tuple[NodeInfo, float]] = {}
        self.placements: Dict[str, Tuple[str, float]] = {}
        self.peers: Dict[Tuple[str, str], PeerRow] = {}
        self.leases: Dict[str, Tuple[str, float]] = {}

    def _live(self, node_id: str, timeout: float) -> bool:
        seen = self.node_seen.get(node_id)
        return seen is not None and self.clock.seconds() - seen[1] < timeout

    def heartbeat(self, node: NodeInfo) -> Deferred:
        self.node_seen[node.node_id] = (node, self.clock.seconds())
        return succeed(None)

    def leave(self, node_id: str) -> Deferred:
        seen = self.node_seen.get(node_id)
        if seen is not None:
            self.node_seen[node_id] = (seen[0], float("-inf"))
        for key in [k for k, (n, _) in self.placements.items() if n == node_id]:
            del self.placements[key]
        for name in [k for k, (n, _) in self.leases.items() if n == node_id]:
            del self.leases[name]
        return succeed(None)

    def nodes(self, timeout: float) -> Deferred:
        return succeed([(info, self._live(node_id, timeout)) for node_id, (info, _) in sorted(self.node_seen.items())])

    def place(self, routing_key: str, node_id: str, timeout: float) -> Deferred:
        now = self.clock.seconds()
        current = self.placements.get(routing_key)
        holder, placed_at = current if current is not None else (None, now)
        winner = placement_winner(
            node_id,
            holder,
            holder is not None and self._live(holder, timeout),
            any(row.node_id == holder for (key, _), row in self.peers.items() if key == routing_key),
            now - placed_at,
        )
        if winner == node_id:
            self.placements[routing_key] = (node_id, now)
        seen = self.node_seen.get(winner)
        return succeed(seen[0] if seen is not None else NodeInfo(winner, ""))

    def peer_attached(self, row: PeerRow) -> Deferred:
        self.peers[(row.routing_key, row.side)] = row
        return succeed(None)

    def peer_detached(self, routing_key: str, side: str, node_id: str, channel_id: str) -> Deferred:
        row = self.peers.get((routing_key, side))
        if row is not None and row.node_id == node_id and row.channel_id == channel_id:
            del self.peers[(routing_key, side)]
        return succeed(None)

    def take_own(self, node_id: str) -> Deferred:
        rows = [row for row in self.peers.values() if row.node_id == node_id]
        for row in rows:
            del self.peers[(row.routing_key, row.side)]
        return succeed(rows)

    def reap(self, timeout: float) -> Deferred:
        dead = {node_id for node_id in self.node_seen if not self._live(node_id, timeout)}
        rows = [row for row in self.peers.values() if row.node_id in dead]
        for row in rows:
            del self.peers[(row.routing_key, row.side)]
        for node_id in dead:
            del self.node_seen[node_id]
        now = self.clock.seconds()
        held = {key for key, _ in self.peers}
        for key, (node_id, placed_at) in list(self.placements.items()):
            if node_id in dead or (key not in held and now - placed_at > IDLE_PLACEMENT):
                del self.placements[key]
        return succeed(rows)

    def acquire_lease(self, name: str, node_id: str, ttl: float) -> Deferred:
        now = self.clock.seconds()
        current = self.leases.get(name)
        if current is None or current[0] == node_id or current[1] <= now:
            self.leases[name] = (node_id, now + ttl)
            return succeed(True)
        return succeed(False)

    def release_lease(self, name: str, node_id: str) -> Deferred:
        current = self.leases.get(name)
        if current is not None and current[0] == node_id:
            del self.leases[name]
        return succeed(None)
