"""
Issue 10's checks between two tunnelkit local proxies, with real processes on 127.0.0.1: one stalled
connection does not stop the others (head-of-line blocking), several passive FTP clients at once do
not deadlock, and a half-close crosses the tunnel.  Every byte is checked; nothing here is timed
(the ratios are in benchmarks/bench_hol.py and benchmarks/bench_ftp.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Any, Tuple

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.harness import Harness, Proxy, wait_until
from tests.e2e.test_adapters_servers import start_ftp_server
from tests.e2e.test_adapters_tunnel import _ftp_client, _in_threads, _tunnel
from tunnelkit.testapps import StalledReader, echo_round_trips, pattern_digest, push, sink

MB = 1 << 20


def require_flow_control() -> None:
    """Skip unless the per-connection flow control of issue 10 is in this checkout."""
    if importlib.util.find_spec("tunnelkit.protocol.flowcontrol") is None:
        raise SkipTest(
            "issue 10: needs per-connection flow control and half-close between tunnelkit peers "
            "(tunnelkit/protocol/flowcontrol.py is not in this checkout yet)"
        )


def start_apps(h: Harness, name: str = "apps") -> int:
    """The L{tunnelkit.testapps} command server in a subprocess; its port."""
    process = h.spawn(name, [sys.executable, "-m", "tunnelkit.testapps", "serve"])
    return int(process.wait_for_log(r"^(\d+)\n").group(1))


def two_service_tunnel(h: Harness, apps: int) -> Tuple[Proxy, Proxy, int, int]:
    """Service (ws://), a tunnel with services BULK and OTHER both served by C{apps}: (source,
    destination, BULK's local port, OTHER's local port)."""
    h.start_service()
    tunnel = h.open_tunnel(["BULK", "OTHER"])
    destination = h.start_destination(tunnel.destination_token, f"BULK={apps},OTHER={apps}")
    source = h.start_source(tunnel.source_token, "BULK=0,OTHER=0")
    ports = source.port_of("BULK"), source.port_of("OTHER")
    destination.wait_for_log("The tunnel is ready")
    return source, destination, ports[0], ports[1]


def check_other_connections(test: TestCase, ports: Any, megabytes: int = 8, half_close: bool = False) -> None:
    """On each port: 20 echoes of 1,000 bytes, then a push and a sink of C{megabytes}, byte-exact."""
    total = megabytes * MB
    for port in ports:
        echo_round_trips(port, count=20, size=1000, timeout=30)
        test.assertEqual(push(port, total, seed=port, timeout=30), (total, pattern_digest(port, total)))
        test.assertEqual(
            sink(port, total, seed=port + 1, half_close=half_close, timeout=30), (total, pattern_digest(port + 1, total))
        )


class HeadOfLineTests(TestCase):
    """A connection whose reader stalls stops only itself (same service and another service go on)."""

    timeout = 300
    STALLED = 32 * MB

    def setUp(self) -> None:
        require_flow_control()
        self.h = Harness(self)
        apps = start_apps(self.h)
        self.source, self.destination, self.bulk, self.other = two_service_tunnel(self.h, apps)

    def _stalled_then_others(self, rate: Any) -> None:
        stalled = StalledReader(self.bulk, self.STALLED, rate=rate)
        self.addCleanup(stalled.close)
        # the stalled connection's bytes fill every buffer on their way before the others start
        if rate is not None:
            wait_until(lambda: stalled.received > 0, 30, "the first bytes of the stalled connection")
        time.sleep(2)
        echo_round_trips(self.bulk, count=5, size=1000, timeout=30)
        check_other_connections(self, (self.bulk, self.other))
        received, exact = stalled.drain()
        self.assertEqual((received, exact), (self.STALLED, True))

    def test_reader_not_reading(self) -> None:
        self._stalled_then_others(None)

    def test_reader_at_1kb_per_second(self) -> None:
        self._stalled_then_others(1024)


class HalfCloseTests(TestCase):
    """send 10 MB, shutdown(SHUT_WR), read the far application's answer."""

    timeout = 120

    def test_half_close_10mb(self) -> None:
        require_flow_control()
        h = Harness(self)
        apps = start_apps(h)
        source, destination, bulk, other = two_service_tunnel(h, apps)
        total = 10 * MB
        self.assertEqual(sink(bulk, total, seed=7, half_close=True), (total, pattern_digest(7, total)))
        # the connection after it, and the echo's end of stream comes back as one too
        self.assertEqual(sink(other, 1000, seed=8, half_close=True), (1000, pattern_digest(8, 1000)))


class ConcurrentFTPTests(TestCase):
    """2 and 8 passive ftplib clients at once through the ftp adapter: LIST, STOR and RETR of 10 MB."""

    timeout = 600

    def _runs(self, clients: int, runs: int) -> None:
        require_flow_control()
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        with open(os.path.join(home, "existing.txt"), "wb") as f:
            f.write(b"already here\n")
        ftp_port = start_ftp_server(self, home, masquerade="203.0.113.9")
        h, source, destination, port = _tunnel(self, "FTP1", ftp_port)
        for run in range(runs):
            payloads = [os.urandom(10 * MB) for _ in range(clients)]
            names = [f"r{run}c{i}.bin" for i in range(clients)]
            results = _in_threads(_ftp_client, [(port, name, p) for name, p in zip(names, payloads)])
            for i, (result, payload) in enumerate(zip(results, payloads)):
                self.assertIsInstance(
                    result, dict, f"run {run} client {i}: {result!r}\n{source.tail()}\n{destination.tail()}"
                )
                self.assertTrue(any("existing.txt" in line for line in result["before"]), result["before"])
                self.assertEqual(result["received"], payload, f"run {run} client {i}: RETR differs")
                with open(os.path.join(home, names[i]), "rb") as f:
                    self.assertEqual(f.read(), payload, f"run {run} client {i}: STOR differs")
                os.remove(os.path.join(home, names[i]))

    def test_two_clients_3_runs(self) -> None:
        self._runs(2, 3)

    def test_eight_clients_2_runs(self) -> None:
        self._runs(8, 2)
