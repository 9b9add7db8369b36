# -*- test-case-name: tests.test_logtext -*-
"""
Cheaper lines for twistd's log file: the text twistd's own observer writes (twisted.logger's classic
C{TIME [namespace#level] text} lines), made for less.

Per connection each proxy writes three info lines and the service one audit line; twisted.logger
computes each line's time zone and time stamp anew and formats it with C{string.Formatter} (pure
Python, one call per field), which was a third of a proxy's CPU per connection.  L{ClassicText}
keeps the time stamp of the current second and formats a plain event with C{str.format_map};
anything else (a failure, a C{{call()}} in the format, a C{log_system}, bytes, a field that will not
format) goes to twisted.logger's own formatter.  L{cheaper_text} installs it on a
L{FileLogObserver} only after checking that it writes the very same text as the observer's own
formatter for probe events, so the lines never change.
"""

from __future__ import annotations

from time import time
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.logger import FileLogObserver, LogLevel, formatEventAsClassicLogText, formatTime, timeFormatRFC3339

__all__ = ["ClassicText", "cheaper_text"]

#: Formats without C{{call()}} syntax (twisted.logger calls the field; str.format cannot).
_PLAIN: Dict[str, bool] = {}


class ClassicText:
    """twisted.logger's classic text of an event (L{formatEventAsClassicLogText}), for less."""

    def __init__(self, time_format: str = timeFormatRFC3339) -> None:
        self.time_format = time_format
        self._stamp: Tuple[int, str] = (-1, "")

    def _time(self, when: float) -> str:
        second = int(when)
        if when - second >= 0.999999:  # could round up to the next second: formatted as it comes
            return formatTime(when, self.time_format)
        cached_second, stamp = self._stamp
        if cached_second != second:
            stamp = formatTime(float(second), self.time_format)
            self._stamp = (second, stamp)
        return stamp

    def _fallback(self, event: Dict[str, Any]) -> Optional[str]:
        return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when, self.time_format))

    def __call__(self, event: Dict[str, Any]) -> Optional[str]:
        format = event.get("log_format")
        when = event.get("log_time")
        level = event.get("log_level")
        if (
            type(format) is not str
            or when is None
            or level is None
            or "log_failure" in event
            or "log_system" in event
        ):
            return self._fallback(event)
        plain = _PLAIN.get(format)
        if plain is None:
            plain = _PLAIN[format] = "()" not in format and len(_PLAIN) < 4096
        if not plain:
            return self._fallback(event)
        try:
            text = format.format_map(event)
        except Exception:
            return self._fallback(event)  # twisted.logger's "Unable to format event" line
        if not text:
            return None
        line = f"{self._time(when)} [{event.get('log_namespace', '-')}#{level.name}] {text}\n"
        if "\n" in text:
            line = line[:-1].replace("\n", "\n\t") + "\n"
        return line


def _probes() -> Any:
    now = time()
    yield {"log_format": "Accepted tcp connection on port {port} from {peer}", "log_time": now,
           "log_level": LogLevel.info, "log_namespace": "tunnelkit.localproxy.source.SourceSide",
           "port": 5555, "peer": "127.0.0.1:40000"}
    yield {"log_format": "{what!r} took {seconds:.3f} s ({n}x)", "log_time": int(now) + 0.5,
           "log_level": LogLevel.warn, "log_namespace": "probe", "what": "a", "seconds": 1.23456, "n": 3}
    yield {"log_format": "two\nlines {x}", "log_time": int(now) + 0.9999995, "log_level": LogLevel.error,
           "log_namespace": "probe", "x": 1}
    yield {"log_format": "{missing} field", "log_time": now, "log_level": LogLevel.info, "log_namespace": "p"}


def cheaper_text(observer: Any, check: Optional[Callable[[Dict[str, Any]], Any]] = None) -> bool:
    """
    Give C{observer} (twistd's file observer) L{ClassicText} if it is a L{FileLogObserver} whose
    own formatter writes the same text for the probe events.  @return: whether it did.
    """
    if not isinstance(observer, FileLogObserver):
        return False
    own = check or observer.formatEvent
    cheaper = ClassicText()
    try:
        if any(own(dict(event)) != cheaper(dict(event)) for event in _probes()):
            return False
    except Exception:
        return False
    observer.formatEvent = cheaper
    return True
