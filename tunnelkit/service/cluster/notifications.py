# -*- test-case-name: tests.e2e.test_cluster_postgres -*-
"""
The MQTT notification queue shared by the nodes of a cluster (PostgreSQL), so that each undelivered
notification is retried by exactly one node, and by a survivor when its node dies.

Each row is claimed by one node (C{claimed_by}) until C{claimed_until}: the node that queued it, or
the node that took it over.  A node publishes only the rows it claims; it renews its claims at each
heartbeat (L{renew}) and takes over rows whose claim ran out (L{claim_orphans}: C{FOR UPDATE SKIP
LOCKED}, so two survivors never take the same row).  A restarted node (same C{--node-id}) finds its
own rows in L{pending} and publishes those again, as a single node does after a restart; nothing a
broker acknowledged is published again (the row is deleted at the PUBACK).  As with one node, a
notification sent but not yet acknowledged when its node died is published again: MQTT's QoS 1 is
at least once, and the agent copes with a repeated token (it replaces the session of that tunnel).

L{tunnelkit.service.notify.MQTTNotifier} drives it as its L{INotificationQueue} (whose methods may
return Deferreds); L{tunnelkit.service.cluster.node.ClusterNode} renews and adopts at each beat.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import Deferred
from zope.interface import implementer

from tunnelkit.service.notify import INotificationQueue, QueuedNotification

__all__ = ["PostgresNotificationQueue"]

_COLUMNS = "seq, tunnel_id, thing_name, payload, queued_at"


def _execute(connection: Any, sql: str, params: tuple = ()) -> List[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description is not None else []


def _items(rows: List[tuple]) -> List[QueuedNotification]:
    return sorted(
        (QueuedNotification(int(seq), tunnel_id, thing, bytes(payload), float(at)) for seq, tunnel_id, thing, payload, at in rows),
        key=lambda item: item.seq,
    )


@implementer(INotificationQueue)
class PostgresNotificationQueue:
    """
    @param runner: runs its queries (C{run(fn, *args)} -> Deferred).
    @param claim_seconds: how long a claim lasts unless renewed (the cluster's node timeout).
    """

    def __init__(self, runner: Any, node_id: str, claim_seconds: float) -> None:
        self.runner = runner
        self.node_id = node_id
        self.claim_seconds = claim_seconds

    def put(self, tunnel_id: str, thing_name: str, payload: bytes, now: float) -> Deferred:
        def put(c: Any) -> QueuedNotification:
            (seq,), = _execute(
                c,
                "INSERT INTO cluster_notifications (tunnel_id, seq, thing_name, payload, queued_at, claimed_by, "
                "claimed_until) VALUES (%s, nextval('cluster_notifications_seq'), %s, %s, %s, %s, "
                "clock_timestamp() + make_interval(secs => %s)) ON CONFLICT (tunnel_id) DO UPDATE SET "
                "seq = EXCLUDED.seq, thing_name = EXCLUDED.thing_name, payload = EXCLUDED.payload, "
                "queued_at = EXCLUDED.queued_at, claimed_by = EXCLUDED.claimed_by, "
                "claimed_until = EXCLUDED.claimed_until RETURNING seq",
                (tunnel_id, thing_name, payload, now, self.node_id, self.claim_seconds),
            )
            return QueuedNotification(int(seq), tunnel_id, thing_name, payload, now)
        return self.runner.run(put)  # type: ignore[no-any-return]

    def remove(self, tunnel_id: str, seq: Optional[int] = None) -> Deferred:
        def remove(c: Any) -> bool:
            if seq is None:
                rows = _execute(c, "DELETE FROM cluster_notifications WHERE tunnel_id = %s RETURNING seq", (tunnel_id,))
            else:
                rows = _execute(c, "DELETE FROM cluster_notifications WHERE tunnel_id = %s AND seq = %s RETURNING seq",
                                (tunnel_id, seq))
            return bool(rows)
        return self.runner.run(remove)  # type: ignore[no-any-return]

    def pending(self) -> Deferred:
        """This node's rows (from before a restart), their claims renewed."""
        return self.runner.run(lambda c: _items(_execute(  # type: ignore[no-any-return]
            c,
            "UPDATE cluster_notifications SET claimed_until = clock_timestamp() + make_interval(secs => %s) "
            f"WHERE claimed_by = %s RETURNING {_COLUMNS}",
            (self.claim_seconds, self.node_id),
        )))

    def renew(self) -> Deferred:
        """Keep this node's claims (each heartbeat)."""
        return self.runner.run(lambda c: _execute(  # type: ignore[no-any-return]
            c,
            "UPDATE cluster_notifications SET claimed_until = clock_timestamp() + make_interval(secs => %s) "
            "WHERE claimed_by = %s",
            (self.claim_seconds, self.node_id),
        ))

    def claim_orphans(self) -> Deferred:
        """Take over the rows whose claim ran out (their node died); fires with them, to publish."""
        def claim(c: Any) -> List[QueuedNotification]:
            with c.transaction():
                return _items(_execute(
                    c,
                    "UPDATE cluster_notifications SET claimed_by = %s, claimed_until = clock_timestamp() + "
                    "make_interval(secs => %s) WHERE tunnel_id IN (SELECT tunnel_id FROM cluster_notifications "
                    "WHERE claimed_until < clock_timestamp() FOR UPDATE SKIP LOCKED) "
                    f"RETURNING {_COLUMNS}",
                    (self.node_id, self.claim_seconds),
                ))
        return self.runner.run(claim)  # type: ignore[no-any-return]

    def close(self) -> None:
        pass  # the runner belongs to the cluster
