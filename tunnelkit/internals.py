# -*- test-case-name: tests.test_internals -*-
"""
The one place where tunnelkit reaches into its dependencies' private internals.

Each use is listed in L{INTERNALS} with what it is for and a check that the name is still there, so
an upgrade that removes one is found at start (L{check_internals}, run by C{twistd tunnelkit}) with a
message naming it, instead of as an C{AttributeError} in the middle of a session.  Code that needs
one of them gets it from here (L{parse_endpoint_description}, L{PAHO_SOCKET_HOOK}), never directly.

Required internals have no public replacement and their feature cannot run without them; optional
ones guard a fast path that turns itself off (one log line) when its internals are missing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from tunnelkit.errors import TunnelkitError

__all__ = [
    "Internal",
    "INTERNALS",
    "MissingInternals",
    "check_internals",
    "missing_internals",
    "parse_endpoint_description",
    "PAHO_SOCKET_HOOK",
    "twistd_default_log_observer",
]

#: The name of the paho-mqtt 2.x method that makes a new connection's socket; tunnelkit's MQTT client
#: overrides it to hand paho a socket-like object over a Twisted transport (see L{tunnelkit.mqtt}).
PAHO_SOCKET_HOOK = "_create_socket"

#: twistd's application runner of this platform (its C{loggerFactory} makes twistd's log observer).
TWISTD_RUNNER = "_SomeApplicationRunner"
#: The method of twistd's logger making the observer of C{--logfile}, C{--syslog} and C{-n}.
TWISTD_OBSERVER_METHOD = "_getLogObserver"


@dataclass(frozen=True)
class Internal:
    """One private name of a dependency: C{module} and dotted C{attribute}, why, and whether required."""

    module: str
    attribute: str
    purpose: str
    required: bool = True
    #: For a name set on instances only: returns whether a freshly made instance has it.
    instance_check: Optional[Callable[[], bool]] = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}"

    def present(self) -> bool:
        """Whether the dependency still has it."""
        try:
            value: Any = importlib.import_module(self.module)
        except ImportError:
            return False
        if self.instance_check is not None:
            try:
                return self.instance_check()
            except Exception:
                return False
        for part in self.attribute.split("."):
            if not hasattr(value, part):
                return False
            value = getattr(value, part)
        return True


def _websocket_fast_path_can_run() -> bool:
    from tunnelkit.transport import fastpath

    return not fastpath.missing()


def _nvx_masker_can_run() -> bool:
    from tunnelkit.transport import fastpath

    return fastpath.nvx_masker_present()


def _write_coalescing_can_run() -> bool:
    from tunnelkit.transport import coalesce

    return not coalesce.missing()  # the reactor's part is checked when it is installed


def _forwarders_present() -> bool:
    from tunnelkit.transport import fastpath

    return not fastpath.forwarders_missing()


def _event_dispatch_can_run() -> bool:
    from tunnelkit.transport import fastpath

    return not fastpath.reactor_missing(None)  # the reactor's own names are checked when it is installed


INTERNALS: Tuple[Internal, ...] = (
    Internal(
        "twisted.internet.endpoints",
        "_parse",
        "checking the syntax of endpoint strings in options and tap.yml without building the endpoint "
        "(serverFromString would already read certificate files) and reading host/port of an MQTT "
        "tls: endpoint",
    ),
    Internal(
        "twisted.web.http",
        "_GenericHTTPChannelProtocol",
        "wrapping the service's own HTTP channel (handshake deadlines, 431 for oversize lines) as "
        "twisted.web.server.Site expects",
    ),
    Internal(
        "autobahn.websocket.protocol",
        "WebSocketProtocol's frame and send state (tunnelkit.transport.fastpath.AUTOBAHN_ATTRIBUTES)",
        "the WebSocket fast path of the relay and the local proxy (whole binary frames read by offset, "
        "no per-call debug formatting; it turns itself off and autobahn's own code runs, slower)",
        required=False,
        instance_check=_websocket_fast_path_can_run,
    ),
    Internal(
        "_nvx_xormasker",
        "lib.nvx_xormask_process (autobahn's compiled NVX masker, tunnelkit.transport.fastpath.masked_frame)",
        "masking and unmasking whole WebSocket messages in place, one copy each (off, they are masked in "
        "Python, slower)",
        required=False,
        instance_check=_nvx_masker_can_run,
    ),
    Internal(
        "twisted.internet.abstract",
        "FileDescriptor's write buffer and the epoll reactor's watched writers "
        "(tunnelkit.transport.coalesce.missing)",
        "sending each reactor turn's TCP writes at its end without watching the socket for writability "
        "(fewer system calls per message; off, Twisted's own write path runs)",
        required=False,
        instance_check=_write_coalescing_can_run,
    ),
    Internal(
        "twisted.scripts.twistd",
        f"{TWISTD_RUNNER}.loggerFactory.{TWISTD_OBSERVER_METHOD}",
        "putting the -v log filter of the local proxy and the agent in front of the observer twistd makes "
        "from --logfile, --syslog and -n (an application's ILogObserver component replaces that observer, "
        "and twistd offers no public way to make it)",
    ),
    Internal(
        "paho.mqtt.client",
        f"Client.{PAHO_SOCKET_HOOK}",
        "handing paho's MQTT session a socket over a Twisted transport, so nothing blocks the reactor",
    ),
    Internal(
        "twisted.internet.endpoints",
        "_WrappingProtocol and twisted.application._client_service._ReconnectingProtocolProxy "
        "(tunnelkit.transport.fastpath.FORWARDERS)",
        "handing the local proxy's WebSocket reads from the transport straight to its protocol, past "
        "the forwarding protocols of the client endpoint and ClientService (off, they forward them)",
        required=False,
        instance_check=_forwarders_present,
    ),
    Internal(
        "twisted.internet.epollreactor",
        "EPollReactor's poller, selectables and _doReadOrWrite, and twisted.python.context's tracker "
        "(tunnelkit.transport.fastpath.REACTOR_ATTRIBUTES)",
        "dispatching each I/O event with Twisted's log context in fewer calls (off, Twisted's doPoll runs)",
        required=False,
        instance_check=_event_dispatch_can_run,
    ),
)


class MissingInternals(TunnelkitError):
    """A required private internal of a dependency is gone (an upgrade changed it)."""


def missing_internals(internals: Tuple[Internal, ...] = INTERNALS) -> List[Internal]:
    """The listed internals that are not there."""
    return [internal for internal in internals if not internal.present()]


def check_internals(
    internals: Tuple[Internal, ...] = INTERNALS, warn: Callable[[str], None] = lambda message: None
) -> None:
    """
    Check every listed internal: a missing optional one is reported through C{warn}.

    @raise MissingInternals: naming each missing required one, what it is for, and what to do.
    """
    missing = missing_internals(internals)
    for internal in missing:
        if not internal.required:
            warn(f"{internal.name} is missing in this version: {internal.purpose} is off")
    required = [internal for internal in missing if internal.required]
    if required:
        names = "; ".join(f"{internal.name} ({internal.purpose})" for internal in required)
        raise MissingInternals(
            f"an installed dependency lacks what tunnelkit needs: {names}. Install the versions "
            "setup.cfg allows (pip install -e . or pip install tunnelkit again)"
        )


def parse_endpoint_description(description: str) -> Tuple[List[Any], Dict[str, Any]]:
    """Split a Twisted endpoint string into its positional and keyword arguments (syntax only)."""
    from twisted.internet import endpoints

    parse: Callable[[str], Tuple[List[Any], Dict[str, Any]]] = getattr(endpoints, "_parse")
    return parse(description)


def twistd_default_log_observer(twistd_options: Any) -> Any:
    """
    The log observer twistd would make from C{twistd_options} (its C{ServerOptions}) for an
    application that names none: made by twistd's own logger class of this platform.
    """
    from twisted.scripts import twistd

    logger = getattr(twistd, TWISTD_RUNNER).loggerFactory(twistd_options)
    return getattr(logger, TWISTD_OBSERVER_METHOD)()
