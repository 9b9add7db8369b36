# -*- test-case-name: tests.test_store -*-
"""
L{IControlStore} on SQLite: one file C{tunnelkit.sqlite3} in the state directory.

Durability: WAL journal with C{synchronous=FULL}, so every committed transaction survives C{kill -9} and
power loss; except the sides' connection states (L{SQLiteStore.set_connection_state}), soft state
written twice per WebSocket and reset at every start: they commit with C{synchronous=NORMAL} (no fsync
of their own; they survive C{kill -9}, and the next FULL commit makes them durable).  The fsync was
half the service's CPU and time per tunnel handshake (benchmarks/bench_tunnel.py --parts handshake).  Several processes may open the file at once (the service and the C{tunnelkit admin}
command); writers wait up to C{busy_timeout} for each other.

Calls block the calling thread.  The service makes them on the reactor thread on purpose: each is one
short indexed transaction (tens of microseconds, plus one WAL fsync per durable write), the data plane's
L{ITunnelStore.claim_peer} contract is synchronous, and SQLite allows a single writer anyway, so a
thread pool would add hand-offs without adding throughput.

The database file and its directory are created private to the user (the file holds the API secret
keys, needed to verify signatures, and token hashes).

Schema versions (C{PRAGMA user_version}); an older database is upgraded in place when it is opened,
in one transaction, keeping every tunnel and token:
  1. the first schema: C{tokens.client_token} held client tokens in clear;
  2. C{tokens.client_token_hash} holds L{tokens.client_token_hash} of them instead.
A database of a newer version than this code knows is refused (a message says so).
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from zope.interface import implementer

from tunnelkit.service import tokens
from tunnelkit.service.interfaces import DESTINATION, SOURCE, ITunnelStore, PeerGrant
from tunnelkit.service.metrics import ITunnelCounts
from tunnelkit.service.store import (
    CLOSED,
    CONNECTED,
    DISCONNECTED,
    OPEN,
    AccessKey,
    Account,
    AccountExists,
    ConnectionState,
    IControlStore,
    NewTunnel,
    NoSuchAccount,
    NoSuchKey,
    StoreError,
    Tunnel,
)

DATABASE_NAME = "tunnelkit.sqlite3"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS access_keys (
    access_key_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    secret_access_key TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS tunnels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tunnel_id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    status TEXT NOT NULL,
    description TEXT,
    thing_name TEXT,
    services TEXT,
    max_lifetime_minutes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_updated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    closed_at REAL,
    source_status TEXT NOT NULL,
    source_updated_at REAL NOT NULL,
    destination_status TEXT NOT NULL,
    destination_updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tunnels_by_account ON tunnels (account_id, seq);
CREATE INDEX IF NOT EXISTS tunnels_by_thing ON tunnels (account_id, thing_name, seq);
CREATE INDEX IF NOT EXISTS tunnels_by_status ON tunnels (status, expires_at);
CREATE TABLE IF NOT EXISTS tags (
    tunnel_id TEXT NOT NULL REFERENCES tunnels(tunnel_id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (tunnel_id, key)
);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    tunnel_id TEXT NOT NULL REFERENCES tunnels(tunnel_id) ON DELETE CASCADE,
    side TEXT NOT NULL,
    generation INTEGER NOT NULL,
    client_token_hash TEXT,
    used_at REAL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS tokens_by_tunnel ON tokens (tunnel_id, side);
CREATE INDEX IF NOT EXISTS tokens_by_client_token_hash ON tokens (client_token_hash)
    WHERE client_token_hash IS NOT NULL;
"""


def _upgrade_1_to_2(db: sqlite3.Connection) -> None:
    """Replace every client token kept in clear by its hash."""
    db.execute("DROP INDEX IF EXISTS tokens_by_client_token")
    db.execute("ALTER TABLE tokens RENAME COLUMN client_token TO client_token_hash")
    rows = db.execute("SELECT token_hash, client_token_hash FROM tokens WHERE client_token_hash IS NOT NULL").fetchall()
    db.executemany(
        "UPDATE tokens SET client_token_hash = ? WHERE token_hash = ?",
        [(tokens.client_token_hash(clear), token_hash) for token_hash, clear in rows],
    )


#: How to bring a database of version N to N + 1.
_UPGRADES = {1: _upgrade_1_to_2}

_TUNNEL_COLUMNS = (
    "tunnel_id, account_id, status, description, thing_name, services, max_lifetime_minutes, "
    "created_at, last_updated_at, expires_at, closed_at, source_status, source_updated_at, "
    "destination_status, destination_updated_at, seq"
)


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


@implementer(IControlStore, ITunnelStore, ITunnelCounts)
class SQLiteStore:
    """The SQLite store.  C{path} is the database file (created with its tables if absent)."""

    def __init__(self, path: str, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._closed = False
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.path.exists(path):
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        try:
            self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path}: cannot open the tunnelkit database: {e}") from None

    def _migrate(self) -> None:
        """Create the tables, or upgrade an older database to L{SCHEMA_VERSION} (one transaction)."""
        with self._write():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: the database has schema version {version}, made by a newer tunnelkit; "
                    f"this one knows versions up to {SCHEMA_VERSION}: run the newer tunnelkit, or give "
                    "another --state-dir"
                )
            while 0 < version < SCHEMA_VERSION:
                _UPGRADES[version](self._db)
                version += 1
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # --- transactions ---

    def _write(self) -> "_Transaction":
        return _Transaction(self._db)

    def close(self) -> None:
        self._closed = True
        self._db.close()

    # --- accounts and keys ---

    def create_account(self, name: str, account_id: str, now: float) -> Account:
        with self._write():
            taken = self._db.execute(
                "SELECT name, account_id FROM accounts WHERE name = ? OR account_id = ?", (name, account_id)
            ).fetchone()
            if taken is not None:
                raise AccountExists(
                    f"an account named {taken[0]!r} with id {taken[1]} exists already"
                )
            self._db.execute(
                "INSERT INTO accounts (account_id, name, created_at) VALUES (?, ?, ?)",
                (account_id, name, now),
            )
        return Account(account_id, name, now)

    def get_account(self, name_or_id: str) -> Account:
        row = self._db.execute(
            "SELECT account_id, name, created_at FROM accounts WHERE name = ? OR account_id = ? "
            "ORDER BY name = ? DESC LIMIT 1",
            (name_or_id, name_or_id, name_or_id),
        ).fetchone()
        if row is None:
            raise NoSuchAccount(f"no account is named {name_or_id!r} or has that id")
        return Account(*row)

    def list_accounts(self) -> List[Account]:
        rows = self._db.execute("SELECT account_id, name, created_at FROM accounts ORDER BY created_at, name")
        return [Account(*row) for row in rows]

    def add_access_key(self, key: AccessKey) -> None:
        with self._write():
            if self._db.execute("SELECT 1 FROM accounts WHERE account_id = ?", (key.account_id,)).fetchone() is None:
                raise NoSuchAccount(f"no account has id {key.account_id}")
            self._db.execute(
                "INSERT INTO access_keys (access_key_id, account_id, secret_access_key, created_at, revoked_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (key.access_key_id, key.account_id, key.secret_access_key, key.created_at, key.revoked_at),
            )

    def revoke_access_key(self, access_key_id: str, now: float) -> AccessKey:
        with self._write():
            key = self.get_access_key(access_key_id)
            if key is None:
                raise NoSuchKey(f"no access key has id {access_key_id!r}")
            if key.revoked_at is None:
                self._db.execute(
                    "UPDATE access_keys SET revoked_at = ? WHERE access_key_id = ?", (now, access_key_id)
                )
                key = AccessKey(key.access_key_id, key.account_id, key.secret_access_key, key.created_at, now)
        return key

    def get_access_key(self, access_key_id: str) -> Optional[AccessKey]:
        row = self._db.execute(
            "SELECT access_key_id, account_id, secret_access_key, created_at, revoked_at "
            "FROM access_keys WHERE access_key_id = ?",
            (access_key_id,),
        ).fetchone()
        return AccessKey(*row) if row else None

    def list_access_keys(self) -> List[AccessKey]:
        rows = self._db.execute(
            "SELECT access_key_id, account_id, secret_access_key, created_at, revoked_at "
            "FROM access_keys ORDER BY created_at, access_key_id"
        )
        return [AccessKey(*row) for row in rows]

    # --- tunnels ---

    def count_open_tunnels(self, account_id: str) -> int:
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM tunnels WHERE account_id = ? AND status = ?", (account_id, OPEN)
        ).fetchone()
        return count

    def count_tunnels_by_status(self) -> Dict[str, int]:
        """C{{"OPEN": n, "CLOSED": m}} over every account (the data plane's tunnels gauge)."""
        counts = {OPEN: 0, CLOSED: 0}
        for status, count in self._db.execute("SELECT status, COUNT(*) FROM tunnels GROUP BY status"):
            counts[status] = count
        return counts

    def create_tunnel(self, new: NewTunnel, max_open: Optional[int]) -> bool:
        with self._write():
            if max_open is not None and self.count_open_tunnels(new.account_id) >= max_open:
                return False
            now = new.created_at
            self._db.execute(
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
            self._db.executemany(
                "INSERT INTO tags (tunnel_id, key, value) VALUES (?, ?, ?)",
                [(new.tunnel_id, k, v) for k, v in new.tags],
            )
            self._db.executemany(
                "INSERT INTO tokens (token_hash, tunnel_id, side, generation) VALUES (?, ?, ?, 0)",
                [(new.source_token_hash, new.tunnel_id, SOURCE), (new.destination_token_hash, new.tunnel_id, DESTINATION)],
            )
        return True

    def _tags(self, tunnel_id: str) -> List[Tuple[str, str]]:
        return [
            (k, v)
            for k, v in self._db.execute("SELECT key, value FROM tags WHERE tunnel_id = ? ORDER BY key", (tunnel_id,))
        ]

    def get_tunnel(self, account_id: str, tunnel_id: str) -> Optional[Tunnel]:
        row = self._db.execute(
            f"SELECT {_TUNNEL_COLUMNS} FROM tunnels WHERE tunnel_id = ? AND account_id = ?", (tunnel_id, account_id)
        ).fetchone()
        if row is None:
            return None
        return _tunnel_from_row(row, self._tags(tunnel_id))

    def list_tunnels(
        self, account_id: str, thing_name: Optional[str], limit: int, after: Optional[int]
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
        rows = self._db.execute(query, args).fetchall()
        cursor = rows[limit - 1][15] if len(rows) > limit else None
        return [_tunnel_from_row(row) for row in rows[:limit]], cursor

    def close_tunnel(self, account_id: str, tunnel_id: str, now: float) -> Optional[bool]:
        with self._write():
            row = self._db.execute(
                "SELECT status FROM tunnels WHERE tunnel_id = ? AND account_id = ?", (tunnel_id, account_id)
            ).fetchone()
            if row is None:
                return None
            if row[0] != OPEN:
                return False
            self._close(tunnel_id, now)
        return True

    def _close(self, tunnel_id: str, now: float) -> None:
        self._db.execute(
            "UPDATE tunnels SET status = ?, closed_at = ?, last_updated_at = ?, "
            "source_status = ?, source_updated_at = CASE WHEN source_status = ? THEN ? ELSE source_updated_at END, "
            "destination_status = ?, "
            "destination_updated_at = CASE WHEN destination_status = ? THEN ? ELSE destination_updated_at END "
            "WHERE tunnel_id = ?",
            (CLOSED, now, now, DISCONNECTED, CONNECTED, now, DISCONNECTED, CONNECTED, now, tunnel_id),
        )

    def delete_tunnel(self, account_id: str, tunnel_id: str) -> bool:
        with self._write():
            cursor = self._db.execute(
                "DELETE FROM tunnels WHERE tunnel_id = ? AND account_id = ?", (tunnel_id, account_id)
            )
        return cursor.rowcount > 0

    def rotate_tokens(
        self,
        account_id: str,
        tunnel_id: str,
        new_hashes: Sequence[Tuple[str, str]],
        destination: Optional[Tuple[Optional[str], Tuple[str, ...]]],
        now: float,
    ) -> Optional[Tunnel]:
        with self._write():
            row = self._db.execute(
                "SELECT status FROM tunnels WHERE tunnel_id = ? AND account_id = ?", (tunnel_id, account_id)
            ).fetchone()
            if row is None or row[0] != OPEN:
                return None
            for side, new_hash in new_hashes:
                (generation,) = self._db.execute(
                    "SELECT COALESCE(MAX(generation), -1) FROM tokens WHERE tunnel_id = ? AND side = ?",
                    (tunnel_id, side),
                ).fetchone()
                self._db.execute(
                    "UPDATE tokens SET revoked_at = ? WHERE tunnel_id = ? AND side = ? AND revoked_at IS NULL",
                    (now, tunnel_id, side),
                )
                self._db.execute(
                    "INSERT INTO tokens (token_hash, tunnel_id, side, generation) VALUES (?, ?, ?, ?)",
                    (new_hash, tunnel_id, side, generation + 1),
                )
            if destination is not None:
                thing_name, services = destination
                self._db.execute(
                    "UPDATE tunnels SET thing_name = ?, services = ? WHERE tunnel_id = ?",
                    (thing_name, json.dumps(list(services)), tunnel_id),
                )
            self._db.execute("UPDATE tunnels SET last_updated_at = ? WHERE tunnel_id = ?", (now, tunnel_id))
        return self.get_tunnel(account_id, tunnel_id)

    def tag_tunnel(self, account_id: str, tunnel_id: str, tags: Sequence[Tuple[str, str]], now: float) -> bool:
        with self._write():
            if not self._touch(account_id, tunnel_id, now):
                return False
            self._db.executemany(
                "INSERT INTO tags (tunnel_id, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (tunnel_id, key) DO UPDATE SET value = excluded.value",
                [(tunnel_id, k, v) for k, v in tags],
            )
        return True

    def untag_tunnel(self, account_id: str, tunnel_id: str, keys: Sequence[str], now: float) -> bool:
        with self._write():
            if not self._touch(account_id, tunnel_id, now):
                return False
            self._db.executemany(
                "DELETE FROM tags WHERE tunnel_id = ? AND key = ?", [(tunnel_id, k) for k in keys]
            )
        return True

    def _touch(self, account_id: str, tunnel_id: str, now: float) -> bool:
        cursor = self._db.execute(
            "UPDATE tunnels SET last_updated_at = ? WHERE tunnel_id = ? AND account_id = ?",
            (now, tunnel_id, account_id),
        )
        return cursor.rowcount > 0

    # --- the data plane's part (ITunnelStore) ---

    def claim_peer(
        self,
        access_token: str,
        mode: str,
        client_token: Optional[str],
        now: float,
        admit: Optional[Callable[[PeerGrant], None]] = None,
    ) -> PeerGrant:
        """See L{ITunnelStore.claim_peer}; the rules are L{tokens.check_claim}'s."""
        digest = tokens.token_hash(access_token) if tokens.is_well_formed(access_token) else None
        with self._write():
            row = None
            if digest is not None:
                row = self._db.execute(
                    "SELECT k.side, k.revoked_at, k.used_at, k.client_token_hash, k.generation, "
                    "t.tunnel_id, t.account_id, t.status, t.expires_at, t.services "
                    "FROM tokens k JOIN tunnels t ON t.tunnel_id = k.tunnel_id WHERE k.token_hash = ?",
                    (digest,),
                ).fetchone()
            state = None
            taken = False
            if row is not None:
                state = tokens.TokenState(
                    side=row[0],
                    revoked=row[1] is not None,
                    used=row[2] is not None,
                    bound_client_token_hash=row[3],
                    tunnel_status=row[7],
                    expires_at=row[8],
                )
                if client_token is not None and row[2] is None:
                    taken = (
                        self._db.execute(
                            "SELECT 1 FROM tokens k JOIN tunnels t ON t.tunnel_id = k.tunnel_id "
                            "WHERE k.client_token_hash = ? AND t.account_id = ? AND t.status = ? "
                            "AND t.tunnel_id != ? LIMIT 1",
                            (tokens.client_token_hash(client_token), row[6], OPEN, row[5]),
                        ).fetchone()
                        is not None
                    )
            claim = tokens.check_claim(state, mode, client_token, now, client_token_taken=taken)
            assert row is not None
            services = json.loads(row[9]) if row[9] is not None else []
            grant = PeerGrant(
                tunnel_id=row[5],
                account_id=row[6],
                side=row[0],
                services=tuple(services),
                expires_at=row[8],
                token_generation=row[4],
            )
            if admit is not None:
                admit(grant)  # may refuse: the transaction then rolls back, the token stays unused
            if claim.first_use:
                self._db.execute(
                    "UPDATE tokens SET used_at = ?, client_token_hash = ? WHERE token_hash = ?",
                    (now, claim.bind, digest),
                )
        return grant

    def set_connection_state(self, tunnel_id: str, side: str, connected: bool, now: float) -> None:
        """See L{ITunnelStore.set_connection_state}."""
        if side not in (SOURCE, DESTINATION):
            raise ValueError(f"side must be {SOURCE!r} or {DESTINATION!r}, not {side!r}")
        status = CONNECTED if connected else DISCONNECTED
        if self._closed:
            return  # the service is stopping; the next start resets every state (reset_connection_states)
        with _Transaction(self._db, durable=False):
            self._db.execute(
                f"UPDATE tunnels SET {side}_status = ?, {side}_updated_at = ?, last_updated_at = ? "
                "WHERE tunnel_id = ? AND (status = ? OR ? = ?)",
                (status, now, now, tunnel_id, OPEN, status, DISCONNECTED),
            )

    def reset_connection_states(self, now: float) -> int:
        """Mark every side DISCONNECTED (no peer survives a restart); return how many changed."""
        with self._write():
            changed = 0
            for side in (SOURCE, DESTINATION):
                cursor = self._db.execute(
                    f"UPDATE tunnels SET {side}_status = ?, {side}_updated_at = ? WHERE {side}_status = ?",
                    (DISCONNECTED, now, CONNECTED),
                )
                changed += cursor.rowcount
        return changed

    # --- lifecycle ---

    def open_deadlines(self) -> List[Tuple[str, float]]:
        return [
            (tunnel_id, expires_at)
            for tunnel_id, expires_at in self._db.execute(
                "SELECT tunnel_id, expires_at FROM tunnels WHERE status = ? ORDER BY expires_at", (OPEN,)
            )
        ]

    def expire_due(self, now: float) -> List[str]:
        if self._db.execute(
            "SELECT 1 FROM tunnels WHERE status = ? AND expires_at <= ? LIMIT 1", (OPEN, now)
        ).fetchone() is None:
            return []
        with self._write():
            due = [
                (tunnel_id, expires_at)
                for tunnel_id, expires_at in self._db.execute(
                    "SELECT tunnel_id, expires_at FROM tunnels WHERE status = ? AND expires_at <= ?", (OPEN, now)
                )
            ]
            for tunnel_id, expires_at in due:
                self._close(tunnel_id, expires_at)
        return [tunnel_id for tunnel_id, _ in due]

    def purge_closed(self, closed_before: float) -> int:
        with self._write():
            cursor = self._db.execute(
                "DELETE FROM tunnels WHERE status = ? AND closed_at < ?", (CLOSED, closed_before)
            )
        return cursor.rowcount


class _Transaction:
    """
    C{BEGIN IMMEDIATE} ... C{COMMIT} (or C{ROLLBACK} on error); nests as a no-op.  Not C{durable}:
    committed with C{synchronous=NORMAL} (no fsync), then FULL again for every other transaction.
    """

    def __init__(self, db: sqlite3.Connection, durable: bool = True) -> None:
        self._db = db
        self._durable = durable
        self._outer = False

    def __enter__(self) -> None:
        if not self._db.in_transaction:
            if not self._durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            self._outer = True

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if not self._outer:
            return
        try:
            self._db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            if not self._durable:
                self._db.execute("PRAGMA synchronous=FULL")


def open_store(state_dir: str) -> SQLiteStore:
    """The store of the service whose state directory is C{state_dir}."""
    return SQLiteStore(os.path.join(state_dir, DATABASE_NAME))
