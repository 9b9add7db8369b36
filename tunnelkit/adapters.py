# -*- test-case-name: tests.test_adapters -*-
"""
Service adapters: what each service ID's protocol needs beyond moving bytes.

A tunnel carries several services (C{SSH1}, C{FTP1}, C{HTTP1}, ...).  Both local proxies pick an
adapter for each service ID: configured explicitly (C{--adapter SERVICE=NAME}) or by prefix
(C{SSH*}->ssh, C{FTP*}->ftp, C{VNC*}->vnc, C{HTTP*}->http, anything else -> tcp; the longest
matching prefix wins, so C{HTTPS*} -> tcp).  Use L{resolve_adapter} (one service) or
L{resolve_adapters} (all of a tunnel's services).

Adapters are found as Twisted plugins providing L{IServiceAdapterFactory} in the C{services}
package, so a third party adds one by dropping a module there, or into any C{services/} directory
(without C{__init__.py}) on C{sys.path}.

The local proxy calls an adapter at these points:
  - source side, for each accepted local connection: L{IServiceAdapter.source_filter};
  - destination side, for each STREAM_START/CONNECTION_START: L{IServiceAdapter.destination_target}
    (where to connect) and L{IServiceAdapter.destination_filter};
  - health checks: L{IServiceAdapter.probe} (L{probe_and_log} runs it and writes the log line).
A filter of C{None} means the bytes pass untouched (the fast path).  A filter that also provides
L{IActiveStreamFilter} is given an L{IFilterOutput} right after it is built, to send bytes on its
own (later, or back the way they came).  A filter may raise L{StreamFilterError}: the proxy then
closes that one connection and logs the error.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union, cast

from twisted.internet import defer, protocol
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from tunnelkit.errors import ConfigError, TunnelkitError

Target = Union[Tuple[str, int], str]  # (host, port) or a unix socket path

#: The adapter used when no configured name and no prefix matches.
DEFAULT_ADAPTER = "tcp"

#: The package searched for adapter plugins.
PLUGIN_PACKAGE = "services"

log = Logger()


# --- errors ---


class UnknownAdapter(ConfigError):
    """A configuration names an adapter that no plugin provides."""


class ProbeFailed(TunnelkitError):
    """A target did not answer a probe the way its adapter's protocol should."""


class TargetUnreachable(ProbeFailed):
    """A probe could not connect to its target at all (nothing listens there, or no route)."""


class StreamFilterError(TunnelkitError):
    """A filter cannot go on with its connection (malformed protocol data, limits exceeded)."""


# --- interfaces ---


class IStreamFilter(Interface):
    """Rewrites one TCP connection's bytes.  Each method may buffer and return b"" for now."""

    def outbound(data: bytes) -> bytes:
        """Bytes read from the local socket, on their way into the tunnel."""

    def inbound(data: bytes) -> bytes:
        """Bytes from the tunnel, on their way to the local socket."""

    def connection_lost() -> None:
        """The connection ended: release what the filter holds (listeners, tickets)."""


class IFilterOutput(Interface):
    """
    Given by the local proxy to an L{IActiveStreamFilter}: its connection's two directions.  Its
    methods may be called at any time, also from within the filter's own outbound/inbound (the
    bytes then go before what that call returns); bytes sent after the connection closed are
    dropped.  What they send does not pass through the filter again.
    """

    def send_outbound(data: bytes) -> None:
        """Send C{data} into the tunnel now, as if L{IStreamFilter.outbound} had returned it."""

    def send_inbound(data: bytes) -> None:
        """Write C{data} to the local socket now, as if L{IStreamFilter.inbound} had returned it."""


class IActiveStreamFilter(IStreamFilter):
    """
    A filter that sometimes emits bytes outside a call to outbound/inbound, or in the other
    direction (the FTP filter answers a refused command itself, and releases a held passive reply
    once its data listener is ready).
    """

    def attach(output: IFilterOutput) -> None:
        """Called once by the local proxy right after the filter is built, before any data."""


class IHoldingStreamFilter(IActiveStreamFilter):
    """
    An active filter that may hold outbound bytes (the FTP data filter holds a transfer's bytes
    until its reply has passed): the local application's end of stream must then wait behind them,
    or it would reach the far application first and the held bytes would be dropped after it.
    """

    def outbound_ended(send_end: Any) -> bool:
        """
        The local application shut down its write side (or closed).  Return True when nothing is
        held: the end goes into the tunnel now.  Return False to hold it: the filter then calls
        C{send_end()} (no arguments) once, right after it sent what it holds.
        """


class ISourceContext(Interface):
    """What the source-side local proxy offers an adapter for one service."""

    service_id = Attribute("The service ID (str).")
    reactor = Attribute("The reactor (for listeners and timers).")
    bind_address = Attribute("The local address listeners bind to (str).")

    def open_data_listener(connection_id: int) -> Any:
        """
        Listen on an ephemeral port of C{bind_address}; the next local connection accepted there is
        carried as a new connection of this service with exactly C{connection_id} (V3
        CONNECTION_START).  The listener closes after that accept or after 60 s.  Connection ids
        with the high bit set (0x80000000) are left to adapters: the source numbers the
        connections it accepts itself from 1 up.

        @return: a Deferred firing with the local port number (it may have fired already).
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
        """
        Where the destination connects for a new stream/connection (usually the default target).

        @raise StreamFilterError: when this connection must not be opened (e.g. an unknown FTP
            data-connection ticket); the proxy resets the connection and logs the message.
        """

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

    def build(service_id: str, options: Mapping[str, Any]) -> IServiceAdapter:
        """
        An adapter for C{service_id}; C{options} holds adapter settings from the configuration.

        @raise ConfigError: for an unknown or malformed option (naming the option).
        """


# --- discovery and the service-ID -> adapter mapping ---


def _plugin_package() -> Any:
    """The C{services} package, its search path extended to every C{services/} dir on sys.path."""
    import importlib

    from twisted.plugin import pluginPackagePaths

    package = importlib.import_module(PLUGIN_PACKAGE)
    for path in pluginPackagePaths(PLUGIN_PACKAGE):
        if path not in package.__path__:
            package.__path__.append(path)
    return package


_BUILT_IN_MODULES = tuple(f"{PLUGIN_PACKAGE}.{n}" for n in ("tcp", "ssh", "ftp", "vnc", "http"))


def _origin(factory: Any) -> str:
    """The name of the plugin module holding C{factory} at module level (or its class's module)."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith(PLUGIN_PACKAGE + ".") and any(
            value is factory for value in vars(module).values()
        ):
            return name
    return type(factory).__module__


def _is_built_in(factory: Any) -> bool:
    return _origin(factory) in _BUILT_IN_MODULES


def available_adapters() -> Dict[str, IServiceAdapterFactory]:
    """
    Every adapter plugin found now, by name.  When two plugins claim one name, a built-in one wins
    over a third-party one, otherwise the first found; a warning names both.
    """
    from twisted.plugin import getPlugins

    found: Dict[str, IServiceAdapterFactory] = {}
    for factory in getPlugins(IServiceAdapterFactory, _plugin_package()):
        name = str(factory.name).lower()
        if name in found:
            kept = found[name]
            if _is_built_in(factory) and not _is_built_in(kept):
                kept, factory = factory, kept
                found[name] = kept
            log.warn(
                "Two service adapter plugins are named {name!r}: using the one from {kept}, "
                "ignoring the one from {ignored}",
                name=name,
                kept=_origin(kept),
                ignored=_origin(factory),
            )
            continue
        found[name] = factory
    return found


def default_adapter_name(service_id: str, factories: Mapping[str, IServiceAdapterFactory]) -> str:
    """The adapter a service ID gets by prefix: the longest matching prefix, else C{tcp}."""
    upper = service_id.upper()
    best, best_length = DEFAULT_ADAPTER, -1
    for name in sorted(factories):
        for prefix in factories[name].prefixes:
            prefix = str(prefix).upper()
            if upper.startswith(prefix) and len(prefix) > best_length:
                best, best_length = name, len(prefix)
    return best


def parse_adapter_overrides(
    spec: Union[str, Iterable[str], Mapping[str, str], None],
) -> Dict[str, str]:
    """
    Parse C{"SSH1=ssh,WEB=http"} (or a list of such strings, as from a repeated C{--adapter} flag or
    a tap.yml list, or a mapping) into C{{"SSH1": "ssh", "WEB": "http"}}.  Adapter names are lower
    case; whether each exists is checked by L{resolve_adapter}.

    @raise ConfigError: for an item that is not C{SERVICE=NAME}, or one service given two names.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        pairs = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = [spec] if isinstance(spec, str) else list(spec)
        pairs = []
        for item in items:
            for part in str(item).split(","):
                part = part.strip()
                if not part:
                    continue
                service_id, sep, name = part.partition("=")
                if not sep:
                    raise ConfigError(
                        f"adapter mapping {part!r}: expected SERVICE=ADAPTER, e.g. 'SSH1=ssh'"
                    )
                pairs.append((service_id, name))
    result: Dict[str, str] = {}
    for service_id, name in pairs:
        service_id, name = service_id.strip(), name.strip().lower()
        if not service_id or not name:
            raise ConfigError(
                f"adapter mapping {service_id}={name}: both the service ID and the adapter name "
                "are needed, e.g. 'SSH1=ssh'"
            )
        if result.get(service_id, name) != name:
            raise ConfigError(
                f"adapter mapping: service {service_id} is given two adapters, "
                f"{result[service_id]!r} and {name!r}"
            )
        result[service_id] = name
    return result


def parse_adapter_options(
    spec: Union[str, Iterable[str], Mapping[str, Any], None],
) -> Dict[str, Dict[str, Any]]:
    """
    Parse adapter options into service ID -> {option: value}, from C{"HTTP1.host=device.test"}
    items (a string with commas, or a list of strings, as from a repeated C{--adapter-option}
    flag) or from a tap.yml mapping C{{HTTP1: {host: device.test, forwarded: true}}}.  Whether
    each option exists is checked by the adapter when it is built.

    @raise ConfigError: quoting the malformed item.
    """
    result: Dict[str, Dict[str, Any]] = {}
    if spec is None:
        return result
    if isinstance(spec, Mapping):
        for service_id, options in spec.items():
            if not isinstance(options, Mapping):
                raise ConfigError(
                    f"adapter options of service {service_id}: expected a mapping of option names "
                    f"to values (e.g. {{host: device.test}}), got {options!r}"
                )
            for key, value in options.items():
                if isinstance(value, (Mapping, list)) or value is None:
                    raise ConfigError(
                        f"adapter option {service_id}.{key}: expected a single value, got {value!r}"
                    )
            result[str(service_id)] = {str(k): v for k, v in options.items()}
        return result
    items = [spec] if isinstance(spec, str) else list(spec)
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.partition("=")
            service_id, dot, key = name.strip().rpartition(".")
            if not sep or not dot or not service_id or not key:
                raise ConfigError(
                    f"adapter option {part!r}: expected SERVICE.OPTION=VALUE, e.g. "
                    "'HTTP1.host=device.test'"
                )
            result.setdefault(service_id, {})[key] = value.strip()
    return result


def resolve_adapter(
    service_id: str,
    overrides: Optional[Mapping[str, str]] = None,
    options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    factories: Optional[Mapping[str, IServiceAdapterFactory]] = None,
) -> IServiceAdapter:
    """
    Build the adapter of C{service_id}.

    @param overrides: service ID -> adapter name (from L{parse_adapter_overrides}); a service not
        in it gets its adapter by prefix.
    @param options: service ID -> that service's adapter options (tap.yml C{adapter-options:
        {HTTP1: {host: example.test}}}).
    @param factories: the plugins to choose from (default: L{available_adapters}()).
    @raise UnknownAdapter: if the configured name matches no plugin (the message lists the known).
    @raise ConfigError: if the adapter rejects its options.
    """
    if factories is None:
        factories = available_adapters()
    configured = (overrides or {}).get(service_id)
    name = configured.lower() if configured else default_adapter_name(service_id, factories)
    factory = factories.get(name)
    if factory is None:
        known = ", ".join(sorted(factories)) or "none"
        if configured:
            raise UnknownAdapter(
                f"service {service_id}: unknown adapter {configured!r} (known adapters: {known}; "
                f"a new one is a plugin module in the {PLUGIN_PACKAGE}/ directory)"
            )
        raise UnknownAdapter(
            f"service {service_id}: the default adapter {name!r} is missing (known adapters: "
            f"{known}); is the {PLUGIN_PACKAGE} package installed?"
        )
    service_options = (options or {}).get(service_id) or {}
    if not isinstance(service_options, Mapping):
        raise ConfigError(
            f"adapter options of service {service_id}: expected a mapping of option names to "
            f"values, got {service_options!r}"
        )
    return factory.build(service_id, dict(service_options))


def resolve_adapters(
    service_ids: Iterable[str],
    overrides: Optional[Mapping[str, str]] = None,
    options: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Dict[str, IServiceAdapter]:
    """
    The adapters of all of a tunnel's services, plugins looked up once.  Overrides or options
    naming a service ID not in C{service_ids} are reported with a warning (likely a typo).
    """
    factories = available_adapters()
    ids = list(service_ids)
    for kind, mapping in (("an adapter", overrides), ("adapter options", options)):
        for service_id in mapping or {}:
            if service_id not in ids:
                log.warn(
                    "Service {service_id} is given {kind} but is not one of this tunnel's "
                    "services ({services})",
                    service_id=service_id,
                    kind=kind,
                    services=", ".join(ids),
                )
    adapters = {}
    for service_id in ids:
        adapter = resolve_adapter(service_id, overrides, options, factories)
        log.info(
            "Service {service_id} uses the {adapter} adapter", service_id=service_id, adapter=adapter.name
        )
        adapters[service_id] = adapter
    return adapters


# --- option helpers for adapter factories ---


def check_options(
    adapter: str, service_id: str, options: Mapping[str, Any], known: Iterable[str]
) -> Dict[str, Any]:
    """
    Normalise option keys (C{a_b} == C{a-b}) and reject unknown ones.

    @raise ConfigError: naming the unknown option and listing the known ones.
    """
    known = sorted(known)
    result = {}
    for key, value in options.items():
        normal = str(key).replace("_", "-")
        if normal not in known:
            listed = ", ".join(known) if known else "none"
            raise ConfigError(
                f"adapter options of service {service_id}: the {adapter} adapter has no option "
                f"{key!r} (its options: {listed})"
            )
        result[normal] = value
    return result


def option_bool(service_id: str, key: str, value: Any) -> bool:
    """A boolean option given as YAML bool or as text (true/false/yes/no/on/off/1/0)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(
        f"adapter options of service {service_id}: {key} must be true or false, got {value!r}"
    )


# --- targets and probes ---


def describe_target(target: Target) -> str:
    """C{127.0.0.1:22}, C{[::1]:22} or the unix socket path."""
    if isinstance(target, str):
        return target
    host, port = target
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def target_endpoint(reactor: Any, target: Target, timeout: float = 30) -> IStreamClientEndpoint:
    """A client endpoint for C{target}: TCP for (host, port), UNIX for a path."""
    if isinstance(target, str):
        return UNIXClientEndpoint(reactor, target, timeout=timeout)
    host, port = target
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    if address.version == 4:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)


#: A probe check: given what the target sent so far and whether it closed, return a one-line
#: description (it speaks the protocol), None (need more bytes) or raise ProbeFailed.
ProbeCheck = Callable[[bytes, bool], Optional[str]]


class _ProbeProtocol(protocol.Protocol):
    def __init__(self, check: ProbeCheck, greeting: bytes, limit: int) -> None:
        self.check = check
        self.greeting = greeting
        self.limit = limit
        self.received = b""
        self.result: defer.Deferred = defer.Deferred()

    @property
    def _tcp(self) -> ITCPTransport:
        """The connection to the target (while connected)."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        if self.greeting:
            self._tcp.write(self.greeting)
        self._evaluate(False)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._evaluate(False)

    def connectionLost(self, reason: Any = None) -> None:
        self._evaluate(True)

    def _evaluate(self, closed: bool) -> None:
        if self.result.called:
            return
        try:
            description = self.check(self.received, closed)
            if description is None and (closed or len(self.received) > self.limit):
                raise ProbeFailed(
                    "the connection closed before it said enough"
                    if closed
                    else f"it sent {len(self.received)} bytes without a recognisable greeting"
                )
        except ProbeFailed as e:
            self.result.errback(e)
        else:
            if description is None:
                return
            self.result.callback(description)
        if not closed:
            self._tcp.loseConnection()


def probe_target(
    reactor: Any,
    target: Target,
    timeout: float,
    check: ProbeCheck,
    greeting: bytes = b"",
    limit: int = 8192,
) -> defer.Deferred:
    """
    Connect to C{target}, send C{greeting}, and let C{check} judge what comes back; the whole probe
    is bounded by C{timeout} seconds on C{reactor}.

    @return: a Deferred firing with C{check}'s description or failing with L{ProbeFailed} (a
        refused connection or the timeout included).
    """
    where = describe_target(target)

    @defer.inlineCallbacks
    def run() -> Any:
        proto = _ProbeProtocol(check, greeting, limit)
        factory = protocol.Factory.forProtocol(lambda: proto)
        factory.noisy = False  # no "Starting factory <...>" line per probe
        connecting = target_endpoint(reactor, target, timeout=timeout).connect(factory)
        try:
            yield connecting
        except defer.CancelledError:
            raise
        except ConnectingCancelledError:
            raise defer.CancelledError() from None
        except Exception as e:
            raise TargetUnreachable(f"cannot connect to {where}: {e}") from None
        try:
            return (yield proto.result)
        except ProbeFailed as e:
            raise ProbeFailed(f"{where}: {e}") from None
        finally:
            if proto.transport is not None and proto.connected:
                proto._tcp.abortConnection()

    d = run()

    def timed_out(failure: Any) -> Any:
        failure.trap(defer.TimeoutError, defer.CancelledError)
        raise ProbeFailed(f"{where}: no answer within {timeout:g} s")

    d.addTimeout(timeout, reactor)
    d.addErrback(timed_out)
    return d


def probe_and_log(
    adapter: IServiceAdapter, reactor: Any, service_id: str, target: Target, timeout: float = 5.0
) -> defer.Deferred:
    """
    Run C{adapter}'s probe of C{target} and log one clear line: info when the target speaks the
    adapter's protocol, a warning naming the service ID, the adapter and the fix when it does not.
    Never fails.

    @return: a Deferred firing with True (it speaks the protocol) or False.
    """
    where = describe_target(target)

    def ok(description: str) -> bool:
        log.info(
            "Service {service_id}: target {target} answers as {adapter}: {description}",
            service_id=service_id,
            target=where,
            adapter=adapter.name,
            description=description,
        )
        return True

    def failed(failure: Any) -> bool:
        failure.trap(ProbeFailed)
        if failure.check(TargetUnreachable):
            log.warn(
                "Service {service_id}: {reason}; is its server running? Check -d/--destination-app "
                "({service_id}=HOST:PORT)",
                service_id=service_id,
                reason=str(failure.value).rstrip("."),
            )
            return False
        log.warn(
            "Service {service_id}: target {target} does not look like a {adapter} server "
            "({reason}); check the target, or choose another adapter with "
            "--adapter {service_id}=NAME (e.g. tcp)",
            service_id=service_id,
            target=where,
            adapter=adapter.name,
            reason=failure.getErrorMessage(),
        )
        return False

    d = defer.maybeDeferred(adapter.probe, reactor, target, timeout)
    return d.addCallbacks(ok, failed)


def text_preview(data: bytes, limit: int = 40) -> str:
    """A short printable rendering of bytes a target sent, for error messages."""
    head = data[:limit]
    if head[:2] in (b"\x15\x03", b"\x16\x03"):
        return "a TLS record (is the target using TLS?)"
    text = head.decode("latin-1")
    shown = "".join(c if 32 <= ord(c) < 127 else f"\\x{ord(c):02x}" for c in text)
    return repr(shown + ("..." if len(data) > limit else ""))


__all__: List[str] = [
    "Target",
    "DEFAULT_ADAPTER",
    "UnknownAdapter",
    "ProbeFailed",
    "StreamFilterError",
    "IStreamFilter",
    "IFilterOutput",
    "IActiveStreamFilter",
    "IHoldingStreamFilter",
    "ISourceContext",
    "IDestinationContext",
    "IServiceAdapter",
    "IServiceAdapterFactory",
    "available_adapters",
    "default_adapter_name",
    "parse_adapter_overrides",
    "parse_adapter_options",
    "resolve_adapter",
    "resolve_adapters",
    "check_options",
    "option_bool",
    "describe_target",
    "target_endpoint",
    "probe_target",
    "probe_and_log",
    "text_preview",
]
