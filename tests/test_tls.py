"""
Tests of tunnelkit.transport.tls: real TLS handshakes in memory (iosim) against certificates made
by the service's own generator.
"""

import os
import shutil
import subprocess

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunnelkit.errors import ConfigError
from tunnelkit.service.certs import ensure_certificates
from tunnelkit.transport.tls import client_tls_options, restrict_context


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


def _handshake(creator, server_options):
    server_factory = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(Protocol))
    recorder = _Recorder()
    client_factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: recorder))
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

    def test_interface(self):
        verifyObject(IOpenSSLClientConnectionCreator, client_tls_options("localhost", self.good.ca_cert))
        verifyObject(IOpenSSLClientConnectionCreator, client_tls_options("localhost", verify=False))

    def test_ca_file_and_names(self):
        for host in ["localhost", "127.0.0.1", "service.test", "::1"]:
            client = _handshake(client_tls_options(host, self.good.ca_cert), _server_options(self.good))
            self.assertTrue(client.handshake_done, host)
            self.assertIsNone(client.lost, host)

    def test_wrong_host_name(self):
        client = _handshake(client_tls_options("other.test", self.good.ca_cert), _server_options(self.good))
        self.assertFalse(client.handshake_done)
        self.assertIsNotNone(client.lost)

    def test_untrusted_ca(self):
        client = _handshake(client_tls_options("localhost", self.other.ca_cert), _server_options(self.good))
        self.assertFalse(client.handshake_done)
        self.assertTrue(client.lost.check(SSL.Error), client.lost)

    def test_no_verify_accepts_anything(self):
        client = _handshake(client_tls_options("other.test", verify=False), _server_options(self.good))
        self.assertTrue(client.handshake_done)

    def test_hashed_directory(self):
        if shutil.which("openssl") is None:
            raise SkipTest("no openssl command to hash the directory")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        shutil.copy(self.good.ca_cert, os.path.join(directory, "ca.pem"))
        subprocess.run(["openssl", "rehash", directory], check=True, capture_output=True)
        client = _handshake(client_tls_options("localhost", directory), _server_options(self.good))
        self.assertTrue(client.handshake_done)

    def test_unhashed_directory_is_an_error(self):
        directory = self.mktemp()
        os.makedirs(directory)
        shutil.copy(self.good.ca_cert, os.path.join(directory, "ca.pem"))
        with self.assertRaises(ConfigError) as caught:
            client_tls_options("localhost", directory)
        self.assertIn("openssl rehash", str(caught.exception))

    def test_not_pem(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate")
        with self.assertRaises(ConfigError):
            client_tls_options("localhost", path)

    def test_tls_1_2_server(self):
        client = _handshake(
            client_tls_options("localhost", self.good.ca_cert),
            _server_options(self.good, maximum=ssl.TLSVersion.TLSv1_2),
        )
        self.assertTrue(client.handshake_done)

    def test_refuses_tls_1_1(self):
        client = _handshake(
            client_tls_options("localhost", self.good.ca_cert),
            _server_options(self.good, maximum=ssl.TLSVersion.TLSv1_1),
        )
        self.assertFalse(client.handshake_done)

    def test_refuses_a_cbc_sha1_server(self):
        """A TLS 1.2 server that offers only CBC suites with SHA-1 gets no handshake, with or without -k."""
        server = _server_options(self.good, maximum=ssl.TLSVersion.TLSv1_2)
        server.getContext().set_cipher_list(b"ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
        for creator in (client_tls_options("localhost", self.good.ca_cert), client_tls_options("localhost", verify=False)):
            self.assertFalse(_handshake(creator, server).handshake_done)

    def test_aead_server(self):
        server = _server_options(self.good, maximum=ssl.TLSVersion.TLSv1_2)
        server.getContext().set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256")
        self.assertTrue(_handshake(client_tls_options("localhost", self.good.ca_cert), server).handshake_done)


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
