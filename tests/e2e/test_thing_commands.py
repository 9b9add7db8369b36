"""
One command to a thing (issue 15 item 6): C{tunnelkit ssh USER@THING}, C{tunnelkit connect THING
SERVICE --local-port N} and C{tunnelkit duplicate-tunnel} as processes, against mosquitto, the
service (C{--mqtt}) and the thing's agent (SSH to a real sshd, ECHO to an echo server).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any, List

from twisted.trial.unittest import TestCase

from tests.e2e import test_agent_tunnel as agent_tunnel
from tests.e2e.harness import exchange

THING = agent_tunnel.THING
CLI = [sys.executable, "-m", "tunnelkit.cli"]


class ThingCommandTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        """mosquitto, the service (--mqtt) and the agent of thing t1 (SSH to sshd, ECHO to an echo server)."""
        agent_tunnel.AgentTunnelTests.setUp(self)  # type: ignore[arg-type]
        self.api = ["--endpoint-url", self.service.api_url, "--state-dir", self.service.state_dir]

    def tunnel_states(self) -> List[str]:
        return [t["status"] for t in self.h.api().list_tunnels()["tunnelSummaries"]]

    def test_ssh(self) -> None:
        """ssh through a new tunnel runs the command, exits with ssh's status, and closes the tunnel."""
        options = self.sshd.ssh_options(0)
        done = subprocess.run(
            [*CLI, "ssh", *self.api, f"{self.sshd.user}@{THING}", "--", *options, "echo", "through", "the", "thing"],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "through the thing")
        self.assertRegex(done.stderr, r"opened tunnel \S+ to t1 \(SSH\)")
        self.assertIn("closed tunnel", done.stderr)
        self.assertEqual(self.tunnel_states(), ["CLOSED"])
        failing = subprocess.run(
            [*CLI, "ssh", *self.api, f"{self.sshd.user}@{THING}", "--", *options, "exit 7"],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(failing.returncode, 7, failing.stderr)

    def test_connect_until_interrupted(self) -> None:
        connect = self.h.spawn("connect", [*CLI, "connect", *self.api, THING, "ECHO", "--local-port", "0"])
        port = int(connect.wait_for_log(r"t1 ECHO is at 127\.0\.0\.1:(\d+); Ctrl-C closes the tunnel", 60).group(1))
        self.assertEqual(exchange(port, b"hello, thing"), b"hello, thing")
        self.assertEqual(self.tunnel_states(), ["OPEN"])
        connect.popen.send_signal(signal.SIGINT)
        self.assertEqual(connect.wait_exit(30), 0, connect.tail())
        self.assertIn("closed tunnel", connect.log())
        self.assertEqual(self.tunnel_states(), ["CLOSED"])

    def test_thing_that_never_connects(self) -> None:
        connect = self.h.spawn("connect", [*CLI, "connect", *self.api, "nobody", "SSH", "--local-port", "0",
                                           "--wait", "6"])
        self.assertEqual(connect.wait_exit(60), 1, connect.tail())
        self.assertIn("still waiting for nobody to connect (5 s)", connect.log())
        self.assertIn("did not connect within 6 s: is its agent running", connect.log())
        self.assertEqual(self.tunnel_states(), ["CLOSED"])

    def test_duplicate_tunnel(self) -> None:
        old = self.h.api().open_tunnel(description="maintenance", timeoutConfig={"maxLifetimeTimeoutMinutes": 30},
                                       destinationConfig={"thingName": THING, "services": ["ECHO"]})
        done = subprocess.run([*CLI, "duplicate-tunnel", *self.api, "--tunnel-id", old["tunnelId"], "--lifetime", "20"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        new = json.loads(done.stdout)
        self.assertNotEqual(new["tunnelId"], old["tunnelId"])
        self.assertIn("sourceAccessToken", new)
        tunnel: Any = self.h.api().describe_tunnel(tunnelId=new["tunnelId"])["tunnel"]
        self.assertEqual(tunnel["destinationConfig"], {"thingName": THING, "services": ["ECHO"]})
        self.assertEqual(tunnel["description"], "maintenance")
        self.assertEqual(tunnel["timeoutConfig"], {"maxLifetimeTimeoutMinutes": 20})
