"""
What a mode changes in its twistd process: the log filter of C{-v}.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence


class _RedactingObserver:
    """Replaces secrets in every string field of a log event (autobahn's trace lines hold the request)."""

    def __init__(self, observer: Any, secrets: Sequence[str], client_tokens: Sequence[str] = ()) -> None:
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


def filter_process_logs(
    verbosity: int, secrets: Sequence[str] = (), client_tokens: Sequence[str] = ()
) -> None:
    """
    Apply C{-v} to every log line of the process: 0 nothing, 1 critical, 2 error, 3 warning,
    4 info (default), 5 debug, 6+ also autobahn's own debug (trace) lines, where the access tokens
    C{secrets} and the C{client_tokens} (both in the upgrade request) are masked.

    twistd starts logging after makeService, through L{globalLogBeginner}: each observer it hands over
    is wrapped in a level filter.  (Twisted's own hooks take no options from a plugin: twistd's
    C{--logger} names a factory called without arguments, and L{twisted.application.app.AppLogger}
    looks for an C{ILogObserver} component only on an application a C{.tac} file builds, while a
    plugin's makeService never sees the application.  Hence this wrapper, installed once per process.)
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        PredicateResult,
        globalLogBeginner,
    )

    if verbosity >= 6:
        import txaio

        txaio.set_global_log_level("debug")  # type: ignore[attr-defined]  # bound by txaio.use_twisted()
    if verbosity == 0:
        predicates: List[Any] = [lambda event: PredicateResult.no]
    else:
        level = {1: LogLevel.critical, 2: LogLevel.error, 3: LogLevel.warn, 4: LogLevel.info}.get(
            verbosity, LogLevel.debug
        )
        predicates = [LogLevelFilterPredicate(defaultLogLevel=level)]
    begin = globalLogBeginner.beginLoggingTo

    def filtered_begin(observers: Any, *args: Any, **kwargs: Any) -> Any:
        wrapped: List[Any] = [FilteringLogObserver(o, predicates) for o in observers]
        if verbosity >= 6:
            wrapped = [_RedactingObserver(o, secrets, client_tokens) for o in wrapped]
        return begin(wrapped, *args, **kwargs)

    globalLogBeginner.beginLoggingTo = filtered_begin  # type: ignore[method-assign]
