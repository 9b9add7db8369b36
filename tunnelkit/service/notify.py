# -*- test-case-name: tests.test_notify -*-
"""
Delivering destination tokens to devices over MQTT (reference section 4.1), durably.

L{MQTTNotifier} implements L{INotifier}: each notification is first written to a queue on disk
(L{INotificationQueue}; L{SQLiteNotificationQueue} keeps it in C{notify.sqlite3} in the state
directory), then published with QoS 1 on C{$aws/things/<thingName>/tunnels/notify}.  The row is
deleted once the broker acknowledged it (PUBACK), or when the tunnel closes.  While the broker is
down the MQTT client reconnects with backoff and holds the publish (withdrawn if the tunnel closes
or its token is rotated meanwhile); what was sent but not acknowledged is sent again after a
reconnect; after a restart every row still queued is published again.

A PUBACK means the broker has the message, not that the device does: a device that is offline gets
it from the broker when it comes back, because the agent keeps a persistent MQTT session (QoS 1
messages are queued for it, across broker restarts when the broker persists its state).

The queue holds access tokens, so the database file is created readable by its owner only; tokens
never appear in logs.

The service's tap uses L{NotifyOptions} and L{build_notifier}.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from tunnelkit.errors import TunnelkitError
from tunnelkit.mqtt import MQTT_OPTIONS, IMQTTClient, MQTTClientStopped, client_from_settings, mqtt_settings
from tunnelkit.protocol.notification import NotificationError, notification_payload, notify_topic
from tunnelkit.service.interfaces import INotifier

__all__ = [
    "NotifyOptions",
    "build_notifier",
    "MQTTNotifier",
    "INotificationQueue",
    "SQLiteNotificationQueue",
    "QueuedNotification",
    "NotificationError",
    "notify_topic",
    "notification_payload",
]

log = Logger()

DATABASE_NAME = "notify.sqlite3"


class NotifyOptions:
    """Mixin for the service's Options: the broker the notifier publishes to (see L{MQTT_OPTIONS})."""

    optParameters = [list(option) for option in MQTT_OPTIONS]


@dataclass(frozen=True)
class QueuedNotification:
    """One notification waiting for delivery; C{seq} grows with every put, across tunnels."""

    seq: int
    tunnel_id: str
    thing_name: str
    payload: bytes
    queued_at: float

    def __repr__(self) -> str:  # the payload holds a token: never show it
        return f"QueuedNotification(seq={self.seq}, tunnel_id={self.tunnel_id!r}, thing_name={self.thing_name!r})"


class INotificationQueue(Interface):
    """Durable storage of undelivered notifications, at most one per tunnel."""

    def put(tunnel_id: str, thing_name: str, payload: bytes, now: float) -> Union[QueuedNotification, Deferred]:
        """
        Store (durably, before returning) the tunnel's notification, replacing any older one.  Each
        method may instead return a Deferred of its result (a queue in a shared database,
        L{tunnelkit.service.cluster.notifications}).
        """

    def remove(tunnel_id: str, seq: Optional[int] = None) -> Union[bool, Deferred]:
        """
        Drop the tunnel's notification; with C{seq}, only if it is still that one (not replaced).

        @return: whether a row was removed.
        """

    def pending() -> Union[List[QueuedNotification], Deferred]:
        """Every notification still queued, oldest first."""

    def close() -> None:
        """Release the storage."""


@implementer(INotificationQueue)
class SQLiteNotificationQueue:
    """L{INotificationQueue} in its own SQLite file (WAL, synchronous=FULL: durable at each put)."""

    def __init__(self, path: str) -> None:
        self.path = path
        existed = os.path.exists(path)
        if not existed:
            # Tokens live here until delivered: owner-only from the first byte.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS notifications ("
                " tunnel_id TEXT PRIMARY KEY,"
                " seq INTEGER NOT NULL,"
                " thing_name TEXT NOT NULL,"
                " payload BLOB NOT NULL,"
                " queued_at REAL NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER)")
            self._db.execute("INSERT OR IGNORE INTO counter (id, seq) VALUES (0, 0)")
        except sqlite3.DatabaseError as e:
            raise TunnelkitError(f"{path}: cannot use the notification queue database: {e}") from None

    def put(self, tunnel_id: str, thing_name: str, payload: bytes, now: float) -> QueuedNotification:
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("UPDATE counter SET seq = seq + 1 WHERE id = 0")
                (seq,) = self._db.execute("SELECT seq FROM counter WHERE id = 0").fetchone()
                self._db.execute(
                    "INSERT OR REPLACE INTO notifications (tunnel_id, seq, thing_name, payload, queued_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (tunnel_id, seq, thing_name, payload, now),
                )
        except sqlite3.Error as e:
            raise NotificationError(f"{self.path}: cannot store the notification of tunnel {tunnel_id}: {e}") from None
        return QueuedNotification(seq, tunnel_id, thing_name, payload, now)

    def remove(self, tunnel_id: str, seq: Optional[int] = None) -> bool:
        if seq is None:
            cursor = self._db.execute("DELETE FROM notifications WHERE tunnel_id = ?", (tunnel_id,))
        else:
            cursor = self._db.execute(
                "DELETE FROM notifications WHERE tunnel_id = ? AND seq = ?", (tunnel_id, seq)
            )
        return cursor.rowcount > 0

    def pending(self) -> List[QueuedNotification]:
        rows = self._db.execute(
            "SELECT seq, tunnel_id, thing_name, payload, queued_at FROM notifications ORDER BY seq"
        ).fetchall()
        return [QueuedNotification(seq, t, thing, bytes(p), at) for seq, t, thing, p, at in rows]

    def close(self) -> None:
        self._db.close()


@implementer(INotifier)
class MQTTNotifier(Service):
    """
    L{INotifier} over a durable queue and an MQTT client; see the module docstring.

    @ivar delivered: called with each L{QueuedNotification} once acknowledged (for metrics/tests).
    """

    def __init__(
        self,
        queue: INotificationQueue,
        publisher: IMQTTClient,
        clock: IReactorTime,
        wall_time: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self._publisher = publisher
        self._clock = clock
        self._wall_time = wall_time
        # tunnel_id -> (seq, publish Deferred) of the latest publish in this process not yet acknowledged
        self._in_flight: Dict[str, Tuple[int, Deferred]] = {}
        self.delivered: Optional[Callable[[QueuedNotification], None]] = None

    # --- INotifier ---

    def notify_destination(
        self, tunnel_id: str, thing_name: str, access_token: str, services: Tuple[str, ...], region: str
    ) -> None:
        """Queue durably, then publish (see L{INotifier.notify_destination})."""
        topic = notify_topic(thing_name)
        payload = notification_payload(access_token, services, region, tunnel_id)
        item = self.queue.put(tunnel_id, thing_name, payload, self._wall_time())
        if isinstance(item, Deferred):  # a shared queue (tunnelkit.service.cluster.notifications)
            item.addCallback(self._queued, topic)
            item.addErrback(lambda f: log.failure("Could not queue the notification of tunnel {tunnel_id}", f,
                                                  tunnel_id=tunnel_id))
        else:
            self._queued(item, topic)

    def _queued(self, item: QueuedNotification, topic: str) -> None:
        log.info(
            "Queued the destination token of tunnel {tunnel_id} for thing {thing_name} ({topic})",
            tunnel_id=item.tunnel_id,
            thing_name=item.thing_name,
            topic=topic,
        )
        if self.running:
            self._publish(item)

    def adopt(self, items: List[QueuedNotification]) -> None:
        """Publish C{items}, taken over from a node that died (the shared queue says this node has them now)."""
        if items:
            log.info("Took over {count} undelivered notification(s) of a node that stopped", count=len(items))
        for item in items:
            if self.running:
                self._publish(item)

    def tunnel_closed(self, tunnel_id: str) -> None:
        """Forget the tunnel's undelivered notification, if any (withdrawn if not yet sent)."""
        self._withdraw(tunnel_id)
        removed = self.queue.remove(tunnel_id)
        if isinstance(removed, Deferred):
            removed.addCallback(self._dropped, tunnel_id)
            removed.addErrback(lambda f: log.failure("Could not drop the notification of tunnel {tunnel_id}", f,
                                                     tunnel_id=tunnel_id))
        else:
            self._dropped(removed, tunnel_id)

    def _dropped(self, removed: bool, tunnel_id: str) -> None:
        if removed:
            log.info("Dropped the undelivered notification of closed tunnel {tunnel_id}", tunnel_id=tunnel_id)

    # --- service ---

    def startService(self) -> None:
        super().startService()
        waiting = self.queue.pending()
        if isinstance(waiting, Deferred):
            waiting.addCallback(self._republish)
            waiting.addErrback(lambda f: log.failure("Could not read the undelivered notifications", f))
        else:
            self._republish(waiting)

    def _republish(self, waiting: List[QueuedNotification]) -> None:
        if waiting:
            log.info("{count} notification(s) waiting for delivery from before", count=len(waiting))
        for item in waiting:
            self._publish(item)

    def stopService(self) -> Any:
        for tunnel_id in list(self._in_flight):
            self._withdraw(tunnel_id)  # stays on disk: published again at the next start
        return super().stopService()

    def _withdraw(self, tunnel_id: str) -> None:
        entry = self._in_flight.pop(tunnel_id, None)
        if entry is not None:
            entry[1].cancel()  # withdraws it if it still waits for the broker

    def _publish(self, item: QueuedNotification) -> None:
        self._withdraw(item.tunnel_id)  # a newer token replaces one not yet sent
        d = self._publisher.publish(notify_topic(item.thing_name), item.payload, 1)
        self._in_flight[item.tunnel_id] = (item.seq, d)
        d.addCallbacks(self._acknowledged, self._failed, callbackArgs=(item,), errbackArgs=(item,))

    def _acknowledged(self, _: Any, item: QueuedNotification) -> None:
        entry = self._in_flight.get(item.tunnel_id)
        if entry is not None and entry[0] == item.seq:
            del self._in_flight[item.tunnel_id]
        removed = self.queue.remove(item.tunnel_id, item.seq)
        if isinstance(removed, Deferred):
            removed.addCallback(self._removed, item)
            removed.addErrback(lambda f: log.failure("Could not remove a delivered notification", f))
        else:
            self._removed(removed, item)

    def _removed(self, removed: bool, item: QueuedNotification) -> None:
        if removed:
            log.info(
                "Delivered the destination token of tunnel {tunnel_id} to thing {thing_name}",
                tunnel_id=item.tunnel_id,
                thing_name=item.thing_name,
            )
        if self.delivered is not None:
            self.delivered(item)

    def _failed(self, reason: Failure, item: QueuedNotification) -> None:
        entry = self._in_flight.get(item.tunnel_id)
        if entry is not None and entry[0] == item.seq:
            del self._in_flight[item.tunnel_id]
        if reason.check(MQTTClientStopped, CancelledError):
            return  # withdrawn, or still on disk and published again at the next start
        log.failure(
            "Publishing the notification of tunnel {tunnel_id} failed; it stays queued",
            reason,
            tunnel_id=item.tunnel_id,
        )


def build_notifier(
    options: Mapping[str, Any],
    state_dir: str,
    clock: IReactorTime,
    parent: MultiService,
    reactor: Any = None,
    queue: Optional[INotificationQueue] = None,
) -> Optional[MQTTNotifier]:
    """
    The service's notifier, from its parsed options (L{NotifyOptions}).

    @return: None (after logging that notifications are off) without C{--mqtt}; otherwise the
        notifier, its MQTT client and notifier services added to C{parent}.
    @param queue: where notifications wait (default: C{notify.sqlite3} in C{state_dir}).
    @raise twisted.python.usage.UsageError: for bad MQTT options.
    """
    settings = mqtt_settings(options, default_client_id=f"tunnelkit-service-{os.getpid()}")
    if settings is None:
        log.info("No --mqtt broker: notifications are off (destination tokens are not sent to devices)")
        return None
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    os.makedirs(state_dir, exist_ok=True)
    if queue is None:  # one node: its own file (several nodes share theirs: tunnelkit.service.cluster)
        queue = SQLiteNotificationQueue(os.path.join(state_dir, DATABASE_NAME))
    client = client_from_settings(reactor, settings, clock)
    notifier = MQTTNotifier(queue, client, clock)
    client.setServiceParent(parent)
    notifier.setServiceParent(parent)
    log.info("Notifications go to the MQTT broker {endpoint}", endpoint=settings.endpoint)
    return notifier
