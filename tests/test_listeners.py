"""Tests of tunnelkit.service.listeners: the service's listening endpoints from endpoint strings."""

import os
import ssl

from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import TestCase

from tunnelkit.errors import ConfigError
from tunnelkit.service.certs import ensure_certificates
from tunnelkit.service.listeners import is_tls, listen_description, listener_endpoint, names_certificate
from tunnelkit.transport.stdtls import TLSFactory, TLSServerEndpoint


class ListenerEndpointTests(TestCase):
    def setUp(self):
        self.certs = ensure_certificates(os.path.abspath(self.mktemp()), [])
        self.reactor = MemoryReactor()

    def _ssl(self, text=""):
        return listen_description(f"ssl:0:interface=127.0.0.1{text}", self.certs)

    def test_plain_endpoints_are_twisteds(self):
        endpoint, certificate = listener_endpoint(self.reactor, "tcp:0:interface=127.0.0.1")
        self.assertIsInstance(endpoint, endpoints.TCP4ServerEndpoint)
        self.assertIsNone(certificate)
        self.assertFalse(is_tls("tcp:0"))

    def test_ssl_is_served_by_stdtls(self):
        """An ssl: endpoint listens on TCP with the stdlib TLS factory; its certificate is given."""
        description = self._ssl(":backlog=7")
        self.assertTrue(is_tls(description) and names_certificate(description))
        endpoint, certificate = listener_endpoint(self.reactor, description)
        self.assertIsInstance(endpoint, TLSServerEndpoint)
        with open(self.certs.server_cert) as f:
            self.assertEqual(certificate, ssl.PEM_cert_to_DER_cert(f.read()))
        endpoint.listen(Factory.forProtocol(Protocol))
        port, factory, backlog, interface = self.reactor.tcpServers[0]
        self.assertEqual((port, backlog, interface), (0, 7, "127.0.0.1"))
        self.assertIsInstance(factory, TLSFactory)
        self.assertTrue(factory.server_side)

    def test_ipv6_and_port_keyword(self):
        endpoint, _ = listener_endpoint(self.reactor, listen_description("ssl:port=0:interface=\\:\\:1", self.certs))
        self.assertIsInstance(endpoint.endpoint, endpoints.TCP6ServerEndpoint)

    def test_certificate_in_the_key_file(self):
        """certKey defaults to privateKey, as in Twisted: one PEM file holding both."""
        combined = os.path.abspath(self.mktemp())
        with open(combined, "wb") as out:
            for path in (self.certs.server_cert, self.certs.server_key):
                with open(path, "rb") as f:
                    out.write(f.read())
        endpoint, certificate = listener_endpoint(self.reactor, f"ssl:0:privateKey={combined}")
        self.assertIsNotNone(certificate)

    def test_bad_descriptions(self):
        for text, expected in [
            (self._ssl(":sslmethod=TLSv1_METHOD"), "sslmethod is not supported"),
            (self._ssl(":colour=blue"), "unknown option 'colour'"),
            (listen_description("ssl:http", self.certs), "must be numbers"),
            (listen_description("ssl:70000", self.certs), "out of range"),
            (listen_description("ssl:0:0", self.certs), "expected ssl:PORT"),
            ("ssl:0:privateKey=/nonexistent.pem", "no such file: /nonexistent.pem"),
        ]:
            with self.assertRaises(ConfigError, msg=text) as caught:
                listener_endpoint(self.reactor, text)
            self.assertIn(expected, str(caught.exception), text)

    def test_pyopenssl_is_twisteds_tls(self):
        """--tls-library pyopenssl, and the cluster's listener (RFC 5705 exporter needed): Twisted's TLS, held to the same rules."""
        from OpenSSL import SSL

        endpoint, certificate = listener_endpoint(self.reactor, self._ssl(), library="pyopenssl")
        self.assertIsInstance(endpoint, endpoints.SSL4ServerEndpoint)
        self.assertIsNotNone(certificate)
        endpoint.listen(Factory.forProtocol(Protocol))
        port, factory, options, backlog, interface = self.reactor.sslServers[0]
        names = SSL.Connection(options.getContext(), None).get_cipher_list()
        self.assertTrue(all(name.startswith(("TLS_", "ECDHE-")) for name in names), names)

    def test_pyopenssl_offers_post_quantum_key_exchange(self):
        """Why --tls-library pyopenssl exists: pyOpenSSL's own OpenSSL negotiates X25519MLKEM768."""
        from OpenSSL import SSL
        from twisted.trial.unittest import SkipTest

        from tunnelkit.service.listeners import _twisted_options

        server = SSL.Connection(_twisted_options(self.certs.server_cert, self.certs.server_key, None).getContext(), None)
        client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        if not hasattr(client, "get_group_name"):
            raise SkipTest("this pyOpenSSL cannot name the key exchange group")
        server.set_accept_state()
        client.set_connect_state()
        for _ in range(4):
            for sender, receiver in ((client, server), (server, client)):
                try:
                    sender.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    receiver.bio_write(sender.bio_read(65536))
                except SSL.WantReadError:
                    pass
        version = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).split()[1].decode()
        if tuple(int(part) for part in version.split(".")[:2]) < (3, 5):
            raise SkipTest(f"pyOpenSSL's OpenSSL {version} has no ML-KEM")
        self.assertEqual(client.get_group_name(), "X25519MLKEM768")
