"""
The local proxy's reconnection, deterministically: LocalProxySession's ClientService connects
through an in-memory endpoint (iosim) to an autobahn test service, on an injected clock.
"""

import txaio
import txaio.testutil
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tunnelkit.localproxy.endpoint import ServiceEndpoint
from tunnelkit.localproxy.session_service import LocalProxySession, _ReportingEndpoint
from tunnelkit.localproxy.source import SourceSide
from tunnelkit.protocol.framing import Message, encode_message
from tunnelkit.transport.httpproxy import ProxySettings
from tunnelkit.transport.websocket import SUBPROTOCOL

txaio.use_twisted()

TOKEN = "source-access-token"
CLIENT_TOKEN = "0f0e0d0c-0b0a-4909-8807-060504030201"


class TestService(WebSocketServerProtocol):
    def onConnect(self, request):
        self.factory.requests.append(request)
        self.factory.connections.append(self)
        answer = self.factory.answers.pop(0) if self.factory.answers else SUBPROTOCOL
        if isinstance(answer, ConnectionDeny):
            raise answer
        return answer

    def onOpen(self):
        frame = encode_message(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH1"]))
        self.sendMessage(frame, isBinary=True)


@implementer(IStreamClientEndpoint)
class InMemoryEndpoint:
    """Each connect() pairs a new client protocol with a new TestService over iosim."""

    def __init__(self, server_factory, clock):
        self.server_factory = server_factory
        self.clock = clock
        self.pumps = []

    def connect(self, factory):
        client = factory.buildProtocol(None)
        server = self.server_factory.buildProtocol(None)
        client_transport, server_transport = makeFakeClient(client), makeFakeServer(server)
        self.pumps.append(connect(server, server_transport, client, client_transport, greet=False, clock=self.clock))
        return succeed(client)

    def flush(self):
        for pump in self.pumps:
            pump.flush()


class Endpoint(ServiceEndpoint):
    def client_endpoint(self, reactor):
        return reactor.test_endpoint


class ReconnectTests(TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        loop = txaio.testutil.replace_loop(self.reactor)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.service = WebSocketServerFactory("ws://127.0.0.1:9")
        self.service.protocol = TestService
        self.service.requests, self.service.connections, self.service.answers = [], [], []
        self.endpoint = self.reactor.test_endpoint = InMemoryEndpoint(self.service, self.reactor)
        self.side = SourceSide({"SSH1": 5555}, "127.0.0.1", self.reactor)
        self.proxy = LocalProxySession(
            self.side, Endpoint("127.0.0.1", 9, secure=False), TOKEN, CLIENT_TOKEN, self.reactor, self.reactor,
            retry_policy=lambda attempt: 2.0,
        )
        self.addCleanup(self.stop)

    def start(self, *answers):
        """Start the proxy; the service answers its upgrades with C{answers}, then accepts."""
        self.service.answers = list(answers)
        self.proxy.startService()

    def stop(self):
        if self.proxy.running:
            self.proxy.stopService()
        self.endpoint.flush()

    def test_reconnects_with_the_same_tokens_and_keeps_listeners(self):
        self.start()
        self.endpoint.flush()
        self.assertEqual(len(self.service.requests), 1)
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.service.connections[0].dropConnection(abort=True)
        self.endpoint.flush()
        self.reactor.advance(1.9)
        self.assertEqual(len(self.service.requests), 1)
        self.reactor.advance(0.1)
        self.endpoint.flush()
        self.assertEqual(len(self.service.requests), 2)
        for request in self.service.requests:
            self.assertEqual((request.headers["access-token"], request.headers["client-token"]), (TOKEN, CLIENT_TOKEN))
        self.assertTrue(self.proxy.session.ready)
        self.assertEqual(len(self.reactor.tcpServers), 1)  # the listener stayed
        self.assertIsNone(self.proxy.end)

    def settle(self, seconds=1.0):
        """Let autobahn's drop timers run and the bytes flow."""
        self.endpoint.flush()
        self.reactor.advance(seconds)
        self.endpoint.flush()

    def test_5xx_retries(self):
        self.start(ConnectionDeny(503, "Service Unavailable"))
        self.settle()
        self.assertEqual(len(self.service.requests), 1)
        self.assertIsNone(self.proxy.end)
        self.reactor.advance(2.0)
        self.endpoint.flush()
        self.assertEqual(len(self.service.requests), 2)
        self.assertTrue(self.proxy.session.ready)

    def test_4xx_ends_without_retrying(self):
        self.start(ConnectionDeny(403, "Forbidden"))
        self.settle()
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)
        self.assertIn("403", end.message)
        self.reactor.advance(60)
        self.endpoint.flush()
        self.assertEqual(len(self.service.requests), 1)
        self.assertFalse(self.proxy.running)
        self.assertNotIn("client token", end.message)

    def test_401_says_how_to_get_a_usable_token(self):
        self.start(ConnectionDeny(401, "Invalid access token"))
        self.settle()
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)
        self.assertIn("-i/--client-token", end.message)
        self.assertIn("rotate-tunnel-access-token", end.message)

    def test_401_unknown_token_says_to_check_it(self):
        self.start(ConnectionDeny(401, "Invalid access token: the access token is not valid for any tunnel"))
        self.settle()
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)
        self.assertIn("is it this service's token, whole, of a tunnel not deleted?", end.message)
        self.assertNotIn("-i/--client-token", end.message)

    def test_401_rotated_token_adds_nothing(self):
        self.start(ConnectionDeny(401, "Invalid access token: the access token was revoked by RotateTunnelAccessToken"))
        self.settle()
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)
        self.assertNotIn("-i/--client-token", end.message)

    def test_close_1000_ends_with_status_0(self):
        self.start()
        self.endpoint.flush()
        self.service.connections[0].sendClose(1000, "Tunnel closed")
        self.endpoint.flush()
        self.reactor.advance(5)
        self.endpoint.flush()
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 0)
        self.assertIn("Code: 1000; Reason: Tunnel closed", end.message)
        self.reactor.advance(60)
        self.endpoint.flush()
        self.assertEqual(len(self.service.requests), 1)
        self.assertEqual(self.side.listeners, {})  # closed with the session


@implementer(IStreamClientEndpoint)
class RefusingEndpoint:
    def connect(self, factory):
        return fail(ConnectionRefusedError("Connection refused"))


class ReportingEndpointTests(TestCase):
    def test_refused_connection_says_what_to_check(self):
        """Nothing listening at -e: the reason, and to check that the service runs there."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        url = "wss://127.0.0.1:9/tunnel?local-proxy-mode=source"
        d = _ReportingEndpoint(RefusingEndpoint(), url).connect(None)
        self.failureResultOf(d, ConnectionRefusedError)
        (event,) = [e for e in logged if e.get("log_format", "").startswith("Could not connect to proxy server")]
        self.assertEqual(event["url"], url)
        self.assertIn("Connection refused", event["error"])
        self.assertIn("check -e/--proxy-endpoint", event["hint"])

    def test_refused_web_proxy_named(self):
        """With HTTPS_PROXY the refusal may be the web proxy's: name it (never its credentials)."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        web_proxy = ProxySettings("http", "127.0.0.1", 3128, "user", "s3cret")
        d = _ReportingEndpoint(RefusingEndpoint(), "wss://127.0.0.1:9/tunnel", web_proxy).connect(None)
        self.failureResultOf(d, ConnectionRefusedError)
        (event,) = [e for e in logged if e.get("log_format", "").startswith("Could not connect to proxy server")]
        self.assertIn("web proxy 127.0.0.1:3128 from HTTPS_PROXY", event["hint"])
        self.assertNotIn("s3cret", event["hint"])
