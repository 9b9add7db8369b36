"""
End-to-end: a source run with C{-y V1} / C{-y V2} against destination test peers that speak only
the V1 or V2 message format (tests.e2e.harness.run_old_format_peer), through the real service.
"""

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness
from tests.e2e.test_localproxy_tunnel import _echo_exchange, parallel_echo


class OldDestinationTests(TestCase):
    timeout = 120

    def exchange(self, port, size=300 * 1024):
        results = {}
        _echo_exchange(port, bytes(range(256)) * (size // 256), results, 0)
        return results[0]

    def test_v1_destination(self):
        h = Harness(self)
        h.start_service(tls=False)
        echo = h.start_echo()
        tunnel = h.open_tunnel(["SSH"])
        peer = h.start_old_format_peer(tunnel.destination_token, "V1", echo)
        peer.wait_for_log("peer connected")
        source = h.start_source(tunnel.source_token, "0", extra=["-y", "V1"])
        port = source.port_of("SSH")
        for n in range(3):  # one connection at a time, each its own stream
            self.assertIs(self.exchange(port), True, peer.tail())
        self.assertIn("peer stream start - 3", peer.log())
        self.assertTrue(peer.running(), peer.tail())

    def test_v2_destination(self):
        h = Harness(self)
        h.start_service(tls=False)
        echo = h.start_echo()
        tunnel = h.open_tunnel(["WEB1", "WEB2"])
        peer = h.start_old_format_peer(tunnel.destination_token, "V2", echo)
        peer.wait_for_log("peer connected")
        source = h.start_source(tunnel.source_token, "WEB1=0,WEB2=0", extra=["-y", "V2"])
        ports = [source.port_of("WEB1"), source.port_of("WEB2")]
        for n in range(2):  # one connection per service at a time, both services at once
            results = parallel_echo(ports, 1, 256 * 1024)
            self.assertEqual(list(results.values()), [True, True], peer.tail())
        self.assertIn("peer stream start WEB2 2", peer.log())
        self.assertTrue(peer.running(), peer.tail())
