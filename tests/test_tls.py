"""
Tests of tunnelkit.transport.tls: real TLS handshakes in memory (iosim) of the local proxy's client
context (the standard library's ssl, driven by tunnelkit.transport.stdtls) against servers of
Twisted's own TLS (pyOpenSSL, so that the old and new stacks meet), with certificates made by the
service's own generator.
"""

import os
import shutil
import subprocess

from OpenSSL import SSL
from twisted.internet import ssl
import ssl as stdlib_ssl

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from tunnelkit.errors import ConfigError
from tunnelkit.service.certs import ensure_certificates
from tunnelkit.transport.stdtls import TLSFactory
from tunnelkit.transport.tls import client_context, restrict_context, server_context


@implementer(IHandshakeListener)
class _Recorder(Protocol):
    def __init__(self):
        self.handshake_done = False
        self.lost = None

    def handshakeCompleted(self):
        self.handshake_done = True

    def connectionLost(self, reason):
        self.lost = reason


def _server_options(paths, maximum=None):
    with open(paths.server_cert, "rb") as f:
        cert = f.read()
    with open(paths.server_key, "rb") as f:
        key = f.read()
    private = ssl.PrivateCertificate.loadPEM(cert + key)
    if maximum is None:
        return private.options()
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0,
        lowerMaximumSecurityTo=maximum,
    )


def _handshake(client, server_options):
    """C{client}: (host, context) of the local proxy's TLS; the server is Twisted's TLS."""
    host, context = client
    server_factory = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(Protocol))
    recorder = _Recorder()
    client_factory = TLSFactory(context, Factory.forProtocol(lambda: recorder), server_side=False, hostname=host)
    server, client, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
    )
    for _ in range(20):
        pump.pump()
    return recorder


_material = {}


def _certificates():
    if not _material:
        base = os.path.abspath("tls-material")
        _material["good"] = ensure_certificates(os.path.join(base, "good"), ["service.test"])
        _material["other"] = ensure_certificates(os.path.join(base, "other"), [])
    return _material["good"], _material["other"]


class ClientTLSTests(TestCase):
    def setUp(self):
        self.good, self.other = _certificates()

    def test_contexts(self):
        """TLS 1.2 at least, checked chain and names; -k checks nothing; one context per CA file."""
        checked = client_context(self.good.ca_cert)
        self.assertEqual(checked.minimum_version, stdlib_ssl.TLSVersion.TLSv1_2)
        self.assertTrue(checked.check_hostname)
        self.assertEqual(checked.verify_mode, stdlib_ssl.CERT_REQUIRED)
        self.assertTrue(checked.options & stdlib_ssl.OP_NO_RENEGOTIATION)
        self.assertIs(client_context(self.good.ca_cert), checked)
        unchecked = client_context(verify=False)
        self.assertFalse(unchecked.check_hostname)
        self.assertEqual(unchecked.verify_mode, stdlib_ssl.CERT_NONE)

    def test_ca_file_and_names(self):
        for host in ["localhost", "127.0.0.1", "service.test", "::1"]:
            client = _handshake((host, client_context(self.good.ca_cert)), _server_options(self.good))
            self.assertTrue(client.handshake_done, host)
            self.assertIsNone(client.lost, host)

    def test_wrong_host_name(self):
        client = _handshake(("other.test", client_context(self.good.ca_cert)), _server_options(self.good))
        self.assertFalse(client.handshake_done)
        self.assertTrue(client.lost.check(stdlib_ssl.SSLError), client.lost)
        self.assertIn("Hostname mismatch", client.lost.getErrorMessage())

    def test_untrusted_ca(self):
        client = _handshake(("localhost", client_context(self.other.ca_cert)), _server_options(self.good))
        self.assertFalse(client.handshake_done)
        self.assertTrue(client.lost.check(stdlib_ssl.SSLError), client.lost)
        self.assertIn("certificate verify failed", client.lost.getErrorMessage())

    def test_no_verify_accepts_anything(self):
        client = _handshake(("other.test", client_context(verify=False)), _server_options(self.good))
        self.assertTrue(client.handshake_done)

    def test_hashed_directory(self):
        if shutil.which("openssl") is None:
            raise SkipTest("no openssl command to hash the directory")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        shutil.copy(self.good.ca_cert, os.path.join(directory, "ca.pem"))
        subprocess.run(["openssl", "rehash", directory], check=True, capture_output=True)
        client = _handshake(("localhost", client_context(directory)), _server_options(self.good))
        self.assertTrue(client.handshake_done)

    def test_unhashed_directory_is_an_error(self):
        directory = self.mktemp()
        os.makedirs(directory)
        shutil.copy(self.good.ca_cert, os.path.join(directory, "ca.pem"))
        with self.assertRaises(ConfigError) as caught:
            client_context(directory)
        self.assertIn("openssl rehash", str(caught.exception))

    def test_not_pem(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate")
        with self.assertRaises(ConfigError):
            client_context(path)

    def test_tls_1_2_server(self):
        client = _handshake(
            ("localhost", client_context(self.good.ca_cert)),
            _server_options(self.good, maximum=ssl.TLSVersion.TLSv1_2),
        )
        self.assertTrue(client.handshake_done)

    def test_refuses_tls_1_1(self):
        client = _handshake(
            ("localhost", client_context(self.good.ca_cert)),
            _server_options(self.good, maximum=ssl.TLSVersion.TLSv1_1),
        )
        self.assertFalse(client.handshake_done)

    def test_refuses_a_cbc_sha1_server(self):
        """A TLS 1.2 server that offers only CBC suites with SHA-1 gets no handshake, with or without -k."""
        server = _server_options(self.good, maximum=ssl.TLSVersion.TLSv1_2)
        server.getContext().set_cipher_list(b"ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
        for creator in (("localhost", client_context(self.good.ca_cert)), ("localhost", client_context(verify=False))):
            self.assertFalse(_handshake(creator, server).handshake_done)

    def test_aead_server(self):
        server = _server_options(self.good, maximum=ssl.TLSVersion.TLSv1_2)
        server.getContext().set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertTrue(_handshake(("localhost", client_context(self.good.ca_cert)), server).handshake_done)


class RestrictContextTests(TestCase):
    def test_cipher_list(self):
        """A restricted context offers ECDHE-AEAD suites (and TLS 1.3's) only."""
        good, _ = _certificates()
        context = _server_options(good).getContext()
        restrict_context(context)
        self.assertTrue(context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)  # set_mode(0) returns the mode
        names = SSL.Connection(context, None).get_cipher_list()
        bare = SSL.Context(SSL.TLS_METHOD)
        restrict_context(bare)
        self.assertTrue(bare.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)
        self.assertIn("ECDHE-ECDSA-AES128-GCM-SHA256", names)
        self.assertIn("ECDHE-ECDSA-CHACHA20-POLY1305", names)
        for name in names:
            self.assertTrue(name.startswith("TLS_") or ("GCM" in name or "CHACHA20" in name), name)
            self.assertTrue(name.startswith(("TLS_", "ECDHE-")), name)


class ServerContextTests(TestCase):
    """The service listeners' context (standard library ssl) against Twisted's TLS client."""

    def setUp(self):
        self.good, self.other = _certificates()

    def _handshake(self, context, client_options):
        from tunnelkit.transport.stdtls import TLSFactory

        server_factory = TLSFactory(context, Factory.forProtocol(Protocol), server_side=True)
        recorder = _Recorder()
        client_factory = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(lambda: recorder))
        connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
        )[2].flush()
        return recorder

    def _trust(self, paths):
        with open(paths.ca_cert, "rb") as f:
            return ssl.Certificate.loadPEM(f.read())

    def test_generated_certificate(self):
        context = server_context(self.good.server_cert, self.good.server_key)
        self.assertEqual(context.minimum_version, stdlib_ssl.TLSVersion.TLSv1_2)
        self.assertTrue(context.options & stdlib_ssl.OP_NO_RENEGOTIATION)
        for host in ["localhost", "service.test", "127.0.0.1"]:
            client = self._handshake(context, ssl.optionsForClientTLS(host, trustRoot=self._trust(self.good)))
            self.assertTrue(client.handshake_done, host)

    def test_tls_1_1_client_refused(self):
        context = server_context(self.good.server_cert, self.good.server_key)
        old = ssl.CertificateOptions(
            insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0, lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_1
        )
        self.assertFalse(self._handshake(context, old).handshake_done)

    def test_only_aead_suites_for_tls_1_2(self):
        names = [cipher["name"] for cipher in server_context(self.good.server_cert, self.good.server_key).get_ciphers()]
        self.assertIn("ECDHE-ECDSA-AES128-GCM-SHA256", names)
        for name in names:
            self.assertTrue(name.startswith("TLS_") or ("GCM" in name or "CHACHA20" in name), name)
            self.assertTrue(name.startswith(("TLS_", "ECDHE-")), name)

    def test_missing_file(self):
        with self.assertRaises(ConfigError) as caught:
            server_context(self.good.server_cert, "/nonexistent/key.pem")
        self.assertIn("/nonexistent/key.pem", str(caught.exception))

    def test_key_of_another_certificate(self):
        with self.assertRaises(ConfigError) as caught:
            server_context(self.good.server_cert, self.other.server_key)
        self.assertIn("not a PEM certificate and its private key", str(caught.exception))

    def test_not_pem(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate")
        with self.assertRaises(ConfigError):
            server_context(path, self.good.server_key)

    def test_extra_chain(self):
        """extraCertChain's certificates follow the leaf: a client trusting the CA still verifies."""
        context = server_context(self.good.server_cert, self.good.server_key, self.good.ca_cert)
        client = self._handshake(context, ssl.optionsForClientTLS("localhost", trustRoot=self._trust(self.good)))
        self.assertTrue(client.handshake_done)
        with self.assertRaises(ConfigError):
            server_context(self.good.server_cert, self.good.server_key, self.good.server_key)

    def test_certificate_der(self):
        from tunnelkit.transport.tls import certificate_der

        with open(self.good.server_cert) as f:
            pem = f.read()
        self.assertEqual(certificate_der(self.good.server_cert), stdlib_ssl.PEM_cert_to_DER_cert(pem))
        with self.assertRaises(ConfigError):
            certificate_der(self.good.server_key)


class PyOpenSSLClientTests(TestCase):
    """--tls-library pyopenssl: Twisted's TLS client against the service's stdlib listener context."""

    def setUp(self):
        self.good, self.other = _certificates()

    def _handshake(self, creator):
        from tunnelkit.transport.stdtls import TLSFactory

        context = server_context(self.good.server_cert, self.good.server_key)
        server_factory = TLSFactory(context, Factory.forProtocol(Protocol), server_side=True)
        recorder = _Recorder()
        client_factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: recorder))
        connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
        )[2].flush()
        return recorder

    def test_checked(self):
        from tunnelkit.transport.tls import pyopenssl_client_options

        self.assertTrue(self._handshake(pyopenssl_client_options("localhost", self.good.ca_cert)).handshake_done)
        self.assertFalse(self._handshake(pyopenssl_client_options("other.test", self.good.ca_cert)).handshake_done)
        untrusted = self._handshake(pyopenssl_client_options("localhost", self.other.ca_cert))
        self.assertFalse(untrusted.handshake_done)
        self.assertTrue(untrusted.lost.check(SSL.Error), untrusted.lost)

    def test_no_verify(self):
        from tunnelkit.transport.tls import pyopenssl_client_options

        self.assertTrue(self._handshake(pyopenssl_client_options("other.test", verify=False)).handshake_done)

    def test_bad_ca(self):
        from tunnelkit.transport.tls import pyopenssl_client_options

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate")
        with self.assertRaises(ConfigError):
            pyopenssl_client_options("localhost", path)

    def test_library_names(self):
        from tunnelkit.transport.tls import check_tls_library

        self.assertEqual(check_tls_library("pyopenssl"), "pyopenssl")
        with self.assertRaises(ConfigError) as caught:
            check_tls_library("gnutls")
        self.assertIn("stdlib or pyopenssl", str(caught.exception))
