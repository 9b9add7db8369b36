"""
Restarting a local proxy with the same command after a local mistake (issue 11): its single-use
access token is not spent by a listen port in use, and a token it did spend reconnects with the
client token it kept.
"""

import os
import socket

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness, Proxy, exchange


class RestartTests(TestCase):
    timeout = 180

    def setUp(self):
        self.h = Harness(self)
        self.h.start_service(tls=False)
        self.tunnel = self.h.open_tunnel(["SSH1"])
        self.state_home = self.h.directory("state-home")  # one user's home: the same for every start

    def command(self, mode, token, name, mapping):
        """The same command line every time (C{-s}/C{-d} MAPPING), as a user would type it again."""
        flag = "-s" if mode == "source" else "-d"
        args = ["--mode", mode, "-e", self.h.service.proxy_endpoint, "-b", "127.0.0.1", flag, mapping]
        return self.h.twistd(name, args, {"AWSIOT_TUNNEL_ACCESS_TOKEN": token, "XDG_STATE_HOME": self.state_home},
                             Proxy, cwd=self.h.directory("work"))

    def test_source_whose_port_was_taken(self):
        echo = self.h.start_echo()
        destination = self.command("destination", self.tunnel.destination_token, "destination", f"SSH1={echo}")
        destination.wait_for_log("Successfully established websocket connection")
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        first = self.command("source", self.tunnel.source_token, "source", f"SSH1={port}")
        self.assertEqual(first.wait_exit(30), 1, first.tail())
        self.assertIn(f"fails to bind address 127.0.0.1:{port} for service SSH1", first.log())
        self.assertNotIn("Attempting to establish web socket connection", first.log())  # token not presented
        taken.close()

        second = self.command("source", self.tunnel.source_token, "source-again", f"SSH1={port}")
        second.wait_for_log("The tunnel is ready")
        self.assertEqual(exchange(port, b"hello through the tunnel"), b"hello through the tunnel")

        # A token spent by the second start: a third start of the same command reconnects with the
        # client token the second one generated and kept.
        second.terminate()
        third = self.command("source", self.tunnel.source_token, "source-third", f"SSH1={port}")
        third.wait_for_log("Using the client token kept in")
        third.wait_for_log("The tunnel is ready")
        self.assertEqual(exchange(port, b"and again"), b"and again")
        self.h.close_tunnel(self.tunnel)
        self.assertEqual(third.wait_exit(30), 0, third.tail())

    def test_destination_with_the_wrong_service_ids(self):
        echo = self.h.start_echo()
        wrong = self.command("destination", self.tunnel.destination_token, "destination", f"SSH2={echo}")
        self.assertEqual(wrong.wait_exit(30), 1, wrong.tail())
        self.assertIn("Wrong configurations detected", wrong.log())
        fixed = self.command("destination", self.tunnel.destination_token, "destination-fixed", f"SSH1={echo}")
        fixed.wait_for_log("Using the client token kept in")
        fixed.wait_for_log("Connected to the tunnel: its services are SSH1; waiting for the source to connect")
        source = self.h.start_source(self.tunnel.source_token, "SSH1=0")
        port = source.port_of("SSH1")
        source.wait_for_log("The tunnel is ready")
        self.assertEqual(exchange(port, b"fixed"), b"fixed")
        files = os.listdir(os.path.join(self.state_home, "tunnelkit", "client-tokens"))
        self.assertEqual(len(files), 1)  # one access token, one kept client token
