# -*- test-case-name: tests.test_localproxy_session -*-
"""
Source mode: a listener per service of the tunnel; each accepted connection becomes a stream (V1/V2)
or a connection of the service's stream (V3).

Fixed listen ports are bound before the access token is presented (L{SourceSide.reserve_ports}) and
accept once the tunnel's SERVICE_IDS matched the C{-s} mapping; listeners stay open across WebSocket
reconnects; a connection accepted while the WebSocket is down (or over the per-service maximum) is
reset at once (RST, so the application sees ECONNRESET, not an empty answer) with a log line saying
why.  A listen port of 0 takes an ephemeral port, logged as
C{Listening for new connection on port N}.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from tunnelkit.adapters import ISourceContext, IServiceAdapter, resolve_adapter
from tunnelkit.errors import TunnelkitError
from tunnelkit.localproxy.connection import ConnectionKey, LocalConnection, Refused
from tunnelkit.localproxy.mapping import V1_SERVICE_ID
from tunnelkit.protocol.session import LocalConnectionRefused, SourceSession, StartListening

__all__ = ["SourceSide", "SourceContext", "DATA_LISTENER_TIMEOUT"]

#: Seconds an adapter's data listener waits for its one connection.
DATA_LISTENER_TIMEOUT = 60.0


def _port_of(listener: IListeningPort) -> int:
    """The TCP port C{listener} is bound to (it listens on an IPv4 or IPv6 address: both have a port)."""
    return cast(IPv4Address, listener.getHost()).port


def _server_endpoint(reactor: Any, address: str, port: int) -> Any:
    if ":" in address:
        return TCP6ServerEndpoint(reactor, port, interface=address)
    return TCP4ServerEndpoint(reactor, port, interface=address)


class _ListenerFactory(Factory):
    """Builds one L{LocalConnection} per accepted connection of a service (or refuses it)."""

    noisy = False

    def __init__(self, side: "SourceSide", service_id: str, port: int, connection_id: Optional[int] = None) -> None:
        self.side = side
        self.service_id = service_id
        self.port = port
        self.connection_id = connection_id  # a data listener's fixed id
        self.on_accept: Optional[Any] = None

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        if self.on_accept is not None:
            self.on_accept()
        return self.side.accepted(self.service_id, self.port, addr, self.connection_id)


def _resume_reserved(reserved: Tuple[IListeningPort, "_ListenerFactory"], service_id: str) -> IListeningPort:
    """A listener bound by L{SourceSide.reserve_ports}, now accepting for the tunnel's C{service_id}."""
    listener, factory = reserved
    factory.service_id = service_id
    resume = getattr(listener, "startReading", None)
    if resume is not None:
        resume()
    return listener


@implementer(ISourceContext)
class SourceContext:
    """What a service adapter may use on the source side (L{ISourceContext})."""

    def __init__(self, side: "SourceSide", service_id: str) -> None:
        self._side = side
        self.service_id = service_id
        self.reactor = side.reactor
        self.bind_address = side.bind_address

    def open_data_listener(self, connection_id: int) -> defer.Deferred:
        return self._side.open_data_listener(self.service_id, connection_id)


class SourceSide:
    """
    The source's listeners and accepts.

    @param mapping: mapping key (service id, or C{""} for a bare port) -> listen port (0 = ephemeral);
        empty: listen on an ephemeral port for every service of the tunnel.
    @param adapter_overrides: service id -> adapter name (C{--adapter}); others by prefix.
    """

    mode = "source"
    log = Logger()

    def __init__(
        self,
        mapping: Mapping[str, int],
        bind_address: str,
        reactor: Any,
        client_type: str = "V3",
        max_connections: int = 128,
        adapter_overrides: Optional[Mapping[str, str]] = None,
        adapter_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    ) -> None:
        self.mapping = dict(mapping)
        self.bind_address = bind_address
        self.reactor = reactor
        self.session = SourceSession(list(self.mapping) or None, client_type, max_connections)
        self.adapter_overrides = dict(adapter_overrides or {})
        self.adapter_options = dict(adapter_options or {})
        self.adapters: Dict[str, Optional[IServiceAdapter]] = {}
        self.contexts: Dict[str, SourceContext] = {}
        self.listeners: Dict[str, IListeningPort] = {}
        self.ports: Dict[str, int] = {}  # service id -> the port actually bound
        self._data_listeners: List[Any] = []
        self._reserved: Dict[str, Tuple[IListeningPort, "_ListenerFactory"]] = {}
        self.proxy: Any = None

    def attach(self, proxy: Any) -> None:
        self.proxy = proxy

    # --- listeners ---

    def reserve_ports(self) -> defer.Deferred:
        """
        Bind every fixed port of the mapping now, before the access token is presented, so a port in
        use stops the proxy while its single-use token is still unspent.  Each listener accepts
        nothing until the tunnel's services match (L{start_listening}): a client connecting meanwhile
        waits in the listen queue.  Port 0 entries bind later (any free port will do).

        @return: fires when all are bound; fails with L{TunnelkitError} naming the port at fault
            (the ones already bound are closed).
        """
        reservations = [self._reserve(key, port) for key, port in self.mapping.items() if port]
        done = defer.gatherResults(reservations, consumeErrors=True)

        def failed(failure: Any) -> Any:
            for listener, _ in self._reserved.values():
                listener.stopListening()
            self._reserved.clear()
            return failure.value.subFailure

        return done.addCallbacks(lambda _: None, failed)

    def _reserve(self, key: str, port: int) -> defer.Deferred:
        factory = _ListenerFactory(self, key, port)
        d = _server_endpoint(self.reactor, self.bind_address, port).listen(factory)

        def bound(listener: IListeningPort) -> None:
            pause = getattr(listener, "stopReading", None)
            if pause is not None:
                pause()
            self._reserved[key] = (listener, factory)

        def failed(failure: Any) -> None:
            raise TunnelkitError(self._bind_error(key, port, failure.getErrorMessage()))

        return d.addCallbacks(bound, failed)

    def _bind_error(self, service_id: str, port: int, error: str) -> str:
        return (
            f"Source local proxy fails to bind address {self.bind_address}:{port} for service "
            f"{service_id or '-'}: {error}; choose a free port with "
            f"-s {service_id + '=' if service_id else ''}PORT (0 = any free port)"
        )

    def start_listening(self, action: StartListening) -> None:
        service_id = action.service_id
        if service_id in self.listeners or service_id in self.ports:
            return
        port = self.mapping.get(action.mapping_key, 0)
        if action.mapping_key == V1_SERVICE_ID and service_id:
            self.log.info("Updated port mapping for v1 format: {service_id} = {port}", service_id=service_id, port=port)
        try:
            self.adapters[service_id] = resolve_adapter(service_id, self.adapter_overrides, self.adapter_options)
        except TunnelkitError as e:
            self.proxy.finish(1, str(e))
            return
        self.contexts[service_id] = SourceContext(self, service_id)
        self.ports[service_id] = port
        reserved = self._reserved.pop(action.mapping_key, None)
        if reserved is not None:
            d = defer.succeed(_resume_reserved(reserved, service_id))
            factory = reserved[1]
        else:
            factory = _ListenerFactory(self, service_id, port)
            d = _server_endpoint(self.reactor, self.bind_address, port).listen(factory)

        def listening(listener: IListeningPort) -> None:
            bound = _port_of(listener)
            factory.port = bound
            self.listeners[service_id] = listener
            self.ports[service_id] = bound
            if port == 0:
                self.log.info("Listen port assigned for service id {service_id}: {port}", service_id=service_id or "-", port=bound)
            self.log.info(
                "Listening for new connection on port {port} ({address}, service {service_id}, adapter {adapter})",
                port=bound,
                address=self.bind_address,
                service_id=service_id or "-",
                adapter=getattr(self.adapters.get(service_id), "name", "tcp"),
            )
            if self.proxy.end is not None:  # ended meanwhile
                listener.stopListening()

        def failed(failure: Any) -> None:
            self.proxy.finish(1, self._bind_error(service_id, port, failure.getErrorMessage()))

        d.addCallbacks(listening, failed)

    def stop(self) -> None:
        """Close every listener."""
        reserved = [listener for listener, _ in self._reserved.values()]
        for listener in list(self.listeners.values()) + self._data_listeners + reserved:
            listener.stopListening()
        self.listeners.clear()
        self._reserved.clear()
        self._data_listeners = []

    def open_data_listener(self, service_id: str, connection_id: int) -> defer.Deferred:
        """An ephemeral listener whose one accept is carried as C{connection_id} (L{ISourceContext})."""
        factory = _ListenerFactory(self, service_id, 0, connection_id)
        d = _server_endpoint(self.reactor, self.bind_address, 0).listen(factory)

        def listening(listener: IListeningPort) -> int:
            self._data_listeners.append(listener)
            timeout: List[Any] = []

            def close() -> None:
                if listener in self._data_listeners:
                    self._data_listeners.remove(listener)
                    listener.stopListening()
                if timeout and timeout[0].active():
                    timeout[0].cancel()

            timeout.append(self.reactor.callLater(DATA_LISTENER_TIMEOUT, close))
            factory.on_accept = close
            factory.port = _port_of(listener)
            return factory.port

        return d.addCallback(listening)

    # --- accepts ---

    def accepted(self, service_id: str, port: int, addr: Any, connection_id: Optional[int]) -> Optional[Protocol]:
        """A listener accepted a connection: start its stream/connection, or refuse it (None)."""
        peer = f"{getattr(addr, 'host', addr)}:{getattr(addr, 'port', '')}"
        self.log.info("Accepted tcp connection on port {port} from {peer}", port=port, peer=peer)
        try:
            connection_id, actions = self.session.local_accepted(service_id, connection_id)
        except LocalConnectionRefused as e:
            self.log.warn("Resetting the connection from {peer}: {reason}", peer=peer, reason=str(e))
            return Refused()
        adapter = self.adapters.get(service_id)
        stream_filter = None
        if adapter is not None:
            stream_filter = adapter.source_filter(self.contexts[service_id], connection_id)
        self.log.info(
            "creating tcp connection id {connection_id} for service {service_id}",
            connection_id=connection_id,
            service_id=service_id or "-",
        )
        connection = LocalConnection(self.proxy, service_id, connection_id, stream_filter)
        self.proxy.perform(actions)
        return connection

    # --- hooks of the session service ---

    def connect(self, action: Any) -> None:  # pragma: no cover - only a destination connects
        raise TunnelkitError("a source does not connect to targets")

    def cancel(self, key: ConnectionKey, reason: str) -> None:
        """Nothing pending on a source: connections exist from their accept."""

    def tunnel_ready(self) -> None:
        """SERVICE_IDS matched the mapping (the listeners are opened by StartListening actions)."""

    def after_messages(self) -> None:
        """Nothing to do after a batch of tunnel messages."""

    def websocket_lost(self) -> None:
        """Listeners stay open across reconnects."""
