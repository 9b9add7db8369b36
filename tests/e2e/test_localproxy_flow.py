"""
End-to-end flow control and web proxies: a local reader that stops reading does not make any
process's memory grow (the WebSocket's reads pause instead), and the source reaches the service
through an HTTP CONNECT proxy with Basic authentication (HTTPS_PROXY).
"""

import hashlib
import re
import socket
import sys

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness, wait_until

FIREHOSE = r"""
import hashlib, select, socket, sys, threading
total = int(sys.argv[2])
def serve(conn):
    # Non-blocking, so that it can say how far it got each time the tunnel stops taking bytes.
    block = hashlib.sha256(b"firehose").digest() * 2048   # 64 KiB
    conn.setblocking(False)
    sent = offset = 0
    while sent < total:
        try:
            n = conn.send(block[offset:])
        except BlockingIOError:
            print("firehose blocked at", sent, flush=True)
            select.select([], [conn], [])
            continue
        sent += n
        offset = (offset + n) % len(block)
    conn.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
print("firehose ready on", s.getsockname()[1], flush=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class SlowReaderTests(TestCase):
    timeout = 120

    def test_stalled_reader_bounds_memory(self):
        h = Harness(self)
        h.start_service(tls=False)
        total = 128 * 1024 * 1024
        firehose = h.spawn("firehose", [sys.executable, "-c", FIREHOSE, "0", str(total)])  # binds a free port
        port = int(firehose.wait_for_log(r"firehose ready on (\d+)").group(1))
        tunnel = h.open_tunnel(["BULK", "ECHO"])
        echo = h.start_echo()
        destination = h.start_destination(tunnel.destination_token, f"BULK={port},ECHO={echo}")
        source = h.start_source(tunnel.source_token, "BULK=0,ECHO=0")
        bulk_port, echo_port = source.port_of("BULK"), source.port_of("ECHO")
        destination.wait_for_log("The tunnel is ready")
        processes = {"source": source, "destination": destination, "service": h.service.process}
        idle = {name: rss_mb(p.pid) for name, p in processes.items()}

        reader = socket.create_connection(("127.0.0.1", bulk_port))
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        # the firehose pushes 128 MB, nobody reads: wait until it is blocked at the same byte twice
        # half a second apart (every buffer on the way is as full as it gets)
        seen = []

        def stuck() -> bool:
            blocked = re.findall(r"firehose blocked at (\d+)", firehose.log())
            seen.append(blocked[-1] if blocked else None)
            return len(seen) > 1 and seen[-1] is not None and seen[-1] == seen[-2]

        wait_until(stuck, 60, "the firehose to stay blocked", interval=0.5)
        stalled = {name: rss_mb(p.pid) for name, p in processes.items()}
        for name in processes:
            self.assertLess(stalled[name] - idle[name], 24, f"{name}: {idle[name]:.1f} -> {stalled[name]:.1f} MB")

        # between tunnelkit peers the stalled reader holds back only its own connection's credit
        block = hashlib.sha256(b"firehose").digest() * 2048
        digest = hashlib.sha256()
        received = 0
        reader.settimeout(60)
        while received < total:
            chunk = reader.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        reader.close()
        self.assertEqual(received, total)
        expected = hashlib.sha256()
        for _ in range(total // len(block)):
            expected.update(block)
        self.assertEqual(digest.hexdigest(), expected.hexdigest())
        with socket.create_connection(("127.0.0.1", echo_port), timeout=10) as s:
            s.sendall(b"still alive")
            self.assertEqual(s.recv(100), b"still alive")


CONNECT_PROXY = r"""
import base64, sys
from twisted.internet import reactor, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
USER = sys.argv[2].encode()
class Pipe(protocol.Protocol):
    def __init__(self, other): self.other = other
    def connectionMade(self):
        self.other.peer = self
        self.other.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.other.rest: self.transport.write(self.other.rest)
    def dataReceived(self, data): self.other.transport.write(data)
    def connectionLost(self, reason): self.other.transport.loseConnection()
class Connect(protocol.Protocol):
    peer = None
    def connectionMade(self): self.head = b""
    def dataReceived(self, data):
        if self.peer is not None:
            self.peer.transport.write(data); return
        self.head += data
        if b"\r\n\r\n" not in self.head: return
        head, self.rest = self.head.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].split(b" ")
        auth = [l.split(b":", 1)[1].strip() for l in lines[1:] if l.lower().startswith(b"proxy-authorization:")]
        print("CONNECT", target.decode(), "auth", bool(auth), flush=True)
        if auth != [b"Basic " + base64.b64encode(USER)]:
            self.transport.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            self.transport.loseConnection(); return
        host, port = target.rsplit(b":", 1)
        connectProtocol(TCP4ClientEndpoint(reactor, host.decode(), int(port)), Pipe(self))
    def connectionLost(self, reason):
        if self.peer is not None: self.peer.transport.loseConnection()
port = reactor.listenTCP(int(sys.argv[1]), protocol.Factory.forProtocol(Connect), interface="127.0.0.1")
print("proxy ready on", port.getHost().port, flush=True)
reactor.run()
"""


class WebProxyTests(TestCase):
    timeout = 120

    def test_https_proxy_with_basic_auth(self):
        h = Harness(self)
        h.start_service(tls=True)
        echo = h.start_echo()
        proxy = h.spawn("connect-proxy", [sys.executable, "-c", CONNECT_PROXY, "0", "alice:s3cret"])
        proxy_port = int(proxy.wait_for_log(r"proxy ready on (\d+)").group(1))
        tunnel = h.open_tunnel(["ECHO"])
        h.start_destination(tunnel.destination_token, f"ECHO={echo}")

        # a wrong password: 407, the source keeps retrying (and says why)
        bad = h.twistd(
            "source-bad-password",
            ["--mode", "source", "-e", h.service.proxy_endpoint, "-c", h.service.ca_pem, "-s", "ECHO=0", "-b", "127.0.0.1"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token, "AWSIOT_TUNNEL_CLIENT_TOKEN": "b" * 36,
             "HTTPS_PROXY": f"http://alice:nope@127.0.0.1:{proxy_port}"},
        )
        bad.wait_for_log("HTTP CONNECT request failed with response code: HTTP/1.1 407")
        bad.wait_for_log("Scheduling retry 1")
        bad.terminate()
        good = h.twistd(
            "source-good-password",
            ["--mode", "source", "-e", h.service.proxy_endpoint, "-c", h.service.ca_pem, "-s", "ECHO=0", "-b", "127.0.0.1"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token, "AWSIOT_TUNNEL_CLIENT_TOKEN": "b" * 36,
             "https_proxy": f"http://alice:s3cret@127.0.0.1:{proxy_port}"},
        )
        match = good.wait_for_log(r"Listening for new connection on port (\d+)")
        self.assertIn("Found Web proxy information", good.log())
        self.assertNotIn("s3cret", good.log())
        proxy.wait_for_log(f"CONNECT 127.0.0.1:{h.service.port} auth True")
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=20) as s:
            s.sendall(b"through the web proxy")
            self.assertEqual(s.recv(100), b"through the web proxy")
