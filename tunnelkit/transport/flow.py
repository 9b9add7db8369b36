# -*- test-case-name: tests.test_localproxy_session,tests.test_memory_tunnel -*-
"""
Flow control between the local sockets and the tunnel's one WebSocket (see the README, "Flow control,
half-close and how connections end").

  - L{LocalReadThrottle} -- local sockets -> WebSocket.  Registered as the streaming producer of the
    WebSocket's transport: when that transport's send buffer fills up, Twisted calls
    C{pauseProducing} and every local connection stops reading; C{resumeProducing} starts them again.
    A connection accepted while paused starts paused.  (Each connection also pauses itself for its own
    reasons: no credit, pacing; see L{tunnelkit.localproxy.connection}.)

  - L{WebSocketReadThrottle} -- WebSocket -> local sockets.  With a peer that speaks flow control,
    a slow local reader only holds back its own credit and never pauses the WebSocket.  With a peer
    that does not (AWS's clients), a local connection whose send buffer is full keeps taking bytes
    up to C{per_connection} more, and all of them together up to C{per_tunnel}; past either bound the
    WebSocket's reads pause (one log line names the connection) until that connection drains.  Data
    held for connections still being opened pauses it at once (L{WebSocketReadThrottle.sink_full}).

Twisted calls C{pauseProducing} on every write while a buffer is full, so everything here is
idempotent per connection (sets and dicts, not counters).
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Optional, Set

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "LocalReadThrottle",
    "WebSocketReadThrottle",
    "LEGACY_CONNECTION_BUFFER",
    "LEGACY_TUNNEL_BUFFER",
]

#: Bytes one local connection may buffer past its transport's limit, toward a peer without flow control.
LEGACY_CONNECTION_BUFFER = 4 << 20
#: Bytes all of a tunnel's local connections may buffer so, together.
LEGACY_TUNNEL_BUFFER = 16 << 20

log = Logger()


@implementer(IPushProducer)
class LocalReadThrottle:
    """Pauses the reads of every registered local transport while the WebSocket cannot take more."""

    CAUSE = "websocket"

    def __init__(self) -> None:
        self.paused = False
        self._transports: Set[Any] = set()

    def add(self, reader: Any) -> None:
        """Start managing C{reader}'s reads (a local connection with C{pause_reading(cause)} and
        C{resume_reading(cause)}); paused now if the WebSocket is full."""
        self._transports.add(reader)
        if self.paused:
            reader.pause_reading(self.CAUSE)

    def remove(self, reader: Any) -> None:
        """Stop managing C{reader} (it closed)."""
        self._transports.discard(reader)

    def __len__(self) -> int:
        return len(self._transports)

    # IPushProducer, called by the WebSocket's transport
    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        for reader in list(self._transports):
            reader.pause_reading(self.CAUSE)

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        for reader in list(self._transports):
            reader.resume_reading(self.CAUSE)

    def stopProducing(self) -> None:
        """The WebSocket is going away: the session closes the local connections itself."""
        self.paused = False


class WebSocketReadThrottle:
    """
    Pauses the WebSocket's reads while data waits for connections being opened (L{sink_full}), or
    while a connection to a peer without flow control buffers too much (L{legacy_written}).
    """

    def __init__(
        self, per_connection: int = LEGACY_CONNECTION_BUFFER, per_tunnel: int = LEGACY_TUNNEL_BUFFER
    ) -> None:
        self.per_connection = per_connection
        self.per_tunnel = per_tunnel
        self._full: Set[Hashable] = set()
        self._websocket: Optional[Any] = None
        self._excess: Dict[Hashable, int] = {}  # bytes written to a full local buffer
        self._excess_total = 0

    @property
    def legacy_buffered(self) -> int:
        """Bytes written to full local buffers of connections without flow control."""
        return self._excess_total

    def legacy_full(self, key: Hashable) -> None:
        """Connection C{key} (without flow control) has a full send buffer: count what it takes now."""
        self._excess.setdefault(key, 0)

    def legacy_written(self, key: Hashable, size: int, name: str) -> None:
        """C{size} bytes written to C{key}'s full buffer; pause the WebSocket past the bounds."""
        excess = self._excess.get(key)
        if excess is None:
            return
        excess += size
        self._excess[key] = excess
        self._excess_total += size
        if key in self._full:
            return
        if excess > self.per_connection or self._excess_total > self.per_tunnel:
            log.warn(
                "Pausing the tunnel's WebSocket: {name} does not read what arrives for it ({excess} bytes "
                "waiting, {total} for the whole tunnel), and the far peer has no per-connection flow "
                "control (AWS's clients); every connection of the tunnel waits until it reads",
                name=name,
                excess=excess,
                total=self._excess_total,
            )
            self.sink_full(key)

    def legacy_drained(self, key: Hashable) -> None:
        """C{key}'s send buffer drained (or the connection is gone)."""
        excess = self._excess.pop(key, None)
        if excess is not None:
            self._excess_total -= excess
        self.sink_drained(key)

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
