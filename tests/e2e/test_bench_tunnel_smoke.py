"""
A small run of the performance table (benchmarks/bench_tunnel.py) through real processes: the
reverse-SSH relay (a real sshd), tunnelkit over wss://, tunnelkit behind a real HAProxy running
the shipped deploy/haproxy.cfg (wss-lb), and tunnelkit's TLS legs alone in C (tls-c: three real
socat processes); and of the interleaved before/after comparison
(benchmarks/ab_tunnel.py) against a git worktree of this checkout's HEAD.  The figures themselves
are not checked (never timed assertions): that every path was set up, carried its bytes and got
its row, and that the targets table names each TLS path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.e2e.harness import REPOSITORY_TOP
from tunnelkit.testing.haproxy import HAPROXY


class BenchTunnelSmokeTests(TestCase):
    timeout = 300

    def test_table_has_every_path(self) -> None:
        if not os.access(HAPROXY, os.X_OK):
            raise self.skipTest("haproxy is not installed (apt-get install haproxy)")
        if shutil.which("socat") is None:
            raise self.skipTest("socat is not installed (apt-get install socat)")
        script = os.path.join(REPOSITORY_TOP, "benchmarks", "bench_tunnel.py")
        env = dict(os.environ, PYTHONPATH=REPOSITORY_TOP)
        result = subprocess.run(
            [sys.executable, script, "--paths", "relay,wss,wss-lb,tls-c", "--parts", "bulk,rtt,handshake",
             "--megabytes", "8", "--repeat", "1", "--round-trips", "50", "--handshakes", "40"],
            capture_output=True, timeout=280, env=env, cwd=REPOSITORY_TOP,
        )
        output = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, output)
        number = r"\d+(?:\.\d+)?"
        for label in ("reverse-SSH relay", "tunnel wss://", r"wss:// \+ HAProxy", "TLS legs in C"):
            # a measured MB/s and RTT on each path's row (nan would mean it moved nothing)
            self.assertRegex(output, rf"(?m)^  {label} +{number} .* {number} +{number} ", output)
        self.assertRegex(output, rf"wss:// \+ HAProxy: the service's CPU s/GB is service node {number}, HAProxy {number}")
        for scheme in ("wss", "wss-lb"):
            self.assertRegex(output, rf"(?m)^  {re.escape(scheme)} +{number} /s .* service CPU", output)
        self.assertIn("wss:// CPU s/GB / reverse-SSH relay's", output)
        self.assertIn("wss-lb (wss:// + HAProxy) handshakes/s per service process", output)
        # the C yardstick's own rows: a measured ratio, and CPU counted from socat's ended children
        self.assertRegex(output, rf"(?m)^  wss:// 1 conn / TLS legs in C 1 conn +{number} ", output)
        self.assertRegex(output, rf"(?m)^  TLS legs in C CPU s/GB, 3 processes summed +{number} ", output)


class AbTunnelSmokeTests(TestCase):
    timeout = 200

    def run_script(self, *arguments: str) -> "subprocess.CompletedProcess[bytes]":
        script = os.path.join(REPOSITORY_TOP, "benchmarks", "ab_tunnel.py")
        env = dict(os.environ, PYTHONPATH=REPOSITORY_TOP)
        return subprocess.run([sys.executable, script, *arguments], capture_output=True, timeout=180, env=env,
                              cwd=REPOSITORY_TOP)

    def test_before_and_after_side_by_side(self) -> None:
        if not os.path.isdir(os.path.join(REPOSITORY_TOP, ".git")):
            raise self.skipTest("not a git checkout")
        result = self.run_script("--before", "HEAD", "--schemes", "ws", "--parts", "rtt,bulk", "--rounds", "2",
                                 "--megabytes", "4", "--round-trips", "50", "--no-relay")
        output = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, output)
        number = r"\d+(?:\.\d+)?"
        for part in ("rtt", "bulk"):
            self.assertRegex(output, rf"(?m)^  round 2 {part}: ws-before {number} ws-after {number} ", output)
            self.assertRegex(output, rf"(?m)^  ws: after/before {number}  CPU after/before ", output)
        self.assertRegex(output, rf"(?m)^  ws-after +median +{number} .*\(rounds: {number} {number}\)$", output)
        worktree = re.search(r"checked out in (\S+)\)", output)
        assert worktree is not None, output
        self.assertFalse(os.path.exists(worktree.group(1)))  # the worktree is removed at the end

    def test_bad_input_is_refused_with_a_message(self) -> None:
        for arguments, message in (
            (["--before", "no-such-revision-here"], "cannot check out 'no-such-revision-here'"),
            (["--before-tree", "/"], "is not a tunnelkit checkout"),
            (["--before", "HEAD", "--parts", "speed"], "--parts: choose from"),
            (["--parts", "rtt"], "one of the arguments --before --before-tree is required"),
        ):
            result = self.run_script(*arguments)
            self.assertNotEqual(result.returncode, 0, arguments)
            self.assertIn(message, result.stderr.decode("utf-8", "replace"), arguments)
