# -*- test-case-name: tests.test_memory_tunnel -*-
"""
A whole tunnel in memory: a source L{LocalProxySession}, the service's data plane (its relay on a
C{twisted.web} site, L{ServiceHarness}) and a destination L{LocalProxySession}, with the local
applications at both ends, all on one L{MemoryNetwork} (a C{MemoryReactorClock} whose TCP listeners
and connections are paired over L{twisted.test.iosim} transports).  Nothing touches the real reactor
or the network: the test advances the clock and pumps the bytes, so a tunnel's behaviour can be
checked byte for byte, deterministically, in milliseconds.

    tunnel = MemoryTunnel(self, ["ECHO1"])             # self: the TestCase (cleanups, log capture)
    echo = tunnel.network.serve_echo(7)                # the destination's target
    destination = tunnel.start_destination({"ECHO1": ("127.0.0.1", 7)})
    source = tunnel.start_source({"ECHO1": 0})
    tunnel.pump()                                      # WebSockets open, the tunnel becomes ready
    app = tunnel.connect(source, "ECHO1")              # an application connects to the source
    app.write(b"hello"); tunnel.pump()
    assert app.received == b"hello"
    tunnel.service.store.close_tunnel(tunnel.opened.tunnel_id) ...

The in-memory transports model what the tunnel's flow control depends on: an application that
stops reading (L{App.pause_reading}) leaves bytes in its peer's send buffer, whose producer is paused
past C{bufferSize} bytes and resumed once the reader catches up; half-close (C{loseWriteConnection}
delivers C{readConnectionLost} after the buffered bytes); C{abortConnection} is a reset (the peer's
C{connectionLost} gets L{ConnectionLost} and buffered bytes are dropped).  TLS is not modelled: the
proxies connect with C{ws://}.  For what needs real processes (twistd, exit statuses, kill -9, real
servers, TLS) see L{tunnelkit.testing.process}.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import txaio
import txaio.testutil
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport
from zope.interface import implementer

from tunnelkit.localproxy.destination import DestinationSide
from tunnelkit.localproxy.endpoint import ServiceEndpoint
from tunnelkit.localproxy.session_service import LocalProxySession
from tunnelkit.localproxy.source import SourceSide
from tunnelkit.testing import OpenedTunnel, ServiceHarness

__all__ = ["App", "MemoryNetwork", "MemoryTunnel", "MemoryServiceEndpoint"]

#: Where the service's data plane listens on the L{MemoryNetwork}.
SERVICE_PORT = 8080

#: The first port a listener on port 0 gets (then the next ones).
EPHEMERAL_PORTS = 40000


class _Transport(FakeTransport):
    """
    One end of an in-memory TCP connection (an iosim L{FakeTransport} with flow control).

    @ivar bufferSize: bytes that may wait in the send buffer before a registered streaming producer
        is paused (it is resumed once the peer has read them).
    """

    bufferSize = 64 * 1024

    def __init__(self, protocol: Any, isServer: bool, hostAddress: Any, peerAddress: Any) -> None:
        super().__init__(protocol, isServer, hostAddress, peerAddress)
        self.reading = True
        self.write_shut = False
        self.eof_delivered = False
        self.aborted = False
        self._producer_paused = False
        self.peer: Optional["_Transport"] = None

    def pending(self) -> int:
        """Bytes written and not yet read by the peer."""
        return sum(len(chunk) for chunk in self.stream)

    def write(self, data: bytes) -> None:
        if self.disconnecting or self.write_shut:
            return
        if data:
            self.stream.append(data)
            self._check_full()

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        self.write(b"".join(iovec))

    def _check_full(self) -> None:
        if self.producer is not None and self.streamingProducer and not self._producer_paused:
            if self.pending() > self.bufferSize:
                self._producer_paused = True
                self.producer.pauseProducing()

    def _check_drained(self) -> None:
        if self._producer_paused and self.pending() <= self.bufferSize:
            self._producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        self._producer_paused = False
        self._check_full()

    def unregisterProducer(self) -> None:
        super().unregisterProducer()
        self._producer_paused = False

    # reading from the peer: IPushProducer of the transport
    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def stopProducing(self) -> None:
        self.loseConnection()

    def loseWriteConnection(self) -> None:
        self.write_shut = True

    def abortConnection(self) -> None:
        """A reset: buffered bytes are dropped, the peer sees L{ConnectionLost}."""
        if not self.disconnected:
            self.aborted = True
            self.disconnecting = True
            self.stream = []


class _Link:
    """A connection between two L{_Transport}s; L{pump} moves what can move."""

    def __init__(self, client: _Transport, server: _Transport) -> None:
        self.client = client
        self.server = server
        client.peer, server.peer = server, client
        self.closed = False

    def pump(self) -> bool:
        if self.closed:
            return False
        moved = False
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            if sender.aborted or receiver.aborted:
                self._close(Failure(ConnectionLost("Connection reset by peer (in memory)")))
                return True
            if sender.stream and receiver.reading and not receiver.disconnected:
                data, sender.stream = b"".join(sender.stream), []
                receiver.protocol.dataReceived(data)
                sender._check_drained()
                moved = True
        if moved:
            return True
        for sender, receiver in ((self.client, self.server), (self.server, self.client)):
            if sender.stream:
                continue
            if sender.disconnecting:
                self._close(Failure(ConnectionDone("Connection was closed cleanly.")))
                return True
            if sender.write_shut and not sender.eof_delivered:
                sender.eof_delivered = True
                if IHalfCloseableProtocol.providedBy(receiver.protocol):
                    receiver.protocol.readConnectionLost()
                else:
                    receiver.disconnecting = True  # Twisted closes a protocol that cannot half-close
                if self.client.eof_delivered and self.server.eof_delivered:
                    self._close(Failure(ConnectionDone("Connection was closed cleanly.")))
                return True
        return False

    def _close(self, reason: Failure) -> None:
        self.closed = True
        for transport in (self.client, self.server):
            transport.disconnecting = True
            transport.disconnected = True
            transport.stream = []
        for transport in (self.client, self.server):
            transport.protocol.connectionLost(reason)


@implementer(IListeningPort)
class _Listener:
    """A listening port of the L{MemoryNetwork}; while it is not reading, connections wait."""

    def __init__(self, network: "MemoryNetwork", port: int, factory: Any, interface: str) -> None:
        self.network = network
        self.port = port
        self.factory = factory
        self.interface = interface or "0.0.0.0"
        self.accepting = True
        self.listening = True
        self.waiting: List[Tuple[Any, Any]] = []

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self.interface, self.port)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        if self.listening:
            self.listening = False
            if self.network.listeners.get(self.port) is self:
                del self.network.listeners[self.port]
            for connector, factory in self.waiting:
                self.network._refuse(connector, factory)
            self.waiting = []
            self.factory.doStop()

    loseConnection = stopListening

    def stopReading(self) -> None:
        self.accepting = False

    def startReading(self) -> None:
        self.accepting = True
        waiting, self.waiting = self.waiting, []
        for connector, factory in waiting:
            self.network._accept(self, connector, factory)


class MemoryNetwork(MemoryReactorClock):
    """
    A L{MemoryReactorClock} whose C{listenTCP} and C{connectTCP} meet: a connection to a port
    something listens on is accepted at the next L{flush}, over iosim transports; to any other port
    it is refused.  Port 0 takes the next free port from L{EPHEMERAL_PORTS} up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.listeners: Dict[int, _Listener] = {}
        self.links: List[_Link] = []
        self._ports = itertools.count(EPHEMERAL_PORTS)

    def _free_port(self) -> int:
        while True:
            port = next(self._ports)
            if port not in self.listeners:
                return port

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> _Listener:  # type: ignore[override]
        if port in self.listeners:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        port = port or self._free_port()
        super().listenTCP(port, factory, backlog, interface)
        listener = _Listener(self, port, factory, interface)
        self.listeners[port] = listener
        factory.doStart()
        return listener

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:  # type: ignore[override]
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)
        self.callLater(0, self._arrive, connector, host, port, factory)
        return connector

    def _arrive(self, connector: Any, host: str, port: int, factory: Any) -> None:
        listener = self.listeners.get(port)
        if listener is None or not listener.listening:
            self._refuse(connector, factory)
        elif not listener.accepting:
            listener.waiting.append((connector, factory))
        else:
            self._accept(listener, connector, factory)

    def _refuse(self, connector: Any, factory: Any) -> None:
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError("in memory: nothing listens")))

    def _accept(self, listener: _Listener, connector: Any, factory: Any) -> None:
        client_port = self._free_port() + 10000
        client_address = IPv4Address("TCP", "127.0.0.1", client_port)
        server_address = IPv4Address("TCP", "127.0.0.1", listener.port)
        server = listener.factory.buildProtocol(client_address)
        if server is None:
            self._refuse(connector, factory)
            return
        client = factory.buildProtocol(server_address)
        if client is None:
            return
        client_transport = _Transport(client, False, client_address, server_address)
        server_transport = _Transport(server, True, server_address, client_address)
        self.links.append(_Link(client_transport, server_transport))
        server.makeConnection(server_transport)
        client.makeConnection(client_transport)

    def flush(self, limit: int = 100000) -> None:
        """Run what is due now and move bytes until nothing moves any more."""
        for _ in range(limit):
            self.advance(0)
            moved = False
            for link in list(self.links):
                if link.pump():
                    moved = True
            self.links = [link for link in self.links if not link.closed]
            if not moved and not any(call.getTime() <= self.seconds() for call in self.getDelayedCalls()):
                return
        raise AssertionError(f"the in-memory network still moves bytes after {limit} rounds")

    def let_pass(self, seconds: float, step: float = 0.1) -> None:
        """Let C{seconds} pass in steps of C{step}, flushing after each."""
        self.flush()
        end = self.seconds() + seconds
        while self.seconds() + step <= end + 1e-9:
            self.advance(step)
            self.flush()

    # --- applications ---

    def connect_app(self, port: int, host: str = "127.0.0.1") -> "App":
        """An application's connection to C{port} (connected at the next L{flush})."""
        app = App()
        factory = _AppClientFactory(app)
        self.connectTCP(host, port, factory)
        return app

    def serve(self, port: int, echo: bool = False) -> List["App"]:
        """A server application on C{port} (0: ephemeral, see L{listen_port}); the connections it accepts."""
        accepted: List[App] = []

        def build() -> App:
            app = App(echo=echo)
            accepted.append(app)
            return app

        self.listenTCP(port, Factory.forProtocol(build), interface="127.0.0.1")
        return accepted

    def serve_echo(self, port: int) -> List["App"]:
        """An echo server on C{port}; the connections it accepted."""
        return self.serve(port, echo=True)


@implementer(IHalfCloseableProtocol)
class App(Protocol):
    """
    An application's end of a connection: what it received, how it ended, and calls to write,
    half-close, close, reset and stop or resume reading.

    @ivar received: every byte received so far.
    @ivar eof: the peer half-closed (or closed) its side.
    @ivar lost: why the connection ended (L{None} while it is open); L{reset} tells a reset.
    """

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received = bytearray()
        self.connected_ = False
        self.eof = False
        self.lost: Optional[Failure] = None

    def connectionMade(self) -> None:
        self.connected_ = True

    @property
    def link(self) -> _Transport:
        """This end's in-memory transport."""
        assert isinstance(self.transport, _Transport), "not connected over a MemoryNetwork"
        return self.transport

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.link.write(data)

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.echo:
            self.link.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.eof = True
        self.lost = reason

    @property
    def was_reset(self) -> bool:
        """The connection ended with a reset (not a clean close)."""
        return self.lost is not None and self.lost.check(ConnectionLost) is not None

    @property
    def closed(self) -> bool:
        return self.lost is not None

    def write(self, data: bytes) -> None:
        self.link.write(data)

    def shutdown_write(self) -> None:
        """Half-close: the last byte was written (FIN)."""
        self.link.loseWriteConnection()

    def close(self) -> None:
        self.link.loseConnection()

    def reset(self) -> None:
        self.link.abortConnection()

    def pause_reading(self) -> None:
        """Stop reading: what the peer sends waits in its send buffer."""
        self.link.pauseProducing()

    def resume_reading(self) -> None:
        self.link.resumeProducing()

    def read_some(self, size: int) -> int:
        """While not reading (L{pause_reading}): read at most C{size} bytes that wait; how many."""
        peer = self.link.peer
        assert peer is not None
        data = b"".join(peer.stream)
        taken, rest = data[:size], data[size:]
        peer.stream = [rest] if rest else []
        if taken:
            self.dataReceived(taken)
            peer._check_drained()
        return len(taken)

    def take(self) -> bytes:
        """What was received since the last call."""
        data, self.received = bytes(self.received), bytearray()
        return data


class _AppClientFactory(ClientFactory):
    noisy = False

    def __init__(self, app: App) -> None:
        self.app = app
        self.failure: Optional[Failure] = None

    def buildProtocol(self, addr: Any) -> App:
        return self.app

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.app.lost = reason

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass


class OldFormatPeer:
    """What an old-format peer (L{MemoryTunnel.start_old_format_peer}) said, and its errors."""

    def __init__(self) -> None:
        self.said: List[str] = []
        self.errors: List[str] = []


class MemoryServiceEndpoint(ServiceEndpoint):
    """C{ws://HOST:PORT} on the L{MemoryNetwork} (the real endpoint, less the name resolution)."""

    def client_endpoint(self, reactor: Any) -> IStreamClientEndpoint:
        return TCP4ClientEndpoint(reactor, self.host, self.port, timeout=30)


class MemoryTunnel:
    """
    The service's data plane with one open tunnel on a L{MemoryNetwork}, and local proxies for it.

    @param testcase: the trial TestCase: txaio's timers run on the network's clock until its cleanup,
        which also stops the proxies (or L{None}: call L{stop}).
    @param services: the tunnel's destination services.
    @param options: the data plane's options (L{ServiceHarness}).
    @ivar opened: the tunnel (ids and tokens); L{open_tunnel} opens others.
    @ivar service: the L{ServiceHarness} (its C{store}, its relay as C{events}).
    @ivar sessions: the proxies started, in order.
    """

    def __init__(self, testcase: Any = None, services: Sequence[str] = ("ECHO1",),
                 options: Optional[Mapping[str, Any]] = None) -> None:
        self.network = MemoryNetwork()
        self._loop = txaio.testutil.replace_loop(self.network)
        self._loop.__enter__()
        self.service = ServiceHarness(self.network, options)
        self.network.listenTCP(SERVICE_PORT, self.service.site, interface="127.0.0.1")
        self.endpoint = MemoryServiceEndpoint("127.0.0.1", SERVICE_PORT, secure=False)
        self.sessions: List[LocalProxySession] = []
        self._stopped = False
        self.opened = self.open_tunnel(services)
        if testcase is not None:
            testcase.addCleanup(self.stop)

    def open_tunnel(self, services: Sequence[str] = ("ECHO1",), lifetime_minutes: int = 720) -> OpenedTunnel:
        return self.service.open_tunnel(services, lifetime_minutes)

    def close_tunnel(self, tunnel_id: Optional[str] = None) -> None:
        """CloseTunnel: the store marks it CLOSED and the relay closes both sides, as the API does."""
        tunnel_id = tunnel_id or self.opened.tunnel_id
        self.service.store.close_tunnel(tunnel_id)
        self.service.events.tunnel_closed(tunnel_id, "closed")

    def rotate(self, side: str, tunnel_id: Optional[str] = None) -> str:
        """RotateTunnelAccessToken for C{side} (C{"source"}, C{"destination"}): the new token."""
        tunnel_id = tunnel_id or self.opened.tunnel_id
        token = self.service.store.rotate(tunnel_id, side)
        self.service.events.token_rotated(tunnel_id, side)
        return token

    def pump(self) -> None:
        """Run what is due and move the bytes (L{MemoryNetwork.flush})."""
        self.network.flush()

    def run(self, seconds: float, step: float = 0.1) -> None:
        """Let C{seconds} pass on the clock (L{MemoryNetwork.let_pass})."""
        self.network.let_pass(seconds, step)

    def _start(self, side: Any, token: str, client_token: Optional[str],
               retry_policy: Optional[Callable[[int], float]], pace: float) -> LocalProxySession:
        session = LocalProxySession(side, self.endpoint, token, client_token, self.network, self.network,
                                    retry_policy=retry_policy, pace=pace)
        self.sessions.append(session)
        session.startService()
        return session

    def start_source(self, mapping: Mapping[str, int], token: Optional[str] = None,
                     client_token: Optional[str] = None, client_type: str = "V3",
                     retry_policy: Optional[Callable[[int], float]] = None, pace: float = 0.0,
                     **side_options: Any) -> LocalProxySession:
        """A source (L{SourceSide}: C{mapping} service id -> listen port, 0: ephemeral), started."""
        side = SourceSide(mapping, "127.0.0.1", self.network, client_type=client_type, **side_options)
        return self._start(side, token or self.opened.source_token, client_token, retry_policy, pace)

    def start_destination(self, mapping: Mapping[str, Any], token: Optional[str] = None,
                          client_token: Optional[str] = None,
                          retry_policy: Optional[Callable[[int], float]] = None, pace: float = 0.0,
                          **side_options: Any) -> LocalProxySession:
        """A destination (L{DestinationSide}: C{mapping} service id -> C{(host, port)}), started."""
        side_options.setdefault("probe_targets", False)
        side = DestinationSide(mapping, self.network, self.network, **side_options)
        return self._start(side, token or self.opened.destination_token, client_token, retry_policy, pace)

    def start_old_format_peer(self, message_format: str, target_port: int, token: Optional[str] = None) -> "OldFormatPeer":
        """
        A destination that speaks only the V1 or V2 message format (L{old_format_peer}), to the
        target C{target_port} of the network.
        """
        peer = OldFormatPeer()
        url = f"ws://127.0.0.1:{SERVICE_PORT}/tunnel?local-proxy-mode=destination"
        factory = old_format_peer(self.network, url, message_format, target_port,
                                  token or self.opened.destination_token, peer.errors.append, peer.said.append)
        self.network.connectTCP("127.0.0.1", SERVICE_PORT, factory)
        return peer

    def port_of(self, source: LocalProxySession, service_id: str) -> int:
        """The port C{source} listens on for C{service_id}."""
        return int(source.side.ports[service_id])

    def connect(self, source: LocalProxySession, service_id: str) -> App:
        """An application's connection to C{source}'s listener for C{service_id}, once connected."""
        app = self.network.connect_app(self.port_of(source, service_id))
        self.pump()
        return app

    def stop(self) -> None:
        """Stop the proxies still running and give txaio its loop back."""
        if self._stopped:
            return
        self._stopped = True
        try:
            for session in reversed(self.sessions):
                if session.running:
                    session.stopService()
            self.pump()
        finally:
            self._loop.__exit__(None, None, None)


def old_format_peer(reactor: Any, url: str, message_format: str, target_port: int, token: str,
                    fail: Callable[[str], None], say: Callable[[str], None],
                    closed: Callable[[], None] = lambda: None) -> Any:
    """
    A destination written from the V1/V2 protocol guides only (no connection ids, one TCP connection
    per stream to 127.0.0.1:C{target_port}), like AWS IoT Device Client (V1) or localproxy 2.x (V2):
    the WebSocket client factory for C{url}.  It calls C{fail} if the source sends it anything its
    format does not have (a connection id, CONNECTION_START/RESET, or for V1 a service id), so a test
    sees the source really speaks that format; C{say} with what it does.
    """
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    from tunnelkit.protocol.framing import FrameDecoder, Message, encode_message, parse_message

    v2 = message_format == "V2"
    subprotocol = "aws.iot.securetunneling-2.0" if v2 else "aws.iot.securetunneling-1.0"

    class Local(Protocol):
        def __init__(self, peer: Any, stream_id: int, service_id: str) -> None:
            self.peer, self.stream_id, self.service_id = peer, stream_id, service_id

        def dataReceived(self, data: bytes) -> None:
            for i in range(0, len(data), 63 * 1024):
                self.peer.send(Message(type=Message.DATA, streamId=self.stream_id, payload=data[i : i + 63 * 1024],
                                       serviceId=self.service_id))

        def connectionLost(self, reason: Any = None) -> None:
            state = self.peer.streams.get(self.service_id)
            if state is not None and state[0] == self.stream_id and state[1] is self:
                del self.peer.streams[self.service_id]
                self.peer.send(Message(type=Message.STREAM_RESET, streamId=self.stream_id, serviceId=self.service_id))

    class Peer(WebSocketClientProtocol):
        def onOpen(self) -> None:
            self.decoder = FrameDecoder()
            self.streams: Dict[str, Any] = {}  # service id -> [stream id, Local or None, pending bytes]
            say(f"peer connected ({message_format})")

        def send(self, message: Any) -> None:
            if not v2:
                message.ClearField("serviceId")
            self.sendMessage(encode_message(message), isBinary=True)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            for body in self.decoder.feed(payload):
                self.handle(parse_message(body))

        def handle(self, m: Any) -> None:
            if m.type == Message.SERVICE_IDS:
                say(f"peer service ids {list(m.availableServiceIds)}")
                return
            if m.type in (Message.CONNECTION_START, Message.CONNECTION_RESET) or m.connectionId:
                fail(f"received a V3 message: {m}")
            if m.serviceId and not v2:
                fail(f"received a service id: {m}")
            service = m.serviceId
            state: Optional[List[Any]]
            if m.type == Message.STREAM_START:
                old = self.streams.pop(service, None)
                if old is not None and old[1] is not None:
                    old[1].transport.loseConnection()
                started: List[Any] = [m.streamId, None, []]
                self.streams[service] = started
                say(f"peer stream start {service or '-'} {m.streamId}")

                def connected(local: Any) -> None:
                    if self.streams.get(service) is started:
                        started[1] = local
                        for data in started[2]:
                            local.transport.write(data)
                    else:
                        local.transport.loseConnection()

                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", target_port)
                endpoint.connect(Factory.forProtocol(lambda: Local(self, m.streamId, service))).addCallback(connected)
            elif m.type == Message.DATA:
                state = self.streams.get(service)
                if state is None or state[0] != m.streamId:
                    return
                if state[1] is None:
                    state[2].append(m.payload)
                else:
                    state[1].transport.write(m.payload)
            elif m.type == Message.STREAM_RESET:
                state = self.streams.get(service)
                if state is not None and state[0] == m.streamId:
                    del self.streams[service]
                    if state[1] is not None:
                        state[1].transport.loseConnection()

        def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
            say(f"peer closed {code} {reason}")
            closed()

    factory = WebSocketClientFactory(url, protocols=[subprotocol], headers={"access-token": token}, reactor=reactor)
    factory.protocol = Peer
    return factory
