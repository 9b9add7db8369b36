"""
The example configuration C{tap.yml} is valid for every mode it has a section for.
"""

import os

from twisted.trial import unittest

from tunnelkit.service.certs import ensure_certificates
from tunnelkit.tap import load_mode

TAP_YML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tunnelkit", "tap.yml")


class ExampleConfigurationTests(unittest.TestCase):
    def setUp(self):
        # tap.yml names ./tunnelkit-state/ca.pem, as a service started in the same directory makes it.
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(workdir)
        ensure_certificates("tunnelkit-state", [])

    def options(self, mode, *args):
        options = load_mode(mode).Options()
        if hasattr(options, "mode") and mode in ("source", "destination"):
            options.mode = mode
            options["mode"] = mode
        options.parseOptions(["--mode", mode, "--config", TAP_YML, *args])
        return options

    def test_service(self):
        options = self.options("service")
        self.assertEqual(options["listen"], ["ssl:8443:interface=127.0.0.1"])
        self.assertEqual(options["region"], "us-east-1")

    def test_source(self):
        self.patch(os, "environ", dict(os.environ, AWSIOT_TUNNEL_ACCESS_TOKEN="example-token"))
        options = self.options("source")
        self.assertEqual(options["source-listen-port"], "SSH1=5555,HTTP1=8080")

    def test_destination(self):
        self.patch(os, "environ", dict(os.environ, AWSIOT_TUNNEL_ACCESS_TOKEN="example-token"))
        options = self.options("destination")
        self.assertEqual(options["destination-app"], "SSH1=22,HTTP1=127.0.0.1:80")

    def test_agent(self):
        options = self.options("agent")
        self.assertEqual(options["thing-name"], "t1")

    def test_command_line_wins(self):
        options = self.options("service", "--region", "eu-west-1")
        self.assertEqual(options["region"], "eu-west-1")
