# -*- test-case-name: tests.test_tls -*-
"""
Client TLS for the local proxy's WebSocket: TLS 1.2 or newer, certificate chain and host name checked
(pyOpenSSL + service-identity, through Twisted's L{optionsForClientTLS}); and the protocol rules the
service's TLS listeners share with the clients (L{restrict_context}).

Cipher suites: TLS 1.3 as OpenSSL offers it (all AEAD); TLS 1.2 only with ECDHE key exchange and an
AEAD cipher (AES-GCM, ChaCha20-Poly1305): L{TLS12_CIPHERS}.  The CBC suites with SHA-1 MACs that
Twisted's defaults still allow (C{ECDHE-ECDSA-AES256-SHA}, ...) are never negotiated.  AWS's data
plane endpoints offer ECDHE-GCM suites, so clients lose nothing by this.

Trust comes from, in order:
  - C{-c/--capath FILE}: the CA certificates in a PEM file;
  - C{-c/--capath DIR}: an OpenSSL hashed directory (C{openssl rehash DIR}), looked up lazily by OpenSSL;
  - otherwise the platform's trust store (OpenSSL's defaults, so C{SSL_CERT_FILE}/C{SSL_CERT_DIR} work).

C{-k/--no-ssl-host-verify} turns every check off (the proxy prints a loud warning): the connection is
then encrypted but anyone on the path can read it.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IAcceptableCiphers, IOpenSSLClientConnectionCreator
from zope.interface import implementer

from tunnelkit.errors import ConfigError

__all__ = [
    "client_tls_options",
    "pinned_client_tls",
    "pem_certificates",
    "restrict_context",
    "NO_VERIFY_WARNING",
    "MINIMUM_TLS",
    "TLS12_CIPHERS",
]

#: The oldest TLS version the local proxy and the service speak.
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2

#: The TLS 1.2 suites offered and accepted (OpenSSL cipher-list syntax): ECDHE with AEAD only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP"


def _acceptable_ciphers() -> IAcceptableCiphers:
    return ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS)


def restrict_context(context: SSL.Context) -> None:
    """
    Hold an OpenSSL context (a listener's, whoever built it) to L{MINIMUM_TLS} and, for TLS 1.2,
    to L{TLS12_CIPHERS}; and have its connections free their read and write buffers while idle
    (C{SSL_MODE_RELEASE_BUFFERS}: ~17-33 KB a connection).  Twisted's C{CertificateOptions} sets
    that mode already (this makes it hold for any context); each connection takes the context's
    mode when it is made.
    """
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)

NO_VERIFY_WARNING = """\
!!! SECURITY WARNING: -k/--no-ssl-host-verify is set !!!
The service's TLS certificate and host name are NOT checked.  Anyone able to intercept the
connection can impersonate the tunnel service, read the access token and every byte of the tunnel.
Use it only for a test service; give the service's CA with -c/--capath instead."""


def _trust_root(capath: Optional[str]) -> Any:
    """
    The trust root C{optionsForClientTLS(trustRoot=...)} takes: the platform's CAs, or every CA of a
    PEM file, or of a hashed directory (C{openssl rehash}) read at start (Twisted's public
    L{ssl.trustRootFromCertificates}).
    """
    if capath is None:
        return ssl.platformTrust()
    if os.path.isdir(capath):
        hashed = sorted(name for name in os.listdir(capath) if _is_hash_name(name))
        if not hashed:
            raise ConfigError(
                f"-c/--capath {capath}: no hashed CA files in the directory "
                f"(run 'openssl rehash {capath}', or give a CA file)"
            )
        certificates = []
        for name in hashed:
            certificates += _read_certificates(capath, os.path.join(capath, name))
        return ssl.trustRootFromCertificates(certificates)
    if os.path.isfile(capath):
        certificates = _read_certificates(capath, capath)
        if not certificates:
            raise ConfigError(f"-c/--capath {capath}: no PEM certificate in the file")
        return ssl.trustRootFromCertificates(certificates)
    raise ConfigError(f"-c/--capath {capath}: no such file or directory")


def _read_certificates(capath: str, path: str) -> List[ssl.Certificate]:
    try:
        with open(path, "rb") as f:
            return pem_certificates(f.read())
    except (OSError, SSL.Error, ValueError) as e:
        raise ConfigError(f"-c/--capath {capath}: not a readable PEM CA file ({path}): {e}") from None


def _is_hash_name(name: str) -> bool:
    stem, dot, suffix = name.partition(".")
    return len(stem) == 8 and dot == "." and suffix.isdigit() and all(c in "0123456789abcdef" for c in stem)


def pem_certificates(pem: bytes) -> List[ssl.Certificate]:
    """Every certificate of a PEM bundle, in order (none if it has no C{BEGIN CERTIFICATE})."""
    marker = b"-----BEGIN CERTIFICATE-----"
    certificates = []
    for chunk in pem.split(marker)[1:]:
        certificates.append(ssl.Certificate.loadPEM(marker + chunk))
    return certificates


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TLS 1.2+ with SNI but no certificate check at all (C{-k})."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self._context = ssl.CertificateOptions(
            verify=False, raiseMinimumTo=MINIMUM_TLS, acceptableCiphers=_acceptable_ciphers()
        ).getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not (isIPAddress(self._hostname) or isIPv6Address(self._hostname)):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedClientTLS:
    """
    TLS 1.2+ to a server known to present exactly one certificate (the service connecting to its own
    listener): the leaf must be that certificate, byte for byte; chain and names are not looked at.
    """

    def __init__(self, certificate_der: bytes) -> None:
        self._pinned = certificate_der
        self._context = ssl.CertificateOptions(
            verify=False, raiseMinimumTo=MINIMUM_TLS, acceptableCiphers=_acceptable_ciphers()
        ).getContext()
        self._context.set_verify(SSL.VERIFY_PEER, self._verify)

    def _verify(self, connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True  # whatever signed it: the leaf itself is compared below
        return bool(crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate) == self._pinned)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection


def pinned_client_tls(certificate_der: bytes) -> IOpenSSLClientConnectionCreator:
    """
    The connection creator for a TLS connection to a server that must present exactly
    C{certificate_der} (DER): used by the service to reach its own listener, whatever CA signed the
    listener's certificate and whatever names it carries.
    """
    return _PinnedClientTLS(certificate_der)


def client_tls_options(
    hostname: str, capath: Optional[str] = None, verify: bool = True
) -> IOpenSSLClientConnectionCreator:
    """
    The connection creator for a TLS connection to C{hostname} (a DNS name or an IP address; the
    certificate needs a matching DNS or IP subject alternative name).

    @param capath: a PEM CA file or an OpenSSL hashed CA directory; None for the platform's store.
    @param verify: False only for C{-k}: no chain or host name check.
    @raise ConfigError: if C{capath} is unusable.
    """
    if not verify:
        return _UnverifiedClientTLS(hostname)
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=_trust_root(capath),
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS, "acceptableCiphers": _acceptable_ciphers()},
    )
