"""
The protocol core is sans-IO: framing, messages, the session state machines, flow control, the
relay's rules and token shapes load no reactor, no Twisted, no autobahn (issue 16: the session
returns its log lines as actions instead of logging).
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import TestCase

_PROBE = """
import sys
import tunnelkit.protocol.session, tunnelkit.protocol.flowcontrol, tunnelkit.protocol.framing
import tunnelkit.protocol.rules, tunnelkit.protocol.tokens, tunnelkit.protocol.notification
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("twisted", "autobahn", "txaio"))))
"""


class SansIOTests(TestCase):
    def test_the_protocol_package_loads_no_twisted(self) -> None:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "", "tunnelkit.protocol loads: " + out.stdout)
