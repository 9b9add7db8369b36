# -*- test-case-name: tests.test_localproxy_options -*-
"""
Where the tunnel service is, and how to reach it: C{-e/--proxy-endpoint}, C{-r/--region}, C{-c},
C{-k} and C{HTTPS_PROXY} turned into one client endpoint for the WebSocket.

C{-e} takes C{HOST[:PORT]} (port 443, TLS) like AWS's localproxy, or a URL: C{wss://HOST[:PORT]}
(default port 443) or, for tests and trusted networks only, C{ws://HOST[:PORT]} (default port 80,
no TLS).  C{-r REGION} means C{data.tunneling.iot.REGION.amazonaws.com} (C{.com.cn} for C{cn-*}).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple
from urllib.parse import urlsplit

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

from tunnelkit.errors import ConfigError
from tunnelkit.localproxy.mapping import HOST_NAME_RE
from tunnelkit.protocol.notification import REGION_RE
from tunnelkit.transport.httpproxy import HTTPConnectEndpoint, ProxySettings
from tunnelkit.transport.stdtls import SessionCache, TLSClientEndpoint
from tunnelkit.transport.tls import client_context, pyopenssl_client_options
from tunnelkit.transport.websocket import tunnel_url

__all__ = ["ServiceEndpoint", "parse_proxy_endpoint", "region_host"]

#: Seconds a TCP connection attempt to the service (or web proxy) may take.
CONNECT_TIMEOUT = 30


def region_host(region: str) -> str:
    """The AWS data-plane host of C{region}."""
    if not REGION_RE.match(region):
        raise ConfigError(f"-r/--region {region!r}: expected a region name like us-east-1")
    suffix = ".amazonaws.com.cn" if region.startswith("cn-") else ".amazonaws.com"
    return f"data.tunneling.iot.{region}{suffix}"


def parse_proxy_endpoint(text: str) -> Tuple[str, int, bool]:
    """
    C{-e}'s value -> (host, port, secure).

    @raise ConfigError: for another scheme, a path, or a bad host or port.
    """
    value = text.strip()
    secure = True
    default_port = 443
    if "://" in value:
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if scheme not in ("ws", "wss"):
            raise ConfigError(f"-e/--proxy-endpoint {text!r}: use HOST[:PORT], wss://HOST[:PORT] or ws://HOST[:PORT]")
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"-e/--proxy-endpoint {text!r}: give no path (the proxy uses /tunnel)")
        secure = scheme == "wss"
        default_port = 443 if secure else 80
        host = parts.hostname or ""
        try:
            port = parts.port or default_port
        except ValueError:
            raise ConfigError(f"-e/--proxy-endpoint {text!r}: bad port") from None
    else:
        if value.startswith("["):
            host, sep, rest = value[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ConfigError(f"-e/--proxy-endpoint {text!r}: expected [IPV6]:PORT")
            port_text = rest[1:]
        elif value.count(":") == 1:
            host, _, port_text = value.partition(":")
        else:
            host, port_text = value, ""
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ConfigError(f"-e/--proxy-endpoint {text!r}: bad port {port_text!r}")
            port = int(port_text)
        else:
            port = default_port
    host = host.lower()
    if not host or not (HOST_NAME_RE.match(host) or ":" in host):
        raise ConfigError(f"-e/--proxy-endpoint {text!r}: bad host name")
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:  # '8443' or '127.0.1': not a name, and not an address either
            raise ConfigError(
                f"-e/--proxy-endpoint {text!r}: {host!r} is neither a host name nor an IPv4 address; "
                f"give HOST:PORT (e.g. 127.0.0.1:8443)"
            ) from None
    return host, port, secure


@dataclass(frozen=True)
class ServiceEndpoint:
    """The tunnel service's data plane and how to reach it."""

    host: str
    port: int
    secure: bool = True
    capath: Optional[str] = None
    verify: bool = True
    web_proxy: Optional[ProxySettings] = None
    #: C{--tls-library}: C{stdlib} (L{tunnelkit.transport.stdtls}) or C{pyopenssl} (Twisted's TLS).
    tls_library: str = "stdlib"
    #: TLS sessions to resume when connecting again (stdlib TLS): one cache per proxy.
    sessions: SessionCache = field(default_factory=SessionCache, compare=False, repr=False)

    def url(self, mode: str) -> str:
        """The WebSocket URL for C{mode} (C{source}|C{destination})."""
        return tunnel_url(self.secure, self.host, self.port, mode)

    def check(self) -> None:
        """Fail now (L{ConfigError}) if the TLS settings are unusable, instead of at each attempt."""
        if self.secure:
            self._tls_settings(self.host, self.capath)

    def _tls_settings(self, host: str, capath: Optional[str]) -> Any:
        """What TLS to C{host} needs with the library C{--tls-library} chose (a context or Twisted's options)."""
        if self.tls_library == "pyopenssl":
            return pyopenssl_client_options(host, capath, self.verify)
        return client_context(capath, self.verify)

    def _with_tls(self, endpoint: IStreamClientEndpoint, host: str, capath: Optional[str]) -> IStreamClientEndpoint:
        """C{endpoint} wrapped in TLS to C{host}."""
        settings = self._tls_settings(host, capath)
        if self.tls_library == "pyopenssl":
            return wrapClientTLS(settings, endpoint)
        return TLSClientEndpoint(endpoint, settings, host, self.sessions)

    def client_endpoint(self, reactor: Any) -> IStreamClientEndpoint:
        """A fresh client endpoint: TCP (through the web proxy, if any), then TLS for C{wss}."""
        endpoint: IStreamClientEndpoint
        if self.web_proxy is None:
            endpoint = HostnameEndpoint(reactor, self.host.encode("idna"), self.port, timeout=CONNECT_TIMEOUT)
        else:
            proxy = self.web_proxy
            to_proxy: IStreamClientEndpoint = HostnameEndpoint(
                reactor, proxy.host.encode("idna"), proxy.port, timeout=CONNECT_TIMEOUT
            )
            if proxy.scheme == "https":
                to_proxy = self._with_tls(to_proxy, proxy.host, None)
            endpoint = HTTPConnectEndpoint(to_proxy, self.host, self.port, proxy.authorization)
        if self.secure:
            endpoint = self._with_tls(endpoint, self.host, self.capath)
        return endpoint

    def __str__(self) -> str:
        return self.url("source").split("/tunnel", 1)[0]
