# -*- test-case-name: tests.test_localproxy_flow -*-
"""
Flow control between the local sockets and the tunnel's one WebSocket.

Two directions, two throttles:

  - L{LocalReadThrottle} -- local sockets -> WebSocket.  Registered as the streaming producer of the
    WebSocket's transport: when that transport's send buffer fills up, Twisted calls
    C{pauseProducing} and every local connection stops reading; C{resumeProducing} starts them again.
    A connection accepted while paused starts paused.

  - L{WebSocketReadThrottle} -- WebSocket -> local sockets.  Each local connection registers a
    L{SinkProducer} on its own transport; when that transport's send buffer passes its limit (the
    transport's C{bufferSize}, about 128 KiB here), the WebSocket's reads are paused until every full
    local buffer has drained.

Trade-off (the protocol has no per-stream window): one local reader that stalls pauses the whole
WebSocket, so the other connections of the tunnel wait too.  In exchange memory stays bounded: at most
one WebSocket read plus the local send buffers, whatever the peer sends.  Dropping or buffering without
bound are the only alternatives, and both are worse.

Twisted calls C{pauseProducing} on every write while a buffer is full, so both throttles are
idempotent per sink (sets, not counters).
"""

from __future__ import annotations

from typing import Any, Hashable, Optional, Set

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["LocalReadThrottle", "WebSocketReadThrottle", "SinkProducer"]


@implementer(IPushProducer)
class LocalReadThrottle:
    """Pauses the reads of every registered local transport while the WebSocket cannot take more."""

    def __init__(self) -> None:
        self.paused = False
        self._transports: Set[Any] = set()

    def add(self, transport: Any) -> None:
        """Start managing C{transport}'s reads (paused now if the WebSocket is full)."""
        self._transports.add(transport)
        if self.paused:
            transport.pauseProducing()

    def remove(self, transport: Any) -> None:
        """Stop managing C{transport} (it closed)."""
        self._transports.discard(transport)

    def __len__(self) -> int:
        return len(self._transports)

    # IPushProducer, called by the WebSocket's transport
    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        for transport in list(self._transports):
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        for transport in list(self._transports):
            transport.resumeProducing()

    def stopProducing(self) -> None:
        """The WebSocket is going away: the session closes the local connections itself."""
        self.paused = False


class WebSocketReadThrottle:
    """Pauses the WebSocket's reads while any local connection's send buffer is full."""

    def __init__(self) -> None:
        self._full: Set[Hashable] = set()
        self._websocket: Optional[Any] = None

    @property
    def paused(self) -> bool:
        """Whether the WebSocket's reads are paused now."""
        return bool(self._full) and self._websocket is not None

    @property
    def full_sinks(self) -> int:
        """How many local connections have a full send buffer."""
        return len(self._full)

    def attach(self, websocket_transport: Any) -> None:
        """A new WebSocket: its reads obey the local buffers from now on (full ones pause it at once)."""
        self._websocket = websocket_transport
        if self._full:
            websocket_transport.pauseProducing()

    def detach(self) -> None:
        """The WebSocket went away."""
        self._websocket = None

    def sink_full(self, key: Hashable) -> None:
        """Local connection C{key} cannot take more for now."""
        if key in self._full:
            return
        self._full.add(key)
        if len(self._full) == 1 and self._websocket is not None:
            self._websocket.pauseProducing()

    def sink_drained(self, key: Hashable) -> None:
        """Local connection C{key} can take more again (or is gone)."""
        if key not in self._full:
            return
        self._full.discard(key)
        if not self._full and self._websocket is not None:
            self._websocket.resumeProducing()


@implementer(IPushProducer)
class SinkProducer:
    """
    Registered on a local connection's transport: tells the L{WebSocketReadThrottle} when that
    transport's send buffer is full or drained.  C{key} names the connection.
    """

    def __init__(self, throttle: WebSocketReadThrottle, key: Hashable) -> None:
        self._throttle = throttle
        self._key = key

    def pauseProducing(self) -> None:
        self._throttle.sink_full(self._key)

    def resumeProducing(self) -> None:
        self._throttle.sink_drained(self._key)

    def stopProducing(self) -> None:
        self._throttle.sink_drained(self._key)
