"""
The short run of the fault-injection benchmark (benchmarks/bench_faults.py --short): concurrent
checksummed transfers while the service, the destination and the source are each killed (kill -9)
and restarted once; no transfer may end short with a clean end of stream or corrupted, and the
tunnel must recover by itself.  The script's exit status says whether its targets were met.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.e2e.harness import REPOSITORY_TOP
from tests.e2e.test_tunnel_independence import require_flow_control


class FaultsShortTests(TestCase):
    timeout = 420

    def test_bench_faults_short(self) -> None:
        require_flow_control()
        script = os.path.join(REPOSITORY_TOP, "benchmarks", "bench_faults.py")
        env = dict(os.environ, PYTHONPATH=REPOSITORY_TOP)
        result = subprocess.run([sys.executable, script, "--short"], capture_output=True, timeout=400, env=env,
                                cwd=REPOSITORY_TOP)
        output = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
        self.assertIn("recovered without a manual step: yes", output, output)
        self.assertEqual(result.returncode, 0, output)
