"""L{tunnelkit.service.dbrunner}: when a L{ThreadedRunner}'s threads start."""

from __future__ import annotations

import threading

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from tunnelkit.service.dbrunner import ThreadedRunner


def _runner_threads(name: str) -> list:
    return [t for t in threading.enumerate() if t.name.startswith(f"PoolThread-tunnelkit-{name}")]


class ThreadedRunnerStartTests(unittest.TestCase):
    """
    The service builds its stores before C{twistd} forks into the background, and a fork keeps only
    the forking thread: a runner starts no thread until the reactor runs.
    """

    def test_no_thread_before_the_reactor_runs(self) -> None:
        reactor = MemoryReactorClock()
        runner = ThreadedRunner(reactor, lambda: None, threads=2, name="before-run")
        self.addCleanup(runner.close)
        self.assertEqual(_runner_threads("before-run"), [])
        reactor.run()
        self.assertEqual(len(_runner_threads("before-run")), 1)

    def test_closed_before_the_reactor_runs(self) -> None:
        """Closed before the reactor ran (a start-up error): no thread is ever started."""
        reactor = MemoryReactorClock()
        runner = ThreadedRunner(reactor, lambda: None, threads=2, name="closed-early")
        runner.close()
        reactor.run()
        self.assertEqual(_runner_threads("closed-early"), [])
