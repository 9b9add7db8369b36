# -*- test-case-name: tests.test_services_stream -*-
"""
The plain C{tcp} adapter: bytes pass untouched both ways; the probe checks that the target accepts
a TCP connection.  It serves every service ID no other adapter claims by prefix, and C{HTTPS*} (TLS
bytes must not go through the HTTP adapter).

L{StreamAdapter} is the base of every byte-stream adapter (ssh, vnc): subclasses set C{name} and
override L{StreamAdapter.check_greeting}.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Type

from twisted.plugin import IPlugin
from zope.interface import implementer

from tunnelkit.adapters import (
    IDestinationContext,
    IServiceAdapter,
    IServiceAdapterFactory,
    ISourceContext,
    IStreamFilter,
    Target,
    check_options,
    probe_target,
)


@implementer(IServiceAdapter)
class StreamAdapter:
    """An adapter that moves bytes untouched: C{None} filters, the configured target."""

    name = "tcp"
    #: Bytes the probe sends once connected (most servers speak first: nothing).
    probe_greeting = b""

    def __init__(self, service_id: str) -> None:
        self.service_id = service_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} for {self.service_id}>"

    def source_filter(self, context: ISourceContext, connection_id: int) -> Optional[IStreamFilter]:
        return None

    def destination_target(self, context: IDestinationContext, connection_id: int) -> Target:
        return context.default_target

    def destination_filter(
        self, context: IDestinationContext, connection_id: int
    ) -> Optional[IStreamFilter]:
        return None

    def check_greeting(self, received: bytes, closed: bool) -> Optional[str]:
        """
        Judge what the target sent so far (see L{tunnelkit.adapters.ProbeCheck}).  The plain
        check: having connected is enough.
        """
        return "accepts TCP connections"

    def probe(self, reactor: Any, target: Target, timeout: float) -> Any:
        return probe_target(reactor, target, timeout, self.check_greeting, self.probe_greeting)


@implementer(IPlugin, IServiceAdapterFactory)
class StreamAdapterFactory:
    """Builds one kind of L{StreamAdapter} (no options)."""

    def __init__(self, adapter: Type[StreamAdapter], prefixes: Tuple[str, ...]) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self.prefixes = prefixes

    def build(self, service_id: str, options: Mapping[str, Any]) -> IServiceAdapter:
        check_options(self.name, service_id, options, ())
        return self.adapter(service_id)


#: The plugin.
tcp_adapter_factory = StreamAdapterFactory(StreamAdapter, ("HTTPS",))
