# -*- test-case-name: tests.test_logbounds -*-
"""
Bounding what a client sent before it goes into a log line.

Every value a client controls (a header, a URI, a service id from a frame, an error message quoting
the request) goes through L{bounded} before the service logs it, so one request writes at most a few
hundred bytes of log whatever it carries, and no control character (a forged newline, a terminal
escape) reaches the log file as it is.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["bounded", "LOG_VALUE_LIMIT"]

#: The most characters of one client-controlled value a log line shows.
LOG_VALUE_LIMIT = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: "re.Match[str]") -> str:
    return "\\x%02x" % ord(match.group()) if ord(match.group()) < 0x100 else "\\u%04x" % ord(match.group())


def bounded(value: Any, limit: int = LOG_VALUE_LIMIT) -> str:
    """
    C{value} as text for a log line: at most C{limit} characters of it (then how many more there
    were), with control characters escaped (C{\\x0a}).  Bytes are decoded as Latin-1.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value[: limit + 1]).decode("latin-1")
        total = len(value)
    else:
        text = value if isinstance(value, str) else str(value)
        total = len(text)
    shown = text[:limit]
    shown = _CONTROL.sub(_escape, shown)
    if total > limit:
        shown += f"... ({total - limit} more characters)"
    return shown
