# -*- test-case-name: tests.test_localproxy_session -*-
"""
One local TCP (or unix) connection carried through the tunnel: the protocol both proxy modes use
once a connection exists (accepted by a source listener, or opened by a destination connector).

It reads in multiples of the 64512-byte DATA payload (no runt frames, two frames per WebSocket
message), passes bytes through the service adapter's filter when there is one (C{None} = untouched),
and takes part in flow control (L{tunnelkit.transport.flow}).
"""

from __future__ import annotations

from typing import Any, Tuple

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.adapters import IActiveStreamFilter, IFilterOutput, StreamFilterError
from tunnelkit.protocol.framing import MAX_PAYLOAD_SIZE
from tunnelkit.transport.flow import SinkProducer

__all__ = ["LocalConnection", "READ_SIZE", "ConnectionKey", "reset_connection", "Refused"]

#: Bytes read from a local socket at once: two full DATA payloads, one WebSocket message.
READ_SIZE = 2 * MAX_PAYLOAD_SIZE

ConnectionKey = Tuple[str, int]


def reset_connection(transport: Any) -> None:
    """
    End a TCP connection with a reset (RST): Twisted's C{abortConnection} sets C{SO_LINGER} to
    C{{1, 0}} before closing, so the peer's next read fails with ECONNRESET.  (A transport without
    it, e.g. a unix socket's or a test's, is just closed.)
    """
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


class Refused(Protocol):
    """An accepted connection the source cannot carry: reset at once (the caller logged why)."""

    def connectionMade(self) -> None:
        reset_connection(self.transport)


@implementer(IFilterOutput)
class LocalConnection(Protocol):
    """
    A local connection of service C{service_id}, carried as tunnel connection C{connection_id}.

    @ivar proxy: the L{tunnelkit.localproxy.session_service.LocalProxySession} it reports to.
    @ivar filter: the service adapter's L{IStreamFilter} for this connection, or None (bytes
        untouched).  An L{IActiveStreamFilter} is given this object as its L{IFilterOutput}.
    """

    log = Logger()

    def __init__(self, proxy: Any, service_id: str, connection_id: int, stream_filter: Any = None) -> None:
        self.proxy = proxy
        self.service_id = service_id
        self.connection_id = connection_id
        self.filter = stream_filter
        self.bytes_in = 0  # from the local socket into the tunnel
        self.bytes_out = 0  # from the tunnel to the local socket
        self.closing = False
        self.peer = "?"
        self._reported_closed = False
        if stream_filter is not None and IActiveStreamFilter.providedBy(stream_filter):
            stream_filter.attach(self)

    @property
    def key(self) -> ConnectionKey:
        return (self.service_id, self.connection_id)

    def connectionMade(self) -> None:
        transport = self.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = READ_SIZE  # the recv size, and the send-buffer limit before pausing
        peer = transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}".rstrip(":")
        transport.registerProducer(SinkProducer(self.proxy.websocket_read_throttle, self.key), True)
        self.proxy.local_read_throttle.add(transport)
        self.proxy.local_opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self.filter is not None:
            try:
                data = self.filter.outbound(data)
            except StreamFilterError as e:
                self._filter_failed(e)
                return
            if not data:
                return
        self.bytes_in += len(data)
        self.proxy.local_data(self, data)

    def write(self, data: bytes) -> None:
        """Bytes from the tunnel for the local socket."""
        if self.filter is not None:
            try:
                data = self.filter.inbound(data)
            except StreamFilterError as e:
                self._filter_failed(e)
                return
            if not data:
                return
        self.bytes_out += len(data)
        self.transport.write(data)

    # IFilterOutput, for active filters
    def send_outbound(self, data: bytes) -> None:
        """Send C{data} into the tunnel now (past the filter)."""
        if data and not self.closing:
            self.bytes_in += len(data)
            self.proxy.local_data(self, data)

    def send_inbound(self, data: bytes) -> None:
        """Write C{data} to the local socket now (past the filter)."""
        if data and not self.closing:
            self.bytes_out += len(data)
            self.transport.write(data)

    def _filter_failed(self, error: Exception) -> None:
        self.log.error(
            "Closing connection {connection_id} of {service_id}: the {service_id} adapter refused "
            "its data: {error}",
            connection_id=self.connection_id,
            service_id=self.service_id or "-",
            error=str(error),
        )
        reset_connection(self.transport)

    def close(self, reason: str, abort: bool = False) -> None:
        """
        End the connection (the tunnel side already knows).  C{abort=False}: flush what is buffered,
        then close with a FIN.  C{abort=True}: reset it (RST) now, dropping what is buffered, so that
        the local application sees an error (ECONNRESET) instead of a clean end of stream.
        """
        if self.closing:
            return
        self.closing = True
        self._reported_closed = True  # the session asked for it: no reset to send back
        self.log.info(
            "{what} connection {connection_id} of {service_id} ({reason}): "
            "{bytes_in} bytes in, {bytes_out} bytes out",
            what="Resetting" if abort else "Closing",
            connection_id=self.connection_id,
            service_id=self.service_id or "-",
            reason=reason,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )
        # With a paused streaming producer registered, Twisted would resume it instead of finishing
        # the close once the buffer drains: the far end would never see the end of the stream.
        self.transport.unregisterProducer()
        if abort:
            reset_connection(self.transport)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.proxy.local_read_throttle.remove(self.transport)
        self.proxy.websocket_read_throttle.sink_drained(self.key)
        if self.filter is not None:
            try:
                self.filter.connection_lost()
            except Exception:
                self.log.failure("The service adapter's filter failed on connection_lost")
        if not self._reported_closed:
            self._reported_closed = True
            self.log.info(
                "Disconnected from: {peer} (connection {connection_id} of {service_id}): "
                "{bytes_in} bytes in, {bytes_out} bytes out",
                peer=self.peer,
                connection_id=self.connection_id,
                service_id=self.service_id or "-",
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
            )
        self.proxy.local_gone(self)
