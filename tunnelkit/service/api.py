# -*- test-case-name: tests.test_api -*-
"""
The AWS JSON 1.1 HTTP front of the control plane: C{POST /} with C{X-Amz-Target:
IoTSecuredTunneling.<Operation>} and C{Content-Type: application/x-amz-json-1.1} (reference section 3.1).

Each request is, in order: bounded in size (L{ServiceSite}: a declared C{Content-Length} over
L{MAX_BODY_BYTES} is answered 413 before the body is read, and the connection is closed), authenticated
(L{tunnelkit.service.auth}), dispatched on its target, decoded, and run by
L{tunnelkit.service.operations.ControlPlane}.  Answers are JSON; errors are C{{"__type", "message"}}
bodies with the type also in C{x-amzn-ErrorType}, as botocore expects:

  - 400 C{SerializationException} (malformed JSON, wrong JSON types), C{ValidationException}
    (constraints of reference section 3.2), C{UnknownOperationException}, C{LimitExceededException}
  - 403 authentication errors (see L{tunnelkit.service.auth})
  - 404 C{ResourceNotFoundException}
  - 413 C{RequestEntityTooLargeException}
  - 500 C{InternalFailure} (logged with a traceback; the service keeps serving)
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, List, Optional, Tuple, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http import _GenericHTTPChannelProtocol  # the channel wrapper Site's protocol must be
from twisted.web.pages import errorPage
from twisted.web.resource import Resource

from tunnelkit.service.auth import SigV4Verifier
from tunnelkit.service.logbounds import bounded
from tunnelkit.service.errors import ApiError
from tunnelkit.service.operations import ControlPlane
from tunnelkit.transport.stdtls import is_encrypted

log = Logger()

TARGET_PREFIX = "IoTSecuredTunneling."
CONTENT_TYPE = b"application/x-amz-json-1.1"
#: The largest request body accepted: far above the largest valid request (200 tags of 384 characters
#: and a 2048-character description come to about 100 KB of JSON).
MAX_BODY_BYTES = 1024 * 1024


def error_body(error_type: str, message: str) -> bytes:
    """The JSON body of an AWS JSON error."""
    return json.dumps({"__type": error_type, "message": message}).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class BoundedRequest(server.Request):
    """
    A request that refuses a body over L{MAX_BODY_BYTES}: as soon as the headers announce it
    (C{Content-Length}), or as soon as a chunked body grows past it.  The 413 answer is written at once
    and the connection closed; the rest of the body is discarded unread.
    """

    max_body = MAX_BODY_BYTES
    _too_large = False
    _body_received = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body:
            self._refuse(f"Request body of {length} bytes is over the limit of {self.max_body} bytes")
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body:
            self._refuse(f"Request body is over the limit of {self.max_body} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._too_large:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        channel = self.channel
        super().process()  # a finished request lets go of its channel
        if channel is not None and channel.transport is None:
            # A resource (the WebSocket data plane) took the connection over: the HTTP channel's
            # idle timeout must not fire on a connection that is no longer its own.
            channel.setTimeout(None)
            if isinstance(channel, FrontDoorChannel):
                channel.upgraded()

    def _refuse(self, message: str) -> None:
        self._too_large = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after this answer
        body = error_body("RequestEntityTooLargeException", message)
        head = (
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: " + CONTENT_TYPE + b"\r\n"
            b"x-amzn-ErrorType: RequestEntityTooLargeException\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n"
        )
        log.info("Refused a request: {message}", message=message)
        transport = self.channel.transport
        assert transport is not None  # the request is being received on it
        transport.write(head + body)
        transport.loseConnection()


#: Seconds an HTTP connection may stay idle (between API requests) before the service closes it.
IDLE_TIMEOUT = 120

#: Seconds a new connection has for its TLS handshake and its first request's line and headers
#: (and each later request, for its line and headers, from its first byte).
HEAD_TIMEOUT = 10.0

#: Connections one client address may hold that are not WebSocket peers yet.
MAX_PENDING_PER_ADDRESS = 64

#: The longest request line or header line, and the most bytes of a request's line and headers.
MAX_HEAD_LINE = 16384


class FrontDoorChannel(http.HTTPChannel):
    """
    The HTTP side of one connection to the service, until it is upgraded to a WebSocket (or
    closes).  On top of C{twisted.web}'s channel:
      - its site's L{HEAD_TIMEOUT}: the TLS handshake (the channel starts with the TCP connection,
        before TLS is through) and the request line and headers must arrive within it, however
        slowly the bytes trickle in (the idle timeout restarts on each byte, this does not);
        past it the connection is reset;
      - while that deadline runs (it has not sent a complete request head yet), it counts as
        pending for its client address (see L{ServiceSite.max_pending_per_address}); an idle
        keep-alive connection, a console event stream or a request being answered does not
        count (the idle timeout is theirs);
      - a request line or header line over L{MAX_HEAD_LINE} bytes, or a head over it in all, is
        answered C{431} at once, whatever its size.

    @ivar address_from_proxy_header: the connection came through a C{haproxy:} listener: its
        client's address is the one the PROXY header names, known only when the first bytes after
        that header arrive, so it is counted (and checked against the limit) only then.
    """

    MAX_LENGTH = MAX_HEAD_LINE
    totalHeadersSize = MAX_HEAD_LINE
    address_from_proxy_header = False
    _pending_host: Optional[str] = None
    _head_deadline: Any = None
    _heard = False
    _discarding = False

    @property
    def _tcp(self) -> ITCPTransport:
        """The connection (while connected)."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def isSecure(self) -> bool:
        """Whether the request came over TLS (the service's own, L{is_encrypted}, or Twisted's)."""
        return is_encrypted(self.transport)

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_head_deadline()
        if not self.address_from_proxy_header:
            self._count_pending(refuse=True)

    def _client_host(self) -> str:
        return str(getattr(self._tcp.getPeer(), "host", ""))

    def _count_pending(self, refuse: bool) -> bool:
        """
        Count this connection as pending for its client address; if C{refuse} and the address has
        its limit already, reset it instead and return False.
        """
        site = self.factory
        if not isinstance(site, ServiceSite) or self._pending_host is not None:
            return True
        host = self._client_host()
        if refuse and not site.admit_pending(host):
            self._tcp.abortConnection()
            return False
        site.pending[host] = site.pending.get(host, 0) + 1
        self._pending_host = host
        return True

    def _arm_head_deadline(self) -> None:
        timeout = getattr(self.factory, "head_timeout", HEAD_TIMEOUT)
        if timeout and self._head_deadline is None:
            self._head_deadline = self.callLater(timeout, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None
        self._release()

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        log.debug(
            "Reset a connection from {address}: no complete request head within {timeout} s",
            address=self._pending_host,
            timeout=getattr(self.factory, "head_timeout", HEAD_TIMEOUT),
        )
        if self.transport is not None:
            self._tcp.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        if not self._heard:
            self._heard = True
            # Behind a haproxy: listener, the PROXY header is through: the client is known now.
            if self.address_from_proxy_header and not self._count_pending(refuse=True):
                return
        elif self._head_deadline is None and self.line_mode and not self._handlingRequest:
            # The first bytes of a later request on this connection: pending again until its head is
            # complete (counted, never refused: the client did nothing wrong by keeping it alive).
            self._arm_head_deadline()
            self._count_pending(refuse=False)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._discarding:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._too_large(f"the request line and headers are over {self.totalHeadersSize} bytes")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large(f"a request or header line is over {self.MAX_LENGTH} bytes")

    def _too_large(self, why: str) -> None:
        body = f"Request Header Fields Too Large: {why}\n".encode()
        self._tcp.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )
        self._discarding = True  # the rest of what the client sends is dropped unread
        self.loseConnection()

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        super().allHeadersReceived()

    def upgraded(self) -> None:
        """The connection became a WebSocket peer: no longer pending (nor timed by the head deadline)."""
        self._cancel_head_deadline()

    def _release(self) -> None:
        host, self._pending_host = self._pending_host, None
        site = self.factory
        if host is None or not isinstance(site, ServiceSite):
            return
        left = site.pending.get(host, 1) - 1
        if left > 0:
            site.pending[host] = left
        else:
            site.pending.pop(host, None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_head_deadline()
        super().connectionLost(reason)


def _front_door_protocol(factory: Any) -> Any:
    channel = FrontDoorChannel()
    protocol = _GenericHTTPChannelProtocol(channel)
    protocol.front_door = channel  # type: ignore[attr-defined]
    return protocol


def access_log_line(timestamp: str, request: Any) -> str:
    """
    The access-log line of C{request} in Twisted's combined format, with every value the client
    sent (method, URI, protocol, referrer, user agent) bounded by L{bounded}.
    """
    address = request.getClientAddress()
    host = getattr(address, "host", "-")
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        host,
        timestamp,
        bounded(request.method or b"-", 16),
        bounded(request.uri or b"-"),
        bounded(request.clientproto or b"-", 16),
        request.code,
        request.sentLength or "-",
        bounded(request.getHeader(b"referer") or b"-"),
        bounded(request.getHeader(b"user-agent") or b"-"),
    )


#: Seconds between two log lines about one address's connections reset by the pending limit.
PENDING_RESET_LOG_INTERVAL = 60.0


class ServiceSite(server.Site):
    """
    The service's HTTP site: the API and the data plane share it; request bodies are bounded, and
    idle HTTP connections close after L{IDLE_TIMEOUT} seconds (WebSocket connections are exempt once
    upgraded).  Every connection is a L{FrontDoorChannel} (head deadline, 431, pending count).  A new
    connection from an address that has C{max_pending_per_address} connections still sending
    their request head is reset at once, and logged (a warning, at most one line per address every
    L{PENDING_RESET_LOG_INTERVAL} seconds, with how many were reset since the last one).
    Access-log lines show at most L{bounded}'s share of what the client sent.

    A C{haproxy:} listener gets L{proxied} as its factory: its connections' client address is the
    one the PROXY header names, not HAProxy's.
    """

    requestFactory = BoundedRequest
    protocol = _front_door_protocol
    noisy = False

    def __init__(
        self,
        resource: Resource,
        timeout: float = IDLE_TIMEOUT,
        reactor: Any = None,
        head_timeout: float = HEAD_TIMEOUT,
        max_pending_per_address: Optional[int] = MAX_PENDING_PER_ADDRESS,
    ) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor, logFormatter=access_log_line)
        self.head_timeout = head_timeout
        self.max_pending_per_address = max_pending_per_address
        #: client address -> its connections that have not sent a complete request head yet.
        self.pending: Dict[str, int] = {}
        self.refused_pending = 0
        #: client address -> [time of its last log line, resets not logged since].
        self._reset_logged: Dict[str, List[float]] = {}

    def admit_pending(self, host: str) -> bool:
        """Whether one more pending connection from C{host} is allowed; a refusal is counted and logged."""
        limit = self.max_pending_per_address
        if not limit or self.pending.get(host, 0) < limit:
            return True
        self.refused_pending += 1
        now = self.reactor.seconds()
        logged = self._reset_logged.get(host)
        if logged is not None and now - logged[0] < PENDING_RESET_LOG_INTERVAL:
            logged[1] += 1
            return False
        if len(self._reset_logged) >= 1024:
            self._reset_logged.clear()
        self._reset_logged[host] = [now, 0]
        log.warn(
            "Reset a connection from {address}: it has {limit} connections still sending their request "
            "head (--max-pending-per-address {limit}){since}",
            address=host or "a unix socket",
            limit=limit,
            since=f"; {int(logged[1])} more reset since the last such line" if logged is not None and logged[1] else "",
        )
        return False

    def log(self, request: Any) -> None:
        """The access log, without the load balancer's health checks (GET /healthz every second)."""
        if request.path == b"/healthz" and request.code == 200:
            return
        super().log(request)

    def proxied(self) -> "ProxyProtocolFactory":
        """This site as the factory of a C{haproxy:} (PROXY protocol) listener."""
        return ProxyProtocolFactory(self)


class ProxyProtocolFactory:
    """
    A L{ServiceSite} as a C{haproxy:} listener's factory.  Twisted's PROXY-protocol wrapper builds
    each connection's protocol with HAProxy's address, before the header names the client; this
    marks the channel so that it counts (and limits) the connection under the client's address once
    the header is through.
    """

    def __init__(self, site: ServiceSite) -> None:
        self.site = site

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def logPrefix(self) -> str:
        return self.site.logPrefix()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.site.buildProtocol(addr)
        protocol.front_door.address_from_proxy_header = True
        return protocol


class ApiResource(Resource):
    """C{POST /}: the control-plane API."""

    isLeaf = True

    def __init__(self, control: ControlPlane, verifier: SigV4Verifier) -> None:
        super().__init__()
        self._control = control
        self._verifier = verifier

    def render_GET(self, request: server.Request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (
            b"tunnelkit service: the API takes AWS JSON 1.1 requests (POST / with X-Amz-Target: "
            b"IoTSecuredTunneling.<Operation>), e.g. from 'tunnelkit open-tunnel' or "
            b"'aws iotsecuretunneling ... --endpoint-url'. WebSocket peers connect to /tunnel.\n"
        )

    def answer(self, request: server.Request) -> "Deferred[bytes]":
        """
        The response body of the call C{request} makes (its status and headers set on it); never
        fails (an error is its AWS error body).  L{render_POST} writes it; the audit trail reads it first.
        """
        request_id = str(uuid.uuid4())
        request.setHeader(b"x-amzn-requestid", request_id.encode())
        request.setHeader(b"content-type", CONTENT_TYPE)
        try:
            operation = self._operation(request)  # for the log; checked again once the caller is known
        except ApiError:
            operation = "?"
        body = request.content.read() if request.content is not None else b""
        d = Deferred.fromCoroutine(self._answer(request, body))
        d.addErrback(self._failed, request, operation, request_id)
        return d

    def render_POST(self, request: server.Request) -> Any:
        self.answer(request).addCallback(self.write_answer, request)
        return server.NOT_DONE_YET

    async def _answer(self, request: server.Request, body: bytes) -> bytes:
        headers: List[Tuple[str, List[str]]] = [
            (name.decode("latin-1"), [v.decode("latin-1") for v in values])
            for name, values in request.requestHeaders.getAllRawHeaders()
        ]
        caller = await self._verifier.authenticate("POST", request.uri.decode("latin-1"), headers, body)
        operation = self._operation(request)
        params = self._decode(body)
        result = await self._control.call(operation, caller.account, params)
        return json.dumps(result).encode("utf-8")

    def _failed(self, failure: Failure, request: server.Request, operation: str, request_id: str) -> bytes:
        if failure.check(ApiError):
            e = failure.value
            log.info(
                "API {operation} refused: {error_type}: {message}",
                operation=operation,
                error_type=e.error_type,
                message=bounded(e.message),
            )
            return self._error(request, e.status, e.error_type, e.message)
        log.failure(
            "API {operation} failed (request id {request_id})", failure, operation=operation, request_id=request_id
        )
        return self._error(
            request, 500, "InternalFailure", f"The service failed to process the request (request id {request_id})"
        )

    @staticmethod
    def write_answer(data: bytes, request: server.Request) -> None:
        """Write L{answer}'s body and finish C{request} (unless the client went away)."""
        if request.finished or getattr(request, "_disconnected", False):
            return  # the client went away meanwhile
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()

    @staticmethod
    def _operation(request: server.Request) -> str:
        targets = request.requestHeaders.getRawHeaders(b"x-amz-target") or []
        if len(targets) != 1:
            raise ApiError(
                "UnknownOperationException",
                "The request needs one X-Amz-Target header naming the operation, "
                "e.g. X-Amz-Target: IoTSecuredTunneling.OpenTunnel",
            )
        target = targets[0].decode("latin-1")
        if not target.startswith(TARGET_PREFIX) or target[len(TARGET_PREFIX) :] not in ControlPlane.OPERATIONS:
            raise ApiError(
                "UnknownOperationException",
                f"Unknown operation {target!r}: X-Amz-Target must be {TARGET_PREFIX}<Operation> with one of "
                f"{', '.join(ControlPlane.OPERATIONS)}",
            )
        return target[len(TARGET_PREFIX) :]

    @staticmethod
    def _decode(body: bytes) -> Dict[str, Any]:
        if not body.strip():
            return {}
        try:
            params = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as e:
            raise ApiError("SerializationException", f"The request body is not UTF-8: {e.reason} at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise ApiError(
                "SerializationException",
                f"Malformed JSON in the request body: {e.msg} (line {e.lineno}, column {e.colno})",
            ) from None
        except (ValueError, RecursionError) as e:
            raise ApiError("SerializationException", f"Malformed JSON in the request body: {e}") from None
        if not isinstance(params, dict):
            raise ApiError("SerializationException", "The request body must be a JSON object")
        return params

    @staticmethod
    def _error(request: server.Request, status: int, error_type: str, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"x-amzn-errortype", error_type.encode())
        return error_body(error_type, message)


class _Root(Resource):
    """
    Children: the API at C{/}, C{tunnel} and C{metrics} from the data plane.  A WebSocket upgrade to
    any other path gets the documented 400.
    """

    def getChild(self, path: bytes, request: Any) -> Resource:
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade.lower() == b"websocket":
            return errorPage(400, "Bad Request", "The WebSocket path must be /tunnel")
        return super().getChild(path, request)


def build_root(api: Resource) -> Resource:
    """The root resource: the API at C{/}; the data plane adds C{tunnel} and C{metrics} to it."""
    root = _Root()
    root.putChild(b"", api)
    return root
