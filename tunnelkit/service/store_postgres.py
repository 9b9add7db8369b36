# -*- test-case-name: tests.e2e.test_store_postgres -*-
"""
L{IControlStore} on PostgreSQL, for several service nodes sharing one database
(C{--store postgresql://user:password@host/dbname}).

The driver is psycopg 3 (the PostgreSQL project's maintained adapter, with libpq bundled in its
binary wheel), synchronous, on the store's L{IDatabaseRunner}: in the service a L{ThreadedRunner}
with one connection per thread, so no query blocks the reactor.  The queries are
L{tunnelkit.service.store_sql}'s, shared with the SQLite store; connections run in autocommit mode
and each store call is one explicit transaction at READ COMMITTED.  What several nodes need of it:

  - single-use tokens: the spend is C{UPDATE ... WHERE used_at IS NULL}, so of two nodes racing for
    one token exactly one changes the row (the other waits for the row lock, then sees it used);
  - the per-account quota of OpenTunnel: a transaction-scoped advisory lock per account;
  - expiry: each due tunnel is closed by one node only (C{UPDATE ... WHERE status = 'OPEN'}).

Connection states are soft state (reset at start): their commits use C{synchronous_commit=off}.

The MQTT notification queue (L{tunnelkit.service.notify}) and the console's users
(L{tunnelkit.service.console.users}) live in this database too (L{PostgresStore.notification_queue},
L{PostgresStore.console_users}), so every node sees them.

Schema migrations are versioned in the table C{tunnelkit_schema_migrations} (version, description,
applied_at) and applied at start, in one transaction under an advisory lock, so nodes starting at
once apply each step once; C{tunnelkit admin migrate --store ...} applies them explicitly.

A DSN is never logged with its password: L{redact_dsn}.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from zope.interface import implementer

from tunnelkit.service.cluster import schema as cluster_schema
from tunnelkit.service.dbrunner import IDatabaseRunner, SynchronousRunner, ThreadedRunner
from tunnelkit.service.interfaces import ITunnelStore
from tunnelkit.service.metrics import ITunnelCounts
from tunnelkit.service.store import IControlStore, StoreError
from tunnelkit.service.store_sql import SQLStore

try:
    import psycopg
except ImportError:  # the postgresql extra is not installed
    psycopg = None  # type: ignore[assignment]

#: Advisory lock key of the migrations (any constant: "tunnelkit" in ASCII).
_MIGRATION_LOCK = 0x74756E6E656C6B
#: Seconds to wait for the server when connecting (unless the DSN says connect_timeout).
CONNECT_TIMEOUT = 10

#: (version, description, SQL): what brings a database from version N - 1 to N.
MIGRATIONS: List[Tuple[int, str, str]] = [
    (
        1,
        "the tables: accounts, access_keys, tunnels, tags, tokens",
        """
CREATE TABLE accounts (
    account_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE access_keys (
    access_key_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    secret_access_key TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
CREATE TABLE tunnels (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tunnel_id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    status TEXT NOT NULL,
    description TEXT,
    thing_name TEXT,
    services TEXT,
    max_lifetime_minutes INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    last_updated_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    closed_at DOUBLE PRECISION,
    source_status TEXT NOT NULL,
    source_updated_at DOUBLE PRECISION NOT NULL,
    destination_status TEXT NOT NULL,
    destination_updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX tunnels_by_account ON tunnels (account_id, seq);
CREATE INDEX tunnels_by_thing ON tunnels (account_id, thing_name, seq);
CREATE INDEX tunnels_by_status ON tunnels (status, expires_at);
CREATE TABLE tags (
    tunnel_id TEXT NOT NULL REFERENCES tunnels(tunnel_id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (tunnel_id, key)
);
CREATE TABLE tokens (
    token_hash TEXT PRIMARY KEY,
    tunnel_id TEXT NOT NULL REFERENCES tunnels(tunnel_id) ON DELETE CASCADE,
    side TEXT NOT NULL,
    generation INTEGER NOT NULL,
    client_token_hash TEXT,
    used_at DOUBLE PRECISION,
    revoked_at DOUBLE PRECISION
);
CREATE INDEX tokens_by_tunnel ON tokens (tunnel_id, side);
CREATE INDEX tokens_by_client_token_hash ON tokens (client_token_hash) WHERE client_token_hash IS NOT NULL;
""",
    ),
    (
        2,
        "the MQTT notification queue: notifications, counter (tunnelkit.service.notify)",
        """
CREATE TABLE notifications (
    tunnel_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    thing_name TEXT NOT NULL,
    payload BYTEA NOT NULL,
    queued_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE counter (id INTEGER PRIMARY KEY CHECK (id = 0), seq BIGINT);
INSERT INTO counter (id, seq) VALUES (0, 0);
""",
    ),
    (
        3,
        "the console's users and remembered SSH host keys: console_users, console_host_keys",
        """
CREATE TABLE console_users (
    account_id TEXT NOT NULL,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    password_changed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (account_id, name)
);
CREATE TABLE console_host_keys (
    account_id TEXT NOT NULL,
    thing_name TEXT NOT NULL,
    key_type TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    first_seen_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (account_id, thing_name)
);
""",
    ),
    # Several nodes (issue 13): the cluster's directory, and the notification queue whose rows the
    # nodes claim (tunnelkit.service.cluster.notifications; a single node keeps using notifications).
    (4, cluster_schema.DESCRIPTION, cluster_schema.SQL),
    (5, cluster_schema.NOTIFICATIONS_DESCRIPTION, cluster_schema.NOTIFICATIONS_SQL),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_URI_PASSWORD = re.compile(r"(://[^:/@?#]*):[^@/?#]*@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """C{dsn} with its password (URI user info, C{password=} keyword or query parameter) as C{***}."""
    if "://" in dsn:
        return _QUERY_PASSWORD.sub(r"\1***", _URI_PASSWORD.sub(r"\1:***@", dsn))
    return _KEYWORD_PASSWORD.sub(r"\1***", dsn)


def _password_of(dsn: str) -> Optional[str]:
    try:
        value = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except Exception:
        return None
    return str(value) if value else None


class PostgresConnection(psycopg.Connection if psycopg is not None else object):  # type: ignore[misc]
    """A psycopg connection (autocommit) speaking L{tunnelkit.service.store_sql.SQLConnection}."""

    _translated: Dict[str, str] = {}

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        if isinstance(query, str) and params is not None:
            query = self._translate(query)
        return super().execute(query, params, **kwargs)

    @classmethod
    def _translate(cls, query: str) -> str:
        done = cls._translated.get(query)
        if done is None:
            done = cls._translated[query] = query.replace("%", "%%").replace("?", "%s")
        return done

    def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with self.cursor() as cursor:
                cursor.executemany(self._translate(query), rows)

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[None]:  # type: ignore[override]
        if self.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            yield  # nested
            return
        super().execute("BEGIN")
        try:
            if not durable:
                super().execute("SET LOCAL synchronous_commit = off")
            yield
        except BaseException:
            if not self.closed:
                super().execute("ROLLBACK")
            raise
        super().execute("COMMIT")

    def lock_account(self, account_id: str) -> None:
        self.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (account_id,))


def connect(dsn: str) -> PostgresConnection:
    """
    A connection to C{dsn} (autocommit).

    @raise StoreError: naming the (redacted) DSN and what to fix, if the driver is missing, the DSN is
        malformed or the database cannot be reached.
    """
    shown = redact_dsn(dsn)
    if psycopg is None:
        raise StoreError(
            f"--store {shown}: the PostgreSQL driver is not installed: pip install 'tunnelkit[postgresql]' "
            "(psycopg 3)"
        )
    options: Dict[str, Any] = {"autocommit": True}
    try:
        if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(dsn):
            options["connect_timeout"] = CONNECT_TIMEOUT
    except psycopg.ProgrammingError as e:
        raise StoreError(
            f"--store {shown}: not a valid PostgreSQL connection string ({_clean(e, dsn)}): give "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    try:
        return PostgresConnection.connect(dsn, **options)  # type: ignore[no-any-return]
    except psycopg.Error as e:
        raise StoreError(
            f"--store {shown}: cannot connect to PostgreSQL: {_clean(e, dsn)} (check the host, port, "
            "database name, user and password in --store, and that the server runs and accepts this client)"
        ) from None


def _clean(error: BaseException, dsn: str) -> str:
    """The driver's message in one line, without the DSN's password."""
    text = " ".join(str(error).split())
    password = _password_of(dsn)
    if password:
        text = text.replace(password, "***")
    return redact_dsn(text)


def migrate(db: PostgresConnection, shown: str) -> List[Tuple[int, str]]:
    """
    Apply the L{MIGRATIONS} the database lacks, in one transaction under an advisory lock; return
    the (version, description) of each step applied.

    @raise StoreError: if the database is of a newer version than this code knows.
    """
    applied: List[Tuple[int, str]] = []
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        db.execute(
            "CREATE TABLE IF NOT EXISTS tunnelkit_schema_migrations (version INTEGER PRIMARY KEY, "
            "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
        (version,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM tunnelkit_schema_migrations").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"--store {shown}: the database has schema version {version}, made by a newer tunnelkit; "
                f"this one knows versions up to {SCHEMA_VERSION}: run the newer tunnelkit, or give another "
                "database"
            )
        for number, description, sql in MIGRATIONS:
            if number <= version:
                continue
            for statement in sql.split(";"):
                if statement.strip():
                    psycopg.Connection.execute(db, statement)
            db.execute(
                "INSERT INTO tunnelkit_schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (number, description, time.time()),
            )
            applied.append((number, description))
    return applied


@implementer(IControlStore, ITunnelStore, ITunnelCounts)
class PostgresStore(SQLStore):
    """
    The PostgreSQL store of C{dsn}: connects and applies the migrations at once (in the calling
    thread), then runs its queries on C{runner} (default: a L{SynchronousRunner} on that first
    connection; L{open_postgres} gives the service a L{ThreadedRunner}).

    @ivar applied: the migrations applied when it was opened, as (version, description).
    @ivar shown: the DSN without its password, for messages.
    """

    def __init__(self, dsn: str, runner: Optional[IDatabaseRunner] = None) -> None:
        self.dsn = dsn
        self.shown = redact_dsn(dsn)
        first = connect(dsn)
        try:
            self.applied = migrate(first, self.shown)
        except psycopg.Error as e:
            first.close()
            raise StoreError(f"--store {self.shown}: cannot prepare the database: {_clean(e, dsn)}") from None
        except BaseException:
            first.close()
            raise
        if runner is None:
            runner = SynchronousRunner(self.connect, first)
        else:
            first.close()
        super().__init__(runner)

    def connect(self) -> PostgresConnection:
        """A new connection to this store's database (autocommit); L{StoreError} if it fails."""
        return connect(self.dsn)

    def notification_queue(self) -> Any:
        """The MQTT notification queue in this database (on this store's runner), shared by every node."""
        from tunnelkit.service.notify import SQLNotificationQueue

        return SQLNotificationQueue(self._runner, self.shown, owns_runner=False)

    def console_users(self) -> Any:
        """The console's users and host keys in this database (on this store's runner), shared by every node."""
        from tunnelkit.service.console.users import ConsoleDatabase

        return ConsoleDatabase(self._runner, self.shown, owns_runner=False)


def open_postgres(dsn: str, reactor: Any = None, threads: int = 4) -> PostgresStore:
    """The PostgreSQL store of C{dsn}: with a C{reactor} on a L{ThreadedRunner} of C{threads} connections."""
    if reactor is None:
        return PostgresStore(dsn)
    return PostgresStore(dsn, runner=ThreadedRunner(reactor, lambda: connect(dsn), threads=threads, name="postgres"))
