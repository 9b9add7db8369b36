"""
Tests for L{tunnelkit.transport.nvx}: autobahn's NVX accelerator is on here, and without it a mode
refuses to start unless allowed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import autobahn.websocket
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.transport.nvx import ALLOW_FLAG, NvxOptions, NvxUnavailable, nvx_status, require_nvx


class NvxTests(SynchronousTestCase):
    def test_active_in_this_installation(self) -> None:
        """Throughput depends on it (performance.md): the test environment must have it."""
        self.assertTrue(autobahn.websocket.USES_NVX)
        self.assertIsNone(nvx_status())
        require_nvx()

    def test_refuses_when_missing(self) -> None:
        self.patch(autobahn.websocket, "USES_NVX", False)
        self.patch(autobahn.websocket, "HAS_NVX", False)
        error = self.assertRaises(NvxUnavailable, require_nvx)
        self.assertIn("not available", str(error))
        self.assertIn(f"--{ALLOW_FLAG}", str(error))

    def test_allowed_with_a_warning(self) -> None:
        self.patch(autobahn.websocket, "USES_NVX", False)
        self.patch(autobahn.websocket, "HAS_NVX", True)
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        require_nvx(allow_slow=True)
        warnings = [e for e in events if e.get("log_namespace") == "tunnelkit.transport.nvx"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("AUTOBAHN_USE_NVX", warnings[0]["problem"])

    def test_turned_off_by_environment(self) -> None:
        """A real process with AUTOBAHN_USE_NVX=0 is refused, naming the variable."""
        env = dict(os.environ, AUTOBAHN_USE_NVX="0")
        code = "from tunnelkit.transport.nvx import require_nvx; require_nvx()"
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("AUTOBAHN_USE_NVX", result.stderr)
        self.assertIn("NvxUnavailable", result.stderr)

    def test_option_flag(self) -> None:
        class Options(NvxOptions, usage.Options):
            pass

        options = Options()
        options.parseOptions([])
        self.assertEqual(options[ALLOW_FLAG], 0)
        options = Options()
        options.parseOptions([f"--{ALLOW_FLAG}"])
        self.assertEqual(options[ALLOW_FLAG], 1)
