"""
Tests for L{tunnelkit.process}: the log filter set as twistd's application's C{ILogObserver}
component, the exit status, and one-line fatal errors at start; nothing of the test process is
touched (no global observer, no C{atexit} hook: both are injected or checked not to happen).
"""

from __future__ import annotations

import io
import signal
import sys
from typing import Any, Callable, Dict, List

from twisted.application.service import Application, MultiService, Service
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tunnelkit.errors import ConfigError
from tunnelkit.process import LogFilter, ModeService, freeze_startup_objects, twistd_log_observer


@implementer(ILogObserver)
class Events(List[Dict[str, Any]]):
    """A new-style observer keeping the events it sees (a bare list's append would be taken for a legacy one)."""

    def __call__(self, event: Dict[str, Any]) -> None:
        self.append(event)


def event(level: str, text: str = "x") -> Dict[str, Any]:
    return {"log_level": getattr(LogLevel, level), "log_namespace": "t", "log_format": text, "value": text}


class Recorder:
    """The C{at_exit} and C{end_process} of a L{ModeService}, recorded instead of done."""

    def __init__(self) -> None:
        self.hooks: List[Callable[[], None]] = []
        self.ended: List[int] = []


def mode_service(recorder: Recorder, reactor: Any, **kwargs: Any) -> ModeService:
    return ModeService(
        reactor=reactor, at_exit=recorder.hooks.append, end_process=recorder.ended.append, **kwargs
    )


class LogFilterTests(SynchronousTestCase):
    def test_levels(self) -> None:
        for verbosity, shown in [(0, []), (1, []), (2, ["error"]), (3, ["warn", "error"]),
                                 (4, ["info", "warn", "error"]), (5, ["debug", "info", "warn", "error"])]:
            seen = Events()
            observer = LogFilter(verbosity).wrap(seen)
            for level in ["debug", "info", "warn", "error"]:
                observer(event(level, level))
            self.assertEqual([e["value"] for e in seen], shown, verbosity)

    def test_levels_as_twisteds_predicate(self) -> None:
        """The filter lets through what twisted.logger's level predicate would, for every level."""
        from twisted.logger import FilteringLogObserver, LogLevelFilterPredicate

        probes = [event(level.name, level.name) for level in LogLevel.iterconstants()]
        probes += [{"log_level": LogLevel.error, "log_format": "no namespace"}, {"log_namespace": "t", "log_format": "no level"}]
        for verbosity in range(1, 7):
            ours, twisteds = Events(), Events()
            observer = LogFilter(verbosity).wrap(ours)
            level = {1: LogLevel.critical, 2: LogLevel.error, 3: LogLevel.warn, 4: LogLevel.info}.get(verbosity, LogLevel.debug)
            reference = FilteringLogObserver(twisteds, [LogLevelFilterPredicate(defaultLogLevel=level)])
            for probe in probes:
                observer(dict(probe))
                reference(dict(probe))
            self.assertEqual(ours, twisteds, verbosity)

    def test_trace_redacts_tokens(self) -> None:
        seen = Events()
        log_filter = LogFilter(6, ["the-token"], ["the-client-token"])
        self.assertTrue(log_filter.trace)
        observer = log_filter.wrap(seen)
        self.assertTrue(ILogObserver.providedBy(observer))
        observer(event("debug", "access-token: the-token\r\nclient-token: the-client-token\r\n"))
        self.assertEqual(
            seen[0]["value"], "access-token: ***ACCESS_TOKEN_REMOVED***\r\nclient-token: ***CLIENT_TOKEN_REMOVED***\r\n"
        )

    def test_legacy_observer_is_wrapped(self) -> None:
        """An old-style observer (twistd's syslog one) gets the events in the old shape."""
        legacy: List[Dict[str, Any]] = []
        LogFilter(4).wrap(legacy.append)({**event("info", "hello"), "log_time": 0.0})
        self.assertEqual((legacy[0]["value"], legacy[0]["time"]), ("hello", 0.0))


class ApplicationTests(SynchronousTestCase):
    def test_filter_set_as_the_applications_log_observer(self) -> None:
        """Under twistd the filter is set in front of the observer twistd would make."""
        made: List[Any] = []
        seen = Events()

        def make_observer(options: Any) -> Any:
            made.append(options)
            return seen

        twistd_options = {"logfile": None, "nodaemon": True}
        service = ModeService(twistd_options, LogFilter(3), make_observer=make_observer)
        application = Application("tunnelkit")
        service.setServiceParent(application)
        self.assertEqual(made, [twistd_options])
        observer = application.getComponent(ILogObserver)
        observer(event("info"))
        observer(event("warn"))
        self.assertEqual([e["log_level"] for e in seen], [LogLevel.warn])

    def test_applications_own_observer_is_filtered(self) -> None:
        """An observer the application already names (a .tac's) is kept, behind the filter."""
        seen = Events()
        application = Application("tunnelkit")
        application.setComponent(ILogObserver, seen)
        ModeService({}, LogFilter(2), make_observer=lambda options: self.fail("not used")).setServiceParent(application)
        application.getComponent(ILogObserver)(event("warn"))
        self.assertEqual(seen, [])

    def test_logger_option_wins(self) -> None:
        """With twistd's --logger, no component: twistd uses the logger given, as it documents."""
        application = Application("tunnelkit")
        ModeService({"logger": object()}, LogFilter(2)).setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))

    def test_no_filter_twistds_observer(self) -> None:
        """Without a filter (the service) the component is the observer twistd would make, unfiltered."""
        seen = Events()
        application = Application("tunnelkit")
        ModeService({"logfile": None}, make_observer=lambda options: seen).setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIs(observer, seen)
        observer(event("debug"))
        self.assertEqual([e["log_level"] for e in seen], [LogLevel.debug])

    def test_outside_twistd_nothing_is_set(self) -> None:
        parent = MultiService()
        service = ModeService({}, LogFilter(2), make_observer=lambda options: self.fail("not used"))
        service.setServiceParent(parent)
        self.assertFalse(service.in_application)

    def test_twistd_log_observer_writes_the_logfile(self) -> None:
        """twistd's own observer for --logfile (made by twistd's code, through tunnelkit.internals)."""
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)  # twistd's logger sets log rotation on it
        path = self.mktemp()
        observer = LogFilter(4).wrap(twistd_log_observer({"logfile": path, "nodaemon": False, "syslog": False}))
        observer({**event("info", "hello from the filter"), "log_time": 0.0, "log_system": "-"})
        observer({**event("debug", "left out"), "log_time": 0.0, "log_system": "-"})
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("hello from the filter", text)
        self.assertNotIn("left out", text)


class ExitStatusTests(SynchronousTestCase):
    def started(self, reactor: MemoryReactorClock, recorder: Recorder, parent: Any) -> ModeService:
        service = mode_service(recorder, reactor)
        service.setServiceParent(parent)
        reactor.running = True  # as while run (MemoryReactor.run returns at once)
        return service

    def test_non_zero_status_under_twistd(self) -> None:
        """The reactor stops; one hook ends the process with the first non-zero status, at exit."""
        reactor, recorder = MemoryReactorClock(), Recorder()
        service = self.started(reactor, recorder, Application("tunnelkit"))
        service.exit(1)
        service.exit(2)
        self.assertFalse(reactor.hasStopped)  # stopped from the reactor, not from the caller
        reactor.advance(0)
        self.assertTrue(reactor.hasStopped)
        self.assertEqual(len(recorder.hooks), 1)
        self.assertEqual(recorder.ended, [])
        recorder.hooks[0]()
        self.assertEqual(recorder.ended, [1])

    def test_status_zero_registers_nothing(self) -> None:
        reactor, recorder = MemoryReactorClock(), Recorder()
        service = self.started(reactor, recorder, Application("tunnelkit"))
        service.exit(0)
        reactor.advance(0)
        self.assertTrue(reactor.hasStopped)
        self.assertEqual((recorder.hooks, service.exit_status), ([], 0))

    def test_outside_twistd_no_hook(self) -> None:
        """Not twistd's application (a test): the status is kept, the process is left alone."""
        reactor, recorder = MemoryReactorClock(), Recorder()
        service = self.started(reactor, recorder, MultiService())
        service.exit(3)
        reactor.advance(0)
        self.assertEqual((recorder.hooks, service.exit_status), ([], 3))
        self.assertEqual(reactor.getDelayedCalls(), [])


class FatalAtStartTests(SynchronousTestCase):
    def test_config_error_at_start_is_one_line(self) -> None:
        class CannotListen(Service):
            def startService(self) -> None:
                raise ConfigError("--listen tcp:1: cannot listen: in use")

        service = ModeService()
        CannotListen().setServiceParent(service)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, service.startService)
        self.assertEqual(error.code, 1)
        self.assertEqual(stderr.getvalue(), "tunnelkit: error: --listen tcp:1: cannot listen: in use\n")


class FreezeTests(SynchronousTestCase):
    def test_startup_garbage_collected_then_the_rest_frozen(self) -> None:
        calls: List[str] = []

        class Collector:
            def collect(self) -> int:
                calls.append("collect")
                return 0

            def freeze(self) -> None:
                calls.append("freeze")

        freeze_startup_objects(Collector())
        self.assertEqual(calls, ["collect", "freeze"])

    def test_only_twistds_process_is_frozen(self) -> None:
        """A test's ModeService (not twistd's application) leaves the collector alone."""
        import gc

        frozen = gc.get_freeze_count()
        ModeService().startService()
        self.assertEqual(gc.get_freeze_count(), frozen)
