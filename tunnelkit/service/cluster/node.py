# -*- test-case-name: tests.test_cluster_node -*-
"""
One node's part in the cluster: its heartbeat, the peers it holds, noticing dead nodes, and the jobs
that must run on one node only.

Every C{heartbeat} seconds L{ClusterNode}:
  1. records its heartbeat in the directory;
  2. reaps the peer rows of nodes silent for C{node_timeout} seconds (L{INodeDirectory.reap}: each
     row goes to exactly one reaper) and records those sides DISCONNECTED in the store, so no tunnel
     stays CONNECTED on a node that was killed; their proxies reconnect to a live node, which takes
     the tunnel over (L{tunnelkit.service.cluster.directory.placement_winner});
  3. renews its claims on the shared MQTT notification queue and takes over those of dead nodes
     (L{tunnelkit.service.cluster.notifications}), when notifications are on;
  4. takes or renews the C{lifecycle} lease (C{node_timeout} seconds): the node holding it runs the
     tunnel lifecycle (expiry, purge) and checks for due tunnels on each beat (tunnels opened on
     other nodes expire within a beat of their deadline); a node that loses the lease stops it.
     Expiry is exactly once twice over: one node runs it, and the store's OPEN-to-CLOSED update
     returns each tunnel to one caller only.

At start it takes back the rows an earlier run of the same node id left (C{kill -9}, a crash) and
records them DISCONNECTED: a node resets only its own peers, never the whole store's.  At a clean
stop it leaves the directory (its placements and rows go at once, its lease is free).

The relay tells it of each peer (L{peer_attached}, L{peer_detached}: the relay's C{placement} hook).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tunnelkit.service.cluster.directory import INodeDirectory, NodeInfo, PeerRow
from tunnelkit.service.lifecycle import TunnelLifecycle
from tunnelkit.service.tokens import routing_key_for_tunnel

__all__ = ["ClusterNode", "LIFECYCLE_LEASE"]

log = Logger()

LIFECYCLE_LEASE = "lifecycle"


class ClusterNode(Service):
    """
    @ivar leader: whether this node holds the lifecycle lease now.
    @ivar reaped: peer sides this node recorded DISCONNECTED for dead nodes.
    """

    name = "cluster-node"  # type: ignore[assignment]  # twisted leaves Service.name untyped (inferred None)

    def __init__(
        self,
        node: NodeInfo,
        directory: INodeDirectory,
        store: Any,
        clock: IReactorTime,
        heartbeat: float = 1.0,
        node_timeout: float = 5.0,
        lifecycle: Optional[TunnelLifecycle] = None,
    ) -> None:
        self.node = node
        self.directory = directory
        self.store = store
        self.clock = clock
        self.heartbeat = heartbeat
        self.node_timeout = node_timeout
        self.lifecycle = lifecycle
        #: (shared notification queue, notifier): claims renewed and a dead node's taken over each beat.
        self.notifications: Optional[Any] = None
        self.leader = False
        self.reaped = 0
        self.beats = 0
        self._loop: Optional[LoopingCall] = None
        self._beating: Optional[Deferred] = None
        self._started = False
        self._recording: Dict[Tuple[str, str], Deferred] = {}  # (tunnel, side) -> its row's write
        self._leaving: Dict[Tuple[str, str], str] = {}  # (tunnel, side) -> channel whose row goes next

    # --- the relay's placement hook ---
    #
    # Order, so that a node killed at any moment leaves no side CONNECTED that its survivors cannot
    # see: the peer row is written before the store's CONNECTED (the relay waits for before_state),
    # and removed only after the store's DISCONNECTED (after_state).

    def peer_attached(self, peer: Any) -> None:
        link = peer.link
        row = PeerRow(routing_key_for_tunnel(link.tunnel_id), peer.side, link.tunnel_id, self.node.node_id, peer.channel_id)
        self._leaving.pop((link.tunnel_id, peer.side), None)
        d = self.directory.peer_attached(row)
        d.addErrback(
            lambda f: log.failure("Could not record the {side} of tunnel {tunnel_id} in the cluster directory", f,
                                  side=peer.side, tunnel_id=link.tunnel_id)
        )
        self._recording[(link.tunnel_id, peer.side)] = d

    def before_state(self, tunnel_id: str, side: str, connected: bool) -> Optional[Deferred]:
        recording = self._recording.pop((tunnel_id, side), None)
        return recording if connected else None

    def peer_detached(self, peer: Any) -> None:
        if not self.running:
            return  # stopping: the survivors reap this node's rows once it left
        link = peer.link
        key = (link.tunnel_id, peer.side)
        if link.peers.get(peer.side) is peer and link.closed_reason != "shutdown":
            self._leaving[key] = peer.channel_id  # removed once the store has its DISCONNECTED
        else:
            self._remove(key, peer.channel_id)  # replaced: the side stays CONNECTED

    def after_state(self, tunnel_id: str, side: str, connected: bool) -> None:
        if connected:
            return
        channel_id = self._leaving.pop((tunnel_id, side), None)
        if channel_id is not None:
            self._remove((tunnel_id, side), channel_id)

    def _remove(self, key: Tuple[str, str], channel_id: str) -> None:
        tunnel_id, side = key
        self.directory.peer_detached(
            routing_key_for_tunnel(tunnel_id), side, self.node.node_id, channel_id
        ).addErrback(lambda f: log.failure("Could not remove a peer from the cluster directory", f))

    # --- service ---

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self.clock
        self._loop.start(self.heartbeat, now=True)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._stop_lifecycle()
        pending = self._beating if self._beating is not None else succeed(None)
        pending.addBoth(lambda _: self.directory.leave(self.node.node_id))
        pending.addErrback(lambda f: log.failure("Could not leave the cluster directory", f))
        return pending

    def beat(self) -> Optional[Deferred]:
        """One heartbeat (skipped while the last one is still running: a slow database)."""
        if self._beating is not None:
            return None
        d = self._beating = Deferred.fromCoroutine(self._beat())
        d.addErrback(self._beat_failed)

        def done(_: Any) -> None:
            self._beating = None
        d.addBoth(done)
        return d

    def _beat_failed(self, failure: Any) -> None:
        log.failure("The cluster heartbeat failed (the database?); retrying", failure)
        # Without a heartbeat the lease runs out and another node takes the lifecycle: stop ours.
        self._stop_lifecycle()

    async def _beat(self) -> None:
        directory = self.directory
        await directory.heartbeat(self.node)
        self.beats += 1
        if not self._started:
            own = await directory.take_own(self.node.node_id)
            self._started = True
            if own:
                log.info("Node {node_id} restarted: marking {count} peer connection(s) of its last run DISCONNECTED",
                         node_id=self.node.node_id, count=len(own))
                await self._disconnected(own)
        rows = await directory.reap(self.node_timeout)
        if rows:
            nodes = sorted({row.node_id for row in rows})
            log.info("Node(s) {nodes} stopped their heartbeat: marking {count} peer connection(s) DISCONNECTED",
                     nodes=", ".join(nodes), count=len(rows))
            await self._disconnected(rows)
            self.reaped += len(rows)
        if self.notifications is not None and self.running:
            queue, notifier = self.notifications
            await queue.renew()
            orphans = await queue.claim_orphans()
            if orphans:
                notifier.adopt(orphans)
        if self.lifecycle is not None and self.running:
            held = await directory.acquire_lease(LIFECYCLE_LEASE, self.node.node_id, self.node_timeout)
            if held and self.running:
                self._start_lifecycle()
                await self.lifecycle.expire_due()
            elif not held:
                self._stop_lifecycle()

    async def _disconnected(self, rows: List[PeerRow]) -> None:
        now = self.clock.seconds()
        for row in rows:
            try:
                await maybeDeferred(self.store.set_connection_state, row.tunnel_id, row.side, False, now)
            except Exception:
                log.failure("Could not record the {side} of tunnel {tunnel_id} DISCONNECTED",
                            side=row.side, tunnel_id=row.tunnel_id)

    def _start_lifecycle(self) -> None:
        if not self.leader and self.lifecycle is not None:
            self.leader = True
            log.info("Node {node_id} runs the tunnel lifecycle (expiry, purge) for the cluster", node_id=self.node.node_id)
            self.lifecycle.startService()

    def _stop_lifecycle(self) -> None:
        if self.leader and self.lifecycle is not None:
            self.leader = False
            log.info("Node {node_id} no longer runs the tunnel lifecycle", node_id=self.node.node_id)
            self.lifecycle.stopService()
