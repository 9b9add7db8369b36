# -*- test-case-name: tests.test_stdtls -*-
"""
TLS for the data path, driven through the standard library's C{ssl.SSLObject} over two
C{ssl.MemoryBIO}s, as a Twisted protocol wrapper: the service's C{ssl:} listeners (API, console,
data plane, cluster) and the local proxy's connection to the service.

Why not Twisted's C{TLSMemoryBIOProtocol} over pyOpenSSL (issue 14): measured here, the stdlib's
OpenSSL binding costs 0.55-0.9x the CPU per GB (benchmarks/lever_tls.py: one C call per write and
per record, no cffi wrappers, no 16 KiB slicing loop in Python), and an idle connection holds
~16.5 KB of OpenSSL state against ~24 KB in the OpenSSL pyOpenSSL bundles.  The TLS itself is
OpenSSL's either way; this module only moves bytes between it and Twisted.

What it keeps of Twisted's TLS transport, so that the protocols above cannot tell the difference:
  - the application protocol is connected at once, and what it writes before the handshake is done
    is held and sent after it; C{loseConnection} before then waits for it too;
  - C{loseConnection} sends C{close_notify} and closes the TCP connection when the peer answers
    with its own, or ends the TCP connection; C{abortConnection} resets at once, with no alert;
  - a TLS failure (a handshake refused, a certificate not trusted, a bad record) sends OpenSSL's
    alert and ends the connection; the application's C{connectionLost} gets the C{ssl.SSLError},
    whose text says what failed ("certificate verify failed: Hostname mismatch ...");
  - a TCP end without C{close_notify} reaches the application as C{ConnectionLost}: data may be
    missing, and the application must not take it for a clean end;
  - flow control is the TCP transport's: records go straight into its buffer, so its producer
    pauses the application; C{pauseProducing} on this transport pauses TCP reads;
  - for protocols that provide C{IHandshakeListener}, it calls C{handshakeCompleted}.

It provides L{ITLSConnection}, not Twisted's C{ISSLTransport}: autobahn takes every
C{ISSLTransport} for Twisted's pyOpenSSL transport and reads its OpenSSL handle (for a
"tls-unique" channel ID nothing here uses).  Code asking "is this connection encrypted" asks
L{is_encrypted}, which knows both (the service's HTTP channel does, for C{Request.isSecure()}).

Renegotiation is refused (C{OP_NO_RENEGOTIATION}): no write ever waits for a read.

Writes are encrypted at once (no copy into a Python buffer), at most L{WRITE_SLICE} bytes per
C{SSLObject.write}, so OpenSSL's outgoing memory buffer, which never shrinks, stays that small.
Reads decrypt every whole record that arrived and hand the application each record's C{bytes}.
"""

from __future__ import annotations

import ssl
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    ISSLTransport,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, directlyProvides, implementer, providedBy

__all__ = [
    "SessionCache",
    "ITLSConnection",
    "is_encrypted",
    "TLSConnection",
    "TLSFactory",
    "TLSServerEndpoint",
    "TLSClientEndpoint",
    "WRITE_SLICE",
    "RECORD",
]

#: The largest plaintext a TLS record carries: what one C{SSLObject.read} returns at most.
RECORD = 16384

#: The most plaintext given to one C{SSLObject.write} (OpenSSL cuts it into records).
WRITE_SLICE = 65536


class ITLSConnection(Interface):
    """A transport that is a TLS connection of this module."""

    version = Attribute("The TLS version negotiated (C{TLSv1.3}), None before the handshake.")
    cipher = Attribute("The cipher suite negotiated, as C{ssl.SSLObject.cipher} gives it.")

    def getPeerCertificate() -> Optional[bytes]:
        """The certificate the peer presented (DER), or None."""


def is_encrypted(transport: Any) -> bool:
    """Whether C{transport} is a TLS connection: this module's, or Twisted's (C{ISSLTransport})."""
    return ITLSConnection.providedBy(transport) or ISSLTransport.providedBy(transport)


class SessionCache:
    """
    The TLS sessions a client may resume, one per server name: each is offered once (TLS 1.3
    tickets are for one use, RFC 8446 C.4) and replaced by the ticket of the connection that used
    it.  A resumed handshake skips the certificate chain's check and the server's signature: less
    CPU on both sides when a local proxy or an agent's session connects again.
    """

    def __init__(self, size: int = 16) -> None:
        self._sessions: Dict[Tuple[Optional[str], int], ssl.SSLSession] = {}
        self._size = size

    def take(self, name: Optional[str], context: ssl.SSLContext) -> Optional[ssl.SSLSession]:
        """The session of C{context} to offer to C{name}, if any (it is not offered again)."""
        return self._sessions.pop((name, id(context)), None)

    def keep(self, name: Optional[str], context: ssl.SSLContext, session: ssl.SSLSession) -> None:
        key = (name, id(context))
        if len(self._sessions) >= self._size and key not in self._sessions:
            self._sessions.pop(next(iter(self._sessions)))
        self._sessions[key] = session

    def __len__(self) -> int:
        return len(self._sessions)


class TLSFactory(Factory):
    """
    Makes L{TLSConnection}s around the protocols of C{wrapped}: server side, or client side to
    C{hostname} (the name sent as SNI and checked against the certificate when the context checks
    host names; None for an IP address or no check), resuming sessions from C{sessions} if given.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        wrapped: IProtocolFactory,
        server_side: bool,
        hostname: Optional[str] = None,
        sessions: Optional[SessionCache] = None,
    ) -> None:
        self.context = context
        self.wrapped = wrapped
        self.server_side = server_side
        self.hostname = hostname
        self.sessions = None if server_side else sessions

    def logPrefix(self) -> str:
        prefix = getattr(self.wrapped, "logPrefix", None)
        return f"{prefix() if prefix is not None else type(self.wrapped).__name__} (TLS)"

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def startedConnecting(self, connector: Any) -> None:
        started = getattr(self.wrapped, "startedConnecting", None)
        if started is not None:
            started(connector)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        failed = getattr(self.wrapped, "clientConnectionFailed", None)
        if failed is not None:
            failed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        lost = getattr(self.wrapped, "clientConnectionLost", None)
        if lost is not None:
            lost(connector, reason)

    def buildProtocol(self, addr: Any) -> Optional[TLSConnection]:
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        return TLSConnection(self, protocol)


@implementer(ITLSConnection, ITransport)
class TLSConnection(ProtocolWrapper):
    """
    One TLS connection: the transport of the application protocol C{wrappedProtocol}, the protocol
    of the TCP (or other) transport under it.
    """

    _tls: Any  # ssl.SSLObject, once connected
    transport: Any  # the TCP transport (ITCPTransport), or another TLSConnection
    _incoming: ssl.MemoryBIO
    _outgoing: ssl.MemoryBIO

    def __init__(self, factory: TLSFactory, wrappedProtocol: IProtocol) -> None:  # noqa: N803 - Twisted's name
        self.wrappedProtocol = wrappedProtocol
        self.factory = factory  # type: ignore[assignment]  # a TLSFactory, not a WrappingFactory
        self._handshake_done = False
        self._held: List[bytes] = []  # what the application wrote before the handshake was done
        self._held_size = 0
        self._closing = False  # loseConnection was called
        self._close_notify_sent = False
        self._peer_closed = False  # the peer's close_notify arrived
        self._reason: Optional[Failure] = None  # why the TLS connection ended, if it failed
        self._aborted = False
        self._lost = False
        self._offered: Optional[ssl.SSLSession] = None  # the session offered for resumption
        self._keep_session = False  # a client with a session cache, waiting for a ticket to keep

    # --- the TCP transport's protocol ---

    def makeConnection(self, transport: Any) -> None:
        factory: TLSFactory = self.factory  # type: ignore[assignment]
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        sessions = factory.sessions
        if sessions is not None:
            self._offered = sessions.take(factory.hostname, factory.context)
            self._keep_session = True
        try:
            self._tls = factory.context.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=factory.server_side,
                server_hostname=None if factory.server_side else factory.hostname,
                session=self._offered,
            )
        except ValueError:  # the session is another context's: a full handshake instead
            self._offered = None
            self._tls = factory.context.wrap_bio(
                self._incoming, self._outgoing, server_side=False, server_hostname=factory.hostname
            )
        directlyProvides(self, providedBy(transport), ITLSConnection)
        Protocol.makeConnection(self, transport)
        self.wrappedProtocol.makeConnection(self)
        if not factory.server_side and not self._lost:
            self._handshake()

    def dataReceived(self, data: bytes) -> None:
        if self._reason is not None or self._aborted:
            return
        self._incoming.write(data)
        if not self._handshake_done:
            self._handshake()
            if not self._handshake_done:
                return
        self._read()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._lost:
            return
        self._lost = True
        if self._reason is not None:
            reason = self._reason
        elif reason.check(ConnectionDone) and not self._peer_closed and not self._close_notify_sent:
            reason = Failure(ConnectionLost("the TLS connection ended without close_notify"))
        protocol, self.wrappedProtocol = self.wrappedProtocol, None  # type: ignore[assignment]  # no cycle
        if protocol is not None:
            protocol.connectionLost(reason)

    # --- the application's transport ---

    def write(self, data: bytes) -> None:
        if self._closing or self._reason is not None or self._aborted or self._lost:
            return
        if not self._handshake_done:
            if data:
                self._held.append(bytes(data))
                self._held_size += len(data)
            return
        self._encrypt(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def loseConnection(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self.disconnecting = 1
        if self._handshake_done or not self._held:
            self._shutdown()
        # else: the handshake sends what the application wrote, then shuts down

    def abortConnection(self) -> None:
        if self._lost:
            return
        self._aborted = True
        self.disconnecting = 1
        self.transport.abortConnection()

    def getPeerCertificate(self) -> Optional[bytes]:
        """The certificate the peer presented (DER), or None (none, or the handshake is not done)."""
        if not self._handshake_done:
            return None
        certificate: Optional[bytes] = self._tls.getpeercert(binary_form=True)
        return certificate

    @property
    def version(self) -> Optional[str]:
        """The TLS version negotiated (C{TLSv1.3}), None before the handshake."""
        return self._tls.version() if self._handshake_done else None  # type: ignore[no-any-return]

    @property
    def cipher(self) -> Optional[Tuple[str, str, int]]:
        """The cipher suite negotiated, as C{ssl.SSLObject.cipher} gives it."""
        return self._tls.cipher() if self._handshake_done else None  # type: ignore[no-any-return]

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed an earlier session (L{SessionCache})."""
        return bool(self._handshake_done and self._tls.session_reused)

    def _maybe_keep_session(self) -> None:
        """Keep this connection's own ticket (TLS 1.3 sends it after the handshake) for the next one."""
        session = self._tls.session
        if session is None or not session.has_ticket:
            return
        offered = self._offered
        if offered is not None and session.id == offered.id:
            return  # the ticket this connection used, not a new one
        factory: TLSFactory = self.factory  # type: ignore[assignment]
        assert factory.sessions is not None
        factory.sessions.keep(factory.hostname, factory.context, session)
        self._keep_session = False

    def buffered(self) -> int:
        """Bytes the application wrote that wait for the handshake."""
        return self._held_size

    # --- TLS ---

    def _flush(self) -> None:
        if self._outgoing.pending:
            self.transport.write(self._outgoing.read())

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as e:
            self._fail(e)
            return
        except OSError as e:  # pragma: no cover - an SSLSyscallError with a memory BIO
            self._fail(e)
            return
        self._handshake_done = True
        self._flush()
        if self._keep_session:
            self._maybe_keep_session()
        protocol = self.wrappedProtocol
        if IHandshakeListener.providedBy(protocol):
            protocol.handshakeCompleted()
        held, self._held = self._held, []
        self._held_size = 0
        if held and self._reason is None and not self._aborted and not self._lost:
            self._encrypt(b"".join(held))
        if self._closing and not self._close_notify_sent:
            self._shutdown()

    def _encrypt(self, data: Any) -> None:
        size = len(data)
        try:
            if size <= WRITE_SLICE:
                self._tls.write(data)
            else:
                view = memoryview(data)
                for start in range(0, size, WRITE_SLICE):
                    self._tls.write(view[start : start + WRITE_SLICE])
                    self.transport.write(self._outgoing.read())
                return
        except ssl.SSLError as e:
            self._fail(e)
            return
        self.transport.write(self._outgoing.read())

    def _read(self) -> None:
        tls = self._tls
        incoming = self._incoming
        chunks: List[bytes] = []
        ended = False
        try:
            while True:
                chunk = tls.read(RECORD)
                if not chunk:  # the peer's close_notify
                    ended = True
                    break
                chunks.append(chunk)
                if not incoming.pending and not tls.pending():
                    break  # all that arrived is read: spare the SSLWantReadError of one more read
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True
        except ssl.SSLError as e:
            self._deliver(chunks)
            self._fail(e)
            return
        if self._outgoing.pending:  # a post-handshake answer (TLS 1.3 key update)
            self._flush()
        if self._keep_session:
            self._maybe_keep_session()
        self._deliver(chunks)
        if ended and not self._peer_closed:
            self._peer_closed = True
            self._shutdown()

    def _deliver(self, chunks: List[bytes]) -> None:
        """
        Hand the application each record's bytes as they are, without joining them: the WebSocket
        fast path collects a frame's pieces and copies them once (the relay while unmasking), so a
        join here would copy every byte once more.
        """
        for chunk in chunks:
            protocol = self.wrappedProtocol
            if protocol is None or self._aborted:
                return
            protocol.dataReceived(chunk)

    def _shutdown(self) -> None:
        """Send close_notify (once); end the TCP connection once the peer has sent its own."""
        if self._lost or self._aborted:
            return
        if not self._close_notify_sent and self._reason is None:
            self._close_notify_sent = True
            if self._handshake_done:
                try:
                    self._tls.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass  # close_notify is written; the peer's has not arrived
                except ssl.SSLError:
                    pass  # a broken connection: it ends all the same
                self._flush()
            else:  # nothing was encrypted yet: no TLS to shut down
                self._peer_closed = True
        if self._peer_closed or not self._handshake_done:
            self.transport.loseConnection()
        # else, as Twisted's TLS does: wait for the peer's close_notify (or its TCP end), reading on

    def _fail(self, error: Exception) -> None:
        """A TLS failure: send OpenSSL's alert, if any, and end the connection."""
        if self._reason is None:
            self._reason = Failure(error)
        self._flush()
        self.disconnecting = 1
        self.transport.loseConnection()


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """A server endpoint serving TLS with C{context} over the connections of C{endpoint} (TCP)."""

    def __init__(self, endpoint: IStreamServerEndpoint, context: ssl.SSLContext) -> None:
        self.endpoint = endpoint
        self.context = context

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred:  # noqa: N803 - Twisted's name
        return self.endpoint.listen(TLSFactory(self.context, protocolFactory, server_side=True))


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    A client endpoint: TLS with C{context} to C{hostname} over the connection C{endpoint} makes.
    Its C{connect} fires with the application protocol once TCP is connected (the handshake
    follows, as with Twisted's C{wrapClientTLS}).
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        context: ssl.SSLContext,
        hostname: Optional[str],
        sessions: Optional[SessionCache] = None,
    ) -> None:
        self.endpoint = endpoint
        self.context = context
        self.hostname = hostname
        self.sessions = sessions

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:  # noqa: N803 - Twisted's name
        factory = TLSFactory(
            self.context, protocolFactory, server_side=False, hostname=self.hostname, sessions=self.sessions
        )
        connecting: Deferred = self.endpoint.connect(factory)
        return connecting.addCallback(lambda protocol: protocol.wrappedProtocol)
