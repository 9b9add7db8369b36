"""
Tests for L{services.http}: the request rewriter byte-exact under any split, bodies and chunks
untouched, keep-alive, pipelining, upgrades and non-HTTP bytes.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from services.http import (
    BODY,
    HEAD,
    PASSTHROUGH,
    RequestRewriter,
    check_http_response,
    host_header_for,
    http_adapter_factory,
)
from tunnelkit.adapters import IDestinationContext, IServiceAdapter, IStreamFilter, ProbeFailed, StreamFilterError
from tunnelkit.errors import ConfigError

H = b"127.0.0.1:8080"

# (client bytes, expected bytes after rewriting to Host: 127.0.0.1:8080)
PIPELINE_IN = (
    b"GET /a HTTP/1.1\r\nHost: localhost:5555\r\nAccept: */*\r\n\r\n"
    b"POST /form HTTP/1.1\r\nHOST: localhost:5555\r\nContent-Length: 29\r\n\r\n"
    b"Host: not-a-header\r\n\r\nGET / H"  # a body that looks like a request
    b"\r\n"  # an empty line between requests is allowed
    b"PUT /up HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nhost:localhost\r\n\r\n"
    b"a;ext=1\r\n0123456789\r\n"
    b"14\r\nHost: x\r\n\r\nGET / HTT\r\n"
    b"0\r\nX-Trailer: Host: no\r\n\r\n"
    b"GET /old HTTP/1.0\n\n"
    b"DELETE /z HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
)
PIPELINE_OUT = (
    b"GET /a HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\n\r\n"
    b"POST /form HTTP/1.1\r\nHOST: 127.0.0.1:8080\r\nContent-Length: 29\r\n\r\n"
    b"Host: not-a-header\r\n\r\nGET / H"
    b"\r\n"
    b"PUT /up HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nhost: 127.0.0.1:8080\r\n\r\n"
    b"a;ext=1\r\n0123456789\r\n"
    b"14\r\nHost: x\r\n\r\nGET / HTT\r\n"
    b"0\r\nX-Trailer: Host: no\r\n\r\n"
    b"GET /old HTTP/1.0\nHost: 127.0.0.1:8080\n\n"
    b"DELETE /z HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 0\r\n\r\n"
)


def split_at(data: bytes, cuts):
    points = [0] + sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


class RequestRewriterTests(SynchronousTestCase):
    def test_pipeline_whole(self) -> None:
        rewriter = RequestRewriter(H)
        self.assertEqual(rewriter.feed(PIPELINE_IN), PIPELINE_OUT)
        self.assertEqual(rewriter.requests, 5)
        self.assertEqual(rewriter.state, HEAD)

    @given(st.lists(st.integers(min_value=0, max_value=len(PIPELINE_IN)), max_size=40))
    @settings(max_examples=300, deadline=None)
    def test_pipeline_any_split(self, cuts) -> None:
        rewriter = RequestRewriter(H)
        out = b"".join(rewriter.feed(piece) for piece in split_at(PIPELINE_IN, cuts))
        self.assertEqual(out, PIPELINE_OUT)
        self.assertEqual(rewriter.requests, 5)

    def test_byte_at_a_time(self) -> None:
        rewriter = RequestRewriter(H)
        out = b"".join(rewriter.feed(PIPELINE_IN[i : i + 1]) for i in range(len(PIPELINE_IN)))
        self.assertEqual(out, PIPELINE_OUT)

    def test_body_bytes_are_not_copied(self) -> None:
        rewriter = RequestRewriter(H)
        rewriter.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
        self.assertEqual(rewriter.state, BODY)
        chunk = b"x" * 65536
        self.assertIs(rewriter.feed(chunk), chunk)

    def test_host_kept_when_not_rewriting(self) -> None:
        rewriter = RequestRewriter(None)
        self.assertEqual(rewriter.feed(PIPELINE_IN), PIPELINE_IN)

    def test_forwarded_headers(self) -> None:
        rewriter = RequestRewriter(H, forwarded=True)
        out = rewriter.feed(b'GET / HTTP/1.1\r\nHost: localhost:5555\r\n\r\nGET / HTTP/1.0\r\n\r\n')
        self.assertEqual(
            out,
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b'Forwarded: host="localhost:5555";proto=http\r\n'
            b"X-Forwarded-Host: localhost:5555\r\nX-Forwarded-Proto: http\r\n\r\n"
            b"GET / HTTP/1.0\r\nHost: 127.0.0.1:8080\r\nForwarded: proto=http\r\n"
            b"X-Forwarded-Proto: http\r\n\r\n",
        )

    def test_upgrade_passes_the_rest(self) -> None:
        rewriter = RequestRewriter(H)
        request = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        frames = b"\x81\x85GET / HTTP/1.1\r\nHost: b\r\n\r\n"
        out = rewriter.feed(request + frames)
        self.assertEqual(out, request.replace(b"Host: a", b"Host: " + H) + frames)
        self.assertEqual(rewriter.state, PASSTHROUGH)
        self.assertIs(rewriter.feed(frames), frames)

    def test_connect_passes_the_rest(self) -> None:
        rewriter = RequestRewriter(H)
        out = rewriter.feed(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01")
        self.assertEqual(out, b"CONNECT a:443 HTTP/1.1\r\nHost: " + H + b"\r\n\r\n\x16\x03\x01")
        self.assertEqual(rewriter.state, PASSTHROUGH)

    def test_not_http_passes(self) -> None:
        for data in (b"\x16\x03\x01\x02\x00", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"SSH-2.0-x\r\n", b" GET /"):
            rewriter = RequestRewriter(H)
            self.assertEqual(rewriter.feed(data), data, data)
            self.assertEqual(rewriter.state, PASSTHROUGH)
            self.assertIn("not an HTTP/1.x request", rewriter.passthrough_reason)

    def test_malformed_request_line_passes(self) -> None:
        rewriter = RequestRewriter(H)
        data = b"GET /\r\nHost: a\r\n\r\nmore"
        self.assertEqual(rewriter.feed(data), data)
        self.assertEqual(rewriter.state, PASSTHROUGH)

    def test_bad_content_length_passes(self) -> None:
        for value in (b"abc", b"5\r\nContent-Length: 6"):
            rewriter = RequestRewriter(H)
            data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + value + b"\r\n\r\nhello"
            self.assertEqual(rewriter.feed(data), data)
            self.assertEqual(rewriter.state, PASSTHROUGH)

    def test_non_chunked_transfer_coding_passes(self) -> None:
        rewriter = RequestRewriter(H)
        rewriter.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n")
        self.assertEqual(rewriter.state, PASSTHROUGH)

    def test_limits(self) -> None:
        with self.assertRaises(StreamFilterError):
            RequestRewriter(H).feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 70000)
        rewriter = RequestRewriter(H)
        rewriter.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        with self.assertRaises(StreamFilterError):
            rewriter.feed(b"zz\r\n")
        rewriter = RequestRewriter(H)
        rewriter.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab")
        with self.assertRaises(StreamFilterError):
            rewriter.feed(b"XX\r\n")

    def test_host_header_for(self) -> None:
        self.assertEqual(host_header_for(("127.0.0.1", 80)), b"127.0.0.1:80")
        self.assertEqual(host_header_for(("::1", 8080)), b"[::1]:8080")
        self.assertEqual(host_header_for("/run/web.sock"), b"localhost")


@implementer(IDestinationContext)
class DestinationContext:
    def __init__(self, target) -> None:
        self.service_id = "HTTP1"
        self.reactor = None
        self.default_target = target


class HTTPAdapterTests(SynchronousTestCase):
    def test_default_host_is_the_target(self) -> None:
        adapter = http_adapter_factory.build("HTTP1", {})
        verifyObject(IServiceAdapter, adapter)
        context = DestinationContext(("127.0.0.1", 8080))
        self.assertIsNone(adapter.source_filter(None, 1))
        self.assertEqual(adapter.destination_target(context, 1), ("127.0.0.1", 8080))
        f = adapter.destination_filter(context, 1)
        verifyObject(IStreamFilter, f)
        self.assertEqual(
            f.inbound(b"GET / HTTP/1.1\r\nHost: localhost:5555\r\n\r\n"),
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
        )
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        self.assertIs(f.outbound(response), response)

    def test_configured_host(self) -> None:
        adapter = http_adapter_factory.build("HTTP1", {"host": "device.test"})
        f = adapter.destination_filter(DestinationContext(("127.0.0.1", 8080)), 1)
        self.assertEqual(f.inbound(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), b"GET / HTTP/1.1\r\nHost: device.test\r\n\r\n")

    def test_no_rewrite_is_the_fast_path(self) -> None:
        adapter = http_adapter_factory.build("HTTP1", {"rewrite-host": "false"})
        self.assertIsNone(adapter.destination_filter(DestinationContext(("127.0.0.1", 80)), 1))
        adapter = http_adapter_factory.build("HTTP1", {"rewrite-host": False, "forwarded": True})
        self.assertIsNotNone(adapter.destination_filter(DestinationContext(("127.0.0.1", 80)), 1))

    def test_bad_options(self) -> None:
        for options in ({"host": "a b"}, {"host": ""}, {"host": "a/b"}, {"forwarded": "perhaps"}, {"vhost": "a"}):
            with self.assertRaises(ConfigError, msg=repr(options)):
                http_adapter_factory.build("HTTP1", options)

    def test_prefixes(self) -> None:
        self.assertEqual(http_adapter_factory.prefixes, ("HTTP",))

    def test_probe(self) -> None:
        adapter = http_adapter_factory.build("HTTP1", {})
        reactor = MemoryReactorClock()
        results = []
        adapter.probe(reactor, ("127.0.0.1", 8080), 3).addBoth(results.append)
        proto = reactor.tcpClients[0][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"))
        proto.dataReceived(b"HTTP/1.1 404 Not Found\r\n")
        self.assertEqual(results, ["HTTP/1.1 404 Not Found"])

    def test_response_check(self) -> None:
        self.assertIsNone(check_http_response(b"HTTP/1.", False))
        self.assertEqual(check_http_response(b"HTTP/1.0 200 OK\r\n", False), "HTTP/1.0 200 OK")
        for wrong in (b"SSH-2.0-x\r\n", b"\x15\x03\x01\x00\x02", b"HTTP/1.1 OK\r\n"):
            self.assertRaises(ProbeFailed, check_http_response, wrong, False)
