"""
Live tunnel states as server-sent events (L{tunnelkit.service.console.live.StateWatcher}), on an
injected clock and a real SQLite store, with twisted.web's DummyRequest as the page.
"""

from __future__ import annotations

import json
import os
from typing import List, Tuple

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from zope.interface.verify import verifyObject

from tunnelkit.service.console.live import FALLBACK, KEEPALIVE, StateWatcher
from tunnelkit.service.interfaces import DESTINATION, SOURCE, ITunnelStateObserver
from tunnelkit.service.store import NewTunnel
from tunnelkit.service.store_sqlite import SQLiteStore

ACCOUNT = "123456789012"


def events(request: DummyRequest, start: int = 0) -> List[Tuple[str, dict]]:
    text = b"".join(request.written[start:]).decode()
    found = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in lines:
            found.append((lines["event"], json.loads(lines["data"])))
    return found


class WatcherTests(TestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.store = SQLiteStore(os.path.join(directory, "db"))
        self.addCleanup(self.store.close)
        self.store.create_account("default", ACCOUNT, 1.0)
        self.store.create_account("other", "210987654321", 1.0)
        self.clock = Clock()
        self.clock.advance(1000)
        self.watcher = StateWatcher(self.store, self.clock, interval=1.0)
        self.open("t1")

    def open(self, tunnel_id: str, account: str = ACCOUNT) -> None:
        self.store.create_tunnel(
            NewTunnel(tunnel_id, account, None, None, ("SSH",), 60, (), f"s-{tunnel_id}", f"d-{tunnel_id}",
                      self.clock.seconds()), None)

    def test_changes_are_sent(self) -> None:
        page = DummyRequest([b"events"])
        self.watcher.subscribe(ACCOUNT, "session-1", page)
        self.assertEqual(page.responseHeaders.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        first = events(page)
        self.assertEqual([(kind, data["id"], data["source"]) for kind, data in first], [("tunnel", "t1", "DISCONNECTED")])
        mark = len(page.written)
        self.clock.advance(1)
        self.assertEqual(events(page, mark), [])  # nothing changed: nothing sent
        self.store.set_connection_state("t1", SOURCE, True, self.clock.seconds())
        self.store.set_connection_state("t1", DESTINATION, True, self.clock.seconds())
        self.open("t2", account="210987654321")  # another account's: never seen here
        self.clock.advance(1)
        changed = events(page, mark)
        self.assertEqual([(d["id"], d["source"], d["destination"]) for _, d in changed], [("t1", "CONNECTED", "CONNECTED")])
        mark = len(page.written)
        self.store.delete_tunnel(ACCOUNT, "t1")
        self.clock.advance(1)
        self.assertEqual(events(page, mark), [("gone", {"id": "t1"})])

    def test_tunnel_page_sees_its_tunnel_only(self) -> None:
        self.open("t3")
        page = DummyRequest([b"events"])
        self.watcher.subscribe(ACCOUNT, "s", page, tunnel_id="t3")
        self.assertEqual([d["id"] for _, d in events(page)], ["t3"])
        mark = len(page.written)
        self.store.set_connection_state("t1", SOURCE, True, self.clock.seconds())
        self.clock.advance(1)
        self.assertEqual(events(page, mark), [])

    def test_keepalive_and_the_end(self) -> None:
        page = DummyRequest([b"events"])
        other = DummyRequest([b"events"])
        self.watcher.subscribe(ACCOUNT, "session-1", page)
        self.watcher.subscribe(ACCOUNT, "session-2", other)
        mark = len(page.written)
        self.clock.advance(KEEPALIVE)
        self.assertIn(b": keepalive\n\n", b"".join(page.written[mark:]))
        self.watcher.end_session("session-1")
        self.assertEqual(page.finished, 1)
        self.assertEqual(events(page, mark)[-1][0], "signedout")
        self.assertFalse(other.finished)
        self.assertEqual(self.watcher.subscriber_count(), 1)
        other.processingFailed(Exception("the browser went away"))  # notifyFinish fires
        self.assertEqual(self.watcher.subscriber_count(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no reading while nobody listens


class ToldTests(TestCase):
    """Changes this node tells (L{StateWatcher.tunnel_changed}) are sent at once; the full reading is a 10 s fallback."""

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.store = SQLiteStore(os.path.join(directory, "db"))
        self.addCleanup(self.store.close)
        self.store.create_account("default", ACCOUNT, 1.0)
        self.clock = Clock()
        self.clock.advance(1000)
        self.watcher = StateWatcher(self.store, self.clock)  # the default interval
        verifyObject(ITunnelStateObserver, self.watcher)
        WatcherTests.open(self, "t1")  # type: ignore[arg-type]
        self.page = DummyRequest([b"events"])
        self.watcher.subscribe(ACCOUNT, "session-1", self.page)
        self.mark = len(self.page.written)

    open = WatcherTests.open

    def sent(self) -> List[Tuple[str, dict]]:
        found = events(self.page, self.mark)
        self.mark = len(self.page.written)
        return found

    def test_told_change_sent_at_once(self) -> None:
        self.store.set_connection_state("t1", DESTINATION, True, self.clock.seconds())
        self.watcher.tunnel_changed(ACCOUNT, "t1")
        self.assertEqual([(d["id"], d["destination"]) for _, d in self.sent()], [("t1", "CONNECTED")])
        self.watcher.tunnel_changed(ACCOUNT, "t1")  # told again, nothing changed: nothing sent
        self.watcher.tunnel_changed("210987654321", "t1")  # an account nobody watches
        self.assertEqual(self.sent(), [])

    def test_opened_closed_deleted(self) -> None:
        self.open("t2")
        self.watcher.tunnel_changed(ACCOUNT, "t2")
        self.assertEqual([d["id"] for _, d in self.sent()], ["t2"])
        self.store.close_tunnel(ACCOUNT, "t2", self.clock.seconds())
        self.watcher.tunnel_changed(None, "t2")  # expiry: the teller does not know the account
        self.assertEqual([(d["id"], d["status"]) for _, d in self.sent()], [("t2", "CLOSED")])
        self.store.delete_tunnel(ACCOUNT, "t2")
        self.watcher.tunnel_changed(ACCOUNT, "t2")
        self.assertEqual(self.sent(), [("gone", {"id": "t2"})])

    def test_untold_change_seen_by_the_fallback(self) -> None:
        """A change made by another node: the next full reading (10 s), not every second."""
        self.store.set_connection_state("t1", SOURCE, True, self.clock.seconds())
        self.clock.advance(1)
        self.assertEqual(self.sent(), [])
        self.clock.advance(FALLBACK - 1)
        self.assertEqual([(d["id"], d["source"]) for _, d in self.sent()], [("t1", "CONNECTED")])
