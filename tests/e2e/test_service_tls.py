"""
The service's TLS listener with real handshakes: TLS 1.2 only with ECDHE-AEAD suites (the CBC-SHA1
suites are refused), TLS 1.3 as OpenSSL offers it, nothing older than TLS 1.2.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Optional

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e.test_service_inprocess import start_service


def handshake(port: int, ciphers: Optional[str], version: ssl.TLSVersion) -> str:
    """Handshake with the listener offering only C{ciphers} at C{version}; the negotiated suite."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = version
    context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers + ":@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            cipher = tls.cipher()
            assert cipher is not None
            return cipher[0]


class ServiceTLSTests(TestCase):
    timeout = 60
    library = "stdlib"

    @inlineCallbacks
    def setUp(self) -> Any:
        self.service = yield start_service(self, "--tls-library", self.library)
        port = self.service.listeners[0].port
        assert port is not None
        self.port = port.getHost().port

    def test_library(self) -> None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from tunnelkit.transport.stdtls import TLSFactory

        port = self.service.listeners[0].port
        expected = TLSFactory if self.library == "stdlib" else TLSMemoryBIOFactory
        self.assertIsInstance(port.factory, expected)  # type: ignore[union-attr]

    def attempt(self, ciphers: Optional[str], version: ssl.TLSVersion) -> Any:
        return deferToThread(handshake, self.port, ciphers, version)

    @inlineCallbacks
    def test_cbc_sha1_suites_refused(self) -> Any:
        for suite in ("ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256"):
            with self.subTest(suite=suite):
                yield self.assertFailure(self.attempt(suite, ssl.TLSVersion.TLSv1_2), ssl.SSLError)

    @inlineCallbacks
    def test_aead_suites_accepted(self) -> Any:
        for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
            negotiated = yield self.attempt(suite, ssl.TLSVersion.TLSv1_2)
            self.assertEqual(negotiated, suite)

    @inlineCallbacks
    def test_tls13_as_before(self) -> Any:
        negotiated = yield self.attempt(None, ssl.TLSVersion.TLSv1_3)
        self.assertTrue(negotiated.startswith("TLS_"), negotiated)

    @inlineCallbacks
    def test_nothing_older_than_tls12(self) -> Any:
        try:
            yield self.attempt("DEFAULT", ssl.TLSVersion.TLSv1_1)
        except (ssl.SSLError, OSError):
            return
        self.fail("a TLS 1.1 handshake succeeded")


class PyOpenSSLServiceTLSTests(ServiceTLSTests):
    """The same rules with --tls-library pyopenssl (Twisted's TLS)."""

    library = "pyopenssl"
