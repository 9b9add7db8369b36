# -*- test-case-name: tests.test_store -*-
"""
L{IControlStore} on SQLite: one file C{tunnelkit.sqlite3} in the state directory.

Durability: WAL journal with C{synchronous=FULL}, so every committed transaction survives C{kill -9} and
power loss; except the sides' connection states (L{SQLiteStore.set_connection_state}), soft state
written twice per WebSocket and reset at every start: they commit with C{synchronous=NORMAL} (no fsync
of their own; they survive C{kill -9}, and the next FULL commit makes them durable).  The fsync was
half the service's CPU and time per tunnel handshake (benchmarks/bench_tunnel.py --parts handshake).  Several processes may open the file at once (the service and the C{tunnelkit admin}
command); writers wait up to C{busy_timeout} for each other.

Calls run on the store's L{IDatabaseRunner}: in the service a L{ThreadedRunner} of one thread (SQLite
allows a single writer, and the WAL fsync of each durable write is what must stay off the reactor),
in unit tests and the C{tunnelkit admin} commands a L{SynchronousRunner}.  The queries are
L{tunnelkit.service.store_sql}'s, shared with the PostgreSQL store.

The database file and its directory are created private to the user (the file holds the API secret
keys, needed to verify signatures, and token hashes).

Schema versions (C{PRAGMA user_version}); an older database is upgraded in place when it is opened,
in one transaction, keeping every tunnel and token:
  1. the first schema: C{tokens.client_token} held client tokens in clear;
  2. C{tokens.client_token_hash} holds L{tokens.client_token_hash} of them instead.
A database of a newer version than this code knows is refused (a message says so).
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Tuple

from zope.interface import implementer

from tunnelkit.service import tokens
from tunnelkit.service.dbrunner import IDatabaseRunner, SynchronousRunner, ThreadedRunner
from tunnelkit.service.interfaces import ITunnelStore
from tunnelkit.service.metrics import ITunnelCounts
from tunnelkit.service.store import IControlStore, StoreError
from tunnelkit.service.store_sql import SQLStore

DATABASE_NAME = "tunnelkit.sqlite3"
#: The path of a private database in memory, gone with its one connection (the shipped test harness's).
MEMORY = ":memory:"
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
#: What each version brought, for C{tunnelkit admin migrate}.
_DESCRIPTIONS = {2: "client tokens kept as hashes (tokens.client_token_hash)"}


class SQLiteConnection(sqlite3.Connection):
    """A sqlite3 connection with the transactions L{tunnelkit.service.store_sql.SQLConnection} names."""

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[None]:
        """
        C{BEGIN IMMEDIATE} ... C{COMMIT} (or C{ROLLBACK} on error); nests as a no-op.  Not C{durable}:
        committed with C{synchronous=NORMAL} (no fsync), then FULL again for every other transaction.
        """
        if self.in_transaction:
            yield
            return
        if not durable:
            self.execute("PRAGMA synchronous=NORMAL")
        try:
            self.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.execute("ROLLBACK")
                raise
            self.execute("COMMIT")
        finally:
            if not durable:
                self.execute("PRAGMA synchronous=FULL")

    def lock_account(self, account_id: str) -> None:
        """Nothing to do: C{BEGIN IMMEDIATE} serializes every writer already."""


def connect(path: str, busy_timeout: float = 5.0) -> SQLiteConnection:
    """A connection to the database file C{path} (WAL, C{synchronous=FULL}, foreign keys on)."""
    try:
        db = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, factory=SQLiteConnection, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: cannot open the tunnelkit database: {e}") from None
    return db  # type: ignore[return-value]


def migrate(db: SQLiteConnection, path: str) -> List[Tuple[int, str]]:
    """
    Create the tables, or upgrade an older database to L{SCHEMA_VERSION} (one transaction); returns
    the (version, description) of each step applied (empty when the database was up to date).
    """
    applied: List[Tuple[int, str]] = []
    try:
        with db.transaction():
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: the database has schema version {version}, made by a newer tunnelkit; "
                    f"this one knows versions up to {SCHEMA_VERSION}: run the newer tunnelkit, or give "
                    "another --store"
                )
            if version == 0:
                applied.append((SCHEMA_VERSION, f"created the tables (schema version {SCHEMA_VERSION})"))
            while 0 < version < SCHEMA_VERSION:
                _UPGRADES[version](db)
                version += 1
                applied.append((version, _DESCRIPTIONS[version]))
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: cannot open the tunnelkit database: {e}") from None
    return applied


@implementer(IControlStore, ITunnelStore, ITunnelCounts)
class SQLiteStore(SQLStore):
    """
    The SQLite store.  C{path} is the database file (created with its tables if absent, upgraded if
    older, at once in the calling thread), or L{MEMORY} for a private one in memory (on the
    L{SynchronousRunner} only); C{runner} runs the queries (default: a L{SynchronousRunner}; the
    service passes a L{ThreadedRunner}, see L{open_sqlite}).

    @ivar applied: the schema steps applied when it was opened, as (version, description).
    """

    def __init__(self, path: str, busy_timeout: float = 5.0, runner: Optional[IDatabaseRunner] = None) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        if path == MEMORY:
            if runner is not None:
                raise StoreError(
                    f"an in-memory SQLite database ({MEMORY}) lives in its one connection: it runs on the "
                    "default SynchronousRunner only; give a file path for a threaded store"
                )
            db = connect(path, busy_timeout)
            self.applied = migrate(db, path)
            super().__init__(SynchronousRunner(self.connect, db))
            return
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.path.exists(path):
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        first = connect(path, busy_timeout)
        try:
            self.applied = migrate(first, path)
        except BaseException:
            first.close()
            raise
        if runner is None:
            runner = SynchronousRunner(lambda: connect(path, busy_timeout), first)
        else:
            first.close()
        super().__init__(runner)

    def connect(self) -> SQLiteConnection:
        """Another connection to the same file (what a L{ThreadedRunner} makes per thread)."""
        if self.path == MEMORY:
            raise StoreError(f"an in-memory SQLite database ({MEMORY}) has one connection only")
        return connect(self.path, self._busy_timeout)


def open_sqlite(path: str, reactor: Any = None, busy_timeout: float = 5.0) -> SQLiteStore:
    """
    The SQLite store of C{path}: with a C{reactor} (the service) on a L{ThreadedRunner} of one
    thread, otherwise on a L{SynchronousRunner}.
    """
    if reactor is None:
        return SQLiteStore(path, busy_timeout)
    return SQLiteStore(
        path,
        busy_timeout,
        runner=ThreadedRunner(reactor, lambda: connect(path, busy_timeout), threads=1, name="sqlite"),
    )


def open_store(state_dir: str) -> SQLiteStore:
    """The store of the service whose state directory is C{state_dir} (on a L{SynchronousRunner})."""
    return SQLiteStore(os.path.join(state_dir, DATABASE_NAME))
