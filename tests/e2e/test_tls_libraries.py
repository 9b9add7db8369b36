"""
--tls-library: the service's ssl: listener and the local proxies on either TLS library (Python's
ssl through tunnelkit.transport.stdtls, or pyOpenSSL through Twisted), in every mix, carry a tunnel
(real processes, a real echo server, 1 MB each way).
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness, exchange


class TLSLibraryMixTests(TestCase):
    timeout = 180

    def through(self, service_library: str, proxy_library: str) -> None:
        h = Harness(self)
        h.start_service(tls=True, extra=["--tls-library", service_library])
        echo = h.start_echo()
        tunnel = h.open_tunnel(["ECHO"])
        extra = ["--tls-library", proxy_library]
        destination = h.start_destination(tunnel.destination_token, f"ECHO={echo}", extra)
        source = h.start_source(tunnel.source_token, "ECHO=0", extra)
        port = source.port_of("ECHO")
        destination.wait_for_log("The tunnel is ready")
        source.wait_for_log("The tunnel is ready")
        payload = os.urandom(1 << 20)
        self.assertEqual(exchange(port, payload), payload)

    def test_pyopenssl_everywhere(self) -> None:
        self.through("pyopenssl", "pyopenssl")

    def test_stdlib_proxies_pyopenssl_service(self) -> None:
        self.through("pyopenssl", "stdlib")

    def test_pyopenssl_proxies_stdlib_service(self) -> None:
        self.through("stdlib", "pyopenssl")
