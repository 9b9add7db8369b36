"""
Deterministic tests of the local proxy's Twisted side (LocalProxySession, SourceSide,
DestinationSide, LocalConnection): a fake WebSocket, MemoryReactorClock listeners and connectors,
StringTransport local sockets.
"""

from typing import List

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunnelkit.adapters import IActiveStreamFilter, IDestinationContext, ISourceContext, StreamFilterError
from tunnelkit.localproxy import destination as destination_module
from tunnelkit.localproxy import source as source_module
from tunnelkit.localproxy.destination import PENDING_LIMIT, DestinationSide
from tunnelkit.localproxy.connection import Refused
from tunnelkit.localproxy.endpoint import ServiceEndpoint
from tunnelkit.localproxy.session_service import LocalProxySession
from tunnelkit.localproxy.source import SourceSide
from tunnelkit.protocol.flowcontrol import (
    ANNOUNCE,
    EOF,
    OFFERED,
    WINDOW_UPDATE,
    announcement_frame,
    eof_frame,
    window_increment,
    window_update_frame,
)
from tunnelkit.protocol.framing import MAX_PAYLOAD_SIZE, MAX_WEBSOCKET_FRAME, FrameDecoder, Message, parse_message
from tunnelkit.transport.websocket import ITunnelWebSocketHandler, WebSocketEnded

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class FakeWebSocket:
    """Stands in for TunnelWebSocketProtocol: records WebSocket messages."""

    def __init__(self):
        self.transport = StringTransport()
        self.messages: List[bytes] = []
        self._pending: List[bytes] = []

    def send_frames(self, data, boundary):
        if sum(map(len, self._pending)) + len(data) > MAX_WEBSOCKET_FRAME:
            self.flush()
        self._pending.append(data)
        if boundary:
            self.flush()

    def flush(self):
        if self._pending:
            self.messages.append(b"".join(self._pending))
            self._pending = []

    def decoded(self):
        """Every message sent so far, as lists of parsed tunnel messages, then forget them."""
        result = [[parse_message(body) for body in FrameDecoder().feed(m)] for m in self.messages]
        self.messages = []
        return result


def service_ids(*ids):
    return Message(type=Message.SERVICE_IDS, availableServiceIds=list(ids))


def make_proxy(side, reactor):
    proxy = LocalProxySession(side, ServiceEndpoint("127.0.0.1", 1, secure=False), "token", "c" * 36, reactor, reactor)
    websocket = FakeWebSocket()
    proxy.websocket_opened(websocket)
    return proxy, websocket


class SourceTests(TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.side = SourceSide({"SSH1": 5555, "WEB": 0}, "127.0.0.1", self.reactor)
        self.proxy, self.websocket = make_proxy(self.side, self.reactor)
        verifyObject(ITunnelWebSocketHandler, self.proxy)

    def ready(self):
        self.proxy.messages_received([service_ids("SSH1", "WEB")])
        self.assertEqual(
            [(port, interface) for port, _, _, interface in self.reactor.tcpServers],
            [(5555, "127.0.0.1"), (0, "127.0.0.1")],
        )

    def accept(self, index=0):
        factory = self.reactor.tcpServers[index][1]
        connection = factory.buildProtocol(PEER)
        if connection is None:
            return None, None
        transport = StringTransport()
        connection.makeConnection(transport)
        return connection, transport

    def test_listens_after_service_ids_only(self):
        self.assertEqual(self.reactor.tcpServers, [])
        self.ready()
        self.assertEqual(set(self.side.contexts), {"SSH1", "WEB"})
        verifyObject(ISourceContext, self.side.contexts["SSH1"])

    def test_accept_data_and_close(self):
        self.ready()
        connection, transport = self.accept()
        ((start,),) = self.websocket.decoded()
        self.assertEqual((start.type, start.streamId, start.serviceId, start.connectionId), (Message.STREAM_START, 1, "SSH1", 1))
        second, _ = self.accept()
        ((connection_start,),) = self.websocket.decoded()
        self.assertEqual((connection_start.type, connection_start.connectionId), (Message.CONNECTION_START, 2))

        data = bytes(range(256)) * 1000  # 256000 bytes: 4 DATA frames, batched
        connection.dataReceived(data)
        messages = self.websocket.decoded()
        self.assertTrue(all(len(m) <= MAX_WEBSOCKET_FRAME for m in self.websocket.messages))
        frames = [m for batch in messages for m in batch]
        self.assertEqual(b"".join(m.payload for m in frames), data)
        self.assertTrue(all(len(m.payload) <= MAX_PAYLOAD_SIZE for m in frames))
        self.assertEqual(len(messages), 2)

        reply = Message(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=1, payload=b"from far")
        self.proxy.messages_received([reply])
        self.assertEqual(transport.value(), b"from far")

        connection.connectionLost(Failure(Exception("closed")))
        ((reset,),) = self.websocket.decoded()
        self.assertEqual((reset.type, reset.connectionId), (Message.CONNECTION_RESET, 1))
        self.assertEqual(list(self.proxy.connections), [("SSH1", 2)])

        self.proxy.messages_received([Message(type=Message.STREAM_RESET, streamId=1, serviceId="SSH1")])
        self.assertEqual(self.websocket.decoded(), [])
        self.assertTrue(second.transport.disconnecting)

    def test_websocket_loss_closes_connections_keeps_listeners(self):
        self.ready()
        connection, transport = self.accept()
        self.proxy.websocket_ended(self.websocket, WebSocketEnded("retry", "lost"))
        self.assertTrue(transport.disconnected)  # reset (abortConnection), not closed: a failure
        self.assertIsNone(self.proxy.end)
        # while the tunnel is down, accepts are reset at once; the listeners stay
        refused, refused_transport = self.accept()
        self.assertIsInstance(refused, Refused)
        self.assertTrue(refused_transport.disconnected)
        self.assertEqual(len(self.reactor.tcpServers), 2)
        # a new WebSocket: no second listener, accepts work again
        websocket = FakeWebSocket()
        self.proxy.websocket_opened(websocket)
        self.proxy.messages_received([service_ids("SSH1", "WEB")])
        self.assertEqual(len(self.reactor.tcpServers), 2)
        connection, _ = self.accept()
        self.assertIsNotNone(connection)
        self.assertEqual(websocket.decoded()[0][0].streamId, 2)

    def test_mapping_mismatch_is_fatal(self):
        self.proxy.messages_received([service_ids("SSH1", "OTHER")])
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)
        self.assertIn("Wrong configurations detected in local proxy", end.message)

    def test_close_frame_ends_with_status_0(self):
        self.proxy.websocket_ended(self.websocket, WebSocketEnded("closed", "Web socket close received. Code: 1000"))
        self.assertEqual(self.successResultOf(self.proxy.ended).status, 0)

    def test_rotation_says_to_restart_with_the_new_token(self):
        ended = WebSocketEnded("replaced", "Web socket close received. Code: 1008; Reason: Access token rotated", 1008)
        self.proxy.websocket_ended(self.websocket, ended)
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 0)
        self.assertIn("token was rotated: start it again with the new token", end.message)
        self.assertNotIn("tunnel is closed", end.message)

    def test_replaced_by_another_proxy(self):
        reason = "Web socket close received. Code: 1008; Reason: Connection replaced by a new peer"
        self.proxy.websocket_ended(self.websocket, WebSocketEnded("replaced", reason, 1008))
        self.assertIn("another local proxy connected", self.successResultOf(self.proxy.ended).message)

    def test_closed_for_a_protocol_violation_ends_with_status_1(self):
        reason = "Web socket close received. Code: 1008; Reason: Protocol violation (stream_id): DATA has stream id 0"
        self.proxy.websocket_ended(self.websocket, WebSocketEnded("replaced", reason, 1008))
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)
        self.assertIn("broke the tunneling protocol", end.message)

    def test_rejection_ends_with_status_1(self):
        self.proxy.websocket_ended(self.websocket, WebSocketEnded("rejected", "403", 403))
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)

    def test_bind_failure_is_fatal(self):
        self.reactor.listenTCP = lambda *a, **k: (_ for _ in ()).throw(OSError(98, "Address already in use"))
        self.proxy.messages_received([service_ids("SSH1", "WEB")])
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)
        self.assertIn("fails to bind address 127.0.0.1:5555", end.message)
        self.assertIn("choose a free port with -s SSH1=PORT", end.message)

    def test_flow_control_both_ways(self):
        self.ready()
        connection, transport = self.accept()
        other, other_transport = self.accept()
        # the WebSocket's send buffer is full: local reads pause, and resume
        ws_producer = self.websocket.transport.producer
        ws_producer.pauseProducing()
        ws_producer.pauseProducing()
        self.assertEqual((transport.producerState, other_transport.producerState), ("paused", "paused"))
        late, late_transport = self.accept()
        self.assertEqual(late_transport.producerState, "paused")
        ws_producer.resumeProducing()
        self.assertEqual({transport.producerState, other_transport.producerState, late_transport.producerState}, {"producing"})
        # Without flow control (the far peer did not announce it), a local socket whose send buffer is
        # full takes up to per_connection bytes more, the tunnel's together up to per_tunnel; past
        # either bound the WebSocket's reads pause until that connection drains.
        throttle = self.proxy.websocket_read_throttle
        throttle.per_connection, throttle.per_tunnel = 1000, 1500

        def data(connection_id, size):
            self.proxy.messages_received(
                [Message(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=connection_id, payload=b"x" * size)]
            )

        transport.producer.pauseProducing()
        data(1, 600)
        self.assertEqual(self.websocket.transport.producerState, "producing")
        data(1, 600)
        self.assertEqual(self.websocket.transport.producerState, "paused")
        self.assertEqual(throttle.legacy_buffered, 1200)
        transport.producer.resumeProducing()
        self.assertEqual(self.websocket.transport.producerState, "producing")
        self.assertEqual(throttle.legacy_buffered, 0)
        transport.producer.pauseProducing()
        other_transport.producer.pauseProducing()
        data(1, 800)
        data(2, 800)  # 1600 in all: over the tunnel's bound
        self.assertEqual(self.websocket.transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(self.websocket.transport.producerState, "paused")
        other.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.websocket.transport.producerState, "producing")
        self.assertEqual(throttle.legacy_buffered, 0)

    def test_adapter_filter_and_data_listener(self):
        contexts = []

        @implementer(IActiveStreamFilter)
        class Upper:
            def attach(self, output):
                self.output = output

            def outbound(self, data):
                if data == b"bad":
                    raise StreamFilterError("bad bytes")
                return data.upper()

            def inbound(self, data):
                return data.lower()

            def connection_lost(self):
                pass

        class Adapter:
            name = "upper"

            def source_filter(self, context, connection_id):
                contexts.append((context, connection_id))
                return Upper() if connection_id < 100 else None

        self.patch(source_module, "resolve_adapter", lambda *a, **k: Adapter())
        self.ready()
        connection, transport = self.accept()
        self.websocket.decoded()
        connection.dataReceived(b"hello")
        ((data,),) = self.websocket.decoded()
        self.assertEqual(data.payload, b"HELLO")
        self.proxy.messages_received(
            [Message(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=1, payload=b"WORLD")]
        )
        self.assertEqual(transport.value(), b"world")
        connection.filter.output.send_outbound(b"direct")
        ((data,),) = self.websocket.decoded()
        self.assertEqual(data.payload, b"direct")

        # a data listener: its one accept is carried as exactly the chosen connection id
        port = self.successResultOf(contexts[0][0].open_data_listener(0x80000001))
        listener_factory = self.reactor.tcpServers[-1][1]
        self.assertEqual(port, 0)  # MemoryReactor's fake port number
        data_connection = listener_factory.buildProtocol(PEER)
        data_connection.makeConnection(StringTransport())
        ((start,),) = self.websocket.decoded()
        self.assertEqual((start.type, start.connectionId), (Message.CONNECTION_START, 0x80000001))
        self.assertIsNone(data_connection.filter)

        connection.dataReceived(b"bad")
        self.assertTrue(transport.disconnected or transport.disconnecting)


class DestinationTests(TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.side = DestinationSide(
            {"SSH1": ("127.0.0.1", 2222), "WEB": ("127.0.0.1", 8080)}, self.reactor, self.reactor, probe_targets=False
        )
        self.proxy, self.websocket = make_proxy(self.side, self.reactor)
        self.proxy.messages_received([service_ids("SSH1", "WEB")])

    def start(self, connection_id=1, kind=Message.STREAM_START, service="SSH1"):
        self.proxy.messages_received([Message(type=kind, streamId=1, serviceId=service, connectionId=connection_id)])

    def complete(self, index=-1):
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_connects_holds_data_and_replies(self):
        self.start()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 2222))
        verifyObject(IDestinationContext, self.side.contexts["SSH1"])
        self.proxy.messages_received(
            [Message(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=1, payload=b"early")]
        )
        wrapper, transport = self.complete()
        self.assertEqual(transport.value(), b"early")
        wrapper.dataReceived(b"answer")
        ((data,),) = self.websocket.decoded()
        self.assertEqual((data.type, data.payload, data.serviceId, data.connectionId), (Message.DATA, b"answer", "SSH1", 1))

    def test_retries_then_resets(self):
        self.start()
        for attempt in range(5):
            self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            self.assertEqual(len(self.reactor.tcpClients), attempt + 1)
            self.reactor.advance(2.4)
            self.assertEqual(len(self.reactor.tcpClients), attempt + 1)
            self.reactor.advance(0.1)
            self.assertEqual(len(self.reactor.tcpClients), attempt + 2)
        self.assertEqual(self.websocket.decoded(), [])
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        ((reset,),) = self.websocket.decoded()
        self.assertIn(reset.type, (Message.STREAM_RESET, Message.CONNECTION_RESET))
        self.assertEqual(self.side.pending, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reset_while_retrying_cancels(self):
        self.start()
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.proxy.messages_received([Message(type=Message.STREAM_RESET, streamId=1, serviceId="SSH1")])
        self.assertEqual(self.side.pending, {})
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_reset_while_connecting_stops_the_connector(self):
        """A target given by IP address is connected to straight through connectTCP; a reset stops it."""
        self.start()
        (connector,) = self.reactor.connectors
        self.proxy.messages_received([Message(type=Message.STREAM_RESET, streamId=1, serviceId="SSH1")])
        self.assertTrue(connector.stoppedConnecting)
        self.assertEqual(self.side.pending, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_pending_data_pauses_the_websocket(self):
        self.start()
        chunk = b"x" * MAX_PAYLOAD_SIZE
        count = PENDING_LIMIT // len(chunk) + 2
        self.proxy.messages_received(
            [Message(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=1, payload=chunk)] * count
        )
        self.assertEqual(self.websocket.transport.producerState, "paused")
        _, transport = self.complete()
        self.assertEqual(len(transport.value()), count * len(chunk))
        self.assertEqual(self.websocket.transport.producerState, "producing")

    def test_websocket_loss_cancels_pending(self):
        self.start()
        self.start(connection_id=1, service="WEB")
        wrapper, transport = self.complete(0)
        self.proxy.websocket_ended(self.websocket, WebSocketEnded("retry", "lost"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.side.pending, {})

    def test_adapter_refusal_resets(self):
        class Refusing:
            name = "refusing"

            def destination_target(self, context, connection_id):
                raise StreamFilterError("no such ticket")

            def destination_filter(self, context, connection_id):
                return None

        self.patch(destination_module, "resolve_adapter", lambda *a, **k: Refusing())
        self.start()
        self.assertEqual(self.reactor.tcpClients, [])
        ((reset,),) = self.websocket.decoded()
        self.assertIn(reset.type, (Message.STREAM_RESET, Message.CONNECTION_RESET))


class FTPDataOrderingTests(TestCase):
    """
    The destination of an FTP service: a short listing the server sends and closes on its data
    connection before the transfer's reply passed the control connection (the order the two
    sockets are read in is up to the reactor).  The data filter holds the listing until the reply
    has passed; the end of the data connection must wait behind it, or the client gets an empty
    listing and a clean end of stream (the rare empty second LIST of the FTP end-to-end tests).
    """

    def setUp(self):
        from services.ftp import DATA_CONNECTION_BIT

        self.reactor = MemoryReactorClock()
        self.side = DestinationSide({"FTP1": ("127.0.0.1", 2121)}, self.reactor, self.reactor, probe_targets=False)
        self.proxy, self.websocket = make_proxy(self.side, self.reactor)
        self.proxy.messages_received([service_ids("FTP1")])
        self.proxy.messages_received([Message(type=Message.STREAM_START, streamId=1, serviceId="FTP1", connectionId=1)])
        self.control, _ = self.complete()
        self.control.dataReceived(b"227 Entering Passive Mode (127,0,0,1,0,99)\r\n")
        ((reply,),) = self.websocket.decoded()
        self.assertEqual(reply.payload, b"227 Entering Passive Mode via tunnelkit ticket 1\r\n")
        self.data_id = DATA_CONNECTION_BIT | 1
        self.proxy.messages_received(
            [Message(type=Message.CONNECTION_START, streamId=1, serviceId="FTP1", connectionId=self.data_id)]
        )
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.1", 99))
        self.data, self.data_transport = self.complete()

    def complete(self):
        protocol = self.reactor.tcpClients[-1][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def frames(self):
        self.websocket.flush()
        return [(m.connectionId, m.type, m.payload) for batch in self.websocket.decoded() for m in batch]

    def test_end_of_data_waits_behind_the_held_listing(self):
        self.data.dataReceived(b"-rw-r--r-- 1 ftp ftp 10 a.txt\r\n")
        self.data.readConnectionLost()  # the server closed the data connection: before the 150 passed
        self.assertEqual(self.frames(), [])  # neither the listing nor its end overtakes the reply
        self.control.dataReceived(b"150 Here comes the directory listing.\r\n226 Directory send OK.\r\n")
        self.reactor.advance(0)
        frames = self.frames()
        self.assertEqual(
            frames[:2],
            [
                (1, Message.DATA, b"150 Here comes the directory listing.\r\n226 Directory send OK.\r\n"),
                (self.data_id, Message.DATA, b"-rw-r--r-- 1 ftp ftp 10 a.txt\r\n"),
            ],
        )
        self.assertEqual([f[:2] for f in frames[2:]], [(self.data_id, Message.CONNECTION_RESET)])  # its end, last
        self.assertTrue(self.data_transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_end_of_data_waits_for_the_hold_time(self):
        self.data.dataReceived(b"listing\r\n")
        self.data.readConnectionLost()
        from services.ftp import HOLD_TIME

        self.reactor.advance(HOLD_TIME)
        self.assertEqual(
            [f[:2] for f in self.frames()], [(self.data_id, Message.DATA), (self.data_id, Message.CONNECTION_RESET)]
        )

    def test_end_after_the_reply_goes_at_once(self):
        self.control.dataReceived(b"150 Here comes the directory listing.\r\n")
        self.reactor.advance(0)
        self.data.dataReceived(b"listing\r\n")
        self.data.readConnectionLost()
        self.assertEqual(
            [f[:2] for f in self.frames()],
            [(1, Message.DATA), (self.data_id, Message.DATA), (self.data_id, Message.CONNECTION_RESET)],
        )


class DataListenerTests(TestCase):
    def test_closes_after_accept_or_timeout(self):
        reactor = MemoryReactorClock()
        side = SourceSide({"FTP": 0}, "127.0.0.1", reactor)
        proxy, websocket = make_proxy(side, reactor)
        proxy.messages_received([service_ids("FTP")])
        context = side.contexts["FTP"]
        self.successResultOf(context.open_data_listener(0x80000001))
        self.successResultOf(context.open_data_listener(0x80000002))
        first = reactor.tcpServers[1][1]
        first.buildProtocol(PEER).makeConnection(StringTransport())
        self.assertEqual(len(side._data_listeners), 1)
        reactor.advance(60)
        self.assertEqual(side._data_listeners, [])
        self.assertEqual(reactor.getDelayedCalls(), [])


class SourceWithoutMappingTests(TestCase):
    def test_listens_on_free_ports_for_every_service(self):
        reactor = MemoryReactorClock()
        side = SourceSide({}, "127.0.0.1", reactor)
        proxy, websocket = make_proxy(side, reactor)
        proxy.messages_received([service_ids("A1", "B2")])
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers], [(0, "127.0.0.1")] * 2)
        self.assertEqual(sorted(side.listeners), ["A1", "B2"])
        self.assertIsNone(proxy.end)

    def test_v1_bare_port_takes_the_only_service(self):
        reactor = MemoryReactorClock()
        side = SourceSide({"": 6000}, "::1", reactor, client_type="V1")
        proxy, websocket = make_proxy(side, reactor)
        proxy.messages_received([service_ids("SSH")])
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers], [(6000, "::1")])
        connection = reactor.tcpServers[0][1].buildProtocol(PEER)
        connection.makeConnection(StringTransport())
        ((start,),) = websocket.decoded()
        self.assertEqual((start.type, start.streamId, start.serviceId, start.connectionId), (Message.STREAM_START, 1, "", 0))
        self.assertIsInstance(reactor.tcpServers[0][1].buildProtocol(PEER), Refused)  # one at a time


class FlowControlTests(TestCase):
    """A source whose peer announced flow control and half-close (tunnelkit.protocol.flowcontrol)."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.side = SourceSide({"SSH1": 0}, "127.0.0.1", self.reactor)
        self.proxy = LocalProxySession(
            self.side, ServiceEndpoint("127.0.0.1", 1, secure=False), "token", "c" * 36, self.reactor, self.reactor
        )
        self.websocket = FakeWebSocket()
        self.websocket.extensions = OFFERED
        self.proxy.websocket_opened(self.websocket)
        self.proxy.messages_received([service_ids("SSH1")])
        ((announcement,),) = self.websocket.decoded()
        self.assertEqual(announcement.type, ANNOUNCE)
        self.proxy.messages_received([parse_message(announcement_frame(1000)[2:])])
        self.connection = self.reactor.tcpServers[0][1].buildProtocol(PEER)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        start, marker = [m for batch in self.websocket.decoded() for m in batch]
        self.assertEqual((start.type, marker.type), (Message.STREAM_START, WINDOW_UPDATE))

    def data(self, size):
        return Message(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=1, payload=b"d" * size)

    def test_grants_follow_the_local_socket_buffer(self):
        window = self.side.session.window
        self.proxy.messages_received([self.data(window // 4)])
        self.websocket.flush()
        ((grant,),) = self.websocket.decoded()
        self.assertEqual((grant.type, window_increment(grant.payload)), (WINDOW_UPDATE, window // 4))
        # the local socket's buffer is full: nothing is granted, and the WebSocket keeps reading
        self.transport.producer.pauseProducing()
        self.proxy.messages_received([self.data(window // 2)])
        self.websocket.flush()
        self.assertEqual(self.websocket.decoded(), [])
        self.assertEqual(self.websocket.transport.producerState, "producing")
        self.reactor.advance(1.0)  # the application took a megabyte in a second: not fast
        self.transport.producer.resumeProducing()
        ((grant,),) = self.websocket.decoded()
        self.assertEqual(window_increment(grant.payload), window // 2)
        # the peer says it is blocked, and the socket keeps up: the window doubles
        self.proxy.messages_received([parse_message(window_update_frame(1, "SSH1", 1, 0)[2:])])
        self.websocket.flush()
        ((grant,),) = self.websocket.decoded()
        self.assertEqual(window_increment(grant.payload), window)

    def test_no_credit_pauses_this_connection_only(self):
        self.connection.dataReceived(b"u" * 1500)
        sent, blocked = [m for batch in self.websocket.decoded() for m in batch]
        self.assertEqual(len(sent.payload), 1000)
        self.assertEqual((blocked.type, window_increment(blocked.payload)), (WINDOW_UPDATE, 0))
        self.assertEqual(self.transport.producerState, "paused")
        self.proxy.messages_received([parse_message(window_update_frame(1, "SSH1", 1, 10000)[2:])])
        self.assertEqual(self.transport.producerState, "producing")
        self.websocket.flush()
        ((rest,),) = self.websocket.decoded()
        self.assertEqual(len(rest.payload), 500)

    def test_half_close_both_ways(self):
        self.connection.readConnectionLost()
        ((eof,),) = self.websocket.decoded()
        self.assertEqual(eof.type, EOF)
        self.assertFalse(self.transport.disconnecting)
        self.proxy.messages_received([parse_message(eof_frame(1, "SSH1", 1)[2:])])
        self.assertTrue(self.transport.disconnecting)  # both ended: a FIN, not a reset
        self.assertFalse(self.transport.disconnected)
        self.websocket.flush()
        ((reset,),) = self.websocket.decoded()
        self.assertEqual(reset.type, Message.CONNECTION_RESET)

    def test_far_eof_shuts_down_the_write_side_only(self):
        half_closed = []
        self.transport.loseWriteConnection = lambda: half_closed.append(True)
        self.proxy.messages_received([parse_message(eof_frame(1, "SSH1", 1)[2:])])
        self.assertEqual(half_closed, [True])
        self.assertFalse(self.transport.disconnecting)
        self.connection.dataReceived(b"still talking")
        ((data,),) = self.websocket.decoded()
        self.assertEqual(data.payload, b"still talking")


class ReadinessLogTests(TestCase):
    """
    "The tunnel is ready" only once the far side is there (issue 15 item 11): SERVICE_IDS says this
    side is in the tunnel; the far peer's ANNOUNCE (which tunnelkit's relay passes only once both
    sides announced) says the other side is; an empty ANNOUNCE says it left.
    """

    def start(self, extensions):
        from twisted.logger import formatEvent, globalLogPublisher

        self.lines = []

        def observe(event):
            self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        reactor = MemoryReactorClock()
        side = SourceSide({"SSH1": 0}, "127.0.0.1", reactor)
        self.proxy = LocalProxySession(side, ServiceEndpoint("127.0.0.1", 1, secure=False), "token", "c" * 36, reactor, reactor)
        websocket = FakeWebSocket()
        websocket.extensions = extensions
        self.proxy.websocket_opened(websocket)
        self.proxy.messages_received([service_ids("SSH1")])

    def said(self, text):
        return [line for line in self.lines if text in line]

    def test_ready_when_the_destination_announces(self):
        self.start(OFFERED)
        self.assertEqual(
            self.said("Connected to the tunnel"),
            ["Connected to the tunnel: its services are SSH1; waiting for the destination to connect"],
        )
        self.assertEqual(self.said("The tunnel is ready"), [])
        self.proxy.messages_received([parse_message(announcement_frame(1000)[2:])])
        self.assertEqual(
            self.said("The tunnel is ready"),
            ["The tunnel is ready: the destination is connected (flow control and half-close); its services are SSH1"],
        )
        self.proxy.messages_received([Message(type=ANNOUNCE, ignorable=True)])  # the relay: it left
        self.assertEqual(
            self.said("left the tunnel"),
            ["The destination left the tunnel (the service says so); waiting for it to connect again"],
        )
        self.proxy.messages_received([parse_message(announcement_frame(1000)[2:])])
        self.assertEqual(len(self.said("The tunnel is ready")), 2)

    def test_a_service_that_does_not_say(self):
        self.start("")
        self.assertEqual(
            self.said("Connected to the tunnel"),
            [
                "Connected to the tunnel: its services are SSH1; this service does not say whether the "
                "destination is connected: data flows once it is"
            ],
        )
        self.assertEqual(self.said("The tunnel is ready"), [])


class PacingTests(TestCase):
    def test_paces_toward_a_peer_without_flow_control(self):
        reactor = MemoryReactorClock()
        side = SourceSide({"SSH1": 0}, "127.0.0.1", reactor)
        proxy = LocalProxySession(
            side, ServiceEndpoint("127.0.0.1", 1, secure=False), "token", "c" * 36, reactor, reactor, pace=100000
        )
        websocket = FakeWebSocket()
        proxy.websocket_opened(websocket)
        proxy.messages_received([service_ids("SSH1")])
        connection = reactor.tcpServers[0][1].buildProtocol(PEER)
        transport = StringTransport()
        connection.makeConnection(transport)
        connection.dataReceived(b"p" * 65536)  # the burst
        self.assertEqual(transport.producerState, "producing")
        connection.dataReceived(b"p" * 50000)  # half a second's worth over it
        self.assertEqual(transport.producerState, "paused")
        reactor.advance(0.49)
        self.assertEqual(transport.producerState, "paused")
        reactor.advance(0.02)
        self.assertEqual(transport.producerState, "producing")
        connection.connectionLost(Failure(Exception("gone")))
        self.assertEqual(reactor.getDelayedCalls(), [])


class UnixTargetTests(TestCase):
    def test_unix_socket_target(self):
        reactor = MemoryReactorClock()
        side = DestinationSide({"APP": "/run/app.sock"}, reactor, reactor, probe_targets=False)
        proxy, websocket = make_proxy(side, reactor)
        proxy.messages_received([service_ids("APP")])
        proxy.messages_received([Message(type=Message.STREAM_START, streamId=1, serviceId="APP", connectionId=1)])
        address, factory, timeout, check_pid = reactor.unixClients[0]
        self.assertEqual(address, "/run/app.sock")
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        proxy.messages_received(
            [Message(type=Message.DATA, streamId=1, serviceId="APP", connectionId=1, payload=b"over unix")]
        )
        self.assertEqual(transport.value(), b"over unix")


class DestinationProbeTests(TestCase):
    """When the tunnel is ready, the destination probes each target once with its adapter's probe."""

    def setUp(self):
        self.reactor = MemoryReactorClock()

    def ready(self, probe_targets=True):
        side = DestinationSide(
            {"SSH1": ("127.0.0.1", 2222), "WEB": ("127.0.0.1", 8080)}, self.reactor, self.reactor,
            probe_targets=probe_targets,
        )
        proxy, websocket = make_proxy(side, self.reactor)
        proxy.messages_received([service_ids("SSH1", "WEB")])
        return side, proxy

    def test_probes_each_target_once(self):
        side, proxy = self.ready()
        self.assertEqual(sorted(c[:2] for c in self.reactor.tcpClients), [("127.0.0.1", 2222), ("127.0.0.1", 8080)])
        self.assertEqual(sorted(side.probes), ["SSH1", "WEB"])
        self.assertEqual(side.adapters["SSH1"].name, "ssh")
        # A later SERVICE_IDS (a reconnection) probes nothing more.
        side.tunnel_ready()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_probe_result_is_logged_not_fatal(self):
        side, proxy = self.ready()
        results = []
        side.probes["SSH1"].addCallback(results.append)
        host, port, factory, timeout, bind = [c for c in self.reactor.tcpClients if c[1] == 2222][0]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.reactor.advance(10)
        self.assertEqual(results, [False])
        self.assertIsNone(proxy.end)

    def test_ssh_banner_passes(self):
        side, proxy = self.ready()
        results = []
        side.probes["SSH1"].addCallback(results.append)
        host, port, factory, timeout, bind = [c for c in self.reactor.tcpClients if c[1] == 2222][0]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.reactor.advance(10)
        self.assertEqual(results, [True])

    def test_no_probe(self):
        side, proxy = self.ready(probe_targets=False)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(side.probes, {})


class RefusalHintTests(SynchronousTestCase):
    """The hint after a refused upgrade: by the reason tunnelkit's service names, else by AWS's text."""

    def test_by_reason_or_text(self) -> None:
        from tunnelkit.localproxy.session_service import _refusal_hint
        from tunnelkit.transport.websocket import WebSocketEnded

        unknown = "is it this service's token"
        used = "reconnects only with the client token"
        for ended, expected in [
            (WebSocketEnded("rejected", "x", 401, "unknown-token"), unknown),
            (WebSocketEnded("rejected", "x", 401, "token-used"), used),
            (WebSocketEnded("rejected", "x", 401, "client-token-mismatch"), used),
            (WebSocketEnded("rejected", "x", 401, "token-rotated"), ""),
            (WebSocketEnded("rejected", "x", 403, "mode-mismatch"), ""),
            # AWS's service names no reason: its status and text
            (WebSocketEnded("rejected", "the access token is not valid for any tunnel", 401), unknown),
            (WebSocketEnded("rejected", "The access token was revoked", 401), ""),
            (WebSocketEnded("rejected", "previously used", 401), used),
            (WebSocketEnded("rejected", "Forbidden", 403), ""),
        ]:
            hint = _refusal_hint(ended)
            if expected:
                self.assertIn(expected, hint, ended)
            else:
                self.assertEqual(hint, "", ended)
