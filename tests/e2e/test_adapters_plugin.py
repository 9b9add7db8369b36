"""
A third-party adapter dropped into a C{services/} directory on the proxies' Python path is
discovered by both real local proxy processes and used for the service IDs its prefix claims.
"""

from __future__ import annotations

import os
import socket
import textwrap

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness

PLUGIN = textwrap.dedent(
    '''
    """A test adapter: the destination upper-cases what the client sends."""
    from twisted.plugin import IPlugin
    from zope.interface import implementer
    from tunnelkit.adapters import IServiceAdapterFactory, IStreamFilter
    from services.tcp import StreamAdapter


    @implementer(IStreamFilter)
    class Shout:
        def outbound(self, data):
            return data

        def inbound(self, data):
            return data.upper()

        def connection_lost(self):
            pass


    class ShoutAdapter(StreamAdapter):
        name = "shout"

        def destination_filter(self, context, connection_id):
            return Shout()


    @implementer(IPlugin, IServiceAdapterFactory)
    class ShoutFactory:
        name = "shout"
        prefixes = ("SHOUT",)

        def build(self, service_id, options):
            return ShoutAdapter(service_id)


    shout = ShoutFactory()
    '''
)


class ThirdPartyPluginTunnelTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "services"))
        with open(os.path.join(root, "services", "tk_shout.py"), "w") as f:
            f.write(PLUGIN)
        # The harness passes this process's environment on to the processes it starts.
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = root + (os.pathsep + before if before else "")

        def restore() -> None:
            if before is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = before

        self.addCleanup(restore)

    def test_discovered_and_used_by_prefix(self) -> None:
        h = Harness(self)
        h.start_service()
        echo = h.start_echo()
        tunnel = h.open_tunnel(["SHOUT1", "PLAIN1"])
        destination = h.start_destination(tunnel.destination_token, f"SHOUT1={echo},PLAIN1={echo}")
        source = h.start_source(tunnel.source_token, "SHOUT1=0,PLAIN1=0")
        shout_port, plain_port = source.port_of("SHOUT1"), source.port_of("PLAIN1")
        destination.wait_for_log("The tunnel is ready")
        self.assertIn("adapter shout", source.wait_for_log(r"service SHOUT1, adapter \w+").group(0))
        self.assertIn("adapter tcp", source.wait_for_log(r"service PLAIN1, adapter \w+").group(0))
        for port, expected in ((shout_port, b"HELLO, TUNNEL"), (plain_port, b"hello, tunnel")):
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"hello, tunnel")
                received = b""
                while len(received) < len(expected):
                    chunk = s.recv(100)
                    if not chunk:
                        break
                    received += chunk
            self.assertEqual(received, expected, destination.tail())
        destination.wait_for_log(r"SHOUT1 .*adapter shout")
