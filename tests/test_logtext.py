"""tunnelkit.logtext: the same classic log lines as twisted.logger's formatter, for less."""

import io
from typing import Any, Dict, List

from twisted.logger import FileLogObserver, LogLevel, formatEventAsClassicLogText, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tunnelkit.logtext import ClassicText, cheaper_text


def events() -> List[Dict[str, Any]]:
    base = {"log_time": 1764700000.25, "log_level": LogLevel.info, "log_namespace": "tunnelkit.x"}
    out = [
        dict(base, log_format="Accepted tcp connection on port {port} from {peer}", port=1, peer="127.0.0.1:2"),
        dict(base, log_format="{a!r} and {b:>5} ({c.real})", a="q", b=7, c=3),
        dict(base, log_format="two\nlines {x}", x="and\nthree"),
        dict(base, log_format="{missing}"),
        dict(base, log_format="called {f()}", f=lambda: "yes"),
        dict(base, log_format=""),
        dict(base, log_format=None),
        dict(base, log_format="legacy", log_system="HTTPChannel,1"),
        dict(base, log_format="no level", log_level=None),
        dict(base, log_format="braces {{literal}}"),
        dict(base, log_time=1764700000.9999997, log_format="late in the second"),
        dict(base, log_time=None, log_format="no time"),
    ]
    try:
        1 / 0
    except ZeroDivisionError:
        out.append(dict(base, log_format="failed", log_failure=Failure()))
    return out


class ClassicTextTests(TestCase):
    def test_same_text_as_twisted(self) -> None:
        """Every kind of event (plain, calls, failures, bad formats, systems, times) gives twisted's text."""
        text = ClassicText()
        for event in events():
            self.assertEqual(text(dict(event)), formatEventAsClassicLogText(dict(event)), event["log_format"])

    def test_time_stamp_kept_per_second(self) -> None:
        text = ClassicText()
        base = {"log_level": LogLevel.info, "log_namespace": "n", "log_format": "x"}
        for when in (100.0, 100.5, 101.0, 100.2):
            event = dict(base, log_time=when)
            self.assertEqual(text(dict(event)), formatEventAsClassicLogText(dict(event)))


class CheaperTextTests(TestCase):
    def test_installed_on_a_text_file_observer(self) -> None:
        out = io.StringIO()
        observer = textFileLogObserver(out)
        self.assertTrue(cheaper_text(observer))
        self.assertIsInstance(observer.formatEvent, ClassicText)
        observer(events()[0])
        self.assertEqual(out.getvalue(), formatEventAsClassicLogText(events()[0]))

    def test_not_installed_when_the_text_differs(self) -> None:
        """An observer with another time format keeps its own formatter."""
        observer = textFileLogObserver(io.StringIO(), timeFormat="%H:%M")
        own = observer.formatEvent
        self.assertFalse(cheaper_text(observer))
        self.assertIs(observer.formatEvent, own)

    def test_not_a_file_observer(self) -> None:
        self.assertFalse(cheaper_text(lambda event: None))
        observer = FileLogObserver(io.StringIO(), lambda event: "mine\n")
        self.assertFalse(cheaper_text(observer))
