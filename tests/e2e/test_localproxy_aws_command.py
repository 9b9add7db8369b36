"""
C{tunnelkit-localproxy} as a process with AWS's command line (C{-e -d -s -b -v}, C{--config},
C{--settings-json}) and the token files: bytes through a real service, status 0 on CloseTunnel.
"""

import json
import os
import sys

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness, Proxy, exchange

COMMAND = [sys.executable, "-m", "tunnelkit.localproxy.aws_command"]


class AwsCommandLineTests(TestCase):
    timeout = 120

    def test_awss_command_lines(self):
        h = Harness(self)
        h.start_service(tls=False)
        tunnel = h.open_tunnel(["SSH1"])
        echo = h.start_echo()
        work = h.directory("work")
        token_file = os.path.join(work, "dst.token")
        with open(token_file, "w") as f:
            f.write(tunnel.destination_token + "\n")
        endpoint = h.service.proxy_endpoint
        destination = h.spawn("destination", [*COMMAND, "-e", endpoint, "-d", f"SSH1={echo}",
                                              "--access-token-file", token_file, "-v", "4"], work, process_class=Proxy)
        config = os.path.join(work, "source.ini")
        with open(config, "w") as f:
            f.write(f"proxy-endpoint = {endpoint}\nsource-listen-port = SSH1=0\nlocal-bind-address = 127.0.0.1\n")
        settings = os.path.join(work, "settings.json")
        with open(settings, "w") as f:
            json.dump({"tunneling": {"proxy": {"tcp": {"max_active_connections": 4}}}}, f)
        source = h.spawn("source", [*COMMAND, "--config", config, "--settings-json", settings],
                         work, env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token}, process_class=Proxy)
        port = source.port_of("SSH1")
        source.wait_for_log("The tunnel is ready")
        destination.wait_for_log("The tunnel is ready")
        self.assertEqual(exchange(port, b"aws command line"), b"aws command line")
        self.assertNotIn(tunnel.destination_token, " ".join(destination.argv))
        h.close_tunnel(tunnel)
        self.assertEqual(source.wait_exit(30), 0, source.tail())
        self.assertEqual(destination.wait_exit(30), 0, destination.tail())
