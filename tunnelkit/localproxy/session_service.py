# -*- test-case-name: tests.test_localproxy_session -*-
"""
One local proxy session: the sans-IO source or destination state machine
(L{tunnelkit.protocol.session}) driven over a reconnecting WebSocket and the local sockets.

L{LocalProxySession} is a L{MultiService}.  It owns:
  - a L{ClientService} that keeps one WebSocket to the tunnel service, reconnecting with backoff and
    the same access and client tokens;
  - a I{side} (L{tunnelkit.localproxy.source.SourceSide} or
    L{tunnelkit.localproxy.destination.DestinationSide}) that opens listeners or connects to targets;
  - the open local connections (L{LocalConnection}), keyed by C{(service_id, connection_id)};
  - the two flow-control throttles (L{tunnelkit.transport.flow}).

It ends (L{LocalProxySession.ended} fires with a L{SessionEnd}) when the service closes the tunnel
(status 0), when the upgrade is refused with a 4xx other than 429 (status 1; a 429 is retried with a
growing delay, L{RateLimitedRetry}), or on a fatal protocol or
configuration error (status 1).  The twistd plugin turns that into the process's exit status; the
device agent runs several sessions in one process and just drops the ended ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.localproxy.connection import ConnectionKey, LocalConnection
from tunnelkit.localproxy.endpoint import ServiceEndpoint
from tunnelkit.protocol.framing import Message
from tunnelkit.protocol.flowcontrol import Pacer
from tunnelkit.protocol.tokens import CLIENT_TOKEN_MISMATCH, TOKEN_ROTATED, TOKEN_USED, UNKNOWN_TOKEN
from tunnelkit.protocol.session import (
    CloseLocal,
    ConnectTarget,
    Fatal,
    HalfCloseLocal,
    LogEvent,
    PauseLocal,
    ResumeLocal,
    SendFrames,
    SourceSession,
    StartListening,
    WriteLocal,
)
from tunnelkit.transport.actions import ActionDispatcher, log_event
from tunnelkit.transport.flow import LocalReadThrottle, WebSocketReadThrottle
from tunnelkit.transport.websocket import (
    ITunnelWebSocketHandler,
    TunnelWebSocketFactory,
    TunnelWebSocketProtocol,
    WebSocketEnded,
    tune_allocator,
)

__all__ = ["LocalProxySession", "RateLimitedRetry", "SessionEnd", "default_retry_policy"]

#: Bytes a paced connection may send at once (toward a peer without flow control).
PACE_BURST = 64 * 1024

#: Bytes a destination may hold for connections still being opened before the WebSocket pauses.
PENDING_LIMIT = 1 << 20


def default_retry_policy() -> Callable[[int], float]:
    """
    Reconnect delays: 0.75 s, 1.1 s, 1.7 s ... up to 30 s, plus up to 1 s of jitter, rounded to
    0.1 s (ClientService logs each one: C{Scheduling retry N to connect ... in D seconds}).
    """
    policy = backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=1.5)
    return lambda attempt: round(policy(attempt), 1)


class RateLimitedRetry:
    """
    A reconnection policy that also backs off from the service's C{429 Too Many Requests}.

    A 429 answers a completed TCP connection, so L{ClientService} restarts its count of failed
    attempts and would retry after its shortest delay, again and again.  After C{refusals}
    consecutive 429s the delay is at least 1, 2, 4, ... up to C{max_delay} seconds (plus the base
    policy's jitter); an opened WebSocket clears the count.

    @param base: the usual policy (L{default_retry_policy}).
    """

    def __init__(self, base: Callable[[int], float], max_delay: float = 60.0) -> None:
        self.base = base
        self.max_delay = max_delay
        self.refusals = 0

    def rate_limited(self) -> float:
        """Count one more 429; the least delay before the next attempt."""
        self.refusals += 1
        return self.floor()

    def floor(self) -> float:
        """The least delay the consecutive 429s ask for (0 without any)."""
        if not self.refusals:
            return 0.0
        return float(min(self.max_delay, 2.0 ** (self.refusals - 1)))

    def connected(self) -> None:
        """A WebSocket opened: the service admits us again."""
        self.refusals = 0

    def __call__(self, attempt: int) -> float:
        return max(self.base(attempt), self.floor())


@dataclass(frozen=True)
class SessionEnd:
    """How a session ended: the exit status (0 = the tunnel was closed) and why."""

    status: int
    message: str


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Logs why a connection attempt to the service failed (ClientService only logs the retry)."""

    log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint, url: str, web_proxy: Any = None) -> None:
        self._endpoint = endpoint
        self._url = url
        if web_proxy is None:
            self._hint = "is the tunnel service running there? check -e/--proxy-endpoint"
        else:
            self._hint = (
                f"through the web proxy {web_proxy.host}:{web_proxy.port} from HTTPS_PROXY: is it running? "
                "unset HTTPS_PROXY to connect directly"
            )

    def connect(self, factory: Any) -> Deferred:
        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError):
                self.log.error(
                    "Could not connect to proxy server {url}: {error}; retrying ({hint})",
                    url=self._url,
                    hint=self._hint,
                    error=failure.getErrorMessage().rstrip("."),
                )
            return failure

        return self._endpoint.connect(factory).addErrback(failed)

    def __repr__(self) -> str:
        return f"<{self._url}>"


@implementer(ITunnelWebSocketHandler)
class LocalProxySession(MultiService):
    """
    A local proxy session over a reconnecting WebSocket.

    @param side: the mode's side object (has C{mode}, C{session}, C{attach(proxy)},
        C{start_listening(action)} or C{connect(action)}, C{cancel(key)}, C{websocket_lost()}, C{stop()}).
    @param service_endpoint: where the tunnel service is.
    @param client_token: sent on every (re)connection so the access token can reconnect.
    @param clock: pings, timeouts and reconnection delays run on it (default: C{reactor}).
    """

    log = Logger()

    def __init__(
        self,
        side: Any,
        service_endpoint: ServiceEndpoint,
        access_token: str,
        client_token: Optional[str],
        reactor: Any,
        clock: Any = None,
        retry_policy: Optional[Callable[[int], float]] = None,
        pace: float = 0.0,
    ) -> None:
        super().__init__()
        #: Bytes per second each connection may send toward a far peer without flow control (0: no
        #: pacing); see L{tunnelkit.protocol.flowcontrol.Pacer}.
        self.pace = pace
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.side = side
        self.session = side.session
        self.service_endpoint = service_endpoint
        self.url = service_endpoint.url(side.mode)
        self.local_read_throttle = LocalReadThrottle()
        self.websocket_read_throttle = WebSocketReadThrottle()
        self.connections: Dict[ConnectionKey, LocalConnection] = {}
        self.websocket: Optional[TunnelWebSocketProtocol] = None
        self.ended: Deferred = Deferred()
        self.end: Optional[SessionEnd] = None
        self.factory = TunnelWebSocketFactory(
            self.url, access_token, client_token, self, self.clock, reactor=reactor
        )
        self.retry_policy = RateLimitedRetry(retry_policy or default_retry_policy())
        self.client_service = ClientService(
            _ReportingEndpoint(service_endpoint.client_endpoint(reactor), self.url, service_endpoint.web_proxy),
            self.factory,
            retryPolicy=self.retry_policy,
            clock=self.clock,
        )
        self.client_service.setServiceParent(self)
        side.attach(self)
        self._dispatch = ActionDispatcher(self._action_handlers())

    # --- service ---

    def startService(self) -> None:
        tune_allocator()  # 129 KB messages: see tune_allocator
        self.log.info("Starting proxy in {mode} mode", mode=self.side.mode)
        self.log.info("Attempting to establish web socket connection with endpoint {url}", url=self.url)
        super().startService()

    def stopService(self) -> Deferred:
        websocket = self.websocket
        if websocket is not None and websocket.transport is not None:
            # A TLS transport finishes loseConnection only once its producer is gone.
            websocket.transport.unregisterProducer()
        self.side.stop()
        for connection in list(self.connections.values()):
            connection.close("the local proxy is stopping", abort=True)
        return super().stopService()

    def finish(self, status: int, message: str) -> None:
        """End the session for good: stop reconnecting, close everything, fire L{ended}."""
        if self.end is not None:
            return
        self.end = SessionEnd(status, message)
        if status == 0:
            self.log.info("{message}", message=message)
        else:
            self.log.error("{message}", message=message)
        if self.running:
            self.stopService()
        self.ended.callback(self.end)

    # --- the WebSocket (ITunnelWebSocketHandler) ---

    def websocket_opened(self, websocket: TunnelWebSocketProtocol) -> None:
        self.websocket = websocket
        self.retry_policy.connected()
        self.log.info(
            "Successfully established websocket connection with proxy server: {url}", url=self.url
        )
        websocket.transport.registerProducer(self.local_read_throttle, True)
        self.websocket_read_throttle.attach(websocket.transport)
        self.perform(self.session.websocket_opened(getattr(websocket, "extensions", "")))

    def messages_received(self, messages: List[Message]) -> None:
        session = self.session
        was_ready = session.ready
        was_there = session.far_peer_connected
        receive = session.receive
        perform = self.perform
        for message in messages:
            perform(receive(message), flush=False)
        self.side.after_messages()
        if self.end is not None:
            return
        if not was_ready and session.ready:
            self._log_connected()
            self.side.tunnel_ready()
        there = session.far_peer_connected
        if there and not was_there:
            self.log.info(
                "The tunnel is ready: the {far} is connected ({extensions}); its services are {services}",
                far=self._far_side,
                extensions="flow control and half-close"
                if session.peer_extensions is not None
                else "it announces neither flow control nor half-close",
                services=self._services_text(),
            )
        elif was_there and there is False:
            self.log.info(
                "The {far} left the tunnel (the service says so); waiting for it to connect again",
                far=self._far_side,
            )

    @property
    def _far_side(self) -> str:
        return "destination" if isinstance(self.session, SourceSession) else "source"

    def _services_text(self) -> str:
        return ", ".join(sid or "(none)" for sid in self.session.services) or "(none)"

    def _log_connected(self) -> None:
        """SERVICE_IDS came: this side is in the tunnel; the far side may not be (yet)."""
        if self.session.far_peer_connected is None:
            waiting = (
                f"this service does not say whether the {self._far_side} is connected: "
                "data flows once it is"
            )
        else:
            waiting = f"waiting for the {self._far_side} to connect"
        self.log.info(
            "Connected to the tunnel: its services are {services}; {waiting}",
            services=self._services_text(),
            waiting=waiting,
        )

    def websocket_ended(self, websocket: TunnelWebSocketProtocol, ended: WebSocketEnded) -> None:
        if websocket is self.websocket or self.websocket is None:
            self.websocket = None
            self.websocket_read_throttle.detach()
            self.local_read_throttle.resumeProducing()
            self.perform(self.session.websocket_lost())
            self.side.websocket_lost()
        if ended.kind == "retry":
            if not self.running:
                return  # we are stopping: the WebSocket was closed on purpose
            self.log.warn(
                "{message}; reconnecting to {url} (the delay follows)", message=ended.message, url=self.url
            )
        elif ended.kind == "rejected" and ended.code == 429:
            self._rate_limited(ended)
        elif ended.kind == "rejected":
            hint = _refusal_hint(ended)
            self.finish(
                1, f"{ended.message}; not retrying: the token or tunnel cannot be used{hint} (exit status 1)"
            )
        elif ended.kind == "replaced" and "Protocol violation" in ended.message:
            self.finish(
                1,
                f"{ended.message}; the service closed this proxy's connection because a frame it sent broke "
                "the tunneling protocol (a bug of this proxy: please report it with this line), stopping",
            )
        elif ended.kind == "replaced" and "rotated" in ended.message:
            self.finish(
                0, f"{ended.message}; this proxy's token was rotated: start it again with the new token, stopping"
            )
        elif ended.kind == "replaced":
            self.finish(0, f"{ended.message}; another local proxy connected with this token, stopping")
        else:
            self.finish(0, f"{ended.message}; the tunnel is closed, stopping")

    def _rate_limited(self, ended: WebSocketEnded) -> None:
        """A 429 (too many attempts, or the account's connection limit): retry later, never give up."""
        if not self.running:
            return
        delay = self.retry_policy.rate_limited()
        self.log.warn(
            "{message}; the service is limiting connections: retrying in {delay:g} s or more "
            "(refused {count} time(s) in a row)",
            message=ended.message,
            delay=delay,
            count=self.retry_policy.refusals,
        )

    # --- actions of the state machine ---

    def perform(self, actions: List[Any], flush: bool = True) -> None:
        """Carry out the state machine's actions, in order (L{ActionDispatcher}: every type handled)."""
        websocket = self.websocket
        self._dispatch(actions)
        if flush and websocket is not None:
            websocket.flush()

    def _action_handlers(self) -> Dict[type, Callable[[Any], None]]:
        side = self.side
        return {
            SendFrames: self._send_frames,
            WriteLocal: self._write_local,
            CloseLocal: self._close_local,
            PauseLocal: lambda a: self._on_connection(a, "pause_reading", "credit"),
            ResumeLocal: lambda a: self._on_connection(a, "resume_reading", "credit"),
            HalfCloseLocal: lambda a: self._on_connection(a, "half_close"),
            StartListening: lambda a: side.start_listening(a),
            ConnectTarget: lambda a: side.connect(a),
            Fatal: lambda a: self.finish(1, a.message),
            LogEvent: log_event,
        }

    def _send_frames(self, action: SendFrames) -> None:
        websocket = self.websocket
        if websocket is not None:
            websocket.send_frames(action.data, action.boundary)

    def _write_local(self, action: WriteLocal) -> None:
        connection = self.connections.get((action.service_id, action.connection_id))
        if connection is not None:
            connection.write(action.data)

    def _close_local(self, action: CloseLocal) -> None:
        key = (action.service_id, action.connection_id)
        connection = self.connections.get(key)
        if connection is not None:
            connection.close(action.reason, action.abort)
        else:
            self.side.cancel(key, action.reason)

    def _on_connection(self, action: Any, method: str, *args: Any) -> None:
        connection = self.connections.get((action.service_id, action.connection_id))
        if connection is not None:
            getattr(connection, method)(*args)

    # --- local connections (called by LocalConnection and the sides) ---

    def local_opened(self, connection: LocalConnection) -> None:
        """Register a local connection the side accepted or connected."""
        self.connections[connection.key] = connection

    def local_data(self, connection: LocalConnection, data: bytes) -> None:
        session = self.session
        self.perform(session.local_data(connection.service_id, connection.connection_id, data))
        if self.pace and not session.flow_controlled(connection.service_id, connection.connection_id):
            self._pace(connection, len(data))

    def _pace(self, connection: LocalConnection, size: int) -> None:
        """Toward a peer without flow control: pause this connection's reads to keep to L{pace}."""
        now = self.clock.seconds()
        if connection.pacer is None:
            connection.pacer = Pacer(self.pace, PACE_BURST, now)
        delay = connection.pacer.delay_after(size, now)
        if delay > 0 and connection.pace_call is None:
            connection.pause_reading("pace")

            def resume() -> None:
                connection.pace_call = None
                connection.resume_reading("pace")

            connection.pace_call = self.clock.callLater(delay, resume)

    def local_written(self, connection: LocalConnection, size: int) -> None:
        """C{size} tunnel bytes were written to the connection's transport."""
        if self.session.flow_controlled(connection.service_id, connection.connection_id):
            if connection.buffer_full:
                connection.ungranted += size
            else:
                self.perform(
                    self.session.local_delivered(connection.service_id, connection.connection_id, size), flush=False
                )
        elif connection.buffer_full:
            self.websocket_read_throttle.legacy_written(
                connection.key, size, f"connection {connection.connection_id} of {connection.service_id or '-'} ({connection.peer})"
            )

    def local_buffer_full(self, connection: LocalConnection) -> None:
        if self.session.flow_controlled(connection.service_id, connection.connection_id):
            self.session.local_buffer_full(connection.service_id, connection.connection_id, self.clock.seconds())
        else:
            self.websocket_read_throttle.legacy_full(connection.key)

    def local_buffer_drained(self, connection: LocalConnection) -> None:
        self.websocket_read_throttle.legacy_drained(connection.key)
        size, connection.ungranted = connection.ungranted, 0
        actions = self.session.local_buffer_drained(
            connection.service_id, connection.connection_id, size, self.clock.seconds()
        )
        if actions:
            self.perform(actions)

    def local_eof(self, connection: LocalConnection) -> None:
        """The local application shut down its write side."""
        if not connection.closing:
            self.perform(self.session.local_eof(connection.service_id, connection.connection_id))

    def local_gone(self, connection: LocalConnection) -> None:
        key = connection.key
        if self.connections.get(key) is connection:
            del self.connections[key]
            if not connection.closing:
                self.perform(self.session.local_closed(connection.service_id, connection.connection_id))


def _refusal_hint(ended: WebSocketEnded) -> str:
    """
    What to tell the user after a refused upgrade, by the reason tunnelkit's service names
    (L{REFUSAL_HEADER}); for a service that names none (AWS's), by the status and the text.
    """
    reason = ended.reason
    if reason is None and ended.code == 401:
        if "not valid for any tunnel" in ended.message:
            reason = UNKNOWN_TOKEN
        elif "revoked" in ended.message:
            reason = TOKEN_ROTATED
        else:
            reason = TOKEN_USED
    if reason == UNKNOWN_TOKEN:
        return (
            " (is it this service's token, whole, of a tunnel not deleted? copy it from open-tunnel's"
            " output or token file)"
        )
    if reason in (TOKEN_USED, CLIENT_TOKEN_MISMATCH):
        return (
            " (an access token connects once, and reconnects only with the client token it first"
            " used: -i/--client-token; or get a new one with 'tunnelkit rotate-tunnel-access-token')"
        )
    return ""  # token-rotated: the service's text says to use the new token; others say enough
