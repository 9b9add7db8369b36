"""
Tests of tunnelkit.transport.stdtls: TLS (the standard library's ssl over memory BIOs) between two
of its connections, and against garbage, in memory (iosim, StringTransport): what the application
protocols on either side see.
"""

import os
import ssl

from hypothesis import given, settings
from hypothesis import strategies as st

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tunnelkit.service.certs import ensure_certificates
from tunnelkit.transport.stdtls import WRITE_SLICE, ITLSConnection, TLSConnection, TLSFactory, is_encrypted
from tunnelkit.transport.tls import client_context, server_context

_material = {}


def _paths():
    if not _material:
        base = os.path.abspath("stdtls-material")
        _material["good"] = ensure_certificates(os.path.join(base, "good"), ["service.test"])
        _material["other"] = ensure_certificates(os.path.join(base, "other"), [])
    return _material["good"], _material["other"]


@implementer(IHandshakeListener)
class App(Protocol):
    """Records what the application above the TLS layer sees."""

    def __init__(self, greeting=b""):
        self.greeting = greeting
        self.received = []
        self.lost = None
        self.handshakes = 0

    def connectionMade(self):
        if self.greeting:
            self.transport.write(self.greeting)

    def handshakeCompleted(self):
        self.handshakes += 1

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost = reason

    @property
    def data(self):
        return b"".join(self.received)


class Pair:
    """A stdlib TLS server and client, connected in memory."""

    def __init__(self, server_app, client_app, host="service.test", ca=None, greet=True):
        good, _ = _paths()
        server_ctx = server_context(good.server_cert, good.server_key)
        client_ctx = client_context(ca or good.ca_cert)
        self.server_app, self.client_app = server_app, client_app
        server_factory = TLSFactory(server_ctx, Factory.forProtocol(lambda: server_app), server_side=True)
        client_factory = TLSFactory(client_ctx, Factory.forProtocol(lambda: client_app), server_side=False, hostname=host)
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), greet=greet
        )

    def flush(self):
        self.pump.flush()


class ConnectionTests(TestCase):
    def test_data_both_ways(self):
        """What each side writes, before the handshake too, arrives; each sees the handshake once."""
        pair = Pair(App(b"hello client"), App(b"hello server"))
        pair.flush()
        self.assertEqual(pair.server_app.data, b"hello server")
        self.assertEqual(pair.client_app.data, b"hello client")
        self.assertEqual((pair.server_app.handshakes, pair.client_app.handshakes), (1, 1))
        pair.client_app.transport.write(b"more")
        pair.client_app.transport.writeSequence([b" and", b" more"])
        pair.flush()
        self.assertEqual(pair.server_app.data, b"hello servermore and more")
        self.assertIsNone(pair.server_app.lost)
        self.assertIsNone(pair.client_app.lost)

    def test_interfaces_and_peer(self):
        pair = Pair(App(), App())
        pair.flush()
        client = pair.client_app.transport
        self.assertIsInstance(client, TLSConnection)
        self.assertTrue(ITLSConnection.providedBy(client))
        self.assertFalse(ISSLTransport.providedBy(client))  # autobahn would read pyOpenSSL's handle
        self.assertTrue(is_encrypted(pair.server_app.transport))
        self.assertFalse(is_encrypted(pair.server.transport))
        good, _ = _paths()
        with open(good.server_cert) as f:
            self.assertEqual(client.getPeerCertificate(), ssl.PEM_cert_to_DER_cert(f.read()))
        self.assertIsNone(pair.server_app.transport.getPeerCertificate())  # no client certificate
        self.assertIn(client.version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(client.cipher, pair.server_app.transport.cipher)
        self.assertIs(type(client.getPeer()), type(pair.client.transport.getPeer()))

    def test_held_until_handshake(self):
        """Writes before the handshake are counted as buffered, then sent."""
        client = App()
        pair = Pair(App(), client, greet=False)
        client.transport.write(b"early")
        self.assertEqual(client.transport.buffered(), 5)
        from tunnelkit.transport.fastpath import transport_buffered

        self.assertEqual(transport_buffered(client.transport), 5)  # the relay's accounting sees it
        pair.flush()
        self.assertEqual(client.transport.buffered(), 0)
        self.assertEqual(pair.server_app.data, b"early")

    def test_large_write(self):
        """A write of several slices arrives whole and in order."""
        pair = Pair(App(), App())
        pair.flush()
        payload = os.urandom(3 * WRITE_SLICE + 123)
        pair.client_app.transport.write(payload)
        pair.flush()
        self.assertEqual(pair.server_app.data, payload)

    def test_clean_close(self):
        """loseConnection: close_notify each way, and both applications see a clean end."""
        pair = Pair(App(), App())
        pair.flush()
        pair.client_app.transport.write(b"last words")
        pair.client_app.transport.loseConnection()
        pair.client_app.transport.write(b"ignored")
        pair.flush()
        self.assertEqual(pair.server_app.data, b"last words")
        self.assertTrue(pair.server_app.lost.check(ConnectionDone), pair.server_app.lost)
        self.assertTrue(pair.client_app.lost.check(ConnectionDone), pair.client_app.lost)

    def test_close_before_handshake_sends_what_was_written(self):
        client = App(b"request")
        pair = Pair(App(), client, greet=False)
        client.transport.loseConnection()
        pair.flush()
        self.assertEqual(pair.server_app.data, b"request")
        self.assertTrue(pair.server_app.lost.check(ConnectionDone), pair.server_app.lost)
        self.assertTrue(client.lost.check(ConnectionDone), client.lost)

    def test_tcp_end_without_close_notify(self):
        """The TCP connection ending under an open TLS connection: ConnectionLost, not a clean end."""
        pair = Pair(App(), App())
        pair.flush()
        pair.client.transport.loseConnection()  # under the TLS layer
        pair.flush()
        self.assertTrue(pair.server_app.lost.check(ConnectionLost), pair.server_app.lost)
        self.assertIn("without close_notify", pair.server_app.lost.getErrorMessage())

    def test_abort(self):
        """abortConnection resets the TCP connection under it at once: no close_notify."""
        pair = Pair(App(), App())
        pair.flush()
        pair.client_app.transport.abortConnection()
        self.assertTrue(pair.client.transport.disconnecting)
        self.assertEqual(pair.client.transport.stream, [])  # nothing more was written
        pair.flush()
        self.assertTrue(pair.server_app.lost.check(ConnectionLost), pair.server_app.lost)

    def test_untrusted_certificate(self):
        """The client refuses; its application learns why; the server's sees the TLS failure."""
        _, other = _paths()
        pair = Pair(App(), App(b"secret"), ca=other.ca_cert)
        pair.flush()
        self.assertEqual(pair.server_app.data, b"")
        self.assertTrue(pair.client_app.lost.check(ssl.SSLError), pair.client_app.lost)
        self.assertIn("certificate verify failed", pair.client_app.lost.getErrorMessage())
        self.assertTrue(pair.server_app.lost.check(ssl.SSLError), pair.server_app.lost)
        self.assertEqual(pair.client_app.handshakes, 0)

    def test_wrong_name(self):
        pair = Pair(App(), App(), host="other.test")
        pair.flush()
        self.assertIn("Hostname mismatch", pair.client_app.lost.getErrorMessage())


class GarbageTests(TestCase):
    def _server(self):
        good, _ = _paths()
        app = App()
        factory = TLSFactory(server_context(good.server_cert, good.server_key), Factory.forProtocol(lambda: app), server_side=True)
        connection = factory.buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        return app, connection, transport

    def test_plain_http_to_a_tls_port(self):
        """Not TLS: the connection ends, the application sees the TLS error; nothing delivered."""
        app, connection, transport = self._server()
        connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        connection.dataReceived(b"more")  # ignored after the failure
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(app.lost.check(ssl.SSLError), app.lost)
        self.assertEqual(app.received, [])

    def test_producer_calls_reach_tcp(self):
        """Pausing the TLS transport pauses the TCP one (flow control stays TCP's)."""
        app, connection, transport = self._server()
        app.transport.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        app.transport.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_write_after_loss_is_dropped(self):
        app, connection, transport = self._server()
        connection.connectionLost(Failure(ConnectionDone()))
        app.transport.write(b"late")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(app.lost.check(ConnectionLost), app.lost)  # no TLS close happened


class FuzzTests(TestCase):
    """Whatever a client sends a TLS listener, nothing escapes: the connection waits or ends."""

    def test_garbage_and_cut_handshakes(self):
        good, _ = _paths()
        context = server_context(good.server_cert, good.server_key)
        # A real ClientHello to cut and flip: what a client context writes first.
        hello_side = client_context(good.ca_cert).wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x")
        try:
            hello_side.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = outgoing.read()

        @settings(max_examples=200, deadline=None, derandomize=True)
        @given(
            st.one_of(
                st.binary(max_size=4096),
                st.tuples(st.integers(0, len(hello)), st.integers(0, 255), st.integers(0, len(hello) - 1)).map(
                    lambda t: hello[: t[0]] if t[1] == 0 else hello[: t[2]] + bytes([t[1]]) + hello[t[2] + 1 :]
                ),
            ),
            st.integers(1, 7),
        )
        def check(data, pieces):
            app = App()
            factory = TLSFactory(context, Factory.forProtocol(lambda: app), server_side=True)
            connection = factory.buildProtocol(None)
            transport = StringTransport()
            connection.makeConnection(transport)
            step = max(1, len(data) // pieces)
            for start in range(0, len(data), step):
                connection.dataReceived(data[start : start + step])
            self.assertEqual(app.received, [])  # no handshake: no application bytes
            connection.connectionLost(Failure(ConnectionDone()))
            self.assertIsNotNone(app.lost)
            self.assertFalse(app.lost.check(ConnectionDone), app.lost)  # never a clean end

        check()


class ResumptionTests(TestCase):
    """A client with a SessionCache resumes its last session when it connects again."""

    def _connect(self, sessions, host="service.test"):
        good, _ = _paths()
        server_app, client_app = App(), App(b"ping")
        server_factory = TLSFactory(
            self.server_context, Factory.forProtocol(lambda: server_app), server_side=True
        )
        client_factory = TLSFactory(
            client_context(good.ca_cert), Factory.forProtocol(lambda: client_app), server_side=False,
            hostname=host, sessions=sessions,
        )
        client, server, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
        )
        server_app.transport.write(b"pong")  # the ticket is kept when the client reads after the handshake
        pump.flush()
        self.assertEqual((server_app.data, client_app.data), (b"ping", b"pong"))
        return client_app.transport

    def setUp(self):
        good, _ = _paths()
        self.server_context = server_context(good.server_cert, good.server_key)

    def test_resumes_then_keeps_the_new_ticket(self):
        from tunnelkit.transport.stdtls import SessionCache

        sessions = SessionCache()
        first = self._connect(sessions)
        self.assertFalse(first.resumed)
        self.assertEqual(len(sessions), 1)
        for _ in range(3):  # each resumed connection leaves a new ticket for the next
            again = self._connect(sessions)
            self.assertTrue(again.resumed)
            self.assertEqual(len(sessions), 1)

    def test_per_name_and_without_cache(self):
        from tunnelkit.transport.stdtls import SessionCache

        sessions = SessionCache()
        self._connect(sessions)
        self.assertFalse(self._connect(sessions, host="localhost").resumed)  # another name: full handshake
        self.assertFalse(self._connect(None).resumed)
