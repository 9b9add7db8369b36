# -*- test-case-name: tests.test_store,tests.test_relay,tests.test_notify -*-
"""
The seams of the tunnel service: the store the API and relay share, and tunnel events the relay obeys.

The control plane (operations, store) implements L{ITunnelStore}; the data plane (relay) implements
L{ITunnelEvents} and calls L{ITunnelStore.claim_peer} at each WebSocket handshake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from twisted.internet.defer import Deferred

from zope.interface import Interface

from tunnelkit.errors import TunnelkitError

SOURCE = "source"
DESTINATION = "destination"


class HandshakeRejected(TunnelkitError):
    """
    A data-plane WebSocket handshake is refused.

    @ivar status: the HTTP status to answer the upgrade with.
    @ivar reason: a short machine-readable label (metrics, logs).
    @ivar text: the body text for the client.
    """

    def __init__(self, status: int, reason: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.text = text


class TokenRejected(HandshakeRejected):
    """
    The handshake's access token may not connect (raised by L{ITunnelStore.claim_peer}): a 4xx
    status, a reason such as C{unknown-token}, C{token-used}, C{client-token-mismatch},
    C{mode-mismatch}, C{tunnel-closed}, C{token-rotated}, and the documented AWS texts where they apply.
    """


@dataclass(frozen=True)
class PeerGrant:
    """What a valid access token lets a peer join."""

    tunnel_id: str
    account_id: str
    side: str  # SOURCE or DESTINATION
    services: Tuple[str, ...]
    expires_at: float  # epoch seconds when the tunnel's lifetime ends
    token_generation: int  # bumps on each rotation of this side's token


class ITunnelStore(Interface):
    """The part of the tunnel store the data plane needs (the full store is the control plane's)."""

    def claim_peer(
        access_token: str,
        mode: str,
        client_token: Optional[str],
        now: float,
        admit: Optional[Callable[[PeerGrant], None]] = None,
    ) -> "Deferred[PeerGrant]":
        """
        Check and consume C{access_token} for a handshake in C{mode} (C{source}|C{destination}):
        a Deferred of the grant.

        Single use: a token without a client token connects once; with a client token, it binds to
        that client token and may reconnect with the same one only.  Durable before the Deferred
        fires.  Atomic across store instances sharing one database (several service nodes): of
        claims racing for one unused token, exactly one wins.

        @param admit: called (on the reactor thread) with the grant once the token is found valid,
            before it is spent; if it raises (a L{HandshakeRejected}), nothing is recorded and the
            Deferred fails with that exception, so the token can still be used.
        @raise TokenRejected: (as the Deferred's failure) with the status, reason and text for the client.
        """

    def set_connection_state(tunnel_id: str, side: str, connected: bool, now: float) -> "Deferred[None]":
        """Record a side's CONNECTED/DISCONNECTED state and its lastUpdatedAt (a Deferred of None)."""


class ITunnelEvents(Interface):
    """Told by the control plane when a connected peer must go (implemented by the relay)."""

    def tunnel_closed(tunnel_id: str, reason: str) -> None:
        """
        The tunnel is CLOSED (C{reason}: C{"closed"} by CloseTunnel or C{"expired"}): close both
        sides' WebSockets within a second.
        """

    def token_rotated(tunnel_id: str, side: str) -> None:
        """C{side}'s token was rotated: close that side's WebSocket (its old token is revoked)."""


class ITunnelStateObserver(Interface):
    """
    Told when a tunnel's state changed on this node, once the store holds the change (the console's
    live pages and terminals): a side connected or disconnected (the relay), the tunnel was opened,
    closed, deleted or expired (the control plane).  Changes made by other nodes are not told here.
    """

    def tunnel_changed(account_id: Optional[str], tunnel_id: str) -> None:
        """C{tunnel_id} (of C{account_id}, or None when the teller does not know it) changed: read it again."""


class INotifier(Interface):
    """
    Delivers destination tokens to devices (MQTT C{$aws/things/<thing>/tunnels/notify}).

    Durable: a notification accepted here is delivered even across a broker outage or a restart,
    until delivered or until its tunnel closes.
    """

    def notify_destination(
        tunnel_id: str, thing_name: str, access_token: str, services: Tuple[str, ...], region: str
    ) -> None:
        """
        Queue the notification for C{thing_name}: a Deferred that fires once it is queued durably
        (or None if queued already); delivery is asynchronous.
        """

    def tunnel_closed(tunnel_id: str) -> None:
        """Drop any undelivered notification of C{tunnel_id}."""
