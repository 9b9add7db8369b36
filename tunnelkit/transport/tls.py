# -*- test-case-name: tests.test_tls -*-
"""
TLS settings: the data path's contexts (the standard library's C{ssl}, driven by
L{tunnelkit.transport.stdtls}): the local proxy's client context (L{client_context}: TLS 1.2 or
newer, certificate chain and host name checked) and the service's listeners' (L{server_context});
and, for the control plane's connections that Twisted's own TLS carries (pyOpenSSL: the console's
terminal to its own listener, a cluster node to another, MQTT), the same protocol rules
(L{restrict_context}, L{pinned_client_tls}, L{pem_certificates}).

Cipher suites: TLS 1.3 as OpenSSL offers it (all AEAD); TLS 1.2 only with ECDHE key exchange and an
AEAD cipher (AES-GCM, ChaCha20-Poly1305): L{TLS12_CIPHERS}.  The CBC suites with SHA-1 MACs that
Twisted's defaults still allow (C{ECDHE-ECDSA-AES256-SHA}, ...) are never negotiated.  AWS's data
plane endpoints offer ECDHE-GCM suites, so clients lose nothing by this.  Renegotiation is refused.

Key exchange groups are the defaults of the OpenSSL that Python's C{ssl} module is built with: on
OpenSSL 3.5 or newer they include the post-quantum hybrid X25519MLKEM768; Debian 12's OpenSSL 3.0
offers X25519 and the NIST curves only.

Trust comes from, in order:
  - C{-c/--capath FILE}: the CA certificates in a PEM file;
  - C{-c/--capath DIR}: an OpenSSL hashed directory (C{openssl rehash DIR}), looked up lazily by OpenSSL;
  - otherwise the platform's trust store (OpenSSL's defaults, so C{SSL_CERT_FILE}/C{SSL_CERT_DIR} work).

C{-k/--no-ssl-host-verify} turns every check off (the proxy prints a loud warning): the connection is
then encrypted but anyone on the path can read it.
"""

from __future__ import annotations

import os
import ssl as stdlib_ssl
from typing import Any, Dict, List, Optional, Tuple

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IAcceptableCiphers, IOpenSSLClientConnectionCreator
from zope.interface import implementer

from tunnelkit.errors import ConfigError

__all__ = [
    "TLS_LIBRARIES",
    "check_tls_library",
    "pyopenssl_client_options",
    "client_context",
    "server_context",
    "certificate_der",
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


#: The TLS libraries the data path can run on: the standard library's C{ssl} (the default: less CPU
#: and memory per connection) or pyOpenSSL through Twisted (its wheel bundles its own OpenSSL, 3.5+,
#: with the post-quantum hybrid key exchange X25519MLKEM768 where the system's OpenSSL, which the
#: standard library uses, is older: Debian 12's 3.0).
TLS_LIBRARIES = ("stdlib", "pyopenssl")


def check_tls_library(value: str) -> str:
    """C{--tls-library}'s value, checked."""
    if value not in TLS_LIBRARIES:
        raise ConfigError(f"--tls-library {value!r}: choose {' or '.join(TLS_LIBRARIES)}")
    return value


def _stdlib_context(purpose: int) -> stdlib_ssl.SSLContext:
    """A context of the standard library's C{ssl}, held to the rules above."""
    context = stdlib_ssl.SSLContext(purpose)
    context.minimum_version = stdlib_ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= stdlib_ssl.OP_NO_RENEGOTIATION | stdlib_ssl.OP_NO_COMPRESSION
    return context


def _source_stamp(capath: Optional[str]) -> Tuple[Optional[str], int]:
    try:
        return capath, os.stat(capath).st_mtime_ns if capath is not None else 0
    except OSError:
        return capath, -1


_client_contexts: Dict[Tuple[Optional[str], int, bool], stdlib_ssl.SSLContext] = {}


def client_context(capath: Optional[str] = None, verify: bool = True) -> stdlib_ssl.SSLContext:
    """
    The client context (standard library C{ssl}) for the connection to the tunnel service: the
    chain checked against C{capath} (a PEM CA file or an OpenSSL hashed CA directory; None for the
    platform's store) and the host name against the certificate's DNS or IP subject alternative
    names (give the name as C{server_hostname} when wrapping).  C{verify=False} only for C{-k}: no
    chain or host name check.  Contexts are kept per C{capath} while the file or directory is
    unchanged (loading the platform's store takes milliseconds: not for every reconnection).

    @raise ConfigError: if C{capath} is unusable.
    """
    key = (*_source_stamp(capath), verify)
    context = _client_contexts.get(key)
    if context is not None:
        return context
    context = _stdlib_context(stdlib_ssl.PROTOCOL_TLS_CLIENT)
    if not verify:
        context.check_hostname = False
        context.verify_mode = stdlib_ssl.CERT_NONE
    elif capath is None:
        context.load_default_certs()
    elif os.path.isdir(capath):
        if not any(_is_hash_name(name) for name in os.listdir(capath)):
            raise ConfigError(
                f"-c/--capath {capath}: no hashed CA files in the directory "
                f"(run 'openssl rehash {capath}', or give a CA file)"
            )
        context.load_verify_locations(capath=capath)
    elif os.path.isfile(capath):
        try:
            with open(capath, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ConfigError(f"-c/--capath {capath}: cannot read the CA file: {e.strerror}") from None
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ConfigError(f"-c/--capath {capath}: no PEM certificate in the file")
        try:
            context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
        except (stdlib_ssl.SSLError, ValueError) as e:
            raise ConfigError(f"-c/--capath {capath}: not a readable PEM CA file: {e}") from None
    else:
        raise ConfigError(f"-c/--capath {capath}: no such file or directory")
    if len(_client_contexts) > 16:
        _client_contexts.clear()
    _client_contexts[key] = context
    return context


def server_context(certificate_file: str, key_file: str, chain_file: Optional[str] = None) -> stdlib_ssl.SSLContext:
    """
    The context (standard library C{ssl}) of a service listener presenting the certificate of
    C{certificate_file} (PEM; certificates after the first in it, and those of C{chain_file}, are
    sent as its chain) with the private key of C{key_file} (PEM).

    @raise ConfigError: if a file is missing, not PEM, or the key does not match the certificate.
    """
    for path in (certificate_file, key_file, chain_file):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"TLS listener: no such file: {path}")
    context = _stdlib_context(stdlib_ssl.PROTOCOL_TLS_SERVER)
    context.options |= stdlib_ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        if chain_file is None:
            context.load_cert_chain(certificate_file, key_file)
        else:
            _load_with_chain(context, certificate_file, key_file, chain_file)
    except OSError as e:
        if isinstance(e, stdlib_ssl.SSLError):
            raise ConfigError(
                f"TLS listener: certificate {certificate_file} and key {key_file} are not a PEM "
                f"certificate and its private key ({e.reason or e})"
            ) from None
        raise ConfigError(f"TLS listener: cannot read {e.filename or certificate_file}: {e.strerror}") from None
    return context


def _load_with_chain(context: stdlib_ssl.SSLContext, certificate_file: str, key_file: str, chain_file: str) -> None:
    """C{load_cert_chain} with C{chain_file}'s certificates after the leaf (the stdlib reads files only)."""
    import tempfile

    with open(certificate_file, "rb") as f:
        leaf = f.read()
    with open(chain_file, "rb") as f:
        chain = f.read()
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise ConfigError(f"TLS listener: extraCertChain {chain_file}: no PEM certificate in the file")
    with tempfile.TemporaryDirectory(prefix="tunnelkit-tls-") as directory:
        combined = os.path.join(directory, "chain.pem")
        with open(combined, "wb") as f:
            f.write(leaf.rstrip(b"\n") + b"\n" + chain)
        context.load_cert_chain(combined, key_file)


def certificate_der(certificate_file: str) -> bytes:
    """The first certificate of a PEM file, DER-encoded (what a listener presents)."""
    with open(certificate_file, "rb") as f:
        pem = f.read()
    begin = pem.find(b"-----BEGIN CERTIFICATE-----")
    end = pem.find(b"-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ConfigError(f"TLS listener: {certificate_file}: no PEM certificate in the file")
    return stdlib_ssl.PEM_cert_to_DER_cert(pem[begin : end + 25].decode("ascii"))


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


def _trust_root(capath: Optional[str]) -> Any:
    """
    The trust root C{optionsForClientTLS(trustRoot=...)} takes: the platform's CAs, or every CA of a
    PEM file, or of a hashed directory (C{openssl rehash}), read at start.
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


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TLS 1.2+ with SNI but no certificate check at all (C{-k}), for Twisted's TLS."""

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


def pyopenssl_client_options(
    hostname: str, capath: Optional[str] = None, verify: bool = True
) -> IOpenSSLClientConnectionCreator:
    """
    What L{client_context} is for the standard library, for Twisted's TLS (C{--tls-library
    pyopenssl}): the connection creator for TLS to C{hostname}, checked against C{capath} (or the
    platform's store) with service-identity, or not at all with C{verify=False} (C{-k}).

    @raise ConfigError: if C{capath} is unusable.
    """
    if not verify:
        return _UnverifiedClientTLS(hostname)
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=_trust_root(capath),
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS, "acceptableCiphers": _acceptable_ciphers()},
    )
