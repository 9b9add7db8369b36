# -*- test-case-name: tests.test_store -*-
"""
L{IControlStore} in SQL, shared by the SQLite (L{tunnelkit.service.store_sqlite}) and PostgreSQL
(L{tunnelkit.service.store_postgres}) stores: the queries, written once in the SQL both speak.

Each public method returns a L{Deferred}: it hands one function of a connection (a C{_name} method,
one transaction) to the store's L{IDatabaseRunner}.  A dialect gives the connection: C{execute},
C{executemany} and C{transaction(durable=True)} (L{SQLConnection}); queries use C{?} placeholders.

Single-use tokens (L{SQLStore.claim_peer}) are spent by a conditional C{UPDATE ... WHERE used_at IS
NULL}: of two claims racing for one token, in one process or on two service nodes, exactly one
changes the row; the other reads the token again and is refused (or, with the client token the
winner bound, let in as its reconnection).  The data plane's C{admit} check runs on the reactor
thread between the check and the spend, so a refused peer keeps its token.

The sides' connection states are committed in groups (L{SQLStore.set_connection_state}): while one
group's transaction runs, the states set meanwhile wait and then go together in the next, in the
order they were set.  Under a burst of handshakes that is one transaction (and one trip to the
store's thread) for many states instead of one each; alone, a state is written at once as before.
"""

from __future__ import annotations

import json
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import Interface

from tunnelkit.service import tokens
from tunnelkit.service.dbrunner import IDatabaseRunner
from tunnelkit.service.interfaces import DESTINATION, SOURCE, PeerGrant, TokenRejected
from tunnelkit.service.store import (
    CLOSED,
    CONNECTED,
    DISCONNECTED,
    OPEN,
    AccessKey,
    Account,
    AccountExists,
    ConnectionState,
    NewTunnel,
    NoSuchAccount,
    NoSuchKey,
    Tunnel,
)


class SQLConnection(Interface):
    """What the shared queries need of a connection (a thin layer over sqlite3's and psycopg's)."""

    def execute(sql: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement with C{?} placeholders; a cursor (C{fetchone}, C{fetchall}, iteration, C{rowcount})."""

    def executemany(sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement per row."""

    def transaction(durable: bool = True) -> ContextManager[None]:
        """A write transaction (nested: a no-op); not C{durable}: may commit without waiting for the disk."""

    def lock_account(account_id: str) -> None:
        """In a transaction: serialize C{account_id}'s quota checks until it ends (across nodes)."""


_TUNNEL_COLUMNS = (
    "tunnel_id, account_id, status, description, thing_name, services, max_lifetime_minutes, "
    "created_at, last_updated_at, expires_at, closed_at, source_status, source_updated_at, "
    "destination_status, destination_updated_at, seq"
)

T = TypeVar("T")

#: How many times a claim reads a token again after losing the race to spend it.
_CLAIM_ATTEMPTS = 3


def _tunnel_from_row(row: Sequence[Any], tags: Iterable[Tuple[str, str]] = ()) -> Tunnel:
    services = row[5]
    return Tunnel(
        tunnel_id=row[0],
        account_id=row[1],
        status=row[2],
        description=row[3],
        thing_name=row[4],
        services=tuple(json.loads(services)) if services is not None else None,
        max_lifetime_minutes=row[6],
        created_at=row[7],
        last_updated_at=row[8],
        expires_at=row[9],
        closed_at=row[10],
        source=ConnectionState(row[11], row[12]),
        destination=ConnectionState(row[13], row[14]),
        tags=tuple(tags),
    )


class SQLStore:
    """The queries of L{IControlStore}; a subclass gives the runner (and its connections) and the schema."""

    def __init__(self, runner: IDatabaseRunner) -> None:
        self._runner = runner
        self._closed = False
        #: Connection states waiting for the group being written (L{set_connection_state}).
        self._states_waiting: List[Tuple[Tuple[str, str, str, float], "Deferred[None]"]] = []
        self._states_writing = False

    def _run(self, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        return self._runner.run(fn, *args)

    def close(self) -> None:
        self._closed = True
        self._runner.close()

    @property
    def _db(self) -> Any:
        """The connection of a store on a L{SynchronousRunner} (tests look at it)."""
        connection = getattr(self._runner, "_connection", None)
        if connection is None:
            raise AttributeError("only a store on a SynchronousRunner has one connection")
        return connection

    # --- accounts and keys ---

    def create_account(self, name: str, account_id: str, now: float) -> "Deferred[Account]":
        return self._run(self._create_account, name, account_id, now)

    @staticmethod
    def _create_account(db: Any, name: str, account_id: str, now: float) -> Account:
        with db.transaction():
            taken = db.execute(
                "SELECT name, account_id FROM accounts WHERE name = ? OR account_id = ?", (name, account_id)
            ).fetchone()
            if taken is not None:
                raise AccountExists(f"an account named {taken[0]!r} with id {taken[1]} exists already")
            db.execute(
                "INSERT INTO accounts (account_id, name, created_at) VALUES (?, ?, ?)", (account_id, name, now)
            )
        return Account(account_id, name, now)

    def get_account(self, name_or_id: str) -> "Deferred[Account]":
        return self._run(self._get_account, name_or_id)

    @staticmethod
    def _get_account(db: Any, name_or_id: str) -> Account:
        row = db.execute(
            "SELECT account_id, name, created_at FROM accounts WHERE name = ? OR account_id = ? "
            "ORDER BY name = ? DESC LIMIT 1",
            (name_or_id, name_or_id, name_or_id),
        ).fetchone()
        if row is None:
            raise NoSuchAccount(f"no account is named {name_or_id!r} or has that id")
        return Account(*row)

    def list_accounts(self) -> "Deferred[List[Account]]":
        return self._run(self._list_accounts)

    @staticmethod
    def _list_accounts(db: Any) -> List[Account]:
        rows = db.execute("SELECT account_id, name, created_at FROM accounts ORDER BY created_at, name")
        return [Account(*row) for row in rows]

    def add_access_key(self, key: AccessKey) -> "Deferred[None]":
        return self._run(self._add_access_key, key)

    @staticmethod
    def _add_access_key(db: Any, key: AccessKey) -> None:
        with db.transaction():
            if db.execute("SELECT 1 FROM accounts WHERE account_id = ?", (key.account_id,)).fetchone() is None:
                raise NoSuchAccount(f"no account has id {key.account_id}")
            db.execute(
                "INSERT INTO access_keys (access_key_id, account_id, secret_access_key, created_at, revoked_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (key.access_key_id, key.account_id, key.secret_access_key, key.created_at, key.revoked_at),
            )

    def revoke_access_key(self, access_key_id: str, now: float) -> "Deferred[AccessKey]":
        return self._run(self._revoke_access_key, access_key_id, now)

    @classmethod
    def _revoke_access_key(cls, db: Any, access_key_id: str, now: float) -> AccessKey:
        with db.transaction():
            key = cls._get_access_key(db, access_key_id)
            if key is None:
                raise NoSuchKey(f"no access key has id {access_key_id!r}")
            if key.revoked_at is None:
                db.execute("UPDATE access_keys SET revoked_at = ? WHERE access_key_id = ?", (now, access_key_id))
                key = AccessKey(key.access_key_id, key.account_id, key.secret_access_key, key.created_at, now)
        return key

    def get_access_key(self, access_key_id: str) -> "Deferred[Optional[AccessKey]]":
        return self._run(self._get_access_key, access_key_id)

    @staticmethod
    def _get_access_key(db: Any, access_key_id: str) -> Optional[AccessKey]:
        row = db.execute(
            "SELECT access_key_id, account_id, secret_access_key, created_at, revoked_at "
            "FROM access_keys WHERE access_key_id = ?",
            (access_key_id,),
        ).fetchone()
        return AccessKey(*row) if row else None

    def list_access_keys(self) -> "Deferred[List[AccessKey]]":
        return self._run(self._list_access_keys)

    @staticmethod
    def _list_access_keys(db: Any) -> List[AccessKey]:
        rows = db.execute(
            "SELECT access_key_id, account_id, secret_access_key, created_at, revoked_at "
            "FROM access_keys ORDER BY created_at, access_key_id"
        )
        return [AccessKey(*row) for row in rows]

    # --- tunnels ---

    def count_open_tunnels(self, account_id: str) -> "Deferred[int]":
        return self._run(self._count_open_tunnels, account_id)

    @staticmethod
    def _count_open_tunnels(db: Any, account_id: str) -> int:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM tunnels WHERE account_id = ? AND status = ?", (account_id, OPEN)
        ).fetchone()
        return int(count)

    def count_tunnels_by_status(self) -> "Deferred[Dict[str, int]]":
        """C{{"OPEN": n, "CLOSED": m}} over every account (the data plane's tunnels gauge)."""
        return self._run(self._count_tunnels_by_status)

    @staticmethod
    def _count_tunnels_by_status(db: Any) -> Dict[str, int]:
        counts = {OPEN: 0, CLOSED: 0}
        for status, count in db.execute("SELECT status, COUNT(*) FROM tunnels GROUP BY status"):
            counts[status] = int(count)
        return counts

    def create_tunnel(self, new: NewTunnel, max_open: Optional[int]) -> "Deferred[bool]":
        return self._run(self._create_tunnel, new, max_open)

    @classmethod
    def _create_tunnel(cls, db: Any, new: NewTunnel, max_open: Optional[int]) -> bool:
        with db.transaction():
            if max_open is not None:
                db.lock_account(new.account_id)
                if cls._count_open_tunnels(db, new.account_id) >= max_open:
                    return False
            now = new.created_at
            db.execute(
                "INSERT INTO tunnels (tunnel_id, account_id, status, description, thing_name, services, "
                "max_lifetime_minutes, created_at, last_updated_at, expires_at, closed_at, source_status, "
                "source_updated_at, destination_status, destination_updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                (
                    new.tunnel_id,
                    new.account_id,
                    OPEN,
                    new.description,
                    new.thing_name,
                    json.dumps(list(new.services)) if new.services is not None else None,
                    new.max_lifetime_minutes,
                    now,
                    now,
                    now + new.max_lifetime_minutes * 60.0,
                    DISCONNECTED,
                    now,
                    DISCONNECTED,
                    now,
                ),
            )
            db.executemany(
                "INSERT INTO tags (tunnel_id, key, value) VALUES (?, ?, ?)",
                [(new.tunnel_id, k, v) for k, v in new.tags],
            )
            db.executemany(
                "INSERT INTO tokens (token_hash, tunnel_id, side, generation) VALUES (?, ?, ?, 0)",
                [
                    (new.source_token_hash, new.tunnel_id, SOURCE),
                    (new.destination_token_hash, new.tunnel_id, DESTINATION),
                ],
            )
        return True

    @staticmethod
    def _tags(db: Any, tunnel_id: str) -> List[Tuple[str, str]]:
        return [
            (k, v) for k, v in db.execute("SELECT key, value FROM tags WHERE tunnel_id = ? ORDER BY key", (tunnel_id,))
        ]

    def get_tunnel(self, account_id: str, tunnel_id: str) -> "Deferred[Optional[Tunnel]]":
        return self._run(self._get_tunnel, account_id, tunnel_id)

    @classmethod
    def _get_tunnel(cls, db: Any, account_id: str, tunnel_id: str) -> Optional[Tunnel]:
        row = db.execute(
            f"SELECT {_TUNNEL_COLUMNS} FROM tunnels WHERE tunnel_id = ? AND account_id = ?", (tunnel_id, account_id)
        ).fetchone()
        if row is None:
            return None
        return _tunnel_from_row(row, cls._tags(db, tunnel_id))

    def list_tunnels(
        self, account_id: str, thing_name: Optional[str], limit: int, after: Optional[int]
    ) -> "Deferred[Tuple[List[Tunnel], Optional[int]]]":
        return self._run(self._list_tunnels, account_id, thing_name, limit, after)

    @staticmethod
    def _list_tunnels(
        db: Any, account_id: str, thing_name: Optional[str], limit: int, after: Optional[int]
    ) -> Tuple[List[Tunnel], Optional[int]]:
        query = f"SELECT {_TUNNEL_COLUMNS} FROM tunnels WHERE account_id = ?"
        args: List[Any] = [account_id]
        if thing_name is not None:
            query += " AND thing_name = ?"
            args.append(thing_name)
        if after is not None:
            query += " AND seq < ?"
            args.append(after)
        query += " ORDER BY seq DESC LIMIT ?"
        args.append(limit + 1)
        rows = db.execute(query, args).fetchall()
        cursor = int(rows[limit - 1][15]) if len(rows) > limit else None
        return [_tunnel_from_row(row) for row in rows[:limit]], cursor

    def close_tunnel(self, account_id: str, tunnel_id: str, now: float) -> "Deferred[Optional[bool]]":
        return self._run(self._close_tunnel, account_id, tunnel_id, now)

    @classmethod
    def _close_tunnel(cls, db: Any, account_id: str, tunnel_id: str, now: float) -> Optional[bool]:
        with db.transaction():
            row = db.execute(
                "SELECT status FROM tunnels WHERE tunnel_id = ? AND account_id = ?", (tunnel_id, account_id)
            ).fetchone()
            if row is None:
                return None
            if row[0] != OPEN:
                return False
            return cls._close(db, tunnel_id, now)

    @staticmethod
    def _close(db: Any, tunnel_id: str, now: float) -> bool:
        """Mark an OPEN tunnel CLOSED; False if it was not OPEN (closed meanwhile by another node)."""
        cursor = db.execute(
            "UPDATE tunnels SET status = ?, closed_at = ?, last_updated_at = ?, "
            "source_status = ?, source_updated_at = CASE WHEN source_status = ? THEN ? ELSE source_updated_at END, "
            "destination_status = ?, "
            "destination_updated_at = CASE WHEN destination_status = ? THEN ? ELSE destination_updated_at END "
            "WHERE tunnel_id = ? AND status = ?",
            (CLOSED, now, now, DISCONNECTED, CONNECTED, now, DISCONNECTED, CONNECTED, now, tunnel_id, OPEN),
        )
        return bool(cursor.rowcount > 0)

    def delete_tunnel(self, account_id: str, tunnel_id: str) -> "Deferred[bool]":
        return self._run(self._delete_tunnel, account_id, tunnel_id)

    @staticmethod
    def _delete_tunnel(db: Any, account_id: str, tunnel_id: str) -> bool:
        with db.transaction():
            cursor = db.execute("DELETE FROM tunnels WHERE tunnel_id = ? AND account_id = ?", (tunnel_id, account_id))
            return bool(cursor.rowcount > 0)

    def rotate_tokens(
        self,
        account_id: str,
        tunnel_id: str,
        new_hashes: Sequence[Tuple[str, str]],
        destination: Optional[Tuple[Optional[str], Tuple[str, ...]]],
        now: float,
    ) -> "Deferred[Optional[Tunnel]]":
        return self._run(self._rotate_tokens, account_id, tunnel_id, new_hashes, destination, now)

    @classmethod
    def _rotate_tokens(
        cls,
        db: Any,
        account_id: str,
        tunnel_id: str,
        new_hashes: Sequence[Tuple[str, str]],
        destination: Optional[Tuple[Optional[str], Tuple[str, ...]]],
        now: float,
    ) -> Optional[Tunnel]:
        with db.transaction():
            # Locks the tunnel's row first (PostgreSQL), so two rotations queue instead of clashing.
            cursor = db.execute(
                "UPDATE tunnels SET last_updated_at = ? WHERE tunnel_id = ? AND account_id = ? AND status = ?",
                (now, tunnel_id, account_id, OPEN),
            )
            if cursor.rowcount == 0:
                return None
            for side, new_hash in new_hashes:
                (generation,) = db.execute(
                    "SELECT COALESCE(MAX(generation), -1) FROM tokens WHERE tunnel_id = ? AND side = ?",
                    (tunnel_id, side),
                ).fetchone()
                db.execute(
                    "UPDATE tokens SET revoked_at = ? WHERE tunnel_id = ? AND side = ? AND revoked_at IS NULL",
                    (now, tunnel_id, side),
                )
                db.execute(
                    "INSERT INTO tokens (token_hash, tunnel_id, side, generation) VALUES (?, ?, ?, ?)",
                    (new_hash, tunnel_id, side, int(generation) + 1),
                )
            if destination is not None:
                thing_name, services = destination
                db.execute(
                    "UPDATE tunnels SET thing_name = ?, services = ? WHERE tunnel_id = ?",
                    (thing_name, json.dumps(list(services)), tunnel_id),
                )
            return cls._get_tunnel(db, account_id, tunnel_id)

    def tag_tunnel(self, account_id: str, tunnel_id: str, tags: Sequence[Tuple[str, str]], now: float) -> "Deferred[bool]":
        return self._run(self._tag_tunnel, account_id, tunnel_id, tags, now)

    @classmethod
    def _tag_tunnel(cls, db: Any, account_id: str, tunnel_id: str, tags: Sequence[Tuple[str, str]], now: float) -> bool:
        with db.transaction():
            if not cls._touch(db, account_id, tunnel_id, now):
                return False
            db.executemany(
                "INSERT INTO tags (tunnel_id, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (tunnel_id, key) DO UPDATE SET value = excluded.value",
                [(tunnel_id, k, v) for k, v in tags],
            )
        return True

    def untag_tunnel(self, account_id: str, tunnel_id: str, keys: Sequence[str], now: float) -> "Deferred[bool]":
        return self._run(self._untag_tunnel, account_id, tunnel_id, keys, now)

    @classmethod
    def _untag_tunnel(cls, db: Any, account_id: str, tunnel_id: str, keys: Sequence[str], now: float) -> bool:
        with db.transaction():
            if not cls._touch(db, account_id, tunnel_id, now):
                return False
            db.executemany("DELETE FROM tags WHERE tunnel_id = ? AND key = ?", [(tunnel_id, k) for k in keys])
        return True

    @staticmethod
    def _touch(db: Any, account_id: str, tunnel_id: str, now: float) -> bool:
        cursor = db.execute(
            "UPDATE tunnels SET last_updated_at = ? WHERE tunnel_id = ? AND account_id = ?",
            (now, tunnel_id, account_id),
        )
        return bool(cursor.rowcount > 0)

    # --- the data plane's part (ITunnelStore) ---

    def claim_peer(
        self,
        access_token: str,
        mode: str,
        client_token: Optional[str],
        now: float,
        admit: Optional[Callable[[PeerGrant], None]] = None,
    ) -> "Deferred[PeerGrant]":
        """See L{ITunnelStore.claim_peer}; the rules are L{tokens.check_claim}'s."""
        digest = tokens.token_hash(access_token) if tokens.is_well_formed(access_token) else None
        client_hash = tokens.client_token_hash(client_token) if client_token is not None else None

        async def claim() -> PeerGrant:
            for _ in range(_CLAIM_ATTEMPTS):
                row, taken = await self._run(self._claim_read, digest, client_hash)
                state = None
                if row is not None:
                    state = tokens.TokenState(
                        side=row[0],
                        revoked=row[1] is not None,
                        used=row[2] is not None,
                        bound_client_token_hash=row[3],
                        tunnel_status=row[7],
                        expires_at=row[8],
                    )
                decision = tokens.check_claim(state, mode, client_token, now, client_token_taken=taken)
                assert row is not None
                grant = PeerGrant(
                    tunnel_id=row[5],
                    account_id=row[6],
                    side=row[0],
                    services=tuple(json.loads(row[9])) if row[9] is not None else (),
                    expires_at=row[8],
                    token_generation=int(row[4]),
                )
                if admit is not None:
                    admit(grant)  # may refuse: the token stays unused
                if not decision.first_use:
                    return grant
                if await self._run(self._claim_spend, digest, now, decision.bind):
                    return grant
                # Another claim spent it first (another node, or a connection in flight): read again.
            raise TokenRejected(503, "claim-contended", "The token is being claimed by another connection; retry")

        return Deferred.fromCoroutine(claim())

    @staticmethod
    def _claim_read(db: Any, digest: Optional[str], client_hash: Optional[str]) -> Tuple[Any, bool]:
        if digest is None:
            return None, False
        row = db.execute(
            "SELECT k.side, k.revoked_at, k.used_at, k.client_token_hash, k.generation, "
            "t.tunnel_id, t.account_id, t.status, t.expires_at, t.services "
            "FROM tokens k JOIN tunnels t ON t.tunnel_id = k.tunnel_id WHERE k.token_hash = ?",
            (digest,),
        ).fetchone()
        taken = False
        if row is not None and client_hash is not None and row[2] is None:
            taken = (
                db.execute(
                    "SELECT 1 FROM tokens k JOIN tunnels t ON t.tunnel_id = k.tunnel_id "
                    "WHERE k.client_token_hash = ? AND t.account_id = ? AND t.status = ? "
                    "AND t.tunnel_id != ? LIMIT 1",
                    (client_hash, row[6], OPEN, row[5]),
                ).fetchone()
                is not None
            )
        return row, taken

    @staticmethod
    def _claim_spend(db: Any, digest: str, now: float, bind: Optional[str]) -> bool:
        """Spend an unused token: False if it is used already (the claim lost a race)."""
        with db.transaction():
            cursor = db.execute(
                "UPDATE tokens SET used_at = ?, client_token_hash = ? WHERE token_hash = ? AND used_at IS NULL",
                (now, bind, digest),
            )
            return bool(cursor.rowcount > 0)

    def set_connection_state(self, tunnel_id: str, side: str, connected: bool, now: float) -> "Deferred[None]":
        """See L{ITunnelStore.set_connection_state}."""
        if side not in (SOURCE, DESTINATION):
            raise ValueError(f"side must be {SOURCE!r} or {DESTINATION!r}, not {side!r}")
        if self._closed:
            return succeed(None)  # the service is stopping; the next start resets every state
        done: "Deferred[None]" = Deferred()
        self._states_waiting.append(((tunnel_id, side, CONNECTED if connected else DISCONNECTED, now), done))
        if not self._states_writing:
            self._write_states()
        return done

    def _write_states(self) -> None:
        """Commit every waiting state in one transaction; fire their Deferreds; then the next group."""
        group, self._states_waiting = self._states_waiting, []
        self._states_writing = True

        def written(result: Any) -> None:
            self._states_writing = False
            for _, done in group:
                if isinstance(result, Failure):
                    done.errback(result)
                else:
                    done.callback(None)
            if self._closed:  # stopping: the next start resets every state
                waiting, self._states_waiting = self._states_waiting, []
                for _, done in waiting:
                    done.callback(None)
            elif self._states_waiting:
                self._write_states()

        self._run(self._set_connection_states, [state for state, _ in group]).addBoth(written)

    @staticmethod
    def _set_connection_states(db: Any, states: Sequence[Tuple[str, str, str, float]]) -> None:
        with db.transaction(durable=False):
            for tunnel_id, side, status, now in states:
                # A CLOSED tunnel's side may become DISCONNECTED, never CONNECTED.
                only_open = "" if status == DISCONNECTED else " AND status = ?"
                db.execute(
                    f"UPDATE tunnels SET {side}_status = ?, {side}_updated_at = ?, last_updated_at = ? "
                    f"WHERE tunnel_id = ?{only_open}",
                    (status, now, now, tunnel_id) + (() if status == DISCONNECTED else (OPEN,)),
                )

    def reset_connection_states(self, now: float) -> "Deferred[int]":
        """Mark every side DISCONNECTED (no peer survives a restart); return how many changed."""
        return self._run(self._reset_connection_states, now)

    @staticmethod
    def _reset_connection_states(db: Any, now: float) -> int:
        with db.transaction():
            changed = 0
            for side in (SOURCE, DESTINATION):
                cursor = db.execute(
                    f"UPDATE tunnels SET {side}_status = ?, {side}_updated_at = ? WHERE {side}_status = ?",
                    (DISCONNECTED, now, CONNECTED),
                )
                changed += cursor.rowcount
        return changed

    # --- lifecycle ---

    def open_deadlines(self) -> "Deferred[List[Tuple[str, float]]]":
        return self._run(self._open_deadlines)

    @staticmethod
    def _open_deadlines(db: Any) -> List[Tuple[str, float]]:
        return [
            (tunnel_id, expires_at)
            for tunnel_id, expires_at in db.execute(
                "SELECT tunnel_id, expires_at FROM tunnels WHERE status = ? ORDER BY expires_at", (OPEN,)
            )
        ]

    def expire_due(self, now: float) -> "Deferred[List[str]]":
        return self._run(self._expire_due, now)

    @classmethod
    def _expire_due(cls, db: Any, now: float) -> List[str]:
        if db.execute(
            "SELECT 1 FROM tunnels WHERE status = ? AND expires_at <= ? LIMIT 1", (OPEN, now)
        ).fetchone() is None:
            return []
        with db.transaction():
            due = [
                (tunnel_id, expires_at)
                for tunnel_id, expires_at in db.execute(
                    "SELECT tunnel_id, expires_at FROM tunnels WHERE status = ? AND expires_at <= ?", (OPEN, now)
                ).fetchall()
            ]
            # Only the tunnels this call closed: another node expiring the same ones at once gets the rest.
            return [tunnel_id for tunnel_id, expires_at in due if cls._close(db, tunnel_id, expires_at)]

    def purge_closed(self, closed_before: float) -> "Deferred[int]":
        return self._run(self._purge_closed, closed_before)

    @staticmethod
    def _purge_closed(db: Any, closed_before: float) -> int:
        with db.transaction():
            cursor = db.execute("DELETE FROM tunnels WHERE status = ? AND closed_at < ?", (CLOSED, closed_before))
            return int(cursor.rowcount)
