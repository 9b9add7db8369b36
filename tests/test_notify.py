"""
Tests for L{tunnelkit.service.notify}: the durable queue, and the notifier driving a real
L{MQTTClient} whose broker side is played byte by byte (see L{tests.test_mqtt}).
"""

from __future__ import annotations

import json
import os
import stat
import struct
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.test_mqtt import CONNACK_OK, BrokerSide, puback
from tunnelkit.mqtt import MQTT_OPTIONS, MQTTClient
from tunnelkit.service.interfaces import INotifier
from tunnelkit.service.dbrunner import Blocking
from tunnelkit.service.notify import (
    DATABASE_NAME,
    INotificationQueue,
    MQTTNotifier,
    NotificationError,
    NotifyOptions,
    SQLiteNotificationQueue,
    build_notifier,
    notification_payload,
    notify_topic,
)

TOKEN = "AQGAAXiSecretDestinationToken0123456789"
TOPIC = "$aws/things/t1/tunnels/notify"


def parse_publish(body: bytes):
    """(topic, mid, payload) of a QoS 1 PUBLISH body."""
    (length,) = struct.unpack("!H", body[:2])
    topic = body[2 : 2 + length].decode()
    (mid,) = struct.unpack("!H", body[2 + length : 4 + length])
    return topic, mid, body[4 + length :]


class PayloadTests(SynchronousTestCase):
    def test_payload(self) -> None:
        """The payload of reference section 4.1, plus tunnelkit's tunnelId."""
        document = json.loads(notification_payload(TOKEN, ("SSH", "FTP"), "us-east-1", "tid-1"))
        self.assertEqual(
            document,
            {
                "clientAccessToken": TOKEN,
                "clientMode": "destination",
                "region": "us-east-1",
                "services": ["SSH", "FTP"],
                "tunnelId": "tid-1",
            },
        )
        self.assertNotIn("tunnelId", json.loads(notification_payload(TOKEN, ("SSH",), "us-east-1")))

    def test_topic(self) -> None:
        self.assertEqual(notify_topic("t1"), TOPIC)
        for bad in ("", "a/b", "a+", "#", "x" * 129, "t1\n"):
            self.assertRaises(NotificationError, notify_topic, bad)
            self.assertRaises(ValueError, notify_topic, bad)  # as the agent expects of a bad thing name

    def test_bad_payloads(self) -> None:
        self.assertRaises(NotificationError, notification_payload, "", ("SSH",), "r")
        self.assertRaises(NotificationError, notification_payload, TOKEN, (), "r")
        self.assertRaises(NotificationError, notification_payload, TOKEN, ("S S",), "r")
        self.assertRaises(NotificationError, notification_payload, TOKEN, ("SSH",), "US EAST")
        self.assertRaises(NotificationError, notification_payload, TOKEN, ("SSH\n",), "r")
        self.assertRaises(NotificationError, notification_payload, TOKEN, ("SSH",), "r\n")


class QueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp() + "-dir", DATABASE_NAME)
        os.makedirs(os.path.dirname(self.path))
        self.queue: Any = Blocking(SQLiteNotificationQueue(self.path))
        self.addCleanup(lambda: self.queue.close())

    def test_interface(self) -> None:
        verifyObject(INotificationQueue, self.queue.store)

    def test_settings(self) -> None:
        """WAL, synchronous=FULL, and a file only its owner can read."""
        self.assertEqual(self.queue._db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(self.queue._db.execute("PRAGMA synchronous").fetchone()[0], 2)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_put_replace_remove(self) -> None:
        """One row per tunnel; a put replaces it; remove with a stale seq keeps the newer row."""
        a = self.queue.put("tun-a", "t1", b"A1", 10.0)
        b = self.queue.put("tun-b", "t2", b"B1", 11.0)
        a2 = self.queue.put("tun-a", "t1", b"A2", 12.0)
        self.assertLess(a.seq, b.seq)
        self.assertLess(b.seq, a2.seq)
        self.assertEqual([(q.tunnel_id, q.payload) for q in self.queue.pending()], [("tun-b", b"B1"), ("tun-a", b"A2")])
        self.assertFalse(self.queue.remove("tun-a", a.seq))
        self.assertTrue(self.queue.remove("tun-a", a2.seq))
        self.assertTrue(self.queue.remove("tun-b"))
        self.assertFalse(self.queue.remove("tun-b"))
        self.assertEqual(self.queue.pending(), [])

    def test_survives_reopen(self) -> None:
        """What was put is there after closing and opening the file again; seqs keep growing."""
        first = self.queue.put("tun-a", "t1", b"A1", 10.0)
        self.queue.close()
        self.queue = Blocking(SQLiteNotificationQueue(self.path))
        [again] = self.queue.pending()
        self.assertEqual((again.seq, again.tunnel_id, again.thing_name, again.payload), (first.seq, "tun-a", "t1", b"A1"))
        self.assertGreater(self.queue.put("tun-b", "t1", b"B", 11.0).seq, first.seq)

    def test_write_failure_is_typed(self) -> None:
        """A database that cannot be written gives a NotificationError naming the file."""
        import sqlite3

        from tunnelkit.service.store_sqlite import SQLiteConnection

        self.queue.close()
        # The queue over a read-only connection to its file (permissions do not stop root).
        self.queue = Blocking(SQLiteNotificationQueue(self.path))
        self.queue.store._db = sqlite3.connect(
            f"file:{self.path}?mode=ro", uri=True, isolation_level=None, factory=SQLiteConnection
        )
        e = self.assertRaises(NotificationError, self.queue.put, "tun-a", "t1", b"x", 1.0)
        self.assertIn(self.path, str(e))

    def test_repr_hides_payload(self) -> None:
        item = self.queue.put("tun-a", "t1", TOKEN.encode(), 1.0)
        self.assertNotIn(TOKEN, repr(item))

    def test_unusable_file(self) -> None:
        """A file that is not a database is refused with its path."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"this is not sqlite" * 100)
        from tunnelkit.errors import TunnelkitError

        e = self.assertRaises(TunnelkitError, SQLiteNotificationQueue, path)
        self.assertIn(path, str(e))


class NotifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.connections = 0
        self.build()

    def build(self) -> None:
        self.real_queue = SQLiteNotificationQueue(os.path.join(self.directory, DATABASE_NAME))
        self.queue: Any = Blocking(self.real_queue)
        self.client = MQTTClient(
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1883), "svc", self.reactor, retry_policy=lambda n: 5.0
        )
        self.notifier = MQTTNotifier(self.real_queue, self.client, self.reactor, wall_time=lambda: 1000.0)
        self.parent = MultiService()
        self.client.setServiceParent(self.parent)
        self.notifier.setServiceParent(self.parent)

    def stop(self) -> None:
        if self.parent.running:
            self.parent.stopService()
        self.queue.close()

    def run_service(self) -> None:
        self.parent.startService()
        self.addCleanup(self.stop)

    def broker(self) -> BrokerSide:
        """Accept the client's latest connection attempt and answer its CONNECT."""
        side = BrokerSide(self.reactor, len(self.reactor.tcpClients) - 1)
        [(first, _)] = side.take()
        self.assertEqual(first, 0x10)
        side.feed(CONNACK_OK)
        return side

    def refuse(self) -> None:
        """Fail the client's latest connection attempt (the broker is down)."""
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def publishes(self, side: BrokerSide):
        return [parse_publish(body) for first, body in side.take() if first & 0xF0 == 0x30]

    def test_interface(self) -> None:
        verifyObject(INotifier, self.notifier)

    def test_delivered_then_deleted(self) -> None:
        """A notification is published with QoS 1 on the thing's topic and deleted on PUBACK."""
        self.run_service()
        side = self.broker()
        self.notifier.notify_destination("tun-1", "t1", TOKEN, ("SSH",), "us-east-1")
        [(topic, mid, payload)] = self.publishes(side)
        self.assertEqual(topic, TOPIC)
        self.assertEqual(json.loads(payload)["clientAccessToken"], TOKEN)
        self.assertEqual(len(self.queue.pending()), 1)
        side.feed(puback(mid))
        self.assertEqual(self.queue.pending(), [])
        self.assertNotIn(TOKEN, repr(self.logged))

    def test_broker_down_then_up(self) -> None:
        """While the broker refuses connections the notification waits; it goes out once it is up."""
        self.run_service()
        self.refuse()
        self.notifier.notify_destination("tun-1", "t1", TOKEN, ("SSH",), "us-east-1")
        self.reactor.advance(5.0)
        self.refuse()
        self.reactor.advance(5.0)
        side = self.broker()
        [(topic, mid, payload)] = self.publishes(side)
        side.feed(puback(mid))
        self.assertEqual(self.queue.pending(), [])

    def test_lost_before_puback_is_sent_again(self) -> None:
        """A notification sent but not acknowledged when the connection drops is sent again."""
        self.run_service()
        side = self.broker()
        self.notifier.notify_destination("tun-1", "t1", TOKEN, ("SSH",), "us-east-1")
        [(_, mid, _)] = self.publishes(side)
        side.drop()
        self.reactor.advance(5.0)
        second = self.broker()
        [(_, mid2, payload)] = self.publishes(second)
        self.assertEqual(json.loads(payload)["tunnelId"], "tun-1")
        second.feed(puback(mid2))
        self.assertEqual(self.queue.pending(), [])

    def test_closed_tunnel_is_dropped(self) -> None:
        """A tunnel closed before its notification could be sent: nothing is sent, the row is gone."""
        self.run_service()
        self.refuse()
        self.notifier.notify_destination("tun-1", "t1", TOKEN, ("SSH",), "us-east-1")
        self.notifier.notify_destination("tun-2", "t1", TOKEN + "2", ("SSH",), "us-east-1")
        self.notifier.tunnel_closed("tun-1")
        self.assertEqual([q.tunnel_id for q in self.queue.pending()], ["tun-2"])
        self.reactor.advance(5.0)
        side = self.broker()
        [(_, _, payload)] = self.publishes(side)
        self.assertEqual(json.loads(payload)["tunnelId"], "tun-2")

    def test_rotation_replaces_waiting_notification(self) -> None:
        """A rotated token replaces the one still waiting: only the newest is sent."""
        self.run_service()
        self.refuse()
        self.notifier.notify_destination("tun-1", "t1", "old-token", ("SSH",), "us-east-1")
        self.notifier.notify_destination("tun-1", "t1", "new-token", ("SSH",), "us-east-1")
        self.reactor.advance(5.0)
        side = self.broker()
        [(_, mid, payload)] = self.publishes(side)
        self.assertEqual(json.loads(payload)["clientAccessToken"], "new-token")
        side.feed(puback(mid))
        self.assertEqual(self.queue.pending(), [])

    def test_survives_restart(self) -> None:
        """Queued and not delivered when the service stops: delivered by the next process."""
        self.run_service()
        self.refuse()
        self.notifier.notify_destination("tun-1", "t1", TOKEN, ("SSH", "FTP"), "eu-west-1")
        self.stop()
        self.build()
        self.parent.startService()
        side = self.broker()
        [(topic, mid, payload)] = self.publishes(side)
        self.assertEqual(topic, TOPIC)
        self.assertEqual(json.loads(payload)["services"], ["SSH", "FTP"])
        side.feed(puback(mid))
        self.assertEqual(self.queue.pending(), [])

    def test_stop_leaves_nothing_scheduled(self) -> None:
        self.run_service()
        self.refuse()
        self.notifier.notify_destination("tun-1", "t1", TOKEN, ("SSH",), "us-east-1")
        self.stop()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(Blocking(SQLiteNotificationQueue(os.path.join(self.directory, DATABASE_NAME))).pending()), 1)

    def test_bad_thing_name(self) -> None:
        """A thing name that would change the topic is refused before anything is stored."""
        self.run_service()
        self.assertRaises(NotificationError, self.notifier.notify_destination, "tun-1", "t1/#", TOKEN, ("SSH",), "r")
        self.assertEqual(self.queue.pending(), [])


class BuildNotifierTests(SynchronousTestCase):
    def options(self, **kwargs):
        values = {option[0].replace("-", "_"): None for option in MQTT_OPTIONS}
        values.update(kwargs)
        return values

    def test_options_mixin(self) -> None:
        names = [option[0] for option in NotifyOptions.optParameters]
        self.assertIn("mqtt", names)
        self.assertIn("mqtt-password-file", names)

    def test_off(self) -> None:
        """Without --mqtt: None, nothing added, and a log line saying notifications are off."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        parent = MultiService()
        self.assertIsNone(build_notifier(self.options(), self.mktemp(), MemoryReactorClock(), parent))
        self.assertEqual(list(parent), [])
        self.assertTrue(any("notifications are off" in e.get("log_format", "") for e in logged))

    def test_on(self) -> None:
        """With --mqtt: the client and notifier join the parent; the queue file is in the state dir."""
        reactor = MemoryReactorClock()
        state = self.mktemp()
        parent = MultiService()
        notifier = build_notifier(
            self.options(mqtt="tcp:host=127.0.0.1:port=1883"), state, reactor, parent, reactor=reactor
        )
        self.assertIsInstance(notifier, MQTTNotifier)
        self.assertEqual(len(list(parent)), 2)
        self.assertTrue(os.path.exists(os.path.join(state, DATABASE_NAME)))
        parent.startService()
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 1883))
        parent.stopService()
        notifier.queue.close()

    def test_bad_options(self) -> None:
        self.assertRaises(
            UsageError,
            build_notifier,
            self.options(mqtt_username="u"),
            self.mktemp(),
            MemoryReactorClock(),
            MultiService(),
        )


