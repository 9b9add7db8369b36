"""
Issue 10's checks between two tunnelkit local proxies, with real processes on 127.0.0.1: several
passive FTP clients at once (real ftplib and pyftpdlib) do not deadlock.  Every byte is checked;
nothing here is timed (the ratios are in benchmarks/bench_hol.py and benchmarks/bench_ftp.py).  That
one stalled connection does not stop the others (head-of-line blocking) and that a half-close
crosses the tunnel are checked in memory, byte for byte, in tests/test_memory_tunnel.py.
"""

from __future__ import annotations

import importlib.util
import os

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.harness import Harness
from tests.e2e.test_adapters_servers import start_ftp_server
from tests.e2e.test_adapters_tunnel import _ftp_client, _in_threads, _tunnel

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
    return h.start_apps(name)


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
