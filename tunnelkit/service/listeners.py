# -*- test-case-name: tests.test_listeners -*-
"""
The service's listening endpoints (C{--listen}, C{--cluster-listen}) from Twisted endpoint strings.

An C{ssl:} description keeps Twisted's syntax (C{ssl:PORT:interface=...:privateKey=KEY.pem:
certKey=CERT.pem:extraCertChain=CHAIN.pem:backlog=N}); its TLS is the data path's own
(L{tunnelkit.transport.stdtls} over L{tunnelkit.transport.tls.server_context}: TLS 1.2+, AEAD
suites only), not Twisted's.  Any other description (C{tcp:}, C{unix:}, ...) is Twisted's, as
C{serverFromString} builds it.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamServerEndpoint

from tunnelkit.errors import ConfigError
from tunnelkit.internals import parse_endpoint_description
from tunnelkit.transport.stdtls import TLSServerEndpoint
from tunnelkit.transport.tls import certificate_der, check_tls_library, server_context

__all__ = ["listen_description", "listener_endpoint", "is_tls", "names_certificate"]

#: The keys of Twisted's C{ssl:} server endpoint strings that are taken here.
_SSL_KEYS = frozenset({"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain", "dhParameters"})


def is_tls(description: str) -> bool:
    """Whether an endpoint string is an C{ssl:} one (TLS served by the service itself)."""
    return description.split(":", 1)[0].lower() == "ssl"


def names_certificate(description: str) -> bool:
    """Whether an endpoint string names a certificate or key file of its own."""
    return any(f":{key}=" in description or description.startswith(f"{key}=") for key in ("privateKey", "certKey"))


def listen_description(description: str, certificates: Any) -> str:
    """C{description}, with the generated certificate (C{certificates}: ServiceCertificates) added to an C{ssl:} endpoint that names none."""
    if is_tls(description) and not names_certificate(description):
        return (
            f"{description}:privateKey={endpoints.quoteStringArgument(certificates.server_key)}"
            f":certKey={endpoints.quoteStringArgument(certificates.server_cert)}"
        )
    return description


def listener_endpoint(
    reactor: Any, description: str, library: str = "stdlib"
) -> Tuple[IStreamServerEndpoint, Optional[bytes]]:
    """
    The endpoint C{description} names, and the certificate (DER) it presents: None without TLS.

    @param library: C{stdlib} (L{tunnelkit.transport.stdtls}), or C{pyopenssl}: Twisted's TLS,
        whose OpenSSL is pyOpenSSL's own (post-quantum key exchange where the system's OpenSSL
        lacks it: C{--tls-library}) and whose connections export keying material (RFC 5705: the
        cluster's channel binding, which the standard library's C{ssl} cannot give).  Both hold
        TLS to the same rules.

    @raise ConfigError: for an C{ssl:} description with an unknown or unsupported key, a bad port or
        backlog, or certificate files that cannot be used.
    """
    if not is_tls(description):
        return endpoints.serverFromString(reactor, description), None
    args, kwargs = parse_endpoint_description(description)
    positional = args[1:]
    if len(positional) > 1:
        raise ConfigError(f"{description!r}: expected ssl:PORT followed by key=value options")
    if positional:
        if "port" in kwargs:
            raise ConfigError(f"{description!r}: the port is given twice")
        kwargs["port"] = positional[0]
    unknown = sorted(set(kwargs) - _SSL_KEYS)
    if "sslmethod" in unknown:
        raise ConfigError(f"{description!r}: sslmethod is not supported (the service speaks TLS 1.2 and 1.3)")
    if unknown:
        raise ConfigError(f"{description!r}: unknown option {unknown[0]!r} for an ssl: endpoint")
    try:
        port = int(kwargs.get("port", ""))
        backlog = int(kwargs.get("backlog", 50))
    except ValueError:
        raise ConfigError(f"{description!r}: the port and backlog must be numbers") from None
    if not 0 <= port <= 65535 or backlog < 1:
        raise ConfigError(f"{description!r}: port {port} or backlog {backlog} is out of range")
    key = kwargs.get("privateKey", "server.pem")
    certificate = kwargs.get("certKey", key)
    # dhParameters: accepted as Twisted's ssl: endpoint does, and without effect: no DHE suite is offered.
    chain = kwargs.get("extraCertChain")
    context = server_context(certificate, key, chain)  # checks the files in every case
    interface = kwargs.get("interface", "")
    if check_tls_library(library) == "pyopenssl":
        return (
            endpoints.SSL4ServerEndpoint(reactor, port, _twisted_options(certificate, key, chain), backlog, interface),
            certificate_der(certificate),
        )
    tcp: IStreamServerEndpoint
    if ":" in interface:
        tcp = endpoints.TCP6ServerEndpoint(reactor, port, backlog, interface)
    else:
        tcp = endpoints.TCP4ServerEndpoint(reactor, port, backlog, interface)
    return TLSServerEndpoint(tcp, context), certificate_der(certificate)


def _twisted_options(certificate_file: str, key_file: str, chain_file: Optional[str]) -> Any:
    """Twisted's TLS options for the same files (already checked by L{server_context}), same rules."""
    from twisted.internet import ssl as twisted_ssl

    from tunnelkit.transport.tls import pem_certificates, restrict_context

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    private = twisted_ssl.PrivateCertificate.loadPEM(read(certificate_file) + b"\n" + read(key_file))
    extra = [c.original for c in pem_certificates(read(chain_file))] if chain_file is not None else None
    options = twisted_ssl.CertificateOptions(
        privateKey=private.privateKey.original, certificate=private.original, extraCertChain=extra
    )
    restrict_context(options.getContext())
    return options
