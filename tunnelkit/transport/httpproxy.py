# -*- test-case-name: tests.test_httpproxy -*-
"""
Reaching the tunnel service through a web proxy: C{HTTPS_PROXY}/C{https_proxy} and HTTP CONNECT.

C{https_proxy} wins over C{HTTPS_PROXY}.  The value is C{http[s]://[USER:PASSWORD@]HOST[:PORT]}
(default port 3128, as AWS's localproxy; a value without scheme means C{http://}).  With
credentials the CONNECT carries C{Proxy-Authorization: Basic ...}.  Any 2xx answer opens the
tunnel; anything else fails the attempt with the status line (the reconnecting client retries).

L{HTTPConnectEndpoint} is an ordinary client endpoint: wrap it with L{wrapClientTLS} for C{wss://}.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, cast
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.errors import ConfigError, TunnelkitError

__all__ = ["ProxySettings", "proxy_from_environment", "parse_proxy_url", "HTTPConnectEndpoint", "HTTPProxyError"]

DEFAULT_PROXY_PORT = 3128
_MAX_RESPONSE_HEAD = 16384


class HTTPProxyError(TunnelkitError):
    """The web proxy refused or botched the CONNECT request."""


@dataclass(frozen=True)
class ProxySettings:
    """Where the web proxy is and how to authenticate to it."""

    scheme: str  # "http" or "https" (TLS to the proxy itself)
    host: str
    port: int
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)  # never in a log line

    @property
    def authorization(self) -> Optional[str]:
        """The C{Proxy-Authorization} value, or None without credentials."""
        if self.username is None:
            return None
        secret = f"{self.username}:{self.password or ''}".encode("utf-8")
        return "Basic " + base64.b64encode(secret).decode("ascii")

    def __str__(self) -> str:  # never the password
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"


def parse_proxy_url(url: str) -> ProxySettings:
    """
    Parse an C{HTTPS_PROXY} value.

    @raise ConfigError: for another scheme, no host, or a bad port.
    """
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"HTTPS_PROXY: unsupported protocol {parts.scheme!r} (use http:// or https://)")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"HTTPS_PROXY: bad port in {url!r}") from None
    if not parts.hostname:
        raise ConfigError(f"HTTPS_PROXY: no host in {url!r}")
    return ProxySettings(
        scheme=scheme,
        host=parts.hostname,
        port=port or DEFAULT_PROXY_PORT,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def proxy_from_environment(environ: Mapping[str, str]) -> Optional[ProxySettings]:
    """The web proxy named by C{https_proxy} (first) or C{HTTPS_PROXY}, if any."""
    for name in ("https_proxy", "HTTPS_PROXY"):
        value = environ.get(name)
        if value:
            return parse_proxy_url(value)
    return None


class _ConnectProtocol(Protocol):
    """Sends CONNECT, waits for the answer, then hands the connection to the real protocol."""

    def __init__(self, request: bytes, factory: IProtocolFactory, connected: Deferred) -> None:
        self._request = request
        self._factory = factory
        self._connected: Optional[Deferred] = connected
        self._head = b""
        self._wrapped: Optional[IProtocol] = None

    @property
    def _tcp(self) -> ITCPTransport:
        """The connection to the web proxy (TCP, or TLS over it): connected while this is called."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        self._tcp.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._wrapped is not None:
            self._wrapped.dataReceived(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_RESPONSE_HEAD:
                self._fail(HTTPProxyError("the web proxy's answer to CONNECT has no end of headers"))
            return
        status_line = self._head.split(b"\r\n", 1)[0].decode("latin-1")
        rest = self._head[end + 4 :]
        self._head = b""
        fields = status_line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            self._fail(HTTPProxyError(f"bad answer from the web proxy: {status_line!r}"))
            return
        status = int(fields[1])
        if not 200 <= status < 300:
            hint = {
                407: " (proxy authentication required: put USER:PASSWORD@ in HTTPS_PROXY)",
                403: " (the proxy forbids this destination or port)",
            }.get(status, "")
            self._fail(HTTPProxyError(f"HTTP CONNECT request failed with response code: {status_line}{hint}"))
            return
        if self._connected is None or self._connected.called:  # cancelled meanwhile
            self._tcp.abortConnection()
            return
        wrapped = self._factory.buildProtocol(self._tcp.getPeer())
        if wrapped is None:
            self._fail(HTTPProxyError("the protocol factory refused the connection"))
            return
        self._wrapped = wrapped
        wrapped.makeConnection(self._tcp)
        connected, self._connected = self._connected, None
        assert connected is not None
        connected.callback(wrapped)
        if rest:
            wrapped.dataReceived(rest)

    def _fail(self, error: Exception) -> None:
        connected, self._connected = self._connected, None
        self._tcp.loseConnection()
        if connected is not None and not connected.called:
            connected.errback(Failure(error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._wrapped is not None:
            self._wrapped.connectionLost(reason)
        elif self._connected is not None and not self._connected.called:
            connected, self._connected = self._connected, None
            connected.errback(
                Failure(HTTPProxyError(f"the web proxy closed the connection before answering CONNECT: {reason.getErrorMessage()}"))
            )


@implementer(IStreamClientEndpoint)
class HTTPConnectEndpoint:
    """
    Connects to C{host:port} through a web proxy reached by C{proxy_endpoint}.

    @param authorization: the C{Proxy-Authorization} value, or None.
    """

    def __init__(
        self, proxy_endpoint: IStreamClientEndpoint, host: str, port: int, authorization: Optional[str] = None
    ) -> None:
        self._proxy_endpoint = proxy_endpoint
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if authorization:
            lines.append(f"Proxy-Authorization: {authorization}")
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        """Connect through the proxy; the Deferred fires with C{protocolFactory}'s protocol."""
        to_proxy: List[_ConnectProtocol] = []

        def cancel(d: Deferred) -> None:
            attempt.cancel()  # still reaching the proxy
            if to_proxy and to_proxy[0].transport is not None:
                to_proxy[0]._tcp.abortConnection()  # waiting for the CONNECT answer

        connected: Deferred = Deferred(cancel)
        attempt = self._proxy_endpoint.connect(_ConnectFactory(self._request, protocolFactory, connected))
        attempt.addCallbacks(to_proxy.append, lambda f: None if connected.called else connected.errback(f))
        return connected


class _ConnectFactory(Factory):
    """Builds the one L{_ConnectProtocol} of an attempt."""

    noisy = False

    def __init__(self, request: bytes, factory: IProtocolFactory, connected: Deferred) -> None:
        self._request = request
        self._factory = factory
        self._connected = connected

    def buildProtocol(self, addr: object) -> Protocol:
        return _ConnectProtocol(self._request, self._factory, self._connected)
