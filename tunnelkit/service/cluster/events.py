# -*- test-case-name: tests.test_cluster_events -*-
"""
Control events across nodes: CloseTunnel, expiry and token rotation, wherever they happen, reach the
node that holds the tunnel's WebSockets.

L{ClusterEvents} is the L{ITunnelEvents} the control plane tells: it tells this node's relay at once
and publishes a L{TunnelEvent} on an L{IEventCarrier}; every other node's L{ClusterEvents} receives
it and tells its own relay (which ignores tunnels it holds nothing of).  Carriers:
L{InProcessCarrier} (one process: a single node, unit tests) and
L{tunnelkit.service.cluster.postgres.PostgresCarrier} (PostgreSQL C{LISTEN}/C{NOTIFY} on a dedicated
connection).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, List

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import Interface, implementer

from tunnelkit.service.interfaces import DESTINATION, SOURCE, ITunnelEvents

__all__ = ["TunnelEvent", "IEventCarrier", "InProcessCarrier", "ClusterEvents", "encode_event", "decode_event"]

log = Logger()

CLOSED = "closed"
ROTATED = "rotated"
_KINDS = {CLOSED: ("closed", "expired"), ROTATED: (SOURCE, DESTINATION)}
_ID_RE = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")


@dataclass(frozen=True)
class TunnelEvent:
    """C{kind} C{"closed"} (C{detail}: C{"closed"}|C{"expired"}) or C{"rotated"} (C{detail}: the side)."""

    origin: str  # the node it happened on
    kind: str
    tunnel_id: str
    detail: str


def encode_event(event: TunnelEvent) -> str:
    """The event as a C{NOTIFY} payload (short JSON: the limit is 8000 bytes)."""
    return json.dumps({"o": event.origin, "k": event.kind, "t": event.tunnel_id, "d": event.detail}, separators=(",", ":"))


def decode_event(payload: str) -> TunnelEvent:
    """
    @raise ValueError: not an event this version knows (it is ignored, with a log line).
    """
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    fields = [v for v in (data.get(k) for k in ("o", "k", "t", "d")) if isinstance(v, str)]
    if len(fields) != 4:
        raise ValueError("missing fields")
    origin, kind, tunnel_id, detail = fields
    if kind not in _KINDS or detail not in _KINDS[kind] or not _ID_RE.match(tunnel_id) or not _ID_RE.match(origin):
        raise ValueError(f"unknown event {kind!r}/{detail!r}")
    return TunnelEvent(origin, kind, tunnel_id, detail)


class IEventCarrier(Interface):
    """Delivers tunnel events to every node of the cluster."""

    def publish(event: TunnelEvent) -> Deferred:
        """Send C{event} to every subscriber of every node (fires once handed to the carrier)."""

    def subscribe(receiver: Callable[[TunnelEvent], None]) -> None:
        """Call C{receiver} with each event published anywhere (this node's own included)."""


@implementer(IEventCarrier)
class InProcessCarrier:
    """L{IEventCarrier} within one process: events go to every subscriber at once."""

    def __init__(self) -> None:
        self._receivers: List[Callable[[TunnelEvent], None]] = []

    def publish(self, event: TunnelEvent) -> Deferred:
        for receiver in list(self._receivers):
            try:
                receiver(event)
            except Exception:
                log.failure("A tunnel event receiver failed")
        return succeed(None)

    def subscribe(self, receiver: Callable[[TunnelEvent], None]) -> None:
        self._receivers.append(receiver)


@implementer(ITunnelEvents)
class ClusterEvents:
    """
    The control plane's L{ITunnelEvents} on a node of a cluster: this node's relay at once, every
    other node's through C{carrier}.
    """

    def __init__(self, node_id: str, local: ITunnelEvents, carrier: IEventCarrier) -> None:
        self.node_id = node_id
        self.local = local
        self.carrier = carrier
        self.received = 0
        carrier.subscribe(self._received)

    def _publish(self, event: TunnelEvent) -> None:
        d = self.carrier.publish(event)
        d.addErrback(
            lambda f: log.failure(
                "Could not tell the other nodes that tunnel {tunnel_id} is {kind}",
                f,
                tunnel_id=event.tunnel_id,
                kind=event.kind,
            )
        )

    def tunnel_closed(self, tunnel_id: str, reason: str) -> None:
        self.local.tunnel_closed(tunnel_id, reason)
        self._publish(TunnelEvent(self.node_id, CLOSED, tunnel_id, reason))

    def token_rotated(self, tunnel_id: str, side: str) -> None:
        self.local.token_rotated(tunnel_id, side)
        self._publish(TunnelEvent(self.node_id, ROTATED, tunnel_id, side))

    def _received(self, event: TunnelEvent) -> Any:
        if event.origin == self.node_id:
            return  # told already, when it happened here
        self.received += 1
        if event.kind == CLOSED:
            self.local.tunnel_closed(event.tunnel_id, event.detail)
        else:
            self.local.token_rotated(event.tunnel_id, event.detail)
