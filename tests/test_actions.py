"""
L{tunnelkit.transport.actions}: one dispatcher for a session's actions, every type handled; the
console's tunnel source handles each type (review 9: it dropped the flow-control and half-close ones).
"""

from __future__ import annotations

from typing import Any, List

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.protocol.session import (
    CloseLocal,
    ConnectTarget,
    Fatal,
    HalfCloseLocal,
    LogEvent,
    PauseLocal,
    ResumeLocal,
    SendFrames,
    StartListening,
    WriteLocal,
)
from tunnelkit.service.console.terminal import TunnelSource
from tunnelkit.transport.actions import ACTION_TYPES, ActionDispatcher, log_event


class LogEventTests(SynchronousTestCase):
    def test_a_log_event_is_one_logger_event_in_the_sessions_namespace(self) -> None:
        events: List[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log_event(LogEvent("warn", "Ignoring {type} before the service ids", {"type": "DATA"}))
        (event,) = [e for e in events if e.get("log_namespace") == "tunnelkit.protocol.session"]
        self.assertEqual(
            (event["log_level"], event["log_format"], event["type"]),
            (LogLevel.warn, "Ignoring {type} before the service ids", "DATA"),
        )


class DispatcherTests(SynchronousTestCase):
    def test_every_type_needed(self) -> None:
        handlers = {t: (lambda a: None) for t in ACTION_TYPES if t is not HalfCloseLocal}
        e = self.assertRaises(TypeError, ActionDispatcher, handlers)
        self.assertIn("HalfCloseLocal", str(e))

    def test_unknown_type_refused(self) -> None:
        handlers: Any = {t: (lambda a: None) for t in ACTION_TYPES}
        handlers[int] = lambda a: None
        e = self.assertRaises(TypeError, ActionDispatcher, handlers)
        self.assertIn("int", str(e))

    def test_in_order(self) -> None:
        seen: List[Any] = []
        dispatch = ActionDispatcher({t: (lambda a, t=t: seen.append((t, a))) for t in ACTION_TYPES})
        actions = [WriteLocal("SSH", 1, b"x"), PauseLocal("SSH", 1), SendFrames(b"f"), Fatal("no")]
        dispatch(actions)
        self.assertEqual(seen, [(type(a), a) for a in actions])


class ConsoleSourceActionTests(SynchronousTestCase):
    """The console's TunnelSource carries out every action type for its one connection."""

    def setUp(self) -> None:
        self.events: List[Any] = []
        self.source = TunnelSource(
            "SSH",
            lambda: self.events.append("ready"),
            lambda data: self.events.append(("data", data)),
            lambda message: self.events.append(("end", message)),
            lambda paused: self.events.append(("paused", paused)),
        )
        self.source.connection_id = 7

    def test_pause_resume(self) -> None:
        self.source._perform([PauseLocal("SSH", 7), ResumeLocal("SSH", 7), PauseLocal("SSH", 8)])
        self.assertEqual(self.events, [("paused", True), ("paused", False)])

    def test_half_close_ends(self) -> None:
        self.source._perform([WriteLocal("SSH", 7, b"bye"), HalfCloseLocal("SSH", 7)])
        self.assertEqual(self.events[0], ("data", b"bye"))
        self.assertEqual(self.events[1][0], "end")
        self.assertIn("last byte", self.events[1][1])
        self.assertIsNone(self.source.connection_id)

    def test_close_and_other_connections(self) -> None:
        self.source._perform([WriteLocal("SSH", 8, b"not mine"), CloseLocal("SSH", 7, "reset", abort=True)])
        self.assertEqual(self.events, [("end", "The device closed the connection (reset).")])

    def test_start_listening_and_connect_target(self) -> None:
        self.source._perform([StartListening("SSH", "SSH")])
        self.assertEqual(self.events, ["ready"])
        self.source._perform([ConnectTarget("SSH", 1, "SSH")])
        self.assertEqual(self.events[1][0], "end")
        self.assertIn("cannot be used", self.events[1][1])
