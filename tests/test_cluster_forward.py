"""
Tests of tunnelkit.service.cluster.wire and .forward: the internal forwarding handshake byte by byte,
and two nodes (data planes on one shared in-memory store and directory) paired over iosim: a peer that
reaches the node not holding its tunnel is spliced to the node that does, with its real address.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, Optional, Tuple

import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from tunnelkit.protocol.framing import FrameDecoder, parse_message
from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.service.cluster.directory import INodeDirectory, MemoryDirectory, NodeInfo
from tunnelkit.service.cluster.forward import ClusterListenerFactory, ForwardingGate
from tunnelkit.service.cluster.node import ClusterNode
from tunnelkit.service.cluster.wire import (
    MAGIC,
    Acceptor,
    ForwardRefused,
    ProxyAddresses,
    answer,
    challenge,
    decode_proxy_v2,
    encode_proxy_v2,
)
from tunnelkit.service.dataplane import mount_data_plane
from tunnelkit.testing import MemoryTunnelStore, client_frame, tunnel_frame, upgrade_request

SECRET = b"0123456789abcdef-cluster-secret"
ADDRESSES = ProxyAddresses("203.0.113.7", 50123, "10.0.0.1", 8443)


class WireTests(TestCase):
    def test_proxy_v2_round_trip(self) -> None:
        for addresses in (ADDRESSES, ProxyAddresses("2001:db8::7", 1, "2001:db8::1", 443)):
            header = encode_proxy_v2(addresses)
            self.assertEqual(header[:12], b"\r\n\r\n\x00\r\nQUIT\n")
            self.assertEqual(decode_proxy_v2(header + b"rest"), (addresses, len(header)))
            self.assertEqual(decode_proxy_v2(header[:-1]), (None, 0))

    def test_proxy_v2_ipv4_header_bytes(self) -> None:
        # HAProxy's proxy-protocol.txt 2.2: signature, 0x21 (v2, PROXY), 0x11 (TCP4), length 12.
        header = encode_proxy_v2(ADDRESSES)
        self.assertEqual(header[12:16], b"\x21\x11\x00\x0c")
        self.assertEqual(header[16:20], bytes([203, 0, 113, 7]))
        self.assertEqual(struct.unpack("!HH", header[24:28]), (50123, 8443))

    def test_proxy_v2_refuses_other_commands(self) -> None:
        header = bytearray(encode_proxy_v2(ADDRESSES))
        header[12] = 0x20  # LOCAL
        self.assertRaises(ForwardRefused, decode_proxy_v2, bytes(header))
        self.assertRaises(ForwardRefused, decode_proxy_v2, b"GET / HTTP/1.1\r\n\r\n")

    def test_answer_accepted_byte_by_byte(self) -> None:
        nonce, first = challenge()
        self.assertEqual(first, MAGIC + nonce)
        data = answer(SECRET, first, "node-b", ADDRESSES) + b"GET /tunnel"
        acceptor = Acceptor(SECRET, nonce)
        end = len(data) - len(b"GET /tunnel")
        for i in range(end - 1):
            self.assertIsNone(acceptor.feed(data[i : i + 1]))
        got = acceptor.feed(data[end - 1 : end + 4])
        assert got is not None
        self.assertEqual((got.node_id, got.addresses, got.rest), ("node-b", ADDRESSES, b"GET "))

    def test_wrong_secret_refused(self) -> None:
        nonce, first = challenge()
        data = answer(b"another-secret-of-16-bytes", first, "node-b", ADDRESSES)
        self.assertRaises(ForwardRefused, Acceptor(SECRET, nonce).feed, data)

    def test_replay_on_a_new_nonce_refused(self) -> None:
        nonce, first = challenge()
        data = answer(SECRET, first, "node-b", ADDRESSES)
        other, _ = challenge()
        self.assertRaises(ForwardRefused, Acceptor(SECRET, other).feed, data)

    def test_changed_address_refused(self) -> None:
        nonce, first = challenge()
        data = bytearray(answer(SECRET, first, "node-b", ADDRESSES))
        data[-12] ^= 1  # a byte of the client's address
        self.assertRaises(ForwardRefused, Acceptor(SECRET, nonce).feed, bytes(data))

    def test_mac_bound_to_the_tls_connection(self) -> None:
        nonce, first = challenge()
        data = answer(SECRET, first, "node-b", ADDRESSES, binding=b"x" * 32)
        self.assertIsNotNone(Acceptor(SECRET, nonce, binding=b"x" * 32).feed(data))
        # A man in the middle holds two TLS connections: their exporters differ.
        self.assertRaises(ForwardRefused, Acceptor(SECRET, nonce, binding=b"y" * 32).feed, data)
        self.assertRaises(ForwardRefused, Acceptor(SECRET, nonce).feed, data)

    def test_http_refused_at_once(self) -> None:
        nonce, _ = challenge()
        self.assertRaises(ForwardRefused, Acceptor(SECRET, nonce).feed, b"GET /tunnel HTTP/1.1\r\n")


class RawClient(Protocol):
    """A WebSocket client written out by hand: what it sent is what a local proxy sends."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    def status(self) -> Optional[int]:
        end = self.received.find(b"\r\n\r\n")
        return int(self.received.split(b" ", 2)[1]) if end >= 0 else None

    def frames(self) -> List[Message]:
        end = self.received.find(b"\r\n\r\n")
        buf = self.received[end + 4 :]
        decoder = FrameDecoder()
        found: List[Message] = []
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            offset = 2
            if n == 126:
                (n,) = struct.unpack("!H", buf[2:4])
                offset = 4
            elif n == 127:
                (n,) = struct.unpack("!Q", buf[2:10])
                offset = 10
            if len(buf) < offset + n:
                break
            if buf[0] & 0x0F == 2:
                found += [parse_message(body) for body in decoder.feed(buf[offset : offset + n])]
            buf = buf[offset + n :]
        return found


class Node:
    """One service node's data plane, gate and cluster listener, on a shared store and directory."""

    def __init__(self, test: "TwoNodes", name: str, secret: bytes = SECRET) -> None:
        self.name = name
        self.root = Resource()
        self.relay = mount_data_plane(self.root, test.store, test.clock, {})
        self.site = Site(self.root, reactor=test.clock)
        self.info = NodeInfo(name, f"{name}.internal:7443")
        self.gate = ForwardingGate(self.info, test.directory, secret, test.clock, 5.0, connect=test.connector)
        self.root.children[b"tunnel"].gate = self.gate
        self.node = ClusterNode(self.info, test.directory, test.store, test.clock)
        self.node.startService()
        test.addCleanup(lambda: self.node.running and self.node.stopService())
        self.relay.placement = self.node
        self.listener = ClusterListenerFactory(self.site, secret, test.clock)
        test.nodes[self.info.address] = self
        test.directory.heartbeat(self.info)


class _Endpoint:
    def __init__(self, test: "TwoNodes", address: str) -> None:
        self.test = test
        self.address = address

    def connect(self, factory: Any) -> Any:
        node = self.test.nodes[self.address]
        client = factory.buildProtocol(None)
        server = node.listener.buildProtocol(IPv4Address("TCP", "10.0.0.2", 40001))
        self.test.pumps.append(
            connect(
                server,
                FakeTransport(server, isServer=True, hostAddress=IPv4Address("TCP", "10.0.0.1", 7443),
                              peerAddress=IPv4Address("TCP", "10.0.0.2", 40001)),
                client,
                FakeTransport(client, isServer=False, hostAddress=IPv4Address("TCP", "10.0.0.2", 40001),
                              peerAddress=IPv4Address("TCP", "10.0.0.1", 7443)),
                greet=False,
            )
        )
        return succeed(client)


class TwoNodes(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        txaio.use_twisted()  # autobahn's timers on the test's clock
        old = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", old)
        self.store = MemoryTunnelStore()
        self.directory = MemoryDirectory(self.clock)
        self.nodes: Dict[str, Node] = {}
        self.pumps: List[Any] = []
        self.a = Node(self, "node-a")
        self.b = Node(self, "node-b")
        self.tunnel = self.store.open_tunnel(("SSH",), self.clock.seconds())

    def silence(self, node: Node) -> None:
        """The node stops its heartbeat (as when killed; its connections stay for the test to see)."""
        assert node.node._loop is not None
        node.node._loop.stop()
        node.node._loop = None

    def connector(self, address: str) -> _Endpoint:
        return _Endpoint(self, address)

    def peer(self, node: Node, mode: str, token: str, host: str = "198.51.100.9") -> RawClient:
        client = RawClient()
        server = node.site.buildProtocol(IPv4Address("TCP", host, 50000))
        self.pumps.append(
            connect(
                server,
                FakeTransport(server, isServer=True, hostAddress=IPv4Address("TCP", "10.0.0.1", 8443),
                              peerAddress=IPv4Address("TCP", host, 50000)),
                client,
                FakeTransport(client, isServer=False, hostAddress=IPv4Address("TCP", host, 50000),
                              peerAddress=IPv4Address("TCP", "10.0.0.1", 8443)),
                greet=False,
            )
        )
        client.transport.write(upgrade_request(mode, token))
        self.pump()
        return client

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump() or moved
            if not moved:
                return

    def test_directory_provides_interface(self) -> None:
        verifyObject(INodeDirectory, self.directory)

    def test_both_peers_on_one_node(self) -> None:
        source = self.peer(self.a, "source", self.tunnel.source_token)
        destination = self.peer(self.a, "destination", self.tunnel.destination_token)
        self.assertEqual((source.status(), destination.status()), (101, 101))
        self.assertEqual((self.a.gate.forwarded, self.b.gate.forwarded), (0, 0))
        self.assertEqual(set(self.a.relay.links[self.tunnel.tunnel_id].peers), {"source", "destination"})

    def test_peer_reaching_the_other_node_is_forwarded(self) -> None:
        source = self.peer(self.a, "source", self.tunnel.source_token)
        destination = self.peer(self.b, "destination", self.tunnel.destination_token, host="192.0.2.44")
        self.assertEqual((source.status(), destination.status()), (101, 101))
        self.assertEqual((self.a.gate.forwarded, self.b.gate.forwarded), (0, 1))
        self.assertNotIn(self.tunnel.tunnel_id, self.b.relay.links)
        link = self.a.relay.links[self.tunnel.tunnel_id]
        self.assertEqual(set(link.peers), {"source", "destination"})
        # The holding node sees the client's own address, not the forwarding node's.
        self.assertEqual(link.peers["destination"].transport.getPeer().host, "192.0.2.44")
        self.assertEqual([f.type for f in destination.frames()], [Message.SERVICE_IDS])
        # Bytes flow both ways through the splice.
        source.transport.write(client_frame(tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH")
                                            + tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH", payload=b"ping")))
        self.pump()
        got = destination.frames()
        self.assertEqual([(f.type, f.payload) for f in got[1:]], [(Message.STREAM_START, b""), (Message.DATA, b"ping")])
        destination.transport.write(client_frame(tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH", payload=b"pong")))
        self.pump()
        self.assertEqual(source.frames()[-1].payload, b"pong")
        # The directory knows where each side is held.
        rows = {side: row.node_id for (_, side), row in self.directory.peers.items()}
        self.assertEqual(rows, {"source": "node-a", "destination": "node-a"})

    def test_splice_registers_producers_both_ways(self) -> None:
        self.peer(self.a, "source", self.tunnel.source_token)
        destination = self.peer(self.b, "destination", self.tunnel.destination_token)
        client_side = destination.transport.getPeer  # the forwarding node's client transport is the peer's
        server_transport = self.pumps[1].serverIO  # node B's transport of the destination's connection
        node_transport = self.pumps[2].clientIO  # node B's connection to node A's cluster listener
        self.assertIs(server_transport.producer, node_transport)
        self.assertIs(node_transport.producer, server_transport)
        del client_side

    def test_dead_holder_tunnel_moves(self) -> None:
        self.peer(self.a, "source", self.tunnel.source_token)
        self.silence(self.a)
        self.clock.advance(6.0)  # node A's heartbeat is older than the node timeout (5 s)
        self.directory.heartbeat(self.b.info)
        destination = self.peer(self.b, "destination", self.tunnel.destination_token)
        self.assertEqual(destination.status(), 101)
        self.assertEqual(self.b.gate.forwarded, 0)
        self.assertIn(self.tunnel.tunnel_id, self.b.relay.links)
        self.assertEqual(self.directory.placements[self.tunnel.source_token[:16]][0], "node-b")

    def test_holder_with_a_wrong_secret_gets_503(self) -> None:
        self.nodes.clear()
        self.silence(self.a)
        self.a = Node(self, "node-a", secret=b"a-different-secret-here")
        self.peer(self.a, "source", self.tunnel.source_token)
        destination = self.peer(self.b, "destination", self.tunnel.destination_token)
        self.assertEqual(destination.status(), 503)
        self.assertNotIn("destination", self.a.relay.links[self.tunnel.tunnel_id].peers)
        # The destination's token was not spent: it connects once node A is gone.
        self.silence(self.a)
        self.clock.advance(6.0)
        self.directory.heartbeat(self.b.info)
        again = self.peer(self.b, "destination", self.tunnel.destination_token)
        self.assertEqual(again.status(), 101)

    def test_bad_token_not_forwarded_without_routing_key(self) -> None:
        client = self.peer(self.b, "source", "not-a-tunnelkit-token")
        self.assertEqual(client.status(), 401)
        self.assertEqual(self.b.gate.forwarded, 0)

    def test_connected_recorded_only_after_the_directory_row(self) -> None:
        # A node killed between the two writes must leave a row its survivors see (and reap).
        from twisted.internet.defer import Deferred

        pending: List[Any] = []
        record = self.directory.peer_attached

        def slow(row: Any) -> Deferred:
            pending.append((row, Deferred()))
            return pending[-1][1]

        self.directory.peer_attached = slow  # type: ignore[method-assign]
        source = self.peer(self.a, "source", self.tunnel.source_token)
        self.assertEqual(source.status(), 101)
        self.assertEqual(self.store.state_changes, [])
        row, written = pending[0]
        record(row)
        written.callback(None)
        self.assertEqual([(s, c) for (_, s, c, _) in self.store.state_changes], [("source", True)])
        # Gone: DISCONNECTED first, then the row goes.
        self.directory.peer_attached = record  # type: ignore[method-assign]
        source.transport.loseConnection()
        self.pump()
        self.assertEqual([(s, c) for (_, s, c, _) in self.store.state_changes], [("source", True), ("source", False)])
        self.assertEqual(self.directory.peers, {})

    def test_cluster_listener_refuses_http(self) -> None:
        server = self.a.listener.buildProtocol(IPv4Address("TCP", "10.9.9.9", 1))
        client = RawClient()
        pump = connect(server, FakeTransport(server, isServer=True), client, FakeTransport(client, isServer=False), greet=False)
        client.transport.write(upgrade_request("source", self.tunnel.source_token))
        pump.flush()
        self.assertTrue(client.received.startswith(MAGIC))
        self.assertTrue(server.transport.disconnecting or server.transport.disconnected)
        self.assertNotIn(self.tunnel.tunnel_id, self.a.relay.links)

    def test_cluster_listener_times_out_silent_connections(self) -> None:
        server = self.a.listener.buildProtocol(IPv4Address("TCP", "10.9.9.9", 1))
        client = RawClient()
        connect(server, FakeTransport(server, isServer=True), client, FakeTransport(client, isServer=False), greet=False)
        self.clock.advance(10.0)
        self.assertTrue(server.transport.disconnecting or server.transport.disconnected)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if "_too_slow" in repr(c.func)], [])


class LaterDirectory(MemoryDirectory):
    """The in-memory directory answering placements a moment later, as a database does."""

    def place(self, routing_key: str, node_id: str, timeout: float) -> Any:
        from twisted.internet.defer import Deferred

        answer = super().place(routing_key, node_id, timeout)
        later: Deferred = Deferred()
        self.clock.callLater(0.001, lambda: answer.chainDeferred(later))
        return later


class TwoNodesLaterDirectory(TwoNodes):
    """The same, with answers that come after the request was handed back to twisted.web."""

    def setUp(self) -> None:
        super().setUp()
        directory = LaterDirectory(self.clock)
        directory.node_seen = self.directory.node_seen
        self.directory = directory
        for node in (self.a, self.b):
            node.gate.directory = directory
            node.node.directory = directory

    def pump(self) -> None:
        for _ in range(20):
            super().pump()
            self.clock.advance(0.001)
