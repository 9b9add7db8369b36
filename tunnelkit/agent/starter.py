# -*- test-case-name: tests.test_agent_tap -*-
"""
The agent's sessions as local proxy destinations in this process: L{LocalProxyStarter} is the
L{IDestinationStarter} the agent's mode (L{tunnelkit.agent.tap}) plugs into L{Agent}, one
L{LocalProxySession} per notification.
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping, Optional

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from tunnelkit.adapters import Target
from tunnelkit.agent.core import IDestinationSession, IDestinationStarter, Notification
from tunnelkit.errors import TunnelkitError
from tunnelkit.localproxy.destination import DestinationSide
from tunnelkit.localproxy.endpoint import ServiceEndpoint, parse_proxy_endpoint
from tunnelkit.transport.stdtls import SessionCache
from tunnelkit.localproxy.session_service import LocalProxySession, SessionEnd
from tunnelkit.transport.httpproxy import ProxySettings

__all__ = ["LocalProxyStarter", "SessionFailed"]


class SessionFailed(TunnelkitError):
    """A destination session ended with an error (its token refused, a protocol error, ...)."""


@implementer(IDestinationSession)
class _RunningSession:
    """A L{LocalProxySession} as the agent sees it."""

    def __init__(self, session: LocalProxySession) -> None:
        self.session = session
        self.ended: Deferred = Deferred()
        session.ended.addCallback(self._session_ended)

    def _session_ended(self, end: SessionEnd) -> None:
        if self.ended.called:
            return
        if end.status == 0:
            self.ended.callback(end)
        else:
            self.ended.errback(SessionFailed(end.message))

    def stop(self) -> Deferred:
        if not self.ended.called:
            self.ended.callback(None)
        if self.session.running:
            return self.session.stopService()
        return succeed(None)


@implementer(IDestinationStarter)
class LocalProxyStarter:
    """Starts the local proxy's destination sessions in this process (one per notification)."""

    def __init__(
        self,
        reactor: Any,
        capath: Optional[str] = None,
        verify: bool = True,
        web_proxy: Optional[ProxySettings] = None,
        adapter_overrides: Optional[Mapping[str, str]] = None,
        clock: Any = None,
        probe_targets: bool = True,
        tls_library: str = "stdlib",
    ) -> None:
        self.tls_library = tls_library
        #: One cache for every session this agent starts: each connects to the service again.
        self.sessions = SessionCache()
        self.reactor = reactor
        self.probe_targets = probe_targets
        self.clock = clock
        self.capath = capath
        self.verify = verify
        self.web_proxy = web_proxy
        self.adapter_overrides = dict(adapter_overrides or {})

    def start(self, notification: Notification, endpoint: str, targets: Mapping[str, Target]) -> _RunningSession:
        host, port, secure = parse_proxy_endpoint(endpoint)
        service_endpoint = ServiceEndpoint(
            host, port, secure, self.capath, self.verify, self.web_proxy, tls_library=self.tls_library,
            sessions=self.sessions,
        )
        side = DestinationSide(
            dict(targets),
            self.reactor,
            self.clock,
            adapter_overrides={k: v for k, v in self.adapter_overrides.items() if k in targets},
            probe_targets=self.probe_targets,
        )
        # A client token of our own lets the session reconnect with its single-use access token.
        session = LocalProxySession(
            side, service_endpoint, notification.access_token, str(uuid.uuid4()), self.reactor, self.clock
        )
        running = _RunningSession(session)
        session.startService()
        return running
