"""
End to end: the service as the README starts it, daemonized by C{twistd} (no C{-n}): on SQLite, and as
a node of a cluster on a real PostgreSQL (L{tunnelkit.testing.postgres}).

C{twistd} builds the service (C{makeService}) before it forks into the background, and a fork keeps
only the forking thread: a database thread pool started while the service was built had a worker
that did not exist in the daemon, so the first query handed to it never returned (SQLite: every API
request unanswered; PostgreSQL: the first one, and a node's stop waiting for it forever, its cluster
port open).  Here each daemon must answer an API call within a few seconds, then end within a few
seconds of SIGTERM and remove its pid file.  Every port is bound by the daemon (C{tcp:0}).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from typing import List, Optional

from twisted.trial import unittest

from tunnelkit.testing.process import TWISTD, Processes, wait_until

#: Seconds an API call may take (a daemon answers in milliseconds; the CLI starts in about one second).
ANSWER_WITHIN = 15.0
#: Seconds between SIGTERM and the end of the daemon.
EXIT_WITHIN = 10.0


def _alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie left to a parent that does not reap counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class DaemonizedServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.processes = Processes(prefix="tunnelkit-daemon-")
        self.addCleanup(self.processes.cleanup)
        self.directory = self.processes.directory("service")
        self.env = self.processes.environment(self.directory)
        self.pids: List[int] = []
        self.addCleanup(self._kill_left)

    def _kill_left(self) -> None:
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def daemon(self, *args: str) -> int:
        """C{twistd --pidfile ... --logfile ... tunnelkit --mode service ARGS} (daemonized): its pid."""
        self.pidfile = os.path.join(self.directory, "service.pid")
        self.logfile = os.path.join(self.directory, "service.log")
        started = subprocess.run(
            [*TWISTD, "--pidfile", self.pidfile, "--logfile", self.logfile, "tunnelkit", "--mode", "service",
             "--state-dir", os.path.join(self.directory, "state"), *args],
            cwd=self.directory, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip
        self.assertEqual(started.returncode, 0, started.stderr.decode(errors="replace"))
        wait_until(lambda: os.path.exists(self.pidfile), 30, "the pid file")
        with open(self.pidfile) as f:
            pid = int(f.read().strip())
        self.pids.append(pid)
        return pid

    def log(self) -> str:
        with open(self.logfile, encoding="utf-8", errors="replace") as f:
            return f.read()

    def api_url(self) -> str:
        found: List[str] = []

        def listening() -> bool:
            found[:] = re.findall(r"API listening on (http://127\.0\.0\.1:\d+)/", self.log())
            return bool(found)

        wait_until(listening, 30, "the API listening")
        return found[0]

    def api_call(self, url: str) -> float:
        """C{tunnelkit list-tunnels} against C{url}: the seconds it took (it must answer within ANSWER_WITHIN)."""
        began = time.monotonic()
        try:
            done = subprocess.run(
                [*TWISTD[:1], "-m", "tunnelkit.cli", "list-tunnels", "--endpoint-url", url,
                 "--state-dir", os.path.join(self.directory, "state")],
                cwd=self.directory, env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=ANSWER_WITHIN,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            self.fail(f"no answer to ListTunnels within {ANSWER_WITHIN:g} s; the daemon's log:\n{self.log()[-3000:]}")
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace"))
        self.assertIn(b"tunnelSummaries", done.stdout)
        return time.monotonic() - began

    def stop(self, pid: int, port: Optional[int] = None) -> float:
        """SIGTERM C{pid}: the seconds until it ended (within EXIT_WITHIN), its pid file removed."""
        began = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not _alive(pid), EXIT_WITHIN, "the daemon to end on SIGTERM")
        except AssertionError:
            pass  # reported below, with the daemon's log
        took = time.monotonic() - began
        self.assertFalse(_alive(pid), f"still running {EXIT_WITHIN:g} s after SIGTERM; its log:\n{self.log()[-3000:]}")
        self.assertFalse(os.path.exists(self.pidfile), "the pid file is left behind")
        return took

    def check(self, *args: str) -> None:
        pid = self.daemon("--listen", "tcp:0:interface=127.0.0.1", *args)
        url = self.api_url()
        first = self.api_call(url)
        second = self.api_call(url)
        took = self.stop(pid)
        print(f"\nfirst API answer {first:.2f} s, second {second:.2f} s (CLI start included), SIGTERM exit {took:.2f} s")

    def test_sqlite(self) -> None:
        """A single node on SQLite, daemonized, answers and ends on SIGTERM."""
        self.check()

    def test_cluster_node_on_postgres(self) -> None:
        """A node of a cluster on PostgreSQL, daemonized, answers and ends on SIGTERM (its cluster port too)."""
        from tunnelkit.testing.postgres import fresh_database, skip_reason

        reason = skip_reason()
        if reason:
            raise unittest.SkipTest(reason)
        dsn = fresh_database(self)
        secret = os.path.join(self.directory, "cluster.secret")
        with open(secret, "wb") as f:
            f.write(os.urandom(32).hex().encode())
        os.chmod(secret, 0o600)
        self.check(
            "--store", dsn, "--node-id", "node1", "--cluster-listen", "tcp:0:interface=127.0.0.1",
            "--cluster-secret-file", secret,
        )
