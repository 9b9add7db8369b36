"""
The shipped systemd units (C{deploy/systemd/}): C{systemd-analyze verify} finds nothing to say about them
(with C{ExecStart} pointed at this checkout's C{twistd}, since C{/opt/tunnelkit} does not exist here), and
C{systemd-analyze security} rates each one's exposure at 2.0 or less.  systemd itself need not run.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from typing import List

from twisted.trial import unittest

from tunnelkit.testing.process import REPOSITORY_TOP

UNITS = os.path.join(REPOSITORY_TOP, "deploy", "systemd")
ANALYZE = shutil.which("systemd-analyze")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class UnitTests(unittest.TestCase):
    skip = None if ANALYZE else "systemd-analyze is not installed (apt-get install systemd)"

    def copies(self) -> List[str]:
        """The units in a temporary directory, templates as an instance, ExecStart at this venv's twistd."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        paths = []
        for name in sorted(os.listdir(UNITS)):
            with open(os.path.join(UNITS, name)) as f:
                text = f.read().replace("/opt/tunnelkit/.venv/bin/twistd", TWISTD)
            path = os.path.join(directory, name.replace("@.service", "@lab.service"))
            with open(path, "w") as f:
                f.write(text)
            paths.append(path)
        return paths

    def verify(self, paths: List[str]) -> subprocess.CompletedProcess:
        return subprocess.run([ANALYZE, "verify", "--man=no", *paths], capture_output=True, text=True)

    def test_one_unit_per_role(self) -> None:
        self.assertEqual(sorted(os.listdir(UNITS)), [
            "tunnelkit-agent.service", "tunnelkit-destination@.service", "tunnelkit-service.service",
            "tunnelkit-source@.service",
        ])

    def test_verify_is_silent(self) -> None:
        paths = self.copies()
        result = self.verify(paths)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))
        # And it can complain: a misspelt key in a copy is reported.
        with open(paths[0], "a") as f:
            f.write("ProtectSystemm=strict\n")
        self.assertIn("Unknown key", self.verify(paths[:1]).stderr)

    def test_exposure(self) -> None:
        for path in self.copies():
            result = subprocess.run([ANALYZE, "security", "--offline=true", "--threshold=20", path],
                                    capture_output=True, text=True)
            self.assertEqual(result.returncode, 0, result.stdout[-500:] + result.stderr)
