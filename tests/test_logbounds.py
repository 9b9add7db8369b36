"""
Tests for L{tunnelkit.service.logbounds} and its use: whatever a client sends, one request writes a
bounded log line (API refusals, the access log, protocol violations at the relay).
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.test_api_helpers import ServiceTestCase
from tests.test_relay import ServiceTestCase as RelayTestCase, start
from tunnelkit.service.api import access_log_line
from tunnelkit.service.logbounds import LOG_VALUE_LIMIT, bounded

#: The longest log line one request may write (the fixed text and a few bounded values).
MAX_LINE = 1200


def capture(test: SynchronousTestCase) -> List[Dict[str, Any]]:
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class BoundedTests(SynchronousTestCase):
    def test_short_text_unchanged(self) -> None:
        self.assertEqual(bounded("SSH1"), "SSH1")

    def test_long_text_cut(self) -> None:
        shown = bounded("x" * 60000)
        self.assertEqual(shown, "x" * LOG_VALUE_LIMIT + f"... ({60000 - LOG_VALUE_LIMIT} more characters)")

    def test_control_characters_escaped(self) -> None:
        self.assertEqual(bounded("a\nb\x1b[31m\u2028"), "a\\x0ab\\x1b[31m\\u2028")

    def test_bytes_and_others(self) -> None:
        self.assertEqual(bounded(b"\xff" * 3, 2), "\xff\xff... (1 more characters)")
        self.assertEqual(bounded(ValueError("bad")), "bad")


class ApiLogTests(ServiceTestCase):
    def test_huge_target_logged_bounded(self) -> None:
        events = capture(self)
        status, body = self.call_raw("IoTSecuredTunneling." + "X" * 12000, {})
        self.assertEqual(status, 400)
        lines = [formatEvent(e) for e in events]
        self.assertTrue(any("UnknownOperationException" in line for line in lines), lines)
        self.assertLess(max(len(line) for line in lines), MAX_LINE)

    def test_access_log_line_bounded(self) -> None:
        class Request:
            method = b"GET"
            uri = b"/" + b"a" * 60000
            clientproto = b"HTTP/1.1\n"
            code = 404
            sentLength = 0

            def getClientAddress(self) -> Any:
                from twisted.internet.address import IPv4Address

                return IPv4Address("TCP", "127.0.0.1", 5555)

            def getHeader(self, name: bytes) -> bytes:
                return b"agent\r\nforged line" * 10000

        line = access_log_line("[02/Dec/2026:08:00:00 +0000]", Request())
        self.assertLess(len(line), MAX_LINE)
        self.assertNotIn("\n", line)
        self.assertNotIn("\r", line)


class RelayLogTests(RelayTestCase):
    def test_huge_service_id_logged_bounded(self) -> None:
        """A frame naming a 60 KB service id closes its sender; the log line stays short."""
        events = capture(self)
        tunnel, source, destination = self.pair()
        source.send(start(service="S" * 60000))
        lines = [formatEvent(e) for e in events]
        self.assertTrue(any("unknown_service_id" in line for line in lines), lines)
        self.assertLess(max(len(line) for line in lines), MAX_LINE)
