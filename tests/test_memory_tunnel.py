"""
Whole tunnels in memory (L{tunnelkit.testing.memory}): a source and a destination local proxy and
the service's relay on one clock, applications at both ends, every byte checked.  These are the
end-to-end cases that need no process (the ones that do are in C{tests/e2e}).
"""

from __future__ import annotations

import hashlib
from typing import List, Optional

from twisted.trial.unittest import TestCase

from tunnelkit.service.interfaces import DESTINATION, SOURCE
from tunnelkit.testing.memory import MemoryNetwork, MemoryTunnel

ECHO = ("127.0.0.1", 7)


def payload(index: int, size: int) -> bytes:
    """C{size} bytes that differ for every C{index}."""
    block = hashlib.sha256(b"%d" % index).digest()
    return (block * (size // len(block) + 1))[:size]


class MemoryNetworkTests(TestCase):
    """The in-memory network itself: what the tunnel tests rely on."""

    def test_refused_without_listener(self) -> None:
        network = MemoryNetwork()
        app = network.connect_app(9)
        network.flush()
        self.assertTrue(app.closed)
        self.assertFalse(app.connected_)

    def test_paused_reader_pauses_the_writer(self) -> None:
        network = MemoryNetwork()
        accepted = network.serve(9)
        app = network.connect_app(9)
        network.flush()
        server = accepted[0]
        server.pause_reading()
        producer = _RecordingProducer()
        app.transport.registerProducer(producer, True)
        app.write(b"x" * (app.transport.bufferSize + 1))
        network.flush()
        self.assertEqual((producer.changes, len(server.received)), ([True], 0))
        self.assertEqual(server.read_some(10), 10)
        server.resume_reading()
        network.flush()
        self.assertEqual((producer.changes, len(server.received)), ([True, False], app.transport.bufferSize + 1))

    def test_half_close_and_reset(self) -> None:
        network = MemoryNetwork()
        accepted = network.serve_echo(9)
        app = network.connect_app(9)
        network.flush()
        app.write(b"last words")
        app.shutdown_write()
        network.flush()
        self.assertEqual((bytes(app.received), app.eof, app.closed), (b"last words", True, True))
        self.assertFalse(app.was_reset)
        other = network.connect_app(9)
        network.flush()
        other.reset()
        network.flush()
        self.assertTrue(accepted[1].was_reset)


class TunnelTests(TestCase):
    """One source, one destination, echo targets."""

    def tunnel(self, services=("ECHO1",)) -> MemoryTunnel:
        tunnel = MemoryTunnel(self, services)
        self.echo = tunnel.network.serve_echo(ECHO[1])
        return tunnel

    def test_many_connections_byte_exact(self) -> None:
        """3 services x 8 simultaneous connections of 200 KB each, both ways, every byte in order."""
        services = ["ECHO1", "ECHO2", "ECHO3"]
        tunnel = self.tunnel(services)
        destination = tunnel.start_destination({s: ECHO for s in services})
        source = tunnel.start_source({s: 0 for s in services})
        tunnel.pump()
        self.assertTrue(source.session.ready and destination.session.ready)
        apps = {}
        for n, service in enumerate(services * 8):
            apps[n] = tunnel.connect(source, service)
            apps[n].write(payload(n, 200 * 1024))
        tunnel.pump()
        for n, app in apps.items():
            self.assertEqual(bytes(app.received), payload(n, 200 * 1024), n)
        self.assertEqual(len(self.echo), 24)

    def test_close_tunnel_ends_both_with_status_0(self) -> None:
        """CloseTunnel: both proxies end (status 0, the tunnel is closed), their connections too."""
        tunnel = self.tunnel()
        destination = tunnel.start_destination({"ECHO1": ECHO})
        source = tunnel.start_source({"ECHO1": 0})
        tunnel.pump()
        app = tunnel.connect(source, "ECHO1")
        app.write(b"before")
        tunnel.pump()
        tunnel.close_tunnel()
        tunnel.run(2)
        for session in (source, destination):
            self.assertEqual(session.end.status, 0, session.end)
            self.assertIn("the tunnel is closed", session.end.message)
            self.assertFalse(session.running)
        self.assertEqual(bytes(app.received), b"before")
        self.assertTrue(app.closed)
        self.assertTrue(self.echo[0].closed)

    def test_rotated_source_ends_and_new_token_connects(self) -> None:
        """A rotated source token: that proxy stops (0, rotated); one with the new token works."""
        tunnel = self.tunnel()
        destination = tunnel.start_destination({"ECHO1": ECHO})
        source = tunnel.start_source({"ECHO1": 0})
        tunnel.pump()
        token = tunnel.rotate(SOURCE)
        tunnel.run(1)
        self.assertEqual(source.end.status, 0)
        self.assertIn("start it again with the new token", source.end.message)
        self.assertIsNone(destination.end)
        again = tunnel.start_source({"ECHO1": 0}, token=token)
        tunnel.pump()
        app = tunnel.connect(again, "ECHO1")
        app.write(b"with the new token")
        tunnel.pump()
        self.assertEqual(bytes(app.received), b"with the new token")

    def test_rotated_destination_ends(self) -> None:
        tunnel = self.tunnel()
        destination = tunnel.start_destination({"ECHO1": ECHO})
        source = tunnel.start_source({"ECHO1": 0})
        tunnel.pump()
        tunnel.rotate(DESTINATION)
        tunnel.run(1)
        self.assertEqual((destination.end.status, source.end), (0, None))
        self.assertIn("start it again with the new token", destination.end.message)

    def test_replaced_by_a_proxy_with_the_same_tokens(self) -> None:
        """A second source with the same access and client token replaces the first (which stops, 0)."""
        tunnel = self.tunnel()
        tunnel.start_destination({"ECHO1": ECHO})
        client_token = "c" * 36
        first = tunnel.start_source({"ECHO1": 0}, client_token=client_token)
        tunnel.pump()
        second = tunnel.start_source({"ECHO1": 0}, client_token=client_token)
        tunnel.run(1)
        self.assertEqual(first.end.status, 0)
        self.assertIn("another local proxy connected", first.end.message)
        self.assertIsNone(second.end)
        app = tunnel.connect(second, "ECHO1")
        app.write(b"through the second")
        tunnel.pump()
        self.assertEqual(bytes(app.received), b"through the second")

    def test_used_token_and_wrong_mapping_end_with_status_1(self) -> None:
        """A token used once without a client token is refused (1); a mapping not of the tunnel (1)."""
        tunnel = self.tunnel(["SSH1"])
        wrong = tunnel.start_destination({"OTHER": ("127.0.0.1", 22)})
        tunnel.pump()
        self.assertEqual(wrong.end.status, 1)
        self.assertIn("Wrong configurations detected in local proxy", wrong.end.message)
        first = tunnel.start_source({"SSH1": 0})
        tunnel.pump()
        first.stopService()
        tunnel.pump()
        second = tunnel.start_source({"SSH1": 0})
        tunnel.pump()
        self.assertEqual(second.end.status, 1)
        self.assertIn("not retrying", second.end.message)
        # the service named the reason (token-used): the hint follows it, not the text
        self.assertIn("reconnects only with the client token it first used", second.end.message)

    def test_reconnect_after_the_websocket_drops(self) -> None:
        """A dropped WebSocket: its open connections are reset, the proxy reconnects after its
        back-off with the same tokens, and new connections work."""
        tunnel = self.tunnel()
        destination = tunnel.start_destination({"ECHO1": ECHO})
        source = tunnel.start_source({"ECHO1": 0}, client_token="d" * 36)
        tunnel.pump()
        app = tunnel.connect(source, "ECHO1")
        app.write(b"one")
        tunnel.pump()
        self.assertEqual(bytes(app.received), b"one")
        source.websocket.transport.abortConnection()
        tunnel.pump()
        self.assertIsNone(source.websocket)
        self.assertTrue(app.closed)
        tunnel.run(5)
        self.assertIsNotNone(source.websocket)
        self.assertTrue(source.session.ready)
        self.assertIsNone(source.end)
        self.assertIsNone(destination.end)
        again = tunnel.connect(source, "ECHO1")
        again.write(b"two")
        tunnel.pump()
        self.assertEqual(bytes(again.received), b"two")

    def test_half_close_both_ways(self) -> None:
        """The application's FIN reaches the target after its last byte; the target's comes back."""
        tunnel = self.tunnel()
        tunnel.start_destination({"ECHO1": ECHO})
        source = tunnel.start_source({"ECHO1": 0})
        tunnel.pump()
        app = tunnel.connect(source, "ECHO1")
        data = payload(1, 3 * 1024 * 1024)
        app.write(data)
        app.shutdown_write()
        tunnel.pump()
        self.assertTrue(self.echo[0].eof)
        self.assertEqual(bytes(app.received), data)
        self.assertTrue(app.eof)
        self.assertFalse(app.was_reset)

    def _stalled(self, rate: Optional[int]) -> None:
        """
        One application stops reading (C{rate} None) or reads C{rate} bytes per 0.1 s: its writer is
        paused after a few MB (what waits on the way is bounded), while other connections of the same
        service and of another service go on byte-exact; once it reads again every byte arrives.
        """
        tunnel = self.tunnel(["BULK", "OTHER"])
        readers = tunnel.network.serve(9)
        tunnel.start_destination({"BULK": ("127.0.0.1", 9), "OTHER": ECHO})
        source = tunnel.start_source({"BULK": 0, "OTHER": 0})
        tunnel.pump()
        writer = tunnel.connect(source, "BULK")
        readers[0].pause_reading()
        producer = _RecordingProducer()
        writer.transport.registerProducer(producer, True)
        written = 0
        while not producer.paused and written < 50 * 1024 * 1024:
            chunk = payload(written, 256 * 1024)
            writer.write(chunk)
            written += len(chunk)
            tunnel.pump()
        self.assertEqual(producer.changes[-1:], [True])
        self.assertLess(written, 8 * 1024 * 1024)
        others = [tunnel.connect(source, service) for service in ("BULK", "OTHER")]
        for n, other in enumerate(others):
            other.write(payload(n, 4 * 1024 * 1024))
        for _ in range(10):
            if rate is not None:
                readers[0].read_some(rate)
            tunnel.run(0.1)
        self.assertEqual(bytes(readers[1].received), payload(0, 4 * 1024 * 1024))
        self.assertEqual(bytes(others[1].received), payload(1, 4 * 1024 * 1024))
        readers[0].resume_reading()
        tunnel.pump()
        self.assertEqual(producer.changes[-1], False)
        expected = b"".join(payload(n, 256 * 1024) for n in range(0, written, 256 * 1024))
        self.assertEqual(bytes(readers[0].received), expected)

    def test_reader_not_reading(self) -> None:
        self._stalled(None)

    def test_reader_at_1kb_per_100ms(self) -> None:
        self._stalled(1024)


class _RecordingProducer:
    """A streaming producer that records its pauses (True) and resumptions (False)."""

    def __init__(self) -> None:
        self.changes: List[bool] = []

    @property
    def paused(self) -> bool:
        return bool(self.changes) and self.changes[-1]

    def pauseProducing(self) -> None:
        self.changes.append(True)

    def resumeProducing(self) -> None:
        self.changes.append(False)

    def stopProducing(self) -> None:
        pass


class OldFormatTests(TestCase):
    """A source run with C{-y V1} / C{-y V2} against a destination that speaks only that format
    (L{tunnelkit.testing.memory.old_format_peer}, written from the V1/V2 guides only)."""

    def test_v1_destination(self) -> None:
        tunnel = MemoryTunnel(self, ["SSH"])
        tunnel.network.serve_echo(ECHO[1])
        peer = tunnel.start_old_format_peer("V1", ECHO[1])
        tunnel.pump()
        self.assertIn("peer connected (V1)", peer.said)
        source = tunnel.start_source({"": 0}, client_type="V1")
        tunnel.pump()
        for n in range(3):  # one connection at a time, each its own stream
            app = tunnel.connect(source, "SSH")
            app.write(payload(n, 300 * 1024))
            tunnel.pump()
            self.assertEqual(bytes(app.received), payload(n, 300 * 1024))
            app.close()
            tunnel.pump()
        self.assertIn("peer stream start - 3", peer.said)
        self.assertEqual(peer.errors, [])

    def test_v2_destination(self) -> None:
        tunnel = MemoryTunnel(self, ["WEB1", "WEB2"])
        tunnel.network.serve_echo(ECHO[1])
        peer = tunnel.start_old_format_peer("V2", ECHO[1])
        tunnel.pump()
        source = tunnel.start_source({"WEB1": 0, "WEB2": 0}, client_type="V2")
        tunnel.pump()
        for n in range(2):  # one connection per service at a time, both services at once
            apps = [tunnel.connect(source, service) for service in ("WEB1", "WEB2")]
            for i, app in enumerate(apps):
                app.write(payload(10 * n + i, 256 * 1024))
            tunnel.pump()
            for i, app in enumerate(apps):
                self.assertEqual(bytes(app.received), payload(10 * n + i, 256 * 1024))
                app.close()
            tunnel.pump()
        self.assertIn("peer stream start WEB2 2", peer.said)
        self.assertEqual(peer.errors, [])
