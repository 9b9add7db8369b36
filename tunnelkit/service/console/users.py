# -*- test-case-name: tests.test_console_users -*-
"""
The console's own tables: console users (per account) and the SSH host keys remembered per thing.

They live in the service's SQLite database file beside the control plane's tables, in tables of their
own (C{console_users}, C{console_host_keys}) with their own schema version in C{console_schema}, so
the control-plane store (L{tunnelkit.service.store_sqlite}) is unchanged: L{ConsoleDatabase} opens its
own connection to the same file (SQLite serialises writers between connections; WAL mode is the
store's).  Migrations are numbered steps in L{MIGRATIONS}; opening the database applies the missing
ones in one transaction.

Passwords are hashed with Argon2id (argon2-cffi's L{PasswordHasher}, its default parameters): a slow,
salted, memory-hard hash, the current recommendation for stored passwords.  The plain password is
never stored nor logged.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from typing import Any, List, Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from tunnelkit.service.store import StoreError

DATABASE_NAME = "tunnelkit.sqlite3"  # the control-plane store's file (store_sqlite.DATABASE_NAME)

#: Numbered schema steps; step N brings the schema from version N-1 to N.
MIGRATIONS = (
    """
    CREATE TABLE console_users (
        account_id TEXT NOT NULL,
        name TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        password_changed_at REAL NOT NULL,
        PRIMARY KEY (account_id, name)
    );
    CREATE TABLE console_host_keys (
        account_id TEXT NOT NULL,
        thing_name TEXT NOT NULL,
        key_type TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        first_seen_at REAL NOT NULL,
        PRIMARY KEY (account_id, thing_name)
    );
    """,
)

USER_NAME_RE = re.compile(r"\A[A-Za-z0-9._@+-]{1,64}\Z")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024

_hasher = PasswordHasher()


class UserError(StoreError):
    """A console-user command cannot be done (the message says why)."""


class NoSuchUser(UserError):
    """No console user has this name in this account."""


class UserExists(UserError):
    """A console user with this name exists already in this account."""


@dataclass(frozen=True)
class ConsoleUser:
    """A person who signs in to the console; sees only C{account_id}'s tunnels."""

    account_id: str
    name: str
    created_at: float
    password_changed_at: float


@dataclass(frozen=True)
class HostKey:
    """The SSH host key first seen for a thing (trust on first use)."""

    thing_name: str
    key_type: str
    fingerprint: str  # SHA256:base64, as OpenSSH shows it
    first_seen_at: float


def check_user_name(name: str) -> str:
    """A console user name: 1-64 of A-Z a-z 0-9 . _ @ + -."""
    if not USER_NAME_RE.match(name):
        raise UserError(f"a console user name is 1-64 of A-Z a-z 0-9 . _ @ + -, not {name[:80]!r}")
    return name


def check_password(password: str) -> str:
    """A new password: 8 to 1024 characters."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    return password


def hash_password(password: str) -> str:
    """The Argon2id hash (with its salt and parameters) of C{password}."""
    return _hasher.hash(password)


def password_matches(password_hash: str, password: str) -> bool:
    """Whether C{password} is the one C{password_hash} was made from (slow on purpose: ~50 ms)."""
    try:
        return bool(_hasher.verify(password_hash, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


#: A hash of a random password, checked when the user does not exist so that the answer takes as long.
DUMMY_HASH = hash_password(os.urandom(16).hex())


class IConsoleUsers(Interface):
    """
    Console users and remembered host keys, per account.  Each method but C{close} returns a Deferred
    of what it documents (no database call on the reactor thread).
    """

    def create_user(account_id: str, name: str, password: str, now: float) -> "Deferred[ConsoleUser]":
        """@raise UserExists: if C{name} is taken in the account."""

    def list_users(account_id: Optional[str]) -> "Deferred[List[ConsoleUser]]":
        """The users of C{account_id} (every account's if None), by account then name."""

    def set_password(account_id: str, name: str, password: str, now: float) -> "Deferred[ConsoleUser]":
        """@raise NoSuchUser: if there is no such user."""

    def delete_user(account_id: str, name: str) -> "Deferred[None]":
        """@raise NoSuchUser: if there is no such user."""

    def check_password(account_id: str, name: str, password: str) -> "Deferred[Optional[ConsoleUser]]":
        """The user if the password is right, else None (an unknown user costs as much time)."""

    def password_hash(account_id: str, name: str) -> "Deferred[Optional[str]]":
        """The user's stored hash (for a check off the reactor thread), or None if no such user."""

    def still_valid(account_id: str, name: str, signed_in_at: float) -> "Deferred[bool]":
        """Whether a session begun at C{signed_in_at} may go on: the user exists, its password unchanged since."""

    def get_host_key(account_id: str, thing_name: str) -> "Deferred[Optional[HostKey]]":
        """The host key remembered for the thing, or None."""

    def remember_host_key(account_id: str, thing_name: str, key_type: str, fingerprint: str, now: float) -> "Deferred[None]":
        """Remember (or replace) the thing's host key."""

    def forget_host_key(account_id: str, thing_name: str) -> "Deferred[bool]":
        """Forget the thing's host key; False if none was remembered."""


def host_key_name(thing_name: Optional[str], tunnel_id: str) -> str:
    """
    Under what name a device's SSH host key is remembered: its thing's name, or for a tunnel without
    a thing C{tunnel/<tunnel id>} (a thing name never holds a C{/}, so the two cannot meet): that key
    is then remembered for that tunnel only.
    """
    return thing_name if thing_name else f"tunnel/{tunnel_id}"


@implementer(IConsoleUsers)
class ConsoleDatabase:
    """
    L{IConsoleUsers} in SQL, on a L{tunnelkit.service.dbrunner.IDatabaseRunner} whose connections speak
    L{tunnelkit.service.store_sql.SQLConnection}: the service's SQLite file (L{SQLiteConsoleDatabase})
    or the PostgreSQL database several nodes share (its tables are the store's migration 3).
    Argon2 hashing runs with the query, off the reactor thread.
    """

    def __init__(self, runner: Any, where: str, owns_runner: bool = True) -> None:
        self._runner = runner
        self.path = where
        self._owns_runner = owns_runner

    def close(self) -> None:
        if self._owns_runner:  # else the store's, closed with it
            self._runner.close()

    def _run(self, fn: Any, *args: Any) -> Any:
        return self._runner.run(fn, *args)

    # --- users ---

    def create_user(self, account_id: str, name: str, password: str, now: float) -> Any:
        check_user_name(name)
        check_password(password)
        return self._run(self._create_user, account_id, name, password, now)

    @staticmethod
    def _create_user(db: Any, account_id: str, name: str, password: str, now: float) -> ConsoleUser:
        digest = hash_password(password)
        with db.transaction():
            cursor = db.execute(
                "INSERT INTO console_users (account_id, name, password_hash, created_at, password_changed_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, name) DO NOTHING",
                (account_id, name, digest, now, now),
            )
            if cursor.rowcount == 0:
                raise UserExists(f"account {account_id} has a console user named {name!r} already")
        return ConsoleUser(account_id, name, now, now)

    def list_users(self, account_id: Optional[str] = None) -> Any:
        return self._run(self._list_users, account_id)

    @staticmethod
    def _list_users(db: Any, account_id: Optional[str]) -> List[ConsoleUser]:
        query = "SELECT account_id, name, created_at, password_changed_at FROM console_users"
        args: tuple = ()
        if account_id is not None:
            query += " WHERE account_id = ?"
            args = (account_id,)
        return [ConsoleUser(*row) for row in db.execute(query + " ORDER BY account_id, name", args).fetchall()]

    @staticmethod
    def _get(db: Any, account_id: str, name: str) -> Optional[tuple]:
        row = db.execute(
            "SELECT account_id, name, created_at, password_changed_at, password_hash FROM console_users "
            "WHERE account_id = ? AND name = ?",
            (account_id, name),
        ).fetchone()
        return tuple(row) if row is not None else None

    def set_password(self, account_id: str, name: str, password: str, now: float) -> Any:
        check_password(password)
        return self._run(self._set_password, account_id, name, password, now)

    @classmethod
    def _set_password(cls, db: Any, account_id: str, name: str, password: str, now: float) -> ConsoleUser:
        digest = hash_password(password)
        with db.transaction():
            cursor = db.execute(
                "UPDATE console_users SET password_hash = ?, password_changed_at = ? WHERE account_id = ? AND name = ?",
                (digest, now, account_id, name),
            )
            if cursor.rowcount == 0:
                raise NoSuchUser(f"account {account_id} has no console user named {name!r}")
            row = cls._get(db, account_id, name)
        assert row is not None
        return ConsoleUser(*row[:4])

    def delete_user(self, account_id: str, name: str) -> Any:
        return self._run(self._delete_user, account_id, name)

    @staticmethod
    def _delete_user(db: Any, account_id: str, name: str) -> None:
        with db.transaction():
            cursor = db.execute("DELETE FROM console_users WHERE account_id = ? AND name = ?", (account_id, name))
            if cursor.rowcount == 0:
                raise NoSuchUser(f"account {account_id} has no console user named {name!r}")

    def check_password(self, account_id: str, name: str, password: str) -> Any:
        return self._run(self._check_password, account_id, name, password)

    @classmethod
    def _check_password(cls, db: Any, account_id: str, name: str, password: str) -> Optional[ConsoleUser]:
        row = cls._get(db, account_id, name)
        if row is None:
            password_matches(DUMMY_HASH, password)
            return None
        if not password_matches(row[4], password):
            return None
        return ConsoleUser(*row[:4])

    def password_hash(self, account_id: str, name: str) -> Any:
        return self._run(self._password_hash, account_id, name)

    @classmethod
    def _password_hash(cls, db: Any, account_id: str, name: str) -> Optional[str]:
        row = cls._get(db, account_id, name)
        return row[4] if row is not None else None

    def still_valid(self, account_id: str, name: str, signed_in_at: float) -> Any:
        return self._run(self._still_valid, account_id, name, signed_in_at)

    @staticmethod
    def _still_valid(db: Any, account_id: str, name: str, signed_in_at: float) -> bool:
        row = db.execute(
            "SELECT password_changed_at FROM console_users WHERE account_id = ? AND name = ?", (account_id, name)
        ).fetchone()
        return row is not None and row[0] <= signed_in_at

    # --- host keys ---

    def get_host_key(self, account_id: str, thing_name: str) -> Any:
        return self._run(self._get_host_key, account_id, thing_name)

    @staticmethod
    def _get_host_key(db: Any, account_id: str, thing_name: str) -> Optional[HostKey]:
        row = db.execute(
            "SELECT thing_name, key_type, fingerprint, first_seen_at FROM console_host_keys "
            "WHERE account_id = ? AND thing_name = ?",
            (account_id, thing_name),
        ).fetchone()
        return HostKey(*row) if row else None

    def remember_host_key(self, account_id: str, thing_name: str, key_type: str, fingerprint: str, now: float) -> Any:
        return self._run(self._remember_host_key, account_id, thing_name, key_type, fingerprint, now)

    @staticmethod
    def _remember_host_key(db: Any, account_id: str, thing_name: str, key_type: str, fingerprint: str, now: float) -> None:
        with db.transaction():
            db.execute(
                "INSERT INTO console_host_keys (account_id, thing_name, key_type, fingerprint, first_seen_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, thing_name) DO UPDATE SET "
                "key_type = excluded.key_type, fingerprint = excluded.fingerprint, first_seen_at = excluded.first_seen_at",
                (account_id, thing_name, key_type, fingerprint, now),
            )

    def forget_host_key(self, account_id: str, thing_name: str) -> Any:
        return self._run(self._forget_host_key, account_id, thing_name)

    @staticmethod
    def _forget_host_key(db: Any, account_id: str, thing_name: str) -> bool:
        with db.transaction():
            cursor = db.execute(
                "DELETE FROM console_host_keys WHERE account_id = ? AND thing_name = ?", (account_id, thing_name)
            )
            return bool(cursor.rowcount > 0)


class SQLiteConsoleDatabase(ConsoleDatabase):
    """
    The console's tables in the service's SQLite file C{path} (own connection; SQLite serialises
    writers between connections): migrated when opened; on a synchronous runner, or on C{reactor}'s
    threads (one) when given.
    """

    def __init__(self, path: str, busy_timeout: float = 5.0, reactor: Any = None) -> None:
        from tunnelkit.service.dbrunner import SynchronousRunner, ThreadedRunner
        from tunnelkit.service.store_sqlite import SQLiteConnection

        def connect() -> Any:
            try:
                db = sqlite3.connect(
                    path, timeout=busy_timeout, isolation_level=None, factory=SQLiteConnection, check_same_thread=False
                )
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{path}: cannot open the console's tables: {e}") from None
            return db

        first = connect()
        try:
            _migrate(first, path)
        except sqlite3.DatabaseError as e:
            first.close()
            raise StoreError(f"{path}: cannot open the console's tables: {e}") from None
        except BaseException:
            first.close()
            raise
        if reactor is None:
            runner: Any = SynchronousRunner(connect, first)
        else:
            first.close()
            runner = ThreadedRunner(reactor, connect, threads=1, name="console")
        super().__init__(runner, path)

    @property
    def _db(self) -> Any:
        return self._runner._connection

    @property
    def schema_version(self) -> int:
        (version,) = self._db.execute("SELECT version FROM console_schema").fetchone()
        return int(version)


def _migrate(db: Any, path: str) -> None:
    with db.transaction():
        db.execute("CREATE TABLE IF NOT EXISTS console_schema (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM console_schema").fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{path}: the console's tables are at schema version {version}, newer than this "
                f"tunnelkit knows ({len(MIGRATIONS)}): upgrade tunnelkit"
            )
        for step in MIGRATIONS[version:]:
            for statement in step.split(";"):
                if statement.strip():
                    db.execute(statement)
        if row is None:
            db.execute("INSERT INTO console_schema (version) VALUES (?)", (len(MIGRATIONS),))
        else:
            db.execute("UPDATE console_schema SET version = ?", (len(MIGRATIONS),))


def open_console_database(state_dir: str, reactor: Any = None) -> ConsoleDatabase:
    """The console's tables in the SQLite database of the service whose state directory is C{state_dir}."""
    return SQLiteConsoleDatabase(os.path.join(state_dir, DATABASE_NAME), reactor=reactor)


def open_console_users(store: Any, state_dir: str, reactor: Any = None) -> ConsoleDatabase:
    """The console's tables beside C{store}: in its PostgreSQL database, or the SQLite file of C{state_dir}."""
    if hasattr(store, "console_users"):
        return store.console_users()  # type: ignore[no-any-return]
    path = getattr(store, "path", None) or os.path.join(state_dir, DATABASE_NAME)
    return SQLiteConsoleDatabase(path, reactor=reactor)
