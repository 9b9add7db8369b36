# -*- test-case-name: tests.test_localproxy_session -*-
"""
Destination mode: each STREAM_START / CONNECTION_START becomes a connection to the service's target
(C{-d}), retried while refused (5 times, 2.5 s apart by default, on the injected clock) before the
stream or connection is reset.

The service adapter picks the target (usually the configured one) and may filter the bytes.  When
the tunnel is ready, each target is probed once with its adapter's probe (SSH banner, RFB greeting,
...): a health check that logs one line per service and never ends the session.  Data
for a connection still being opened is held by the state machine; past L{PENDING_LIMIT} bytes the
WebSocket's reads pause until the connection is up or given up.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, cast

import ipaddress

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.adapters import (
    IDestinationContext,
    IServiceAdapter,
    StreamFilterError,
    Target,
    describe_target,
    probe_and_log,
    resolve_adapter,
    target_endpoint,
)
from tunnelkit.errors import TunnelkitError
from tunnelkit.localproxy.connection import ConnectionKey, LocalConnection
from tunnelkit.protocol.session import ConnectTarget, DestinationSession

__all__ = ["DestinationSide", "DestinationContext", "PENDING_LIMIT", "CONNECT_TIMEOUT", "PROBE_TIMEOUT"]

#: Bytes held for connections being opened before the WebSocket's reads pause.
PENDING_LIMIT = 1 << 20
#: Seconds one connection attempt to a target may take.
CONNECT_TIMEOUT = 10.0
#: Seconds a target's health probe may take.
PROBE_TIMEOUT = 5.0
_PENDING_KEY = ("", -1)  # the flow-control key of "data held for pending connections"


class _OneConnection(Factory):
    """Hands out the connector's one L{LocalConnection} (quietly), for an endpoint."""

    noisy = False

    def __init__(self, connection: LocalConnection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> LocalConnection:
        return self.connection


class _DirectTCP(ClientFactory):
    """
    A connection to a TCP target given by IP address, straight through C{reactor.connectTCP}: what
    Twisted's TCP client endpoint does, without its Deferred and the protocol it wraps around ours
    (one call more for every read, per connection one factory and Deferred more).
    """

    noisy = False

    def __init__(self, connector: "_Connector") -> None:
        self.connector = connector

    def buildProtocol(self, addr: Any) -> LocalConnection:
        return self.connector.connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connector.tcp = None
        self.connector._failed(reason)


def _by_address(target: Target) -> bool:
    """Whether C{target} is (IP address, port): connected to without an endpoint."""
    if isinstance(target, str):
        return False
    try:
        ipaddress.ip_address(target[0])
    except ValueError:
        return False
    return True


@implementer(IDestinationContext)
class DestinationContext:
    """What a service adapter may use on the destination side (L{IDestinationContext})."""

    def __init__(self, service_id: str, reactor: Any, default_target: Target) -> None:
        self.service_id = service_id
        self.reactor = reactor
        self.default_target = default_target


class _Connector:
    """Opens one target connection, retrying while refused."""

    log = Logger()

    def __init__(self, side: "DestinationSide", action: ConnectTarget, target: Target, stream_filter: Any) -> None:
        self.side = side
        self.service_id = action.service_id
        self.connection_id = action.connection_id
        self.target = target
        self.filter = stream_filter
        self.failures = 0
        self.attempt: Any = None  # the endpoint's Deferred while connecting through one
        self.tcp: Any = None  # the reactor's connector while connecting by address
        self.retry: Any = None
        self.cancelled = False
        self.connection = LocalConnection(side.proxy, self.service_id, self.connection_id, stream_filter)

    @property
    def key(self) -> ConnectionKey:
        return (self.service_id, self.connection_id)

    def start(self) -> None:
        if self.cancelled:
            return
        self.retry = None
        side = self.side
        self.log.info(
            "Attempting to establish tcp socket connection to: {target} (connection {connection_id} of {service_id})",
            target=describe_target(self.target),
            connection_id=self.connection_id,
            service_id=self.service_id or "-",
        )
        connection = self.connection
        if side.by_address(self.target):
            host, port = cast(Tuple[str, int], self.target)
            connection.on_made = self._made
            self.tcp = side.reactor.connectTCP(host, port, _DirectTCP(self), timeout=CONNECT_TIMEOUT)
            return
        endpoint = target_endpoint(side.reactor, self.target, timeout=CONNECT_TIMEOUT)
        self.attempt = endpoint.connect(_OneConnection(connection))
        self.attempt.addCallbacks(self._connected, self._failed)

    def _made(self) -> None:
        self.connection.on_made = None
        self.tcp = None
        self._connected(self.connection)

    def _connected(self, connection: LocalConnection) -> None:
        self.attempt = None
        self.side.pending.pop(self.key, None)
        if self.cancelled:
            connection.close("the stream was reset while connecting", abort=True)
            return
        self.log.info("Connected to {target}", target=describe_target(self.target))
        self.side.proxy.perform(self.side.session.local_connected(self.service_id, self.connection_id))
        self.side.after_messages()

    def _failed(self, failure: Failure) -> None:
        self.attempt = None
        if self.cancelled:
            return
        self.failures += 1
        side = self.side
        error = failure.getErrorMessage()
        if self.failures <= side.retries:
            self.log.warn(
                "Could not connect to destination {target} -- {error}; retry {n} of {retries} in {delay} s",
                target=describe_target(self.target),
                error=error,
                n=self.failures,
                retries=side.retries,
                delay=side.retry_delay,
            )
            self.retry = side.clock.callLater(side.retry_delay, self.start)
            return
        self.log.error(
            "Could not connect to destination {target} -- {error}; giving up after {n} attempts, "
            "resetting connection {connection_id} of {service_id}",
            target=describe_target(self.target),
            error=error,
            n=self.failures,
            connection_id=self.connection_id,
            service_id=self.service_id or "-",
        )
        side.pending.pop(self.key, None)
        if self.filter is not None:
            self.filter.connection_lost()
        side.proxy.perform(side.session.local_connect_failed(self.service_id, self.connection_id))
        side.after_messages()

    def cancel(self) -> None:
        self.cancelled = True
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None
        if self.attempt is not None:
            self.attempt.cancel()
        tcp, self.tcp = self.tcp, None
        if tcp is not None:
            self.connection.on_made = None
            tcp.stopConnecting()
        if self.filter is not None:
            self.filter.connection_lost()


class DestinationSide:
    """
    The destination's target connections.

    @param mapping: mapping key (service id, or C{""} for a bare target) -> target.
    @param retries: how many times a refused target is retried before the reset (C{--connect-retries}).
    @param retry_delay: seconds between attempts (C{--connect-retry-delay}).
    """

    mode = "destination"
    log = Logger()

    def __init__(
        self,
        mapping: Mapping[str, Target],
        reactor: Any,
        clock: Any = None,
        retries: int = 5,
        retry_delay: float = 2.5,
        adapter_overrides: Optional[Mapping[str, str]] = None,
        adapter_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        probe_targets: bool = True,
    ) -> None:
        self.mapping = dict(mapping)
        self.probe_targets = probe_targets
        self.probes: Dict[str, Deferred] = {}
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.retries = retries
        self.retry_delay = retry_delay
        self.session = DestinationSession(list(self.mapping))
        self.adapter_overrides = dict(adapter_overrides or {})
        self.adapter_options = dict(adapter_options or {})
        self.adapters: Dict[str, IServiceAdapter] = {}
        self.contexts: Dict[str, DestinationContext] = {}
        self.pending: Dict[ConnectionKey, _Connector] = {}
        self.proxy: Any = None
        self._by_address: Dict[Target, bool] = {}

    def by_address(self, target: Target) -> bool:
        """Whether C{target} is (IP address, port) (remembered per target)."""
        known = self._by_address.get(target)
        if known is None:
            known = self._by_address[target] = _by_address(target)
        return known

    def attach(self, proxy: Any) -> None:
        self.proxy = proxy

    def _adapter(self, service_id: str, mapping_key: str) -> Optional[IServiceAdapter]:
        """The adapter of C{service_id}, resolved once (None after ending the session for a bad one)."""
        adapter = self.adapters.get(service_id)
        if adapter is None:
            try:
                adapter = resolve_adapter(service_id, self.adapter_overrides, self.adapter_options)
            except TunnelkitError as e:
                self.proxy.finish(1, str(e))
                return None
            self.adapters[service_id] = adapter
            self.contexts[service_id] = DestinationContext(service_id, self.reactor, self.mapping[mapping_key])
            self.log.info(
                "Service {service_id} -> {target} (adapter {adapter})",
                service_id=service_id or "-",
                target=describe_target(self.mapping[mapping_key]),
                adapter=adapter.name,
            )
        return adapter

    def tunnel_ready(self) -> None:
        """
        SERVICE_IDS matched the mapping: check once per service that its target speaks the protocol
        its adapter expects (a health check: one log line each, never fatal).
        """
        if not self.probe_targets:
            return
        for service_id in self.session.services:
            if service_id in self.probes:
                continue
            mapping_key = service_id if service_id in self.mapping else ""
            if mapping_key not in self.mapping:
                continue
            adapter = self._adapter(service_id, mapping_key)
            if adapter is None:
                return
            self.probes[service_id] = probe_and_log(
                adapter, self.reactor, service_id or "-", self.mapping[mapping_key], PROBE_TIMEOUT
            )

    def connect(self, action: ConnectTarget) -> None:
        service_id = action.service_id
        adapter = self._adapter(service_id, action.mapping_key)
        if adapter is None:
            return
        context = self.contexts[service_id]
        try:
            target = adapter.destination_target(context, action.connection_id)
            stream_filter = adapter.destination_filter(context, action.connection_id)
        except StreamFilterError as e:
            self.log.error(
                "The {adapter} adapter refused connection {connection_id} of {service_id}: {error}",
                adapter=adapter.name,
                connection_id=action.connection_id,
                service_id=service_id or "-",
                error=str(e),
            )
            self.proxy.perform(self.session.local_connect_failed(service_id, action.connection_id))
            return
        connector = _Connector(self, action, target, stream_filter)
        old = self.pending.pop(connector.key, None)
        if old is not None:
            old.cancel()
        self.pending[connector.key] = connector
        connector.start()

    def cancel(self, key: ConnectionKey, reason: str) -> None:
        """The stream or connection was reset while its target connection was being opened."""
        connector = self.pending.pop(key, None)
        if connector is not None:
            self.log.info(
                "Abandoning the connection to {target} ({reason})", target=describe_target(connector.target), reason=reason
            )
            connector.cancel()
        self.after_messages()

    def after_messages(self) -> None:
        """Pause the WebSocket while too much is held for connections being opened."""
        throttle = self.proxy.websocket_read_throttle
        if self.session.buffered_bytes > PENDING_LIMIT:
            throttle.sink_full(_PENDING_KEY)
        else:
            throttle.sink_drained(_PENDING_KEY)

    def start_listening(self, action: Any) -> None:  # pragma: no cover - only a source listens
        raise TunnelkitError("a destination does not listen")

    def websocket_lost(self) -> None:
        for connector in list(self.pending.values()):
            connector.cancel()
        self.pending.clear()
        self.after_messages()

    def stop(self) -> None:
        for probe in self.probes.values():
            probe.cancel()
        self.websocket_lost()
