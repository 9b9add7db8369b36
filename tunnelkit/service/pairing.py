# -*- test-case-name: tests.test_relay -*-
"""
The live tunnels of one service process, and the decisions that involve more than one peer: who
may connect (the limits), which peer pairs with which, replacement, liveness, and closing on the
control plane's events.  The frames themselves are relayed by each tunnel's
L{tunnelkit.service.relaycore.TunnelCore}; the WebSockets are L{tunnelkit.service.relay.PeerProtocol}s.

Admission (L{Relay.admit}, after L{tunnelkit.service.handshake.check_handshake}): the client
address's failure budget, then the store's verdict on the token (its reasons' statuses are
L{tunnelkit.service.tokens.STATUS_BY_REASON}), with the tunnel's handshake rate and the account's
WebSocket limit checked once the token is found valid and before it is spent, so that a refused
client retries with the same token.  Every failure (a 4xx) is counted against the client's address,
and a token failure against the token's routing key too (L{HandshakeLimiter}); the statuses are
L{tunnelkit.service.handshake.STATUS_BY_REASON}.

Pairing: one peer per side and tunnel; a new peer on a side replaces the connected one, which is
closed (cause C{"replaced"} of L{tunnelkit.service.handshake.CLOSE_BY_CAUSE}).

Liveness: every C{--ping-interval} seconds each peer that sent nothing since the last check gets a
ping (AWS's proxies answer pings); one silent for C{--peer-timeout} seconds is taken for gone (a
peer that vanished without a FIN): its connection is reset, its side recorded DISCONNECTED, and the
other side gets a STREAM_RESET per active stream.  A peer the relay is not reading (backpressure)
counts as alive.

The per-tunnel bandwidth limit is a token bucket on the injected clock (L{TunnelLink.bucket}): a
peer that overdraws it is not read until the bucket refills.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Set, Tuple

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.protocol.framing import MAX_WEBSOCKET_FRAME
from tunnelkit.service.audit import NO_AUDIT
from tunnelkit.service.handshake import (
    CLOSE_BY_CAUSE,
    CLOSE_GOING_AWAY,
    REASON_SHUTDOWN,
    HandshakeRequest,
    refused,
)
from tunnelkit.service.interfaces import (
    DESTINATION,
    SOURCE,
    HandshakeRejected,
    ITunnelEvents,
    ITunnelStateObserver,
    ITunnelStore,
    PeerGrant,
)
from tunnelkit.service.metrics import IRelayMetrics, RelayMetrics
from tunnelkit.service.relaycore import TunnelCore
from tunnelkit.service.statechanges import StateChanges
from tunnelkit.service.tokens import routing_key

if TYPE_CHECKING:
    from tunnelkit.service.relay import PeerProtocol

__all__ = [
    "RelayLimits",
    "TokenBucket",
    "HandshakeLimiter",
    "address_budget_key",
    "TunnelLink",
    "NO_PLACEMENT",
    "Relay",
]

log = Logger()

_OTHER_SIDE = {SOURCE: DESTINATION, DESTINATION: SOURCE}


class TokenBucket:
    """
    A token bucket on an injected clock: C{rate} units a second, holding at most C{capacity}.

    L{take} may overdraw the bucket (a WebSocket message is never split); it returns how long to wait
    until the bucket is back at zero.
    """

    __slots__ = ("rate", "capacity", "_clock", "_level", "_stamp")

    def __init__(self, rate: float, capacity: float, clock: IReactorTime) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._level = capacity
        self._stamp = clock.seconds()

    def _refill(self) -> float:
        now = self._clock.seconds()
        level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        self._level = level
        return level

    def take(self, amount: float) -> float:
        """Take C{amount}; return 0.0, or the seconds until the debt is repaid."""
        level = self._refill() - amount
        self._level = level
        return 0.0 if level >= 0 else -level / self.rate

    def try_take(self, amount: float = 1.0) -> bool:
        """Take C{amount} only if the bucket holds it."""
        if self._refill() < amount:
            return False
        self._level -= amount
        return True

    def holds(self, amount: float = 1.0) -> bool:
        """Whether L{try_take} of C{amount} would succeed now (takes nothing)."""
        return self._refill() >= amount

    @property
    def full(self) -> bool:
        """Whether the bucket has refilled completely (an idle bucket can be forgotten)."""
        return self._refill() >= self.capacity


@dataclass(frozen=True)
class RelayLimits:
    """
    The relay's limits (see L{tunnelkit.service.dataplane.DataPlaneOptions}).

    @ivar tunnel_bandwidth: bytes per second per tunnel, both directions together; None: unlimited.
    @ivar handshakes_per_second: accepted handshakes per tunnel per second (burst of as many); only
        a valid token can spend it.
    @ivar failed_handshakes_per_address: failed handshakes per second one client address may make
        (burst of twice as many) before its next attempts get 429 without a look at their token.
    @ivar failed_handshakes_per_key: failed handshakes per second counted per routing key; beyond
        them a failing attempt is answered 429 (and not logged one by one).  A valid token is always
        checked first, so this never refuses one.
    @ivar max_websockets_per_account: open WebSockets per account; None: unlimited.
    @ivar ping_interval: seconds a peer may stay silent before the service pings it.
    @ivar peer_timeout: seconds of silence (no frame, no pong) after which a peer is taken for gone:
        its connection is reset, its side recorded DISCONNECTED and the other side told with a
        STREAM_RESET for each active stream.  A silent peer is dropped within
        C{peer_timeout + ping_interval} seconds.
    @ivar relay_buffer: bytes a peer's transport may buffer before the other peer is paused, and
        the largest socket read.  Python allocates each read's buffer at this size: above 128 KiB
        glibc serves it with a fresh mmap, so every read costs ~70 us more (page faults).
    """

    tunnel_bandwidth: Optional[int] = None
    handshakes_per_second: float = 10.0
    failed_handshakes_per_address: float = 10.0
    failed_handshakes_per_key: float = 10.0
    max_websockets_per_account: Optional[int] = None
    relay_buffer: int = 131072
    ping_interval: float = 20.0
    peer_timeout: float = 60.0


class _BucketTable:
    """
    One L{TokenBucket} per key, made on first use; idle (full) buckets are forgotten when the table
    grows past C{max_keys}, and if none is idle the table starts afresh (memory stays bounded).
    """

    def __init__(self, rate: float, burst: float, clock: IReactorTime, max_keys: int = 8192) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: Dict[str, TokenBucket] = {}

    def get(self, key: str) -> Optional[TokenBucket]:
        """The bucket of C{key} (None when the rate is 0: no limit)."""
        if self.rate <= 0:
            return None
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                for stale in [k for k, b in buckets.items() if b.full]:
                    del buckets[stale]
                if len(buckets) >= self.max_keys:
                    buckets.clear()
            bucket = buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


def address_budget_key(host: str) -> str:
    """
    The key of a client address's failure budget: an IPv4 address as it is, an IPv6 address by its
    /64 (one site's network: a host can take any address in it, so one budget per address would
    be none), anything else (a unix socket's empty host) as it is.
    """
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d on a dual-stack listener: the IPv4 client
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class HandshakeLimiter:
    """
    Who may try a WebSocket handshake now, on an injected clock (no I/O).

    Three budgets, so that failed attempts never cost a valid token its connection:
      - failures per client address (IPv6: per /64, L{address_budget_key}): an address that spent
        it gets 429 before its token is even looked at.  It blocks only that address: behind NAT,
        CGNAT or a reverse proxy that does not send the PROXY protocol, that is everyone behind it
        (use C{haproxy:} listeners, or C{--failed-handshakes-per-address 0} and rely on the next
        budget);
      - failures per routing key (the token's non-secret prefix, shared by a tunnel's tokens): only
        failures are counted, and only after the token was checked, so a valid token always passes;
        past the budget a failing attempt gets 429 instead of its 4xx;
      - accepted handshakes per tunnel: spent only by valid tokens (a client's reconnect loop).
    """

    def __init__(self, limits: RelayLimits, clock: IReactorTime) -> None:
        self.clock = clock
        self._per_address = _BucketTable(
            limits.failed_handshakes_per_address, 2 * limits.failed_handshakes_per_address, clock
        )
        self._per_key = _BucketTable(limits.failed_handshakes_per_key, 2 * limits.failed_handshakes_per_key, clock)
        self._per_tunnel = _BucketTable(limits.handshakes_per_second, limits.handshakes_per_second, clock)

    @staticmethod
    def _wait(bucket: TokenBucket) -> int:
        return max(1, int(-(-(1.0 - bucket._refill()) // bucket.rate)))

    def check_address(self, address: str) -> None:
        """@raise HandshakeRejected: 429 if C{address} spent its failure budget."""
        bucket = self._per_address.get(address_budget_key(address))
        if bucket is not None and not bucket.holds():
            raise refused(
                "too-many-failures",
                f"Too many failed connection attempts from this address: retry in {self._wait(bucket)} s",
            )

    def check_tunnel(self, tunnel_id: str) -> None:
        """@raise HandshakeRejected: 429 if the tunnel had too many accepted handshakes just now."""
        bucket = self._per_tunnel.get(tunnel_id)
        if bucket is not None and not bucket.holds():
            raise refused(
                "rate-limited",
                f"Too many connections to this tunnel just now: retry in {self._wait(bucket)} s",
            )

    def accepted(self, tunnel_id: str) -> None:
        """A valid token connected to C{tunnel_id}."""
        bucket = self._per_tunnel.get(tunnel_id)
        if bucket is not None:
            bucket.take(1.0)

    def failed(self, address: str, key: Optional[str]) -> bool:
        """
        A handshake from C{address} (presenting routing key C{key}, if any) failed.  Returns
        whether C{key} had spent its failure budget already (the attempt is then answered 429).
        """
        bucket = self._per_address.get(address_budget_key(address))
        if bucket is not None:
            bucket.take(1.0)
        if key is None:
            return False
        bucket = self._per_key.get(key)
        return bucket is not None and not bucket.try_take()


class TunnelLink:
    """
    One tunnel's live state on this relay: its connected peers, its relaying core, its expiry and
    bandwidth.

    @ivar peers: side -> the L{PeerProtocol} connected there.
    @ivar core: the tunnel's L{TunnelCore} (the peers' frames, the streams the source started).
    """

    def __init__(self, relay: "Relay", grant: PeerGrant) -> None:
        self.relay = relay
        self.tunnel_id = grant.tunnel_id
        self.account_id = grant.account_id
        self.expires_at = grant.expires_at
        self.peers: Dict[str, PeerProtocol] = {}
        self.closed_reason: Optional[str] = None
        self.bucket: Optional[TokenBucket] = None
        bandwidth = relay.limits.tunnel_bandwidth
        if bandwidth:
            self.bucket = TokenBucket(
                bandwidth, max(bandwidth / 4.0, 2.0 * MAX_WEBSOCKET_FRAME), relay.clock
            )
        self.expiry_call: Optional[IDelayedCall] = None
        self.core = TunnelCore(grant.services, relay.metrics)

    @property
    def services(self) -> Tuple[str, ...]:
        """The tunnel's service ids."""
        return self.core.services

    @property
    def active_streams(self) -> Dict[str, int]:
        """Service id -> stream id of each stream the source started and nobody reset."""
        return self.core.active_streams

    @property
    def ledger(self) -> Any:
        """The audit trail's ledger of this tunnel's connections (L{tunnelkit.service.audit}); None: off."""
        return self.core.ledger

    @ledger.setter
    def ledger(self, ledger: Any) -> None:
        self.core.ledger = ledger


class _NoPlacement:
    """The relay's C{placement} hook when the service is a single node: nothing to record."""

    def peer_attached(self, peer: Any) -> None:
        pass

    def peer_detached(self, peer: Any) -> None:
        pass

    def before_state(self, tunnel_id: str, side: str, connected: bool) -> None:
        pass

    def after_state(self, tunnel_id: str, side: str, connected: bool) -> None:
        pass


NO_PLACEMENT = _NoPlacement()


@implementer(ITunnelEvents)
class Relay:
    """
    The live tunnels of one service process, and the decisions that involve more than one peer:
    admission (limits, the store's token rules), pairing, replacement, and closing on the control
    plane's events.

    @ivar links: tunnel id -> L{TunnelLink} of every tunnel with a peer connected.
    """

    def __init__(
        self,
        store: ITunnelStore,
        clock: IReactorTime,
        limits: Optional[RelayLimits] = None,
        metrics: Optional[IRelayMetrics] = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.limits = limits or RelayLimits()
        self.metrics: IRelayMetrics = metrics if metrics is not None else RelayMetrics()
        self.links: Dict[str, TunnelLink] = {}
        self._websockets_per_account: Dict[str, int] = {}
        #: Connection states to record, and the sides being written (L{_set_state}).
        self._latest_state: Dict[Tuple[str, str], Tuple[bool, float, Optional[str]]] = {}
        self._writing_state: Set[Tuple[str, str]] = set()
        self.limiter = HandshakeLimiter(self.limits, clock)
        self._liveness: Optional[LoopingCall] = None
        #: The audit trail's hooks (L{tunnelkit.service.audit}); the service sets its trail here.
        self.audit: Any = NO_AUDIT
        #: Told of each peer that attaches and detaches (a cluster node records where peers are:
        #: L{tunnelkit.service.cluster.node.ClusterNode}); nothing on a single node.
        self.placement: Any = NO_PLACEMENT
        #: Told once each connection state is recorded (L{ITunnelStateObserver}: the console's live pages).
        self.state_changes: ITunnelStateObserver = StateChanges()

    # --- admission ---

    async def admit(self, request: HandshakeRequest, address: str = "") -> PeerGrant:
        """
        Decide whether a checked handshake from client C{address} may connect: the failure budgets
        (L{HandshakeLimiter}), then the store's token rules, with the tunnel's rate and the account's
        WebSocket limit checked before the token is spent (a refused client keeps its token).

        @raise HandshakeRejected: if not.
        """
        self.limiter.check_address(address)
        try:
            grant: PeerGrant = await self.store.claim_peer(
                request.access_token,
                request.mode,
                request.client_token,
                self.clock.seconds(),
                admit=self._may_join,
            )
        except HandshakeRejected as e:  # the store's TokenRejected: its status, reason and text as they are
            if e.status < 500 and e.status != 429:
                if self.limiter.failed(address, routing_key(request.access_token)):
                    raise refused(
                        "tunnel-failures-limited",
                        "Too many failed connection attempts for this tunnel: check the access token, "
                        "then retry in a second",
                    ) from None
            raise
        except Exception:
            log.failure("The tunnel store failed while checking an access token")
            raise refused(
                "internal-error", "Internal error: the service could not check the token; retry"
            ) from None
        self.limiter.accepted(grant.tunnel_id)
        return grant

    def _may_join(self, grant: PeerGrant) -> None:
        """Checked by the store before it spends a valid token: the tunnel's and account's limits."""
        self.limiter.check_tunnel(grant.tunnel_id)
        limit = self.limits.max_websockets_per_account
        if limit is not None:
            link = self.links.get(grant.tunnel_id)
            replacing = link is not None and grant.side in link.peers
            open_now = self._websockets_per_account.get(grant.account_id, 0)
            if open_now - (1 if replacing else 0) >= limit:
                raise refused(
                    "too-many-websockets",
                    f"Too many connections: this account has {open_now} open tunnel connections, "
                    f"the limit is {limit}; the access token was not used, retry when one closes",
                )

    # --- pairing ---

    def attach(self, peer: "PeerProtocol") -> None:
        """A peer finished its handshake: send it SERVICE_IDS and pair it with the other side."""
        grant = peer.grant
        assert grant is not None
        link = self.links.get(grant.tunnel_id)
        if link is None:
            link = self.links[grant.tunnel_id] = TunnelLink(self, grant)
            delay = max(0.0, link.expires_at - self.clock.seconds())
            link.expiry_call = self.clock.callLater(delay, self.tunnel_closed, link.tunnel_id, "expired")
            self.metrics.relay_tunnels(len(self.links))
        side = grant.side
        core = link.core
        if tuple(grant.services) != core.services:
            core.set_services(grant.services)
        peer.link = link
        peer.heard = False
        peer.silent_since = self.clock.seconds()
        self._watch_liveness()
        self._websockets_per_account[link.account_id] = (
            self._websockets_per_account.get(link.account_id, 0) + 1
        )
        self.metrics.peer_connected(side, 1)
        old = link.peers.get(side)
        peer.core_peer, actions = core.attach(side, peer.version, peer)
        link.peers[side] = peer
        other = link.peers.get(_OTHER_SIDE[side])
        if old is not None:
            old.replaced = True
            log.info(
                "Replacing the {side} of tunnel {tunnel_id}: channel {old_channel} is replaced by "
                "{channel_id}",
                side=side,
                tunnel_id=link.tunnel_id,
                old_channel=old.channel_id,
                channel_id=peer.channel_id,
            )
        peer.perform(actions)  # SERVICE_IDS; the old peer closed, the other one told
        if other is not None:
            # Backpressure follows the new pairing: the old peer's full buffer no longer matters.
            other.resume_reading("backpressure")
            if other.sink is not None and other.sink.full:
                peer.pause_reading("backpressure")
        self.placement.peer_attached(peer)  # before the state: see _write_state
        self._set_state(link.tunnel_id, side, True, link.account_id)
        self.audit.peer_connected(peer)
        log.info(
            "The {side} of tunnel {tunnel_id} connected on channel {channel_id} ({subprotocol})",
            side=side,
            tunnel_id=link.tunnel_id,
            channel_id=peer.channel_id,
            subprotocol=peer.subprotocol,
        )
        peer.grant = None  # what it granted is in the link now (its strings are copies: ~0.4 KB a peer)
        if link.closed_reason is not None:
            self._close_peer(peer, link.closed_reason)

    # --- liveness ---

    def _watch_liveness(self) -> None:
        """Check every connected peer each L{RelayLimits.ping_interval} (while any is connected)."""
        if self._liveness is not None:
            return
        self._liveness = LoopingCall(self._check_liveness)
        self._liveness.clock = self.clock
        self._liveness.start(self.limits.ping_interval, now=False)

    def _stop_liveness(self) -> None:
        if self._liveness is not None and self._liveness.running:
            self._liveness.stop()
        self._liveness = None

    def _check_liveness(self) -> None:
        """
        Ping each peer that has sent nothing since the last check; reset the connection of one that
        has been silent for L{RelayLimits.peer_timeout} (its side becomes DISCONNECTED and the other
        side gets a STREAM_RESET per active stream, through L{detach}).  A peer the relay is not
        reading (backpressure, bandwidth) counts as alive: its pong could not be read.
        """
        now = self.clock.seconds()
        timeout = self.limits.peer_timeout
        for link in list(self.links.values()):
            for peer in list(link.peers.values()):
                if peer.heard or peer.reading_paused or peer.closing:
                    peer.heard = False
                    peer.silent_since = now
                elif now - peer.silent_since >= timeout:
                    log.info(
                        "The {side} of tunnel {tunnel_id} (channel {channel_id}) sent nothing, not even "
                        "a pong, for {seconds:.0f} s: taking it for gone",
                        side=peer.side,
                        tunnel_id=link.tunnel_id,
                        channel_id=peer.channel_id,
                        seconds=now - peer.silent_since,
                    )
                    self.metrics.peer_closed("timeout")
                    peer.closing = True
                    peer.dropConnection(abort=True)
                elif peer.state == peer.STATE_OPEN:
                    peer.sendPing()
        if not self.links:
            self._stop_liveness()

    def detach(self, peer: "PeerProtocol") -> None:
        """A paired peer's connection ended."""
        link = peer.link
        if link is None or peer.detached:
            return
        peer.detached = True
        self.audit.peer_disconnected(peer)
        self.placement.peer_detached(peer)
        side = peer.side
        self.metrics.peer_connected(side, -1)
        count_now = self._websockets_per_account.get(link.account_id, 1) - 1
        if count_now > 0:
            self._websockets_per_account[link.account_id] = count_now
        else:
            self._websockets_per_account.pop(link.account_id, None)
        peer.cancel_timers()
        if link.peers.get(side) is not peer:
            return  # replaced: the new peer took over the side
        del link.peers[side]
        other = link.peers.get(_OTHER_SIDE[side])
        if other is not None:
            other.resume_reading("backpressure")
        assert peer.core_peer is not None
        # The other side's streams are reset, unless the tunnel is closing anyway.
        peer.perform(link.core.detach(peer.core_peer, reset_streams=link.closed_reason is None))
        if link.closed_reason != "shutdown":
            self._set_state(link.tunnel_id, side, False, link.account_id)
        log.info(
            "The {side} of tunnel {tunnel_id} disconnected (channel {channel_id})",
            side=side,
            tunnel_id=link.tunnel_id,
            channel_id=peer.channel_id,
        )
        if not link.peers:
            if link.expiry_call is not None and link.expiry_call.active():
                link.expiry_call.cancel()
            link.expiry_call = None
            del self.links[link.tunnel_id]
            self.metrics.relay_tunnels(len(self.links))
            if not self.links:
                self._stop_liveness()

    def _set_state(self, tunnel_id: str, side: str, connected: bool, account_id: Optional[str] = None) -> None:
        """
        Record a side's state.  One write per side at a time, in order: a state set while one is
        being written follows it (only the latest), so a quick connect-disconnect never ends CONNECTED
        whatever the store's threads do.  L{state_changes} is told once each write is done.
        """
        key = (tunnel_id, side)
        self._latest_state[key] = (connected, self.clock.seconds(), account_id)
        if key not in self._writing_state:
            self._write_state(key)

    def _write_state(self, key: Tuple[str, str]) -> None:
        tunnel_id, side = key
        connected, now, account_id = self._latest_state.pop(key)
        self._writing_state.add(key)
        # A cluster node records where the peer is before its CONNECTED (and forgets it after its
        # DISCONNECTED): a node killed in between leaves a record its survivors clean up.
        d = maybeDeferred(self.placement.before_state, tunnel_id, side, connected)
        d.addBoth(lambda _: self.store.set_connection_state(tunnel_id, side, connected, now))
        d.addCallback(lambda _: self.placement.after_state(tunnel_id, side, connected))

        def failed(failure: Failure) -> None:
            log.failure(
                "Could not record the {side} of tunnel {tunnel_id} as {state}",
                failure,
                side=side,
                tunnel_id=tunnel_id,
                state="CONNECTED" if connected else "DISCONNECTED",
            )

        def written(_: Any) -> None:
            self._writing_state.discard(key)
            if key in self._latest_state:
                self._write_state(key)

        d.addCallbacks(lambda _: self.state_changes.tunnel_changed(account_id, tunnel_id), failed)
        d.addBoth(written)

    def websockets_of(self, account_id: str) -> int:
        """How many WebSockets of C{account_id} are open here."""
        return self._websockets_per_account.get(account_id, 0)

    # --- ITunnelEvents ---

    def _close_peer(self, peer: "PeerProtocol", why: str) -> None:
        """Close C{peer} because its tunnel is closing: C{why} is C{"shutdown"}, C{"expired"} or C{"closed"}."""
        cause = {"shutdown": "shutdown", "expired": "tunnel-expired"}.get(why, "tunnel-closed")
        code, reason = CLOSE_BY_CAUSE[cause]
        peer.close_by_service(code, reason, cause)

    def tunnel_closed(self, tunnel_id: str, reason: str) -> None:
        """Close both sides of a CLOSED tunnel (C{reason}: C{"closed"} or C{"expired"})."""
        link = self.links.get(tunnel_id)
        if link is None or link.closed_reason is not None:
            return
        link.closed_reason = reason
        if link.expiry_call is not None and link.expiry_call.active():
            link.expiry_call.cancel()
        link.expiry_call = None
        log.info("Tunnel {tunnel_id} is {reason}: closing its connections", tunnel_id=tunnel_id, reason=reason)
        for peer in list(link.peers.values()):
            self._close_peer(peer, reason)

    def token_rotated(self, tunnel_id: str, side: str) -> None:
        """Close C{side}'s connection: its token was revoked."""
        link = self.links.get(tunnel_id)
        peer = link.peers.get(side) if link is not None else None
        if peer is None:
            return
        log.info(
            "The {side} token of tunnel {tunnel_id} was rotated: closing channel {channel_id}",
            side=side,
            tunnel_id=tunnel_id,
            channel_id=peer.channel_id,
        )
        code, reason = CLOSE_BY_CAUSE["token-rotated"]
        peer.close_by_service(code, reason, "token-rotated")

    def shutdown(self, reason: str = REASON_SHUTDOWN) -> None:
        """
        Close every peer with 1001 (going away): call it when the service stops, before the store
        closes.  Each side is recorded DISCONNECTED at once (the closing handshakes finish later).
        """
        self._stop_liveness()
        for link in list(self.links.values()):
            link.closed_reason = "shutdown"
            if link.expiry_call is not None and link.expiry_call.active():
                link.expiry_call.cancel()
            link.expiry_call = None
            for side, peer in list(link.peers.items()):
                self._set_state(link.tunnel_id, side, False, link.account_id)
                peer.close_by_service(CLOSE_GOING_AWAY, reason, "shutdown")

    # --- introspection ---

    def buffered_bytes(self, tunnel_id: str) -> int:
        """Bytes this relay holds for C{tunnel_id} right now (see L{PeerProtocol.buffered_bytes})."""
        link = self.links.get(tunnel_id)
        if link is None:
            return 0
        return sum(peer.buffered_bytes() for peer in link.peers.values())
