# -*- test-case-name: tests.test_cluster_forward -*-
"""
Peers meet whichever node they reach: a node that gets a tunnel's WebSocket upgrade while another
live node holds the tunnel forwards the connection there.

L{ForwardingGate} sits in front of the relay (C{TunnelResource.gate}): once C{twisted.web} has read
the upgrade's request head, and before the token is checked or spent, it asks the directory to place
the tunnel (by the token's routing key) on this node (L{INodeDirectory.place}).  If this node holds
it, the upgrade goes on here as without a cluster.  If another live node holds it, the connection is
taken from C{twisted.web} and spliced to that node's cluster listener: the internal handshake of
L{tunnelkit.service.cluster.wire} (challenge, HMAC under the cluster secret, PROXY v2 header with the
real client address), then the rebuilt request head and every later byte, both ways.  Each side's
transport is registered as the producer of the other (as in Twisted's C{portforward}): a slow reader
pauses the other end, nothing buffers without bound.

L{ClusterListenerFactory} serves the cluster listener: it authenticates the forwarder, then hands the
connection to the service's own site with the real client address as its peer (rate limits, pending
counts, the audit trail and logs see the client, not the node).  A forwarded upgrade is always served
where it lands: it is never forwarded again.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, cast

from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from zope.interface import directlyProvides, providedBy

from tunnelkit.service.cluster.directory import INodeDirectory, NodeInfo
from tunnelkit.service.cluster.wire import (
    MAGIC,
    NONCE_SIZE,
    Acceptor,
    ForwardRefused,
    ProxyAddresses,
    answer,
    challenge,
    channel_binding,
)
from tunnelkit.service.tokens import routing_key

__all__ = ["ForwardingGate", "ClusterListenerFactory", "request_routing_key", "client_endpoint"]

log = Logger()

#: Seconds the gate waits for the directory before serving the upgrade here anyway.
LOOKUP_TIMEOUT = 2.0
#: Seconds a connection to the cluster listener has to authenticate.
AUTH_TIMEOUT = 10.0
#: Bytes a spliced client may send before the holding node's listener answered (it should send none).
MAX_EARLY_BYTES = 65536


def request_routing_key(request: Any) -> Optional[str]:
    """The routing key of the one access token of C{request}'s upgrade, or None."""
    headers = request.requestHeaders
    values = [v.decode("latin-1") for v in headers.getRawHeaders(b"access-token", [])]
    for cookie in headers.getRawHeaders(b"cookie", []):
        for pair in cookie.decode("latin-1").replace(",", ";").split(";"):
            name, sep, value = pair.partition("=")
            if sep and name.strip() == "awsiot-tunnel-token":
                values.append(value.strip().strip('"'))
    tokens = [t.strip() for value in values for t in value.split(",") if t.strip()]
    if len(tokens) != 1:
        return None  # the relay's checks answer it (missing or duplicate token)
    return routing_key(tokens[0])


def rebuilt_head(request: Any) -> bytes:
    """The request line and headers of C{request} (as autobahn's resource rebuilds them)."""
    data = request.method + b" " + request.uri + b" HTTP/1.1\r\n"
    for name, values in request.requestHeaders.getAllRawHeaders():
        data += name + b": " + b",".join(values) + b"\r\n"
    return data + b"\r\n"


#: The prefix of a node address whose cluster listener speaks TLS.
TLS_PREFIX = "tls:"


def client_endpoint(reactor: Any, address: str) -> IStreamClientEndpoint:
    """
    A client endpoint for a node's advertised C{host:port} (C{tls:host:port}: over TLS, whose peer
    is authenticated by the channel-bound MAC, not by its certificate).
    """
    secure = address.startswith(TLS_PREFIX)
    if secure:
        address = address[len(TLS_PREFIX):]
    host, _, port = address.rpartition(":")
    endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(reactor, host.strip("[]"), int(port), timeout=5)
    if secure:
        from twisted.internet.ssl import CertificateOptions

        from tunnelkit.transport.tls import restrict_context

        options = CertificateOptions()  # no certificate check: see tunnelkit.service.cluster.wire
        restrict_context(options.getContext())
        endpoint = endpoints.wrapClientTLS(options, endpoint)
    return endpoint


def _addresses(transport: Any) -> ProxyAddresses:
    peer, host = transport.getPeer(), transport.getHost()
    return ProxyAddresses(
        str(getattr(peer, "host", "127.0.0.1")),
        int(getattr(peer, "port", 0) or 0),
        str(getattr(host, "host", "127.0.0.1")),
        int(getattr(host, "port", 0) or 0),
    )


def _take_transport(request: Any, protocol: Protocol) -> Any:
    """Take C{request}'s connection from C{twisted.web} and give it to C{protocol}."""
    channel = request.channel
    transport, channel.transport = channel.transport, None
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    channel.setTimeout(None)
    upgraded = getattr(channel, "upgraded", None)
    if upgraded is not None:
        upgraded()  # no longer pending for its address (tunnelkit.service.api.FrontDoorChannel)
    protocol.makeConnection(transport)
    return transport


class ForwardingGate:
    """
    Decides where each upgrade is served (see the module docstring).

    @ivar forwarded: how many connections this node forwarded (tests, logs).
    """

    def __init__(
        self,
        node: NodeInfo,
        directory: INodeDirectory,
        secret: bytes,
        reactor: Any,
        node_timeout: float,
        connect: Optional[Callable[[str], Any]] = None,
        lookup_timeout: float = LOOKUP_TIMEOUT,
    ) -> None:
        self.node = node
        self.directory = directory
        self.secret = secret
        self.reactor = reactor
        self.node_timeout = node_timeout
        self.lookup_timeout = lookup_timeout
        self._connect = connect or (lambda address: client_endpoint(reactor, address))
        self.forwarded = 0

    def render(self, request: Any, local: Callable[[Any], Any]) -> Any:
        """Render C{request}'s upgrade here (C{local}) or forward it."""
        transport = request.channel.transport
        key = request_routing_key(request) if transport is not None else None
        if key is None:
            return local(request)
        if getattr(transport, "tunnelkit_forwarded_by", None) is not None:
            # Forwarded to this node because it holds the tunnel: served here, never sent on.
            self.directory.place(key, self.node.node_id, self.node_timeout).addErrback(self._log_failure)
            return local(request)
        decision = self.directory.place(key, self.node.node_id, self.node_timeout)
        decision.addTimeout(self.lookup_timeout, self.reactor)
        outcome: list = []

        def keep(result: Any) -> None:
            outcome.append(result)

        decision.addBoth(keep)
        if outcome:  # decided at once (an in-memory directory)
            return self._decided(outcome[0], request, local, synchronous=True)
        outcome.append(None)  # from now on the answer comes later
        decision.addCallback(lambda _: self._decided(outcome[-1], request, local, synchronous=False))
        return NOT_DONE_YET

    def _log_failure(self, failure: Failure) -> None:
        log.failure("The cluster directory failed", failure)

    def _decided(self, result: Any, request: Any, local: Callable[[Any], Any], synchronous: bool) -> Any:
        channel = request.channel
        if channel is None or channel.transport is None or getattr(request, "_disconnected", False):
            return None  # the client went away meanwhile
        if isinstance(result, Failure):
            log.failure(
                "The cluster directory did not answer where the tunnel is held; serving the upgrade on this node",
                result,
            )
            holder = self.node
        else:
            holder = result
        if holder.node_id == self.node.node_id or not holder.address:
            if synchronous:
                return local(request)
            rendered = local(request)
            if channel.transport is None:  # a WebSocket took the connection (BoundedRequest.process's part)
                channel.setTimeout(None)
                upgraded = getattr(channel, "upgraded", None)
                if upgraded is not None:
                    upgraded()
            elif rendered is not NOT_DONE_YET:
                request.write(rendered)
                request.finish()
            return None
        self._forward(request, holder)
        return NOT_DONE_YET

    def _forward(self, request: Any, holder: NodeInfo) -> None:
        self.forwarded += 1
        head = rebuilt_head(request) + request.content.read()
        client = _ClientSide(self, holder, head)
        transport = _take_transport(request, client)
        client.addresses = _addresses(transport)
        log.info(
            "Forwarding a peer from {address} to node {node_id} ({node_address}), which holds its tunnel",
            address=client.addresses.source_host,
            node_id=holder.node_id,
            node_address=holder.address,
        )
        connecting = defer.maybeDeferred(self._connect(holder.address).connect, _NodeSideFactory(client))
        connecting.addErrback(client.node_unreachable)


class _ClientSide(Protocol):
    """The client's connection on the forwarding node, once taken from C{twisted.web}."""

    def __init__(self, gate: ForwardingGate, holder: NodeInfo, head: bytes) -> None:
        self.gate = gate
        self.holder = holder
        self.head = head
        self.addresses = ProxyAddresses("127.0.0.1", 0, "127.0.0.1", 0)
        self.node: Optional["_NodeSide"] = None
        self.early: list = []
        self.early_size = 0
        self.gone = False

    @property
    def _tcp(self) -> ITCPTransport:
        """The client's connection (while connected)."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def dataReceived(self, data: bytes) -> None:
        node = self.node
        if node is not None and node.ready:
            node._tcp.write(data)
            return
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size > MAX_EARLY_BYTES:
            self._tcp.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.gone = True
        if self.node is not None and self.node.transport is not None:
            self.node.transport.loseConnection()

    def node_unreachable(self, failure: Failure) -> None:
        log.warn(
            "Node {node_id} ({node_address}) holds the tunnel but cannot be reached: {error}; the client retries",
            node_id=self.holder.node_id,
            node_address=self.holder.address,
            error=failure.getErrorMessage(),
        )
        if self.gone:
            return
        body = b"Service unavailable: the node holding this tunnel cannot be reached; retry\n"
        self._tcp.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        self._tcp.loseConnection()


class _NodeSide(Protocol):
    """The forwarding node's connection to the holding node's cluster listener."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client
        self.ready = False  # answered the challenge: the client's bytes flow
        self.heard = False  # the holding node sent something after our answer
        self._challenge = b""

    @property
    def _tcp(self) -> ITCPTransport:
        """The connection to the holding node (while connected)."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        self.client.node = self
        if self.client.gone:
            self._tcp.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        client = self.client
        if self.ready:
            self.heard = True
            client._tcp.write(data)
            return
        self._challenge += data
        size = len(MAGIC) + NONCE_SIZE
        if len(self._challenge) < size:
            return
        got, rest = self._challenge[:size], self._challenge[size:]
        try:
            reply = answer(client.gate.secret, got, client.gate.node.node_id, client.addresses,
                           channel_binding(self.transport))
        except ForwardRefused as e:
            log.warn("Node {node_id} did not answer as a cluster node: {error}", node_id=client.holder.node_id, error=str(e))
            self._tcp.abortConnection()
            return
        if rest:  # the listener says nothing before it has our answer
            self._tcp.abortConnection()
            return
        self.ready = True
        self._tcp.writeSequence([reply, client.head, *client.early])
        client.early = []
        # Each side produces for the other: a full buffer on one pauses reading the other (TCP and
        # TLS transports are consumers and push producers).
        node_side, client_side = self._tcp, client._tcp
        cast(IConsumer, node_side).registerProducer(cast(IPushProducer, client_side), True)
        cast(IConsumer, client_side).registerProducer(cast(IPushProducer, node_side), True)
        cast(IPushProducer, client_side).resumeProducing()  # twisted.web paused it while it handled the request

    def connectionLost(self, reason: Any = None) -> None:
        client = self.client
        if client.transport is not None and not client.gone:
            if self.heard:
                client.transport.loseConnection()
            else:  # refused (another cluster secret?) or gone before it answered the client
                client.node_unreachable(Failure(ForwardRefused("the node closed the connection before it answered")))


class _NodeSideFactory(Factory):
    noisy = False

    def __init__(self, client: _ClientSide) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> _NodeSide:
        protocol = _NodeSide(self.client)
        protocol.factory = self
        return protocol


class _ForwardedConnection(ProtocolWrapper):
    """
    A connection to the cluster listener: challenged, then, once the forwarder proved it holds the
    cluster secret, the service's own HTTP protocol with the real client address as its peer.
    """

    def __init__(self, factory: "ClusterListenerFactory", wrappedProtocol: Any = None) -> None:
        super().__init__(factory, wrappedProtocol)
        self._acceptor: Optional[Acceptor] = None
        self._nonce: Optional[bytes] = None
        self._deadline: Any = None
        self._peer: Any = None
        self._host: Any = None
        self.tunnelkit_forwarded_by: Optional[str] = None

    @property
    def _tcp(self) -> ITCPTransport:
        """The connection from the forwarding node (while connected)."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper's would connect the wrapped protocol now: not before the forwarder proved
        # it is a node (and said whose connection this is).
        # Not ISSLTransport even over TLS: the client's TLS ended on the forwarding node, and the
        # relay (autobahn) must not take the nodes' TLS for the client's.
        directlyProvides(self, providedBy(transport) - ISSLTransport)
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        nonce, first = challenge()
        self._nonce = nonce
        self._acceptor = None  # made at the first byte: by then TLS (if any) is through
        self._tcp.write(first)
        self._deadline = self.factory.clock.callLater(AUTH_TIMEOUT, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        log.info("Reset a cluster-listener connection from {address}: no handshake within {timeout} s",
                 address=str(getattr(self._tcp.getPeer(), "host", "")), timeout=AUTH_TIMEOUT)
        self._tcp.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        acceptor = self._acceptor
        if acceptor is None and self._nonce is not None:
            acceptor = self._acceptor = Acceptor(self.factory.secret, self._nonce, channel_binding(self.transport))
            self._nonce = None
        if acceptor is not None:
            try:
                accepted = acceptor.feed(data)
            except ForwardRefused as e:
                log.warn(
                    "Refused a cluster-listener connection from {address}: {error}",
                    address=str(getattr(self._tcp.getPeer(), "host", "")),
                    error=str(e),
                )
                self._acceptor = None
                self._cancel_deadline()
                self._tcp.abortConnection()
                return
            if accepted is None:
                return
            self._acceptor = None
            self._cancel_deadline()
            self.tunnelkit_forwarded_by = accepted.node_id
            a = accepted.addresses
            kind = IPv6Address if ":" in a.source_host else IPv4Address
            self._peer = kind("TCP", a.source_host, a.source_port)
            self._host = (IPv6Address if ":" in a.destination_host else IPv4Address)("TCP", a.destination_host, a.destination_port)
            self.wrappedProtocol = self.factory.wrappedFactory.buildProtocol(self._peer)
            # It provides its transport's interfaces (makeConnection's directlyProvides).
            self.wrappedProtocol.makeConnection(cast(ITransport, self))
            data = accepted.rest
            if not data:
                return
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def getPeer(self) -> Any:
        return self._peer if self._peer is not None else self._tcp.getPeer()

    def getHost(self) -> Any:
        return self._host if self._host is not None else self._tcp.getHost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self.wrappedProtocol is not None:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class ClusterListenerFactory(WrappingFactory[_ForwardedConnection]):
    """The cluster listener: authenticated forwarded connections into C{site}."""

    protocol = _ForwardedConnection
    noisy = False

    def __init__(self, site: Any, secret: bytes, clock: IReactorTime) -> None:
        super().__init__(site)
        self.secret = secret
        self.clock = clock

    def buildProtocol(self, addr: Any) -> _ForwardedConnection:
        return self.protocol(self, None)
