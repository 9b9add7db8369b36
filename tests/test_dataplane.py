"""
Tests for L{tunnelkit.service.dataplane}: options, limits, and what C{mount_data_plane} serves.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from tunnelkit.config import ModeOptions
from tunnelkit.service.dataplane import (
    DataPlaneOptions,
    limits_from_options,
    mount_data_plane,
    tunnel_counter,
)
from tunnelkit.service.interfaces import ITunnelEvents
from tunnelkit.service.relay import RelayLimits
from tunnelkit.testing import MemoryTunnelStore, RawPeer, ServiceHarness


class Options(DataPlaneOptions, ModeOptions):
    """The data plane's options in a mode's Options, as the service has them."""

    mode = "service"


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["max-services-per-tunnel"], 3)
        self.assertEqual(
            limits_from_options(options),
            RelayLimits(
                tunnel_bandwidth=None,
                handshakes_per_second=10.0,
                max_websockets_per_account=2000,
                relay_buffer=131072,
            ),
        )

    def test_values(self) -> None:
        options = parse(
            "--max-services-per-tunnel", "32",
            "--tunnel-bandwidth", "800000",
            "--handshakes-per-second", "0.5",
            "--max-websockets-per-account", "0",
            "--relay-buffer", "65536",
        )
        self.assertEqual(options["max-services-per-tunnel"], 32)
        self.assertEqual(
            limits_from_options(options),
            RelayLimits(800000, 0.5, max_websockets_per_account=None, relay_buffer=65536),
        )

    def test_bad_values_name_the_option(self) -> None:
        for args, text in [
            (["--max-services-per-tunnel", "33"], "from 1 to 32"),
            (["--max-services-per-tunnel", "0"], "from 1 to 32"),
            (["--tunnel-bandwidth", "fast"], "whole number"),
            (["--handshakes-per-second", "-1"], "handshakes-per-second"),
            (["--relay-buffer", "1000"], "at least 65536"),
        ]:
            error = self.assertRaises(usage.UsageError, parse, *args)
            self.assertIn(text, str(error))

    def test_plain_mapping(self) -> None:
        self.assertEqual(limits_from_options({}), RelayLimits(None, 10.0, max_websockets_per_account=2000))
        self.assertEqual(limits_from_options({"tunnel_bandwidth": 5}).tunnel_bandwidth, 5)


class TunnelCounterTests(SynchronousTestCase):
    def test_sources(self) -> None:
        store = MemoryTunnelStore()
        store.open_tunnel((), now=0.0)
        counts = tunnel_counter(store)
        assert counts is not None
        self.assertEqual(counts(), {})  # nothing read yet
        self.successResultOf(counts.refresh())  # type: ignore[attr-defined]
        self.assertEqual(counts(), {"OPEN": 1, "CLOSED": 0})

        from tunnelkit.service.store_sqlite import open_store

        sqlite_store = open_store(self.mktemp())
        self.addCleanup(sqlite_store.close)
        counts = tunnel_counter(sqlite_store)
        assert counts is not None
        self.successResultOf(counts.refresh())  # type: ignore[attr-defined]
        self.assertEqual(counts(), {"OPEN": 0, "CLOSED": 0})
        self.assertIsNone(tunnel_counter(object()))


class MountTests(SynchronousTestCase):
    def test_children(self) -> None:
        root = Resource()
        events = mount_data_plane(root, MemoryTunnelStore(), Clock(), {})
        verifyObject(ITunnelEvents, events)
        self.assertEqual(sorted(root.children), [b"tunnel"])  # no /metrics on the API's site

    def test_metrics_on_their_own_site(self) -> None:
        clock = Clock()
        harness = ServiceHarness(clock)
        harness.open_tunnel()
        self.assertEqual(RawPeer(harness.site, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").status, 404)
        peer = RawPeer(harness.metrics_site, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(peer.status, 200)
        self.assertTrue(peer.headers["content-type"].startswith("text/plain"))
        value = peer.transport.value().decode()
        self.assertIn('tunnelkit_tunnels{status="OPEN"} 1.0', value)
        self.assertIn("tunnelkit_handshakes_total 0.0", value)
