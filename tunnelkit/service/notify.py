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
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

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
    "SQLNotificationQueue",
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
    """
    Durable storage of undelivered notifications, at most one per tunnel.  Each method but C{close}
    returns a Deferred (no database call on the reactor thread; see L{tunnelkit.service.dbrunner}).
    """

    def put(tunnel_id: str, thing_name: str, payload: bytes, now: float) -> "Deferred[QueuedNotification]":
        """Store (durably, before the Deferred fires) the tunnel's notification, replacing any older one."""

    def remove(tunnel_id: str, seq: Optional[int] = None) -> "Deferred[bool]":
        """
        Drop the tunnel's notification; with C{seq}, only if it is still that one (not replaced).

        @return: a Deferred of whether a row was removed.
        """

    def pending() -> "Deferred[List[QueuedNotification]]":
        """Every notification still queued, oldest first."""

    def close() -> None:
        """Release the storage."""


#: The queue's tables; C{BLOB} and C{REAL} are the SQLite spellings (PostgreSQL's migration has its own).
_QUEUE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS notifications ("
    " tunnel_id TEXT PRIMARY KEY,"
    " seq INTEGER NOT NULL,"
    " thing_name TEXT NOT NULL,"
    " payload BLOB NOT NULL,"
    " queued_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER)",
    "INSERT INTO counter (id, seq) VALUES (0, 0) ON CONFLICT (id) DO NOTHING",
)


@implementer(INotificationQueue)
class SQLNotificationQueue:
    """
    L{INotificationQueue} in SQL on a L{tunnelkit.service.dbrunner.IDatabaseRunner} whose connections
    speak L{tunnelkit.service.store_sql.SQLConnection}: the SQLite file of L{SQLiteNotificationQueue},
    or the PostgreSQL database several service nodes share (its tables are the store's migration 2).
    """

    def __init__(self, runner: Any, where: str, owns_runner: bool = True) -> None:
        self._runner = runner
        self.where = where
        self._owns_runner = owns_runner

    def put(self, tunnel_id: str, thing_name: str, payload: bytes, now: float) -> "Deferred[QueuedNotification]":
        d = self._runner.run(self._put, tunnel_id, thing_name, payload, now)
        d.addErrback(self._put_failed, tunnel_id)
        return d  # type: ignore[no-any-return]

    def _put_failed(self, failure: Failure, tunnel_id: str) -> None:
        if failure.check(NotificationError):
            failure.raiseException()
        raise NotificationError(
            f"{self.where}: cannot store the notification of tunnel {tunnel_id}: {failure.value}"
        ) from None

    @staticmethod
    def _put(db: Any, tunnel_id: str, thing_name: str, payload: bytes, now: float) -> QueuedNotification:
        with db.transaction():
            (seq,) = db.execute("UPDATE counter SET seq = seq + 1 WHERE id = 0 RETURNING seq", ()).fetchone()
            db.execute(
                "INSERT INTO notifications (tunnel_id, seq, thing_name, payload, queued_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (tunnel_id) DO UPDATE SET seq = excluded.seq, thing_name = excluded.thing_name, "
                "payload = excluded.payload, queued_at = excluded.queued_at",
                (tunnel_id, seq, thing_name, payload, now),
            )
        return QueuedNotification(int(seq), tunnel_id, thing_name, payload, now)

    def remove(self, tunnel_id: str, seq: Optional[int] = None) -> "Deferred[bool]":
        return self._runner.run(self._remove, tunnel_id, seq)  # type: ignore[no-any-return]

    @staticmethod
    def _remove(db: Any, tunnel_id: str, seq: Optional[int]) -> bool:
        with db.transaction():
            if seq is None:
                cursor = db.execute("DELETE FROM notifications WHERE tunnel_id = ?", (tunnel_id,))
            else:
                cursor = db.execute("DELETE FROM notifications WHERE tunnel_id = ? AND seq = ?", (tunnel_id, seq))
            return bool(cursor.rowcount > 0)

    def pending(self) -> "Deferred[List[QueuedNotification]]":
        return self._runner.run(self._pending)  # type: ignore[no-any-return]

    @staticmethod
    def _pending(db: Any) -> List[QueuedNotification]:
        rows = db.execute(
            "SELECT seq, tunnel_id, thing_name, payload, queued_at FROM notifications ORDER BY seq", ()
        ).fetchall()
        return [QueuedNotification(int(seq), t, thing, bytes(p), at) for seq, t, thing, p, at in rows]

    @property
    def _db(self) -> Any:
        """The connection of a queue on a synchronous runner (tests look at it)."""
        return self._runner._connection

    @_db.setter
    def _db(self, connection: Any) -> None:
        self._runner._connection = connection

    def close(self) -> None:
        if self._owns_runner:  # else the store's, closed with the store
            self._runner.close()


class SQLiteNotificationQueue(SQLNotificationQueue):
    """
    L{INotificationQueue} in its own SQLite file (WAL, synchronous=FULL: durable at each put), on a
    synchronous runner, or on C{reactor}'s threads (one) when given.
    """

    def __init__(self, path: str, reactor: Any = None) -> None:
        from tunnelkit.service.dbrunner import SynchronousRunner, ThreadedRunner
        from tunnelkit.service.store_sqlite import SQLiteConnection

        self.path = path
        if not os.path.exists(path):
            # Tokens live here until delivered: owner-only from the first byte.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))

        def connect() -> Any:
            try:
                db = sqlite3.connect(path, isolation_level=None, factory=SQLiteConnection, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.DatabaseError as e:
                raise TunnelkitError(f"{path}: cannot use the notification queue database: {e}") from None
            return db

        first = connect()
        try:
            for statement in _QUEUE_SCHEMA:
                first.execute(statement)
        except sqlite3.DatabaseError as e:
            first.close()
            raise TunnelkitError(f"{path}: cannot use the notification queue database: {e}") from None
        if reactor is None:
            runner: Any = SynchronousRunner(connect, first)
        else:
            first.close()
            runner = ThreadedRunner(reactor, connect, threads=1, name="notify")
        super().__init__(runner, path)


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
    ) -> "Deferred[None]":
        """Queue durably, then publish (see L{INotifier.notify_destination}): fires once queued."""
        topic = notify_topic(thing_name)
        payload = notification_payload(access_token, services, region, tunnel_id)
        d = self.queue.put(tunnel_id, thing_name, payload, self._wall_time())

        def queued(item: QueuedNotification) -> None:
            log.info(
                "Queued the destination token of tunnel {tunnel_id} for thing {thing_name} ({topic})",
                tunnel_id=tunnel_id,
                thing_name=thing_name,
                topic=topic,
            )
            if self.running:
                self._publish(item)

        return d.addCallback(queued)  # the control plane waits for it: a notification it accepted is on disk

    def adopt(self, items: List[QueuedNotification]) -> None:
        """
        Publish C{items}, taken over from a node that stopped (a cluster's shared queue says this node
        has them now: L{tunnelkit.service.cluster.notifications}).
        """
        if items:
            log.info("Took over {count} undelivered notification(s) of a node that stopped", count=len(items))
        for item in items:
            if self.running:
                self._publish(item)

    def tunnel_closed(self, tunnel_id: str) -> None:
        """Forget the tunnel's undelivered notification, if any (withdrawn if not yet sent)."""
        self._withdraw(tunnel_id)

        def removed(done: bool) -> None:
            if done:
                log.info("Dropped the undelivered notification of closed tunnel {tunnel_id}", tunnel_id=tunnel_id)

        d = self.queue.remove(tunnel_id)
        d.addCallback(removed)
        d.addErrback(self._queue_failed, "Dropping the notification of closed tunnel {tunnel_id} failed", tunnel_id)

    # --- service ---

    def startService(self) -> None:
        super().startService()

        def publish(waiting: List[QueuedNotification]) -> None:
            if waiting:
                log.info("{count} notification(s) waiting for delivery from before", count=len(waiting))
            for item in waiting:
                if self.running and item.tunnel_id not in self._in_flight:
                    self._publish(item)

        d = self.queue.pending()
        d.addCallback(publish)
        d.addErrback(self._queue_failed, "Reading the queued notifications failed", "")

    def _queue_failed(self, failure: Failure, what: str, tunnel_id: str) -> None:
        if self.running:
            log.failure(what, failure, tunnel_id=tunnel_id)

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

        def removed(done: bool) -> None:
            if done:
                log.info(
                    "Delivered the destination token of tunnel {tunnel_id} to thing {thing_name}",
                    tunnel_id=item.tunnel_id,
                    thing_name=item.thing_name,
                )
            if self.delivered is not None:
                self.delivered(item)

        d = self.queue.remove(item.tunnel_id, item.seq)
        d.addCallback(removed)
        d.addErrback(self._queue_failed, "Removing the delivered notification of tunnel {tunnel_id} failed",
                     item.tunnel_id)

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


class _CloseOnStop(Service):
    """Closes the notifier's own queue (its thread) when the service stops."""

    def __init__(self, queue: INotificationQueue) -> None:
        self._queue = queue

    def stopService(self) -> Any:
        super().stopService()
        self._queue.close()


def build_notifier(
    options: Mapping[str, Any],
    state_dir: str,
    clock: IReactorTime,
    parent: MultiService,
    reactor: Any = None,
    shared: Optional[INotificationQueue] = None,
    threads: Any = None,
) -> Optional[MQTTNotifier]:
    """
    The service's notifier, from its parsed options (L{NotifyOptions}).

    @param shared: the queue in the store's database (PostgreSQL); None: C{notify.sqlite3} in
        C{state_dir}, on C{threads}' thread pool (a reactor) if given, else synchronous.

    @return: None (after logging that notifications are off) without C{--mqtt}; otherwise the
        notifier, its MQTT client and notifier services added to C{parent}.
    @raise twisted.python.usage.UsageError: for bad MQTT options.
    """
    settings = mqtt_settings(options, default_client_id=f"tunnelkit-service-{os.getpid()}")
    if settings is None:
        log.info("No --mqtt broker: notifications are off (destination tokens are not sent to devices)")
        return None
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if shared is not None:
        queue: INotificationQueue = shared  # the tables of the database several nodes share
    else:
        os.makedirs(state_dir, exist_ok=True)
        queue = SQLiteNotificationQueue(os.path.join(state_dir, DATABASE_NAME), reactor=threads)
    client = client_from_settings(reactor, settings, clock)
    notifier = MQTTNotifier(queue, client, clock)
    if shared is None:
        _CloseOnStop(queue).setServiceParent(parent)  # stopped after the notifier (reverse order)
    client.setServiceParent(parent)
    notifier.setServiceParent(parent)
    log.info("Notifications go to the MQTT broker {endpoint}", endpoint=settings.endpoint)
    return notifier
