"""Tests of tunnelkit.transport.httpproxy: HTTPS_PROXY parsing and the CONNECT endpoint."""

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tunnelkit.errors import ConfigError
from tunnelkit.transport.httpproxy import (
    HTTPConnectEndpoint,
    HTTPProxyError,
    parse_proxy_url,
    proxy_from_environment,
)


class ParseTests(TestCase):
    def test_forms(self):
        p = parse_proxy_url("http://proxy.test")
        self.assertEqual((p.scheme, p.host, p.port, p.authorization), ("http", "proxy.test", 3128, None))
        p = parse_proxy_url("https://u%3Ax:pw@[::1]:8080/")
        self.assertEqual((p.scheme, p.host, p.port, p.username, p.password), ("https", "::1", 8080, "u:x", "pw"))
        self.assertEqual(p.authorization, "Basic dTp4OnB3")
        self.assertNotIn("pw", str(p))
        self.assertNotIn("pw", repr(p))
        self.assertEqual(parse_proxy_url("proxy.test:3129").port, 3129)

    def test_errors(self):
        for url in ["socks5://p.test", "http://", "http://p.test:99999"]:
            with self.assertRaises(ConfigError, msg=url):
                parse_proxy_url(url)

    def test_environment_precedence(self):
        self.assertIsNone(proxy_from_environment({}))
        both = {"HTTPS_PROXY": "http://upper.test", "https_proxy": "http://lower.test"}
        self.assertEqual(proxy_from_environment(both).host, "lower.test")
        self.assertEqual(proxy_from_environment({"HTTPS_PROXY": "http://upper.test"}).host, "upper.test")


class Recorder(Protocol):
    def __init__(self):
        self.data = b""
        self.lost = None

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


class ConnectTests(TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        to_proxy = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 3128)
        self.endpoint = HTTPConnectEndpoint(to_proxy, "service.test", 443, "Basic dTpw")
        self.recorder = Recorder()
        self.connected = self.endpoint.connect(Factory.forProtocol(lambda: self.recorder))
        host, port, factory, timeout, bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 3128))
        self.proxy_side = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proxy_side.makeConnection(self.transport)

    def test_interface(self):
        verifyObject(IStreamClientEndpoint, self.endpoint)

    def test_request(self):
        self.assertEqual(
            self.transport.value(),
            b"CONNECT service.test:443 HTTP/1.1\r\nHost: service.test:443\r\n"
            b"Proxy-Authorization: Basic dTpw\r\n\r\n",
        )

    def test_success_hands_over(self):
        self.proxy_side.dataReceived(b"HTTP/1.1 200 Connection established\r\nX: y\r\n")
        self.assertNoResult(self.connected)
        self.proxy_side.dataReceived(b"\r\nearly bytes")
        self.assertIs(self.successResultOf(self.connected), self.recorder)
        self.assertEqual(self.recorder.data, b"early bytes")
        self.proxy_side.dataReceived(b" and more")
        self.assertEqual(self.recorder.data, b"early bytes and more")
        self.transport.clear()
        self.recorder.transport.write(b"out")
        self.assertEqual(self.transport.value(), b"out")

    def test_refused(self):
        self.proxy_side.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        failure = self.failureResultOf(self.connected, HTTPProxyError)
        self.assertIn("407", str(failure.value))
        self.assertIn("HTTPS_PROXY", str(failure.value))
        self.assertTrue(self.transport.disconnecting)

    def test_garbage(self):
        self.proxy_side.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.failureResultOf(self.connected, HTTPProxyError)

    def test_closed_before_answer(self):
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.proxy_side.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.connected, HTTPProxyError)

    def test_no_auth_header_without_credentials(self):
        endpoint = HTTPConnectEndpoint(TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1), "::1", 8443)
        endpoint.connect(Factory.forProtocol(Recorder))
        proto = self.reactor.tcpClients[-1][2].buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n")

    def test_wraps_with_tls(self):
        from tunnelkit.transport.stdtls import TLSClientEndpoint
        from tunnelkit.transport.tls import client_context

        verifyObject(IStreamClientEndpoint, TLSClientEndpoint(self.endpoint, client_context(), "service.test"))


class CancelTests(TestCase):
    def test_cancel_while_waiting_for_the_answer(self):
        from twisted.internet.defer import CancelledError

        reactor = MemoryReactorClock()
        endpoint = HTTPConnectEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", 3128), "service.test", 443)
        connected = endpoint.connect(Factory.forProtocol(Recorder))
        proxy_side = reactor.tcpClients[0][2].buildProtocol(None)
        transport = StringTransport()
        proxy_side.makeConnection(transport)
        connected.cancel()
        self.failureResultOf(connected, CancelledError)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        proxy_side.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")  # too late: nothing breaks

    def test_cancel_while_reaching_the_proxy(self):
        from twisted.internet.defer import CancelledError

        reactor = MemoryReactorClock()
        endpoint = HTTPConnectEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", 3128), "service.test", 443)
        from twisted.internet.error import ConnectingCancelledError

        connected = endpoint.connect(Factory.forProtocol(Recorder))
        connected.cancel()
        self.failureResultOf(connected, CancelledError, ConnectingCancelledError)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
