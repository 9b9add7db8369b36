# -*- test-case-name: tests.test_coalesce -*-
"""
TCP writes sent once per reactor turn, without watching the socket for writability when the
kernel takes them (issue 14: system calls per message).

Twisted's TCP transport buffers every C{write} and sends it when the reactor next reports the
socket writable: per message that costs an C{epoll_ctl} to watch for writability, one more
C{epoll_wait} and event dispatch, and an C{epoll_ctl} to stop watching.  Once installed, a write to
a TCP (or UNIX) connection that is not already waiting for writability is queued, and every queued
connection is flushed at the end of the reactor turn: at the end of the poll's event dispatch when
the reactor's dispatch tells (L{events_listener}, L{tunnelkit.transport.fastpath.install_event_dispatch}),
else by one C{callLater(0)} shared by all of them (writes made in timed calls, or another reactor):
what one turn wrote still goes out in one C{send}, and when the kernel takes it all the reactor
never watches the socket.  When it does not (the peer reads slowly), or the send fails, the
connection goes back to Twisted's own path (C{startWriting}), so flow control, half-close and errors
are Twisted's.  Connections on which C{startTLS} was called keep Twisted's path untouched.  TLS
connections made after it is installed write their records at once (L{TLSMemoryBIOProtocol}, not
Twisted's default C{BufferingTLSTransport}, which holds small writes for one more reactor turn and
copies each write): the TCP writes under them are coalesced here anyway.

Measured with C{strace -c} on the three processes of a wss:// tunnel (source, service,
destination): system calls per 1-byte round trip 13.7 / 12.6 / 13.7 -> 8.4 each; per MB of bulk
74.7 / 49.3 / 61.9 -> 50.3 / 26.0 / 41.8 (benchmarks/bench_syscalls.py).

A turn's writes of several pieces go out in one C{sendmsg} of the pieces as they are (the kernel
gathers them), not joined into one string first as Twisted's C{doWrite} does: one copy of every
byte less in userland (the destination proxy writes each DATA message's payload as a piece).  What
the kernel does not take is then joined (only the rest) for Twisted's path.

This reaches into Twisted's C{FileDescriptor} (its write buffer: C{_tempDataBuffer},
C{_tempDataLen}, C{_maybePauseProducer}, C{dataBuffer}, C{offset}, C{doWrite}, and its producer
state: C{producer}, C{streamingProducer}, C{producerPaused}), its TCP connection's C{TLS} and
C{_aborting}, and the epoll reactor's set of watched writers (C{_writes}); L{missing} names what is
gone, and L{install} then leaves Twisted as it is.
C{TUNNELKIT_WRITE_COALESCING=0} in the environment turns it off.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Iterable, List, Optional

from twisted.internet import abstract, tcp
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

__all__ = ["install", "installed", "events_listener", "missing", "ENVIRONMENT"]

#: Set to C{0} to keep Twisted's own write path.
ENVIRONMENT = "TUNNELKIT_WRITE_COALESCING"

log = Logger()

_FILE_DESCRIPTOR_NEEDS = (
    "_tempDataBuffer",
    "_tempDataLen",
    "_maybePauseProducer",
    "_writeDisconnected",
    "dataBuffer",
    "offset",
    "doWrite",
    "producer",
    "streamingProducer",
    "producerPaused",
)

#: At most this many pieces in one C{sendmsg} (Linux's IOV_MAX); the rest wait for the next send.
_IOV_MAX = 1024

_installed: Optional["_Coalescer"] = None


def missing(reactor: Any = None) -> List[str]:
    """
    The Twisted internals the coalescer needs that Twisted (and C{reactor}, if given) lack; empty:
    all there.
    """
    probe = abstract.FileDescriptor()
    gone = [f"FileDescriptor.{name}" for name in _FILE_DESCRIPTOR_NEEDS if not hasattr(probe, name)]
    for name in ("TLS", "_aborting"):
        if not hasattr(tcp.Connection, name):
            gone.append(f"tcp.Connection.{name}")
    if not hasattr(socket.socket, "sendmsg"):
        gone.append("socket.sendmsg")
    if reactor is None:
        pass
    elif _is_epoll(reactor):
        if not isinstance(getattr(reactor, "_writes", None), set):
            gone.append("EPollReactor._writes")
    elif not hasattr(reactor, "getWriters"):
        gone.append(f"{type(reactor).__name__}.getWriters")
    return gone


def _is_epoll(reactor: Any) -> bool:
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    return isinstance(reactor, EPollReactor)


def installed() -> bool:
    """Whether writes are coalesced in this process."""
    return _installed is not None


def events_listener() -> Optional["_Coalescer"]:
    """
    What the reactor's event dispatch tells when it starts and ends dispatching a poll's events
    (C{events_begin}, C{events_end}), so that their writes go out at its end without a timed call;
    None when writes are not coalesced.
    """
    return _installed


class _Coalescer:
    """The queue of connections with bytes to send at the end of this reactor turn."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.queued: List[Any] = []
        self.scheduled = False  # a timed call to flush is pending
        #: The reactor is dispatching I/O events (L{tunnelkit.transport.fastpath.install_event_dispatch}
        #: tells): writes wait for the end of the dispatch instead of a timed call.
        self.dispatching = False
        if _is_epoll(reactor):  # twistd's reactor on Linux: watched writers by file descriptor
            writes = reactor._writes
            self.watched: Callable[[Any], bool] = lambda t: t.fileno() in writes
        else:  # any other IReactorFDSet (e.g. tests' memory reactors)
            self.watched = lambda t: t in reactor.getWriters()

    def queue(self, transport: Any) -> None:
        if transport._tk_queued or self.watched(transport):
            return  # already queued, or the reactor sends it when the socket is writable
        transport._tk_queued = True
        self.queued.append(transport)
        if not self.scheduled and not self.dispatching:
            self.scheduled = True
            self.reactor.callLater(0, self.flush)

    def events_begin(self) -> None:
        """The reactor starts dispatching one poll's I/O events: what they write is sent at L{events_end}."""
        self.dispatching = True

    def events_end(self) -> None:
        """The poll's events are dispatched: send what they wrote (no timed call needed)."""
        self.dispatching = False
        if self.queued:
            self.flush()

    def flush(self) -> None:
        """Send what each queued connection holds; those the kernel did not take all of wait for writability."""
        self.scheduled = False
        queued, self.queued = self.queued, []
        for transport in queued:
            transport._tk_queued = False
            if not transport.connected or transport._aborting or self.watched(transport):
                # closed meanwhile, aborted (what it held is dropped, as Twisted drops it), or
                # closing (loseConnection watches for writability)
                continue
            try:
                result = _send(transport)
            except Exception:
                log.failure("Sending a connection's buffered bytes failed")
                result = True
            if result is not None or transport.dataBuffer or transport._tempDataLen:
                # Not all sent, or the send failed: Twisted's path sends the rest or reports the error.
                transport.startWriting()


def _send(transport: Any) -> Any:
    """
    Send what C{transport} holds with one system call: one piece with C{send}, several gathered with
    C{sendmsg} (at most L{_IOV_MAX}), when nothing older waits in Twisted's buffer (else Twisted's
    C{doWrite}).  What the kernel did not take stays in the transport (joined) for Twisted's path;
    a failed send is left to that path too, which reports it.  Either way this is what Twisted's
    C{doWrite} does for a connection not watched for writability (no C{stopWriting} to undo), in
    fewer Python calls.
    """
    pieces = transport._tempDataBuffer
    if not pieces or transport.offset != len(transport.dataBuffer):
        return transport.doWrite()
    try:
        if len(pieces) == 1:
            sent = transport.socket.send(pieces[0])
        else:
            sent = transport.socket.sendmsg(pieces if len(pieces) <= _IOV_MAX else pieces[:_IOV_MAX])
    except BlockingIOError:
        sent = 0
    except OSError:
        return transport.doWrite()  # the same error again, reported the way Twisted reports it
    transport.dataBuffer = b""
    transport.offset = 0
    if sent == transport._tempDataLen:
        transport._tempDataBuffer = []
        transport._tempDataLen = 0
        if transport.producer is not None and (not transport.streamingProducer or transport.producerPaused):
            transport.producerPaused = False  # drained: as Twisted's doWrite does
            transport.producer.resumeProducing()
        return None
    index = 0
    while sent >= len(pieces[index]):
        sent -= len(pieces[index])
        index += 1
    rest = [memoryview(pieces[index])[sent:], *pieces[index + 1 :]]
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    transport.dataBuffer = b"".join(rest)
    return None


def _make_write(coalescer: _Coalescer, tls_write: Callable[[Any, bytes], None]) -> Callable[[Any, bytes], None]:
    def write(self: Any, data: bytes) -> None:
        if self.TLS:  # startTLS: its TLS layer writes through FileDescriptor itself
            tls_write(self, data)
            return
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        if not self.connected or self._writeDisconnected or not data:
            return
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)
        self._maybePauseProducer()
        coalescer.queue(self)

    return write


def _make_write_sequence(
    coalescer: _Coalescer, tls_write_sequence: Callable[[Any, Iterable[bytes]], None]
) -> Callable[[Any, Iterable[bytes]], None]:
    def writeSequence(self: Any, iovec: Iterable[bytes]) -> None:
        if self.TLS:
            tls_write_sequence(self, iovec)
            return
        if not self.connected or self._writeDisconnected:
            return
        data = [piece for piece in iovec if piece]
        for piece in data:
            if not isinstance(piece, bytes):
                raise TypeError(f"Data must be bytes, not {type(piece).__name__}")
        if not data:
            return
        self._tempDataBuffer.extend(data)
        self._tempDataLen += sum(map(len, data))
        self._maybePauseProducer()
        coalescer.queue(self)

    return writeSequence


def install(reactor: Any, environ: Optional[Any] = None) -> Callable[[], None]:
    """
    Coalesce the writes of every TCP and UNIX connection of this process on C{reactor} (once per
    process; a second call changes nothing).  Does nothing, with one log line, when Twisted lacks
    what it needs (L{missing}) or the environment says C{TUNNELKIT_WRITE_COALESCING=0}.

    @return: a function that puts Twisted's own write path back (for tests).
    """
    global _installed
    environ = os.environ if environ is None else environ
    if _installed is not None:
        return lambda: None
    if environ.get(ENVIRONMENT, "1") == "0":
        log.info("Write coalescing is off ({variable}=0): Twisted's own write path", variable=ENVIRONMENT)
        return lambda: None
    gone = missing(reactor)
    if gone:
        log.warn(
            "Write coalescing is off: this Twisted lacks {names} (each message then costs a few more "
            "system calls)",
            names=", ".join(gone),
        )
        return lambda: None
    coalescer = _Coalescer(reactor)
    connection = tcp.Connection
    saved = {name: connection.__dict__.get(name) for name in ("write", "writeSequence", "_tk_queued")}
    # Twisted's TLS connections hold small writes for one more reactor turn (BufferingTLSTransport,
    # copying each write) to make fewer records; with the TCP writes coalesced here that only adds a
    # turn to every small message, so new TLS connections write their records at once.
    tls_protocol = TLSMemoryBIOFactory.__dict__.get("protocol")
    TLSMemoryBIOFactory.protocol = TLSMemoryBIOProtocol
    connection.write = _make_write(coalescer, tcp.Connection.write)  # type: ignore[method-assign]
    connection.writeSequence = _make_write_sequence(  # type: ignore[method-assign]
        coalescer, tcp.Connection.writeSequence
    )
    connection._tk_queued = False  # type: ignore[attr-defined]
    _installed = coalescer

    def uninstall() -> None:
        global _installed
        if tls_protocol is not None:
            TLSMemoryBIOFactory.protocol = tls_protocol
        for name, value in saved.items():
            if value is None:
                if name in connection.__dict__:
                    delattr(connection, name)
            else:
                setattr(connection, name, value)
        _installed = None

    return uninstall
