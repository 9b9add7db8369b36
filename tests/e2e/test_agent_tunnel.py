"""
The tutorial with no step on the device: mosquitto + the service (C{--mqtt}) + the agent (thing
C{t1}, SSH mapped to a real sshd) as real processes; C{tunnelkit open-tunnel --destination-config
thingName=t1,services=SSH} and a source proxy with the source token, then C{ssh} through it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import List, Sequence

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.harness import SSHD, Harness, exchange
from tests.e2e.mosquitto import MOSQUITTO, HarnessMosquitto

THING = "t1"


class AgentTunnelTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        if MOSQUITTO is None:
            raise SkipTest("mosquitto is not installed")
        if not os.path.exists(SSHD):
            raise SkipTest("sshd is not installed")
        self.h = Harness(self)
        self.broker = HarnessMosquitto(self.h)
        self.broker.start()
        self.service = self.h.start_service(tls=True, extra=["--mqtt", self.broker.endpoint])
        self.service.process.wait_for_log(r"Connected to the MQTT broker")
        self.sshd = self.h.start_sshd()
        self.echo_port = self.h.start_echo()
        self.agent = self.h.twistd(
            "agent",
            [
                "--mode", "agent",
                "--thing-name", THING,
                "--mqtt", self.broker.endpoint,
                "-e", self.service.proxy_endpoint,
                "-c", self.service.ca_pem,
                "-d", f"SSH=127.0.0.1:{self.sshd.port},ECHO=127.0.0.1:{self.echo_port}",
            ],
        )
        self.agent.wait_for_log(r"Subscribed to \$aws/things/t1/tunnels/notify")

    def cli(self, *args: str) -> dict:
        """C{tunnelkit ARGS} against the service; its JSON output."""
        command = shutil.which("tunnelkit")
        argv: List[str] = [command] if command else [sys.executable, "-m", "tunnelkit.cli"]
        result = subprocess.run(
            [*argv, *args, "--endpoint-url", self.service.api_url, "--state-dir", self.service.state_dir],
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        return json.loads(result.stdout) if result.stdout.strip() else {}

    def agent_logs(self, pattern: str, start: int) -> int:
        """Wait for the agent to log C{pattern}; where that line ends.  A timeout shows every log."""
        try:
            return self.agent.wait_for_log(pattern, start=start).end()
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n--- service:\n{self.service.process.tail(30)}\n--- broker:\n{self.broker.process.tail(30)}"
            ) from None

    def session_up(self, tunnel_id: str, after: int) -> int:
        """Wait for the agent to start tunnel C{tunnel_id}'s session and connect; where its log is now."""
        mark = self.agent_logs(rf"Started a destination session for {tunnel_id}", after)
        mark = self.agent_logs(r"Successfully established websocket connection", mark)
        return self.agent_logs(r"Connected to the tunnel", mark)

    def ssh_works(self, port: int, word: str) -> None:
        result = self.sshd.run(f"echo {word}", port=port)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        self.assertEqual(result.stdout.strip(), word.encode())

    def echo_works(self, port: int, data: bytes) -> None:
        self.assertEqual(exchange(port, data, timeout=20), data)

    def open_tunnel(self, services: Sequence[str]) -> dict:
        return self.cli("open-tunnel", "--destination-config", f"thingName={THING},services={','.join(services)}")

    def test_ssh_rotation_and_second_tunnel(self) -> None:
        """
        ssh works with no device-side step; rotating DESTINATION re-delivers and the agent
        reconnects with the new token; a second tunnel with two services works alongside.
        """
        mark = len(self.agent.log())
        first = self.open_tunnel(["SSH"])
        mark = self.session_up(first["tunnelId"], mark)
        source = self.h.start_source(first["sourceAccessToken"], "SSH=0")
        port = source.port_of("SSH")
        self.ssh_works(port, "through-the-agent")

        self.cli(
            "rotate-tunnel-access-token",
            "--tunnel-id", first["tunnelId"],
            "--client-mode", "DESTINATION",
            "--destination-config", f"thingName={THING},services=SSH",
        )
        # The service closes the old session's WebSocket and the agent replaces the session with
        # one using the new token (in whichever order the two events arrive).
        mark = self.session_up(first["tunnelId"], mark)
        self.ssh_works(port, "after-rotation")

        second = self.open_tunnel(["SSH", "ECHO"])
        mark = self.session_up(second["tunnelId"], mark)
        source2 = self.h.start_source(second["sourceAccessToken"], "SSH=0,ECHO=0")
        self.ssh_works(source2.port_of("SSH"), "second-tunnel")
        self.echo_works(source2.port_of("ECHO"), os.urandom(100_000))
        self.ssh_works(port, "first-still-open")

        self.cli("close-tunnel", "--tunnel-id", first["tunnelId"])
        self.agent_logs(rf"Destination session {first['tunnelId']} ended", mark)
        self.ssh_works(source2.port_of("SSH"), "second-survives")
        self.assertTrue(self.agent.running())
        for secret in (first["destinationAccessToken"], second["destinationAccessToken"]):
            self.assertNotIn(secret, self.agent.log())
            self.assertNotIn(secret, self.service.process.log())

    def test_broker_down_at_open(self) -> None:
        """A broker stopped before the open and started after still delivers the token."""
        mark = len(self.agent.log())
        self.broker.stop()
        tunnel = self.open_tunnel(["SSH"])
        self.service.process.wait_for_log(rf"Queued the destination token of tunnel {tunnel['tunnelId']}")
        self.broker.start()
        self.session_up(tunnel["tunnelId"], mark)
        source = self.h.start_source(tunnel["sourceAccessToken"], "SSH=0")
        self.ssh_works(source.port_of("SSH"), "after-the-outage")

    def test_service_killed_while_broker_down(self) -> None:
        """
        Queued while the broker is down, then the service is killed (-9) and started again: the
        new process delivers the token from its database once the broker is back.
        """
        mark = len(self.agent.log())
        self.broker.stop()
        tunnel = self.open_tunnel(["SSH"])
        self.service.process.wait_for_log(rf"Queued the destination token of tunnel {tunnel['tunnelId']}")
        self.h.kill_service()
        self.service = self.h.start_service(
            tls=True,
            port=self.service.port,
            extra=["--mqtt", self.broker.endpoint],
            name="service-again",
            state_dir=self.service.state_dir,
        )
        self.service.process.wait_for_log(r"1 notification\(s\) waiting for delivery from before")
        self.broker.start()
        self.session_up(tunnel["tunnelId"], mark)
        self.service.process.wait_for_log(rf"Delivered the destination token of tunnel {tunnel['tunnelId']}")
        source = self.h.start_source(tunnel["sourceAccessToken"], "SSH=0")
        self.ssh_works(source.port_of("SSH"), "after-the-restart")
