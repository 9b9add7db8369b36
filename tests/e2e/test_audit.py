"""
The service's audit trail (issue 15 item 7) from a real service process: API calls, peer connects
and disconnects and TCP connections with their bytes, read back with C{tunnelkit audit}; no token.
"""

import json
import os
import socket
import struct
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness, exchange
from tunnelkit.testing.process import wait_until

CLI = [sys.executable, "-m", "tunnelkit.cli"]


class AuditTrailTests(TestCase):
    timeout = 120

    def test_a_tunnels_records(self):
        h = Harness(self)
        service = h.start_service(tls=False)
        tunnel = h.open_tunnel(["ECHO"])
        echo = h.start_echo()
        destination = h.start_destination(tunnel.destination_token, f"ECHO={echo}")
        source = h.start_source(tunnel.source_token, "ECHO=0")
        port = source.port_of("ECHO")
        source.wait_for_log("The tunnel is ready")
        destination.wait_for_log("The tunnel is ready")
        self.assertEqual(exchange(port, b"x" * 5000), b"x" * 5000)
        self.assertEqual(exchange(port, b"y" * 123), b"y" * 123)
        # A connection the application resets (RST, not FIN): recorded as the reset it is.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"z" * 77)
            received = b""
            while len(received) < 77:
                received += s.recv(1024)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        trail = os.path.join(service.state_dir, "audit.jsonl")

        def three_connections() -> bool:  # the relay records each end as its reset passes
            with open(trail, encoding="utf-8") as f:
                return sum('"kind":"connection"' in line for line in f) == 3

        wait_until(three_connections, 30, "the audit records of the three connections")
        h.api().describe_tunnel(tunnelId=tunnel.tunnel_id)
        h.close_tunnel(tunnel)
        self.assertEqual(source.wait_exit(30), 0)
        self.assertEqual(destination.wait_exit(30), 0)
        service.process.terminate()

        with open(trail, encoding="utf-8") as f:
            text = f.read()
        for secret in (tunnel.source_token, tunnel.destination_token):
            self.assertNotIn(secret, text)
        shown = subprocess.run([*CLI, "audit", "--tunnel-id", tunnel.tunnel_id, "--state-dir", service.state_dir,
                                "--json"], capture_output=True, text=True, timeout=60)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        records = [json.loads(line) for line in shown.stdout.splitlines()]
        kinds = [r["kind"] for r in records]
        api = [r for r in records if r["kind"] == "api"]
        self.assertEqual([r["operation"] for r in api], ["OpenTunnel", "DescribeTunnel", "CloseTunnel"])
        for record in api:
            self.assertEqual(record["outcome"], "ok")
            self.assertRegex(record["account"], r"^\d{12}$")
            self.assertTrue(record["access_key_id"])
            self.assertTrue(record["client"].startswith("127.0.0.1:"))
        connects = [r for r in records if r["kind"] == "peer-connect"]
        self.assertEqual(sorted(r["side"] for r in connects), ["destination", "source"])
        connections = [r for r in records if r["kind"] == "connection"]
        self.assertEqual(len(connections), 3, records)
        self.assertEqual(sorted((c["bytes_source_to_destination"], c["bytes_destination_to_source"], c["ended"])
                                for c in connections),
                         [(77, 77, "reset by source"), (123, 123, "closed"), (5000, 5000, "closed")])
        for connection in connections:
            self.assertEqual(connection["service"], "ECHO")
        disconnects = [r for r in records if r["kind"] == "peer-disconnect"]
        self.assertEqual(len(disconnects), 2)
        self.assertLess(kinds.index("peer-connect"), kinds.index("connection"))
        readable = subprocess.run([*CLI, "audit", "--tunnel-id", tunnel.tunnel_id, "--state-dir", service.state_dir],
                                  capture_output=True, text=True, timeout=60)
        self.assertIn(" connection tunnel_id=", readable.stdout)
        missing = subprocess.run([*CLI, "audit", "--tunnel-id", "nope", "--state-dir", service.state_dir],
                                 capture_output=True, text=True, timeout=60)
        self.assertEqual(missing.returncode, 1)
        self.assertIn("no records of tunnel nope", missing.stderr)
