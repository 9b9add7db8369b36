# -*- test-case-name: tests.e2e.test_cluster_postgres -*-
"""
The cluster directory (L{PostgresDirectory}) and event carrier (L{PostgresCarrier}) on the service's
PostgreSQL database (tables: L{tunnelkit.service.cluster.schema}).

Every directory call is one short transaction on a database runner's thread (never on the reactor);
times are the database's C{clock_timestamp()}.  Each decision that two nodes could race for is made
under a row lock or by one statement: placing a tunnel locks its placement row
(C{INSERT ... ON CONFLICT DO NOTHING}, then C{SELECT ... FOR UPDATE}) and applies
L{tunnelkit.service.cluster.directory.placement_winner}; reaping is C{DELETE ... RETURNING} (a row
deleted by one node is not returned to another); a lease is one C{INSERT ... ON CONFLICT DO UPDATE
... WHERE} (its holder, or anyone once it ran out).

Events travel by C{NOTIFY tunnelkit_events} (sent by C{pg_notify} through the runner, so it is
delivered when its transaction commits) and are received on a dedicated connection that does only
C{LISTEN}: its socket is watched by the reactor (C{addReader}) and read with libpq's non-blocking
C{PQconsumeInput}/C{PQnotifies}, so waiting for events never holds a thread or blocks the reactor.
When that connection is lost it is made again with backoff (0.5 s doubling to 10 s); events sent
meanwhile are missed, so on each reconnection the carrier's C{on_reconnect} callbacks run (the
cluster then closes its WebSockets of tunnels the store says are closed).
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from tunnelkit.errors import ConfigError
from tunnelkit.service.cluster.directory import IDLE_PLACEMENT, INodeDirectory, NodeInfo, PeerRow, placement_winner
from tunnelkit.service.cluster.events import IEventCarrier, TunnelEvent, decode_event, encode_event

__all__ = ["PostgresDirectory", "PostgresCarrier", "backends_for_store", "CHANNEL"]

log = Logger()

CHANNEL = "tunnelkit_events"
_LIVE = "n.heartbeat_at > clock_timestamp() - make_interval(secs => %s)"


def _execute(connection: Any, sql: str, params: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description is not None else []


def _in_transaction(connection: Any, fn: Callable[[Any], Any]) -> Any:
    with connection.transaction():
        return fn(connection)


@implementer(INodeDirectory)
class PostgresDirectory:
    """L{INodeDirectory} in PostgreSQL, its calls on C{runner} (C{run(fn, *args)} -> Deferred)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def _tx(self, fn: Callable[[Any], Any]) -> Deferred:
        return self.runner.run(_in_transaction, fn)  # type: ignore[no-any-return]

    def heartbeat(self, node: NodeInfo) -> Deferred:
        return self._tx(lambda c: _execute(
            c,
            "INSERT INTO cluster_nodes (node_id, address, heartbeat_at, started_at) "
            "VALUES (%s, %s, clock_timestamp(), clock_timestamp()) ON CONFLICT (node_id) DO UPDATE "
            "SET address = EXCLUDED.address, heartbeat_at = EXCLUDED.heartbeat_at",
            (node.node_id, node.address),
        ))

    def leave(self, node_id: str) -> Deferred:
        def leave(c: Any) -> None:
            for table in ("cluster_placements", "cluster_leases"):
                _execute(c, f"DELETE FROM {table} WHERE node_id = %s", (node_id,))
            _execute(c, "UPDATE cluster_nodes SET heartbeat_at = '-infinity' WHERE node_id = %s", (node_id,))
        return self._tx(leave)

    def nodes(self, timeout: float) -> Deferred:
        def nodes(c: Any) -> List[Tuple[NodeInfo, bool]]:
            rows = _execute(c, f"SELECT node_id, address, {_LIVE} FROM cluster_nodes n ORDER BY node_id", (timeout,))
            return [(NodeInfo(node_id, address), bool(live)) for node_id, address, live in rows]
        return self._tx(nodes)

    def place(self, routing_key: str, node_id: str, timeout: float) -> Deferred:
        def place(c: Any) -> NodeInfo:
            placed = _execute(
                c,
                "INSERT INTO cluster_placements (routing_key, node_id, placed_at) VALUES (%s, %s, clock_timestamp()) "
                "ON CONFLICT (routing_key) DO NOTHING RETURNING node_id",
                (routing_key, node_id),
            )
            if not placed:
                (holder, age, live, has_peers), = _execute(
                    c,
                    f"SELECT p.node_id, EXTRACT(EPOCH FROM clock_timestamp() - p.placed_at), "
                    f"COALESCE({_LIVE}, false), EXISTS (SELECT 1 FROM cluster_peers q WHERE "
                    "q.routing_key = p.routing_key AND q.node_id = p.node_id) "
                    "FROM cluster_placements p LEFT JOIN cluster_nodes n ON n.node_id = p.node_id "
                    "WHERE p.routing_key = %s FOR UPDATE OF p",
                    (timeout, routing_key),
                )
                winner = placement_winner(node_id, holder, bool(live), bool(has_peers), float(age))
                if winner == node_id:
                    _execute(
                        c,
                        "UPDATE cluster_placements SET node_id = %s, placed_at = clock_timestamp() WHERE routing_key = %s",
                        (node_id, routing_key),
                    )
            else:
                winner = node_id
            found = _execute(c, "SELECT address FROM cluster_nodes WHERE node_id = %s", (winner,))
            return NodeInfo(winner, found[0][0] if found else "")
        return self._tx(place)

    def peer_attached(self, row: PeerRow) -> Deferred:
        return self._tx(lambda c: _execute(
            c,
            "INSERT INTO cluster_peers (routing_key, side, tunnel_id, node_id, channel_id, since) "
            "VALUES (%s, %s, %s, %s, %s, clock_timestamp()) ON CONFLICT (routing_key, side) DO UPDATE SET "
            "tunnel_id = EXCLUDED.tunnel_id, node_id = EXCLUDED.node_id, channel_id = EXCLUDED.channel_id, "
            "since = EXCLUDED.since",
            (row.routing_key, row.side, row.tunnel_id, row.node_id, row.channel_id),
        ))

    def peer_detached(self, routing_key: str, side: str, node_id: str, channel_id: str) -> Deferred:
        return self._tx(lambda c: _execute(
            c,
            "DELETE FROM cluster_peers WHERE routing_key = %s AND side = %s AND node_id = %s AND channel_id = %s",
            (routing_key, side, node_id, channel_id),
        ))

    _RETURNING = " RETURNING routing_key, side, tunnel_id, node_id, channel_id"

    def take_own(self, node_id: str) -> Deferred:
        def take(c: Any) -> List[PeerRow]:
            rows = _execute(c, "DELETE FROM cluster_peers WHERE node_id = %s" + self._RETURNING, (node_id,))
            return [PeerRow(*row) for row in rows]
        return self._tx(take)

    def reap(self, timeout: float) -> Deferred:
        def reap(c: Any) -> List[PeerRow]:
            dead = f"SELECT n.node_id FROM cluster_nodes n WHERE NOT ({_LIVE})"
            rows = _execute(c, f"DELETE FROM cluster_peers WHERE node_id IN ({dead})" + self._RETURNING, (timeout,))
            _execute(c, f"DELETE FROM cluster_placements WHERE node_id IN ({dead})", (timeout,))
            # Placements of tunnels no node has held for a long time (closed, or idle) are forgotten.
            _execute(
                c,
                "DELETE FROM cluster_placements p WHERE p.placed_at < clock_timestamp() - make_interval(secs => %s) "
                "AND NOT EXISTS (SELECT 1 FROM cluster_peers q WHERE q.routing_key = p.routing_key)",
                (IDLE_PLACEMENT,),
            )
            _execute(
                c,
                f"DELETE FROM cluster_nodes m WHERE m.node_id IN ({dead}) AND NOT EXISTS "
                "(SELECT 1 FROM cluster_peers q WHERE q.node_id = m.node_id)",
                (timeout,),
            )
            return [PeerRow(*row) for row in rows]
        return self._tx(reap)

    def acquire_lease(self, name: str, node_id: str, ttl: float) -> Deferred:
        d = self._tx(lambda c: _execute(
            c,
            "INSERT INTO cluster_leases (name, node_id, expires_at) VALUES (%s, %s, clock_timestamp() + "
            "make_interval(secs => %s)) ON CONFLICT (name) DO UPDATE SET node_id = EXCLUDED.node_id, "
            "expires_at = EXCLUDED.expires_at WHERE cluster_leases.node_id = EXCLUDED.node_id OR "
            "cluster_leases.expires_at <= clock_timestamp() RETURNING node_id",
            (name, node_id, ttl),
        ))
        d.addCallback(bool)
        return d

    def release_lease(self, name: str, node_id: str) -> Deferred:
        return self._tx(lambda c: _execute(c, "DELETE FROM cluster_leases WHERE name = %s AND node_id = %s", (name, node_id)))


@implementer(IEventCarrier, IReadDescriptor)
class PostgresCarrier:
    """
    L{IEventCarrier} over PostgreSQL C{LISTEN}/C{NOTIFY}.

    @param connect: makes a new (autocommit) connection; called in a thread.
    @param runner: sends the notifications (C{run(fn, *args)} -> Deferred).
    @ivar connected: whether the listening connection is up.
    """

    def __init__(self, connect: Callable[[], Any], runner: Any, reactor: Any, channel: str = CHANNEL) -> None:
        self._connect = connect
        self.runner = runner
        self.reactor = reactor
        self.channel = channel
        self._receivers: List[Callable[[TunnelEvent], None]] = []
        self.on_reconnect: List[Callable[[], Any]] = []
        self._connection: Any = None
        self._fileno = -1
        self._retry: Any = None
        self._delay = 0.5
        self._running = False
        self.connected = False
        self.connections = 0

    # --- IEventCarrier ---

    def publish(self, event: TunnelEvent) -> Deferred:
        payload = encode_event(event)
        # One channel per schema: clusters in other schemas of the database hear nothing of this one.
        return self.runner.run(lambda c: _execute(  # type: ignore[no-any-return]
            c, "SELECT pg_notify(%s || '.' || current_schema(), %s)", (self.channel, payload)
        ))

    def subscribe(self, receiver: Callable[[TunnelEvent], None]) -> None:
        self._receivers.append(receiver)

    # --- the listening connection ---

    def start(self) -> Deferred:
        """Connect and listen (fires once listening, or failed: it keeps retrying)."""
        self._running = True
        return self._open()

    def stop(self) -> None:
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._close()

    def _open(self) -> Deferred:
        def listen() -> Any:
            connection = self._connect()
            (schema,), = _execute(connection, "SELECT current_schema()")
            name = f"{self.channel}.{schema}".replace('"', '""')
            connection.execute(f'LISTEN "{name}"')
            return connection

        d = deferToThread(listen)
        d.addCallbacks(self._listening, self._failed)
        return d

    def _listening(self, connection: Any) -> None:
        if not self._running:
            connection.close()
            return
        self._connection = connection
        # The reactor watches a duplicate of libpq's socket: libpq closes its own when it finds the
        # connection broken, and the reactor must still be able to forget the one it watches.
        self._fileno = os.dup(connection.pgconn.socket)
        self._delay = 0.5
        self.connected = True
        self.connections += 1
        self.reactor.addReader(self)
        if self.connections > 1:
            log.info("Listening for cluster events again (PostgreSQL LISTEN {channel})", channel=self.channel)
            for callback in list(self.on_reconnect):
                try:
                    callback()
                except Exception:
                    log.failure("A cluster reconnection callback failed")
        self._drain()

    def _failed(self, failure: Any) -> None:
        log.warn("Cannot listen for cluster events: {error}; retrying in {delay} s",
                 error=failure.getErrorMessage(), delay=self._delay)
        self._schedule()

    def _schedule(self) -> None:
        if not self._running or (self._retry is not None and self._retry.active()):
            return
        delay, self._delay = self._delay, min(self._delay * 2, 10.0)
        self._retry = self.reactor.callLater(delay, self._open)

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        self.connected = False
        if connection is not None:
            self.reactor.removeReader(self)
            os.close(self._fileno)
            self._fileno = -1
            try:
                connection.close()
            except Exception:
                pass

    # --- IReadDescriptor ---

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "PostgresCarrier"

    def doRead(self) -> None:
        try:
            self._connection.pgconn.consume_input()
        except Exception as e:
            log.warn("Lost the cluster events connection to PostgreSQL: {error}", error=str(e).strip())
            self._close()
            self._schedule()
            return None
        self._drain()
        return None

    def connectionLost(self, reason: Any) -> None:
        self._close()
        self._schedule()

    def _drain(self) -> None:
        connection = self._connection
        while connection is not None:
            notify = connection.pgconn.notifies()
            if notify is None:
                break
            try:
                event = decode_event(notify.extra.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                log.warn("Ignored a cluster event this node does not understand: {error}", error=str(e))
                continue
            for receiver in list(self._receivers):
                try:
                    receiver(event)
                except Exception:
                    log.failure("A cluster event receiver failed")


def backends_for_store(store: Any, reactor: Any) -> Tuple[Any, Any]:
    """
    The directory and carrier on C{store}'s PostgreSQL database: their own small thread pool of
    connections made as the store makes its own (the heartbeat must not wait behind API calls).

    @raise ConfigError: C{store} is not a PostgreSQL store.
    """
    connect = getattr(store, "connect", None)
    if connect is None or not getattr(store, "dsn", "").startswith(("postgresql://", "postgres://", "host=", "dbname=")):
        raise ConfigError(
            "--cluster-listen needs the nodes to share one PostgreSQL store (--store postgresql://...); "
            "this store is a local file"
        )
    from tunnelkit.service.dbrunner import ThreadedRunner

    runner = ThreadedRunner(reactor, connect, threads=2, name="cluster")
    return PostgresDirectory(runner), PostgresCarrier(connect, runner, reactor)
