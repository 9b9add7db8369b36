"""
Each adapter's filters against real servers and real clients, joined by L{DirectRelay}: a source
end and a destination end in one process, wired together without a tunnel.  This proves the
parsers and rewriters on real protocol traffic independently of the WebSocket path; the same
checks through service + source + destination are in C{test_adapters_tunnel}.
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import socket
import subprocess
from typing import Any, Dict, List, Optional

from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from zope.interface import implementer

from tests.e2e.test_adapters_servers import (
    FTP_PASSWORD,
    FTP_USER,
    SSHServer,
    VNCServer,
    rfb_handshake,
    start_ftp_server,
    start_vhost_site,
)
from tunnelkit.adapters import (
    IActiveStreamFilter,
    IDestinationContext,
    IFilterOutput,
    ISourceContext,
    StreamFilterError,
    Target,
    resolve_adapter,
    target_endpoint,
)


@implementer(ISourceContext)
class _SourceContext:
    def __init__(self, relay: "DirectRelay") -> None:
        self.relay = relay
        self.service_id = relay.service_id
        self.reactor = relay.reactor
        self.bind_address = "127.0.0.1"

    def open_data_listener(self, connection_id: int) -> defer.Deferred:
        return self.relay.open_data_listener(connection_id)


@implementer(IDestinationContext)
class _DestinationContext:
    def __init__(self, relay: "DirectRelay", target: Target) -> None:
        self.service_id = relay.service_id
        self.reactor = relay.reactor
        self.default_target = target


@implementer(IFilterOutput)
class _End(protocol.Protocol):
    """One side of a relayed connection; C{peer} is the other side; bytes pass its filter."""

    def __init__(self, stream_filter: Any, from_local: bool) -> None:
        self.filter = stream_filter
        self.peer: Optional["_End"] = None
        self.pending: List[bytes] = []
        self.from_local = from_local
        if stream_filter is not None and IActiveStreamFilter.providedBy(stream_filter):
            stream_filter.attach(self)

    def connectionMade(self) -> None:
        if self.peer is not None and self.peer.transport is not None:  # both ends connected
            self.transport.registerProducer(self.peer.transport, True)
            self.peer.transport.registerProducer(self.transport, True)
        for data in self.pending:
            self.transport.write(data)
        self.pending = []

    # local socket -> tunnel (through our filter's outbound, then the peer's inbound)
    def dataReceived(self, data: bytes) -> None:
        if self.filter is not None:
            try:
                data = self.filter.outbound(data)
            except StreamFilterError:
                self.transport.abortConnection()
                return
        self.send_outbound(data)

    def send_outbound(self, data: bytes) -> None:
        if data and self.peer is not None:
            self.peer.deliver(data)

    def deliver(self, data: bytes) -> None:
        """Bytes from the tunnel for our local socket."""
        if self.filter is not None:
            try:
                data = self.filter.inbound(data)
            except StreamFilterError:
                self.transport.abortConnection()
                return
        self.send_inbound(data)

    def send_inbound(self, data: bytes) -> None:
        if not data:
            return
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.filter is not None:
            self.filter.connection_lost()
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            if peer.transport is not None:
                # A paused streaming producer would keep the connection open: unregister first.
                peer.transport.unregisterProducer()
                peer.transport.loseConnection()
            else:
                peer.closed_early = True


class DirectRelay:
    """
    A source listener whose connections reach C{target} through the adapters of C{service_id}
    (two adapter instances, as the two local proxies would have), connection ids counted from 1,
    data listeners for C{open_data_listener}.
    """

    def __init__(self, reactor: Any, service_id: str, target: Target, options: Optional[Dict[str, Any]] = None, asynchronous: bool = False) -> None:
        self.reactor = reactor
        self.service_id = service_id
        opts = {service_id: options or {}}
        self.source_adapter = resolve_adapter(service_id, None, opts)
        self.destination_adapter = resolve_adapter(service_id, None, opts)
        self.source_context = _SourceContext(self)
        self.destination_context = _DestinationContext(self, target)
        self.asynchronous = asynchronous
        self.next_id = 1
        self.listeners: List[Any] = []
        self.connections: List[_End] = []
        self.refused: List[str] = []

    def start(self) -> int:
        port = self.reactor.listenTCP(0, _AcceptFactory(self, None), interface="127.0.0.1")
        self.listeners.append(port)
        return port.getHost().port

    def stop(self) -> defer.Deferred:
        for end in self.connections:
            if end.transport is not None:
                end.transport.abortConnection()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.listeners])

    def open_data_listener(self, connection_id: int) -> defer.Deferred:
        factory = _AcceptFactory(self, connection_id)
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        factory.port = port
        self.listeners.append(port)
        if not self.asynchronous:
            return defer.succeed(port.getHost().port)
        d: defer.Deferred = defer.Deferred()
        self.reactor.callLater(0.01, d.callback, port.getHost().port)
        return d

    def accepted(self, connection_id: Optional[int]) -> Optional[_End]:
        if connection_id is None:
            connection_id = self.next_id
            self.next_id += 1
        source = _End(self.source_adapter.source_filter(self.source_context, connection_id), True)
        try:
            target = self.destination_adapter.destination_target(self.destination_context, connection_id)
        except StreamFilterError as e:
            self.refused.append(str(e))
            return None
        destination = _End(self.destination_adapter.destination_filter(self.destination_context, connection_id), False)
        source.peer, destination.peer = destination, source
        self.connections += [source, destination]
        d = target_endpoint(self.reactor, target).connect(protocol.Factory.forProtocol(lambda: destination))

        def failed(f: Any) -> None:
            if source.transport is not None:
                source.transport.loseConnection()

        d.addErrback(failed)
        return source


class _AcceptFactory(protocol.Factory):
    def __init__(self, relay: DirectRelay, connection_id: Optional[int]) -> None:
        self.relay = relay
        self.connection_id = connection_id
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> Optional[protocol.Protocol]:
        if self.port is not None:  # a data listener: one accept only
            self.port.stopListening()
        return self.relay.accepted(self.connection_id)


def _ftp_session(port: int, work: str, name: str, payload: bytes) -> Dict[str, Any]:
    """A blocking ftplib client in passive mode: LIST, STOR then RETR of C{payload}."""
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", port, timeout=30)
    try:
        ftp.login(FTP_USER, FTP_PASSWORD)
        ftp.set_pasv(True)
        ftp.storbinary(f"STOR {name}", io.BytesIO(payload), blocksize=65536)
        listing: List[str] = []
        ftp.retrlines("LIST", listing.append)
        received = io.BytesIO()
        ftp.retrbinary(f"RETR {name}", received.write, blocksize=65536)
        try:
            ftp.sendport("127.0.0.1", 1025)
            active = "accepted"
        except ftplib.error_perm as e:
            active = str(e)
        ftp.sendcmd("NOOP")
        return {"listing": listing, "received": received.getvalue(), "active": active}
    finally:
        ftp.quit()


class FTPDirectTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)

    def relay(self, ftp_port: int, **kw: Any) -> DirectRelay:
        relay = DirectRelay(self.reactor, "FTP1", ("127.0.0.1", ftp_port), **kw)
        self.addCleanup(relay.stop)
        return relay

    @defer.inlineCallbacks
    def test_two_clients_stor_list_retr_10mb(self) -> Any:
        ftp_port = start_ftp_server(self, self.home, masquerade="203.0.113.9")
        relay = self.relay(ftp_port)
        port = relay.start()
        payloads = [os.urandom(10 * 1024 * 1024), os.urandom(10 * 1024 * 1024)]
        results = yield defer.gatherResults(
            [
                deferToThread(_ftp_session, port, self.home, f"file{i}.bin", payload)
                for i, payload in enumerate(payloads)
            ]
        )
        for i, (result, payload) in enumerate(zip(results, payloads)):
            self.assertEqual(hashlib.sha256(result["received"]).hexdigest(), hashlib.sha256(payload).hexdigest())
            with open(os.path.join(self.home, f"file{i}.bin"), "rb") as f:
                self.assertEqual(f.read(), payload)
            self.assertTrue(any(f"file{i}.bin" in line for line in result["listing"]), result["listing"])
            self.assertIn("502 Active mode", result["active"])
        self.assertEqual(relay.refused, [])
        # Each client made 3 data connections, each under its own ticket; all redeemed.
        self.assertEqual(relay.destination_adapter.open_tickets(), 0)

    @defer.inlineCallbacks
    def test_asynchronous_data_listener(self) -> Any:
        ftp_port = start_ftp_server(self, self.home)
        relay = self.relay(ftp_port, asynchronous=True)
        port = relay.start()
        result = yield deferToThread(_ftp_session, port, self.home, "small.txt", b"hello\n" * 1000)
        self.assertEqual(result["received"], b"hello\n" * 1000)


class HTTPDirectTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.site_port = start_vhost_site(self, reactor, [b"127.0.0.1", b"device.test"])
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 20
        self.addCleanup(self.pool.closeCachedConnections)

    def relay(self, options: Optional[Dict[str, Any]] = None) -> int:
        relay = DirectRelay(self.reactor, "HTTP1", ("127.0.0.1", self.site_port), options)
        self.addCleanup(relay.stop)
        return relay.start()

    @defer.inlineCallbacks
    def get_many(self, port: int, count: int) -> Any:
        agent = Agent(self.reactor, pool=self.pool)

        @defer.inlineCallbacks
        def one(i: int) -> Any:
            response = yield agent.request(b"GET", b"http://localhost:%d/page/%d" % (port, i))
            body = yield readBody(response)
            return body

        bodies = yield defer.gatherResults([one(i) for i in range(count)])
        return bodies

    @defer.inlineCallbacks
    def test_20_parallel_requests_reach_the_targets_vhost(self) -> Any:
        port = self.relay()
        for round_ in range(2):  # the second round reuses kept-alive connections
            bodies = yield self.get_many(port, 20)
            for i, body in enumerate(bodies):
                self.assertEqual(body, b"vhost=127.0.0.1 host=127.0.0.1:%d path=/page/%d" % (self.site_port, i))

    @defer.inlineCallbacks
    def test_configured_host(self) -> Any:
        port = self.relay({"host": "device.test"})
        bodies = yield self.get_many(port, 3)
        self.assertEqual(bodies[2], b"vhost=device.test host=device.test path=/page/2")

    @defer.inlineCallbacks
    def test_without_adapter_the_wrong_vhost_answers(self) -> Any:
        port = self.relay({"rewrite-host": False})
        bodies = yield self.get_many(port, 1)
        self.assertEqual(bodies[0], b"vhost=default host=localhost:%d path=/page/0" % port)

    @defer.inlineCallbacks
    def test_pipelined_requests_with_bodies(self) -> Any:
        port = self.relay()

        def pipeline() -> bytes:
            requests = (
                b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n"
                b"POST /two HTTP/1.1\r\nHost: localhost\r\nContent-Length: 20\r\n\r\nHost: evil.test\r\n\r\nx"
                b"POST /three HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nabcde\r\n0\r\n\r\n"
                b"GET /four HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                for i in range(0, len(requests), 7):  # in small pieces
                    s.sendall(requests[i : i + 7])
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return data
                    data += chunk

        data = yield deferToThread(pipeline)
        host = b"host=127.0.0.1:%d" % self.site_port
        for expected in (b"path=/one", b"path=/two body=20", b"path=/three body=5", b"path=/four"):
            self.assertIn(b"vhost=127.0.0.1 " + host + b" " + expected, data)
        self.assertEqual(data.count(b"HTTP/1.1 200 OK"), 4)


class StreamDirectTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor

    @defer.inlineCallbacks
    def test_ssh_command(self) -> Any:
        sshd = SSHServer(self)
        relay = DirectRelay(self.reactor, "SSH1", ("127.0.0.1", sshd.port))
        self.addCleanup(relay.stop)
        port = relay.start()
        result = yield deferToThread(
            subprocess.run, sshd.ssh_command(port, "echo tunnelkit-$((6*7))"), capture_output=True, timeout=30
        )
        self.assertEqual(result.stdout, b"tunnelkit-42\n", result.stderr)

    @defer.inlineCallbacks
    def test_vnc_handshake(self) -> Any:
        vnc = VNCServer(self)
        relay = DirectRelay(self.reactor, "VNC1", ("127.0.0.1", vnc.port))
        self.addCleanup(relay.stop)
        port = relay.start()
        info = yield deferToThread(rfb_handshake, port)
        self.assertEqual(info["version"], b"RFB 003.008\n")
        self.assertEqual(info["result"], 0)
        self.assertEqual((info["width"], info["height"]), (VNCServer.WIDTH, VNCServer.HEIGHT))
