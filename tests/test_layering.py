"""
Dependencies point one way: protocol <- transport <- (service | localproxy | agent).  A device
install (no service extra) runs the local proxy and the agent, so they must not load the service.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import TestCase

_PROBE = """
import sys
import tunnelkit.localproxy.tap, tunnelkit.localproxy.aws_command, tunnelkit.agent, tunnelkit.agent_tap
import tunnelkit.protocol.session, tunnelkit.transport.websocket
print(" ".join(sorted(m for m in sys.modules if m.startswith("tunnelkit.service"))))
"""


class ClientLayeringTests(TestCase):
    def test_clients_do_not_import_the_service(self) -> None:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "", "client modules load service modules: " + out.stdout)
