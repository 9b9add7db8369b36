# -*- test-case-name: tests.test_localproxy_session -*-
"""
One local TCP (or unix) connection carried through the tunnel: the protocol both proxy modes use
once a connection exists (accepted by a source listener, or opened by a destination connector).

It reads in multiples of the 64512-byte DATA payload (no runt frames, two frames per WebSocket
message), passes bytes through the service adapter's filter when there is one (C{None} = untouched),
and takes part in flow control (L{tunnelkit.transport.flow}, L{tunnelkit.protocol.flowcontrol}):

  - its reads pause for any of several causes (the WebSocket is full, no credit, pacing) and resume
    when none is left;
  - it watches its own send buffer (it is its transport's producer): bytes from the tunnel are
    reported as delivered while the buffer takes them, and held back while it is full, so that the
    peer's credit only grows as the local application reads;
  - it is half-closeable: a read EOF is reported to the session (an EOF to the far peer, or the
    connection's end without the extension), and L{LocalConnection.half_close} shuts down only the
    write side.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Tuple

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.adapters import IActiveStreamFilter, IFilterOutput, IHoldingStreamFilter, StreamFilterError
from tunnelkit.protocol.framing import MAX_PAYLOAD_SIZE

__all__ = ["LocalConnection", "READ_SIZE", "ConnectionKey", "reset_connection", "reset_if_killed", "Refused"]

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


_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


def reset_if_killed(transport: Any, on: bool) -> None:
    """
    C{on=True}: set C{SO_LINGER} to C{{1, 0}} on a TCP connection's socket, so that if this process
    dies (C{kill -9}, a crash) the kernel's close of the socket sends a reset and the application
    sees ECONNRESET, not a clean end of stream after a prefix.  C{on=False}: back to the ordinary
    close (a FIN after every buffered byte), just before an honest close: with C{{1, 0}} left on, a
    close would drop what the kernel still holds for the application.  (Other transports: nothing.)
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return
    try:
        handle = get_handle()
        if getattr(handle, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET if on else _LINGER_OFF)
    except (OSError, AttributeError):
        pass  # already closed: nothing to change


class Refused(Protocol):
    """An accepted connection the source cannot carry: reset at once (the caller logged why)."""

    def connectionMade(self) -> None:
        reset_connection(self.transport)


@implementer(IPushProducer)
class _SendBuffer:
    """Registered on a local connection's transport: tells the connection when its buffer is full."""

    __slots__ = ("connection",)

    def __init__(self, connection: "LocalConnection") -> None:
        self.connection = connection

    def pauseProducing(self) -> None:
        self.connection.buffer_filled()

    def resumeProducing(self) -> None:
        self.connection.buffer_drained()

    def stopProducing(self) -> None:
        self.connection.buffer_drained()


@implementer(IFilterOutput, IHalfCloseableProtocol)
class LocalConnection(Protocol):
    """
    A local connection of service C{service_id}, carried as tunnel connection C{connection_id}.

    @ivar proxy: the L{tunnelkit.localproxy.session_service.LocalProxySession} it reports to.
    @ivar filter: the service adapter's L{IStreamFilter} for this connection, or None (bytes
        untouched).  An L{IActiveStreamFilter} is given this object as its L{IFilterOutput}.
    """

    log = Logger()
    #: A TCP or UNIX transport (ITCPTransport, IHalfCloseableDescriptor, IPushProducer and the
    #: producer registration at once), which ITransport, Protocol's annotation, does not say.
    transport: Any

    def __init__(self, proxy: Any, service_id: str, connection_id: int, stream_filter: Any = None) -> None:
        self.proxy = proxy
        self.service_id = service_id
        self.connection_id = connection_id
        self.filter = stream_filter
        self.bytes_in = 0  # from the local socket into the tunnel
        self.bytes_out = 0  # from the tunnel to the local socket
        self.closing = False
        self.peer = "?"
        self.buffer_full = False  # the transport's send buffer is over its limit
        self.ungranted = 0  # tunnel bytes written while it was full (flow control: not granted yet)
        self.pacer: Any = None  # a Pacer toward a peer without flow control, if configured
        self.pace_call: Any = None
        self._read_pauses: set = set()
        self._reported_closed = False
        #: Called once the connection is made and registered (a destination's direct TCP connect).
        self.on_made: Any = None
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
        # Until it ends honestly, this connection ends with a reset even if this process is killed.
        reset_if_killed(transport, True)
        transport.registerProducer(_SendBuffer(self), True)
        self.proxy.local_read_throttle.add(self)
        self.proxy.local_opened(self)
        if self.on_made is not None:
            self.on_made()

    # --- reading: pauses for several causes ---

    def pause_reading(self, cause: str) -> None:
        """Stop reading the local socket for C{cause} (until every cause is lifted)."""
        if not self._read_pauses and self.transport is not None:
            self.transport.pauseProducing()
        self._read_pauses.add(cause)

    def resume_reading(self, cause: str) -> None:
        """Lift C{cause}; read again when none is left."""
        if cause not in self._read_pauses:
            return
        self._read_pauses.discard(cause)
        if not self._read_pauses and self.transport is not None and not self.closing:
            self.transport.resumeProducing()

    @property
    def reading_paused(self) -> bool:
        return bool(self._read_pauses)

    # --- the send buffer ---

    def buffer_filled(self) -> None:
        if not self.buffer_full:
            self.buffer_full = True
            self.proxy.local_buffer_full(self)

    def buffer_drained(self) -> None:
        if self.buffer_full:
            self.buffer_full = False
            self.proxy.local_buffer_drained(self)

    def readConnectionLost(self) -> None:
        """
        The local application shut down its write side (or closed).  A filter that holds outbound
        bytes (L{IHoldingStreamFilter}) may hold this end too, until it sent them: the end never
        overtakes the bytes before it.
        """
        stream_filter = self.filter
        if (
            stream_filter is not None
            and IHoldingStreamFilter.providedBy(stream_filter)
            and not stream_filter.outbound_ended(self._send_end)
        ):
            return
        self.proxy.local_eof(self)

    def _send_end(self) -> None:
        """The filter sent what it held: now the local end of stream goes into the tunnel."""
        if not self.closing and self.transport is not None:
            self.proxy.local_eof(self)

    def writeConnectionLost(self) -> None:
        """Our write side is shut down (after L{half_close})."""

    def half_close(self) -> None:
        """The far application sent its last byte: flush, then shut down only our write side (FIN)."""
        if self.closing:
            return
        # A paused streaming producer would be resumed instead of the write side being shut down.
        self.transport.unregisterProducer()
        self.buffer_drained()
        self.transport.loseWriteConnection()

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
        """Bytes from the tunnel for the local socket (reported as written, in tunnel bytes)."""
        size = len(data)
        if self.filter is not None:
            try:
                data = self.filter.inbound(data)
            except StreamFilterError as e:
                self._filter_failed(e)
                return
        if data:
            self.bytes_out += len(data)
            self.transport.write(data)
        self.proxy.local_written(self, size)

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
        self._cancel_pacing()
        if abort:
            reset_connection(self.transport)
        else:
            reset_if_killed(self.transport, False)  # an honest end: every buffered byte, then a FIN
            self.transport.loseConnection()

    def _cancel_pacing(self) -> None:
        if self.pace_call is not None and self.pace_call.active():
            self.pace_call.cancel()
        self.pace_call = None

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_pacing()
        self.proxy.local_read_throttle.remove(self)
        self.proxy.websocket_read_throttle.legacy_drained(self.key)
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
