# -*- test-case-name: tests.test_adapters -*-
"""
Service adapters: what each service ID's protocol needs beyond moving bytes.

A tunnel carries several services (C{SSH1}, C{FTP1}, C{HTTP1}, ...).  Both local proxies pick an
adapter for each service ID: configured explicitly (C{--adapter SERVICE=NAME}) or by prefix
(C{SSH*}->ssh, C{FTP*}->ftp, C{VNC*}->vnc, C{HTTP*}->http, anything else -> tcp).

Adapters are found as Twisted plugins providing L{IServiceAdapterFactory} in the C{services}
package, so a third party adds one by dropping a module there (or into any C{services/} directory
on C{sys.path}).

The local proxy calls an adapter at these points:
  - source side, for each accepted local connection: L{IServiceAdapter.source_filter};
  - destination side, for each STREAM_START/CONNECTION_START: L{IServiceAdapter.destination_target}
    (where to connect) and L{IServiceAdapter.destination_filter};
  - health checks: L{IServiceAdapter.probe}.
A filter of C{None} means the bytes pass untouched (the fast path).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

from zope.interface import Attribute, Interface

Target = Union[Tuple[str, int], str]  # (host, port) or a unix socket path


class IStreamFilter(Interface):
    """Rewrites one TCP connection's bytes.  Each method may buffer and return b"" for now."""

    def outbound(data: bytes) -> bytes:
        """Bytes read from the local socket, on their way into the tunnel."""

    def inbound(data: bytes) -> bytes:
        """Bytes from the tunnel, on their way to the local socket."""

    def connection_lost() -> None:
        """The connection ended: release what the filter holds (listeners, tickets)."""


class ISourceContext(Interface):
    """What the source-side local proxy offers an adapter for one service."""

    service_id = Attribute("The service ID (str).")
    reactor = Attribute("The reactor (for listeners and timers).")
    bind_address = Attribute("The local address listeners bind to (str).")

    def open_data_listener(connection_id: int) -> Any:
        """
        Listen on an ephemeral port of C{bind_address}; the next local connection accepted there is
        carried as a new connection of this service with exactly C{connection_id} (V3
        CONNECTION_START).  The listener closes after that accept or after 60 s.

        @return: a Deferred firing with the local port number.
        """


class IDestinationContext(Interface):
    """What the destination-side local proxy offers an adapter for one service."""

    service_id = Attribute("The service ID (str).")
    reactor = Attribute("The reactor.")
    default_target = Attribute("The configured target of this service (a L{Target}).")


class IServiceAdapter(Interface):
    """One service's adapter, built per service ID and per local proxy session."""

    name = Attribute("The adapter's name: 'tcp', 'ssh', 'ftp', ...")

    def source_filter(context: ISourceContext, connection_id: int) -> Optional[IStreamFilter]:
        """A filter for a local connection accepted by the source, or None to pass bytes as is."""

    def destination_target(context: IDestinationContext, connection_id: int) -> Target:
        """Where the destination connects for a new stream/connection (usually the default target)."""

    def destination_filter(
        context: IDestinationContext, connection_id: int
    ) -> Optional[IStreamFilter]:
        """A filter for a connection the destination opened, or None to pass bytes as is."""

    def probe(reactor: Any, target: Target, timeout: float) -> Any:
        """
        Check that C{target} speaks this adapter's protocol.

        @return: a Deferred firing with a one-line description (e.g. the SSH banner), or failing
            with L{ProbeFailed}.
        """


class IServiceAdapterFactory(Interface):
    """A plugin: builds adapters of one kind."""

    name = Attribute("The adapter's name, used in configuration ('ssh').")
    prefixes = Attribute("Service-ID prefixes it serves by default, upper case (('SSH',)).")

    def build(service_id: str, options: dict) -> IServiceAdapter:
        """An adapter for C{service_id}; C{options} holds adapter settings from the configuration."""
