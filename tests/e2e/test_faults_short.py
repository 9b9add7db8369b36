"""
The short run of the fault-injection benchmark (benchmarks/bench_faults.py --short): concurrent
checksummed transfers while the service, the destination and the source are each killed (kill -9)
and restarted once; no transfer may end short with a clean end of stream or corrupted, and the
tunnel must recover by itself.

A transfer during which the source itself was killed counts too: the kernel then closes the
application's socket, and the source keeps SO_LINGER {1, 0} on its accepted sockets so that this
close is a reset.  The test checks the verdicts line by line (not the exit status: --short makes
fewer than 1,000 transfers).
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.e2e.harness import REPOSITORY_TOP


class FaultsShortTests(TestCase):
    timeout = 420

    def test_bench_faults_short(self) -> None:
        script = os.path.join(REPOSITORY_TOP, "benchmarks", "bench_faults.py")
        env = dict(os.environ, PYTHONPATH=REPOSITORY_TOP)
        result = subprocess.run([sys.executable, script, "--short"], capture_output=True, timeout=400, env=env,
                                cwd=REPOSITORY_TOP)
        output = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
        self.assertIn("recovered without a manual step: yes", output, output)
        for verdict in (r"short-then-clean-EOF = 0 \(transfers during no kill of the source\)",
                        r"short-then-clean-EOF = 0 \(all\)", r"corrupted = 0", r"recovered"):
            self.assertRegex(output, rf"(?m)^  {verdict} +ok$", output)
