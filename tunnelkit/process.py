# -*- test-case-name: tests.test_process -*-
"""
What a mode changes in its twistd process, and how; every mode's C{makeService} returns a
L{ModeService}, and nothing here acts before twistd hands that service its application.

  - B{Writes} (every mode): TCP writes are coalesced once per reactor turn
    (L{tunnelkit.transport.coalesce}), installed when the service starts as twistd's application.
  - B{Log filter} (C{-v} of the local proxy and the agent): when the service joins twistd's
    application, it sets the application's C{ILogObserver} component, the hook twistd documents for
    customising its logging (L{twisted.application.app.AppLogger.start}; the howto "Using the Twisted
    Application Framework", section "Customizing twistd logging"), to a L{LogFilter} in front of the
    observer twistd would have made itself from C{--logfile}, C{--syslog} and C{-n}.  twistd's C{--logger}, when given,
    takes precedence over any component (as twistd documents), and its observer is not filtered.
    In every mode (the service has no filter) the observer twistd would have made writes its lines
    through L{tunnelkit.logtext.ClassicText}: the same text for less CPU.
  - B{Exit status} (the local proxy ends with its session's status): Twisted has no way for a
    service to set twistd's exit status (Twisted issue #11335; L{twisted.internet.task.react} is
    the supported way outside twistd).  L{ModeService.exit} stops the reactor; twistd then stops
    the services, removes its pid file and logs "Server Shut Down." as usual, and returns to Python,
    which would exit 0.  So for a non-zero status, and only then, one C{atexit} hook is registered
    that ends the process with that status (C{os._exit}, after flushing stdout and stderr; the only
    way to change the status once twistd's C{run()} has returned); C{atexit} hooks registered before
    it, which run after it, are skipped.  Outside twistd's application (tests) no hook is registered.
    The status lives on the service, never in a module.
  - B{Fatal errors at start}: a L{ConfigError} from a part's C{startService} (a port in use) is one
    line on stderr and status 1, as for a usage error.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NoReturn, Optional, Sequence

from twisted.application.service import IProcess, MultiService
from twisted.logger import ILogObserver, LegacyLogObserverWrapper, LogLevel
from zope.interface import implementer

from tunnelkit.errors import ConfigError

from tunnelkit.logtext import cheaper_text

__all__ = ["LogFilter", "ModeService", "exit_with_message", "twistd_log_observer"]

#: C{-v} below 5: the lowest level shown (0 shows nothing; 5 and more show debug lines).
_LEVELS = {1: LogLevel.critical, 2: LogLevel.error, 3: LogLevel.warn, 4: LogLevel.info}


@dataclass(frozen=True)
class LogFilter:
    """
    C{-v}: 0 nothing, 1 critical, 2 error, 3 warning, 4 info (the default), 5 debug, 6 and more also
    autobahn's own debug (trace) lines, where the access tokens and client tokens given (both in
    the upgrade request) are masked.
    """

    verbosity: int = 4
    access_tokens: Sequence[str] = ()
    client_tokens: Sequence[str] = ()

    @property
    def trace(self) -> bool:
        """Whether autobahn's debug lines are wanted (txaio's log level is set to debug)."""
        return self.verbosity >= 6

    def wrap(self, observer: Any) -> ILogObserver:
        """C{observer} (new or legacy style) behind this filter."""
        if not ILogObserver.providedBy(observer):
            observer = LegacyLogObserverWrapper(observer)
        filtered: ILogObserver = _LevelFilter(
            observer, None if self.verbosity == 0 else _LEVELS.get(self.verbosity, LogLevel.debug)
        )
        if self.trace:
            filtered = _RedactingObserver(filtered, self.access_tokens, self.client_tokens)
        return filtered


@implementer(ILogObserver)
class _LevelFilter:
    """
    What C{FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])} lets
    through (events of C{level} and above that have a namespace), for one level everywhere: a set
    lookup per event instead of the predicate's namespace walk (a tenth of a proxy's CPU per
    connection went to filtering its three log lines).
    """

    def __init__(self, observer: ILogObserver, level: Optional[LogLevel]) -> None:
        """C{level} None: nothing passes (C{-v 0})."""
        self._observer = observer
        self._levels = frozenset(
            known for known in LogLevel.iterconstants() if level is not None and not known < level
        )

    def __call__(self, event: Dict[str, Any]) -> None:
        if event.get("log_level") in self._levels and event.get("log_namespace"):
            if "log_trace" in event:
                event["log_trace"].append((self, self._observer))
            self._observer(event)


@implementer(ILogObserver)
class _RedactingObserver:
    """Replaces secrets in every string field of a log event (autobahn's trace lines hold the request)."""

    def __init__(self, observer: ILogObserver, secrets: Sequence[str], client_tokens: Sequence[str] = ()) -> None:
        self._observer = observer
        self._secrets = [(s, "***ACCESS_TOKEN_REMOVED***") for s in secrets if s] + [
            (s, "***CLIENT_TOKEN_REMOVED***") for s in client_tokens if s
        ]

    def __call__(self, event: Dict[str, Any]) -> None:
        from tunnelkit.transport.fastpath import LazyText

        cleaned = dict(event)
        for key, value in event.items():
            if isinstance(value, LazyText):  # autobahn's configuration, formatted now that it is written
                value = str(value)
            if isinstance(value, str):
                for secret, replacement in self._secrets:
                    if secret in value:
                        value = value.replace(secret, replacement)
                cleaned[key] = value
        self._observer(cleaned)


def twistd_log_observer(twistd_options: Mapping[str, Any]) -> Any:
    """
    The observer twistd makes from its own options when the application names none: a file
    (C{--logfile}, rotated on SIGUSR1), stdout (C{-n}, or C{--logfile -}) or syslog (C{--syslog}).
    It is twistd's own code that makes it (L{tunnelkit.internals.twistd_default_log_observer}).
    """
    from tunnelkit.internals import twistd_default_log_observer

    return twistd_default_log_observer(twistd_options)


def exit_with_message(message: str) -> NoReturn:
    """End C{twistd} before it runs: one line on stderr, status 1, no traceback."""
    sys.stderr.write(f"tunnelkit: error: {message}\n")
    raise SystemExit(1)


def freeze_startup_objects(collector: Any = None) -> None:
    """
    Leave what the process made before it serves (its modules, classes, configuration: most of
    its objects) out of the cyclic garbage collector's passes from now on (C{gc.freeze}): each
    full pass otherwise walks all of them again, and a destination's connections (their cycles
    of protocol, transport and connector) trigger passes all the time (5 % of its CPU per
    connection).  What is made later is collected as before.
    """
    if collector is None:
        import gc as collector
    collector.collect()  # what startup left behind goes now, not into the frozen set
    collector.freeze()


class ModeService(MultiService):
    """
    The top service of every mode: its parts are its children; under twistd it applies the mode's
    log filter and exit status (see the module's docstring).

    @param twistd_options: twistd's own options (C{--logfile}, ...), or None outside twistd: no
        log filter can be put in front of twistd's observer then.
    @param reactor: what L{exit} stops (default: the global reactor, when L{exit} is called).
    @param make_observer: makes the observer the filter is put in front of, from C{twistd_options}.
    @param at_exit: registers the exit hook (C{atexit.register}).
    @param end_process: ends the process with a status (C{os._exit}).
    """

    def __init__(
        self,
        twistd_options: Optional[Mapping[str, Any]] = None,
        log_filter: Optional[LogFilter] = None,
        reactor: Any = None,
        make_observer: Callable[[Mapping[str, Any]], Any] = twistd_log_observer,
        at_exit: Callable[[Callable[[], None]], Any] = atexit.register,
        end_process: Callable[[int], None] = os._exit,
    ) -> None:
        super().__init__()
        self.twistd_options = twistd_options
        self.log_filter = log_filter
        self._reactor = reactor
        self._make_observer = make_observer
        self._at_exit = at_exit
        self._end_process = end_process
        #: The status the process ends with (the first non-zero one given to L{exit}).
        self.exit_status = 0
        #: Whether the service runs as twistd's application (log filter and exit status apply).
        self.in_application = False

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if IProcess(parent, None) is None or not hasattr(parent, "setComponent"):
            return  # a test's MultiService: nothing of the process is touched
        self.in_application = True
        if self.twistd_options is not None:
            self._filter_logs(parent)

    def _filter_logs(self, application: Any) -> None:
        assert self.twistd_options is not None
        if self.twistd_options.get("logger"):
            return  # twistd's --logger wins over the application's component: its observer is unfiltered
        observer = application.getComponent(ILogObserver, None)  # a .tac may have named one
        if observer is None:
            observer = self._make_observer(self.twistd_options)
            cheaper_text(observer)  # the same lines as twistd's own formatter, for less CPU
        if self.log_filter is None:
            application.setComponent(ILogObserver, observer)
            return
        application.setComponent(ILogObserver, self.log_filter.wrap(observer))
        if self.log_filter.trace:
            import txaio

            txaio.set_global_log_level("debug")  # type: ignore[attr-defined]  # bound by txaio.use_twisted()

    def startService(self) -> None:
        if self.in_application:
            # twistd's process: TCP writes go out once per reactor turn (tunnelkit.transport.coalesce)
            from tunnelkit.transport import coalesce

            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor
            coalesce.install(reactor)
            # each I/O event dispatched with Twisted's log context, in fewer calls
            from tunnelkit.transport import fastpath

            fastpath.install_event_dispatch(reactor, coalesce.events_listener())
        try:
            super().startService()
        except ConfigError as e:
            exit_with_message(str(e))  # one line: twistd already logs stderr, so not log.error too
        if self.in_application:
            freeze_startup_objects()

    def exit(self, status: int) -> None:
        """End the process: stop the reactor; under twistd the process ends with C{status} if not 0."""
        if status and not self.exit_status:
            self.exit_status = status
            if self.in_application:
                self._at_exit(self._end_with_status)
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.callLater(0, self._stop, reactor)

    @staticmethod
    def _stop(reactor: Any) -> None:
        if reactor.running:
            reactor.stop()

    def _end_with_status(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._end_process(self.exit_status)
