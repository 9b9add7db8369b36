# -*- test-case-name: tests.test_stores -*-
"""
The C{--store} option: which database the service (and C{tunnelkit admin}) keeps its state in.

  - C{sqlite:PATH}: a SQLite file (the default: C{tunnelkit.sqlite3} in the state directory), for one
    service process;
  - C{postgresql://USER:PASSWORD@HOST:PORT/DATABASE} (or C{postgres://}, or any libpq URI; libpq's
    C{PGPASSWORD}/C{PGPASSFILE} keep the password off the command line): a PostgreSQL database that
    several service nodes share.

L{open_configured_store} opens either, applying its schema migrations; with a reactor the store runs
its queries on a thread pool, without one (start-up, the admin commands, unit tests) synchronously.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from tunnelkit.service.store import StoreError

SQLITE_PREFIX = "sqlite:"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def check_store(text: str) -> str:
    """Coerce C{--store}: C{sqlite:PATH} or a PostgreSQL URI (ValueError naming the forms otherwise)."""
    if text.startswith(POSTGRES_PREFIXES) or (text.startswith(SQLITE_PREFIX) and len(text) > len(SQLITE_PREFIX)):
        return text
    raise ValueError(
        "give sqlite:PATH (a SQLite file) or postgresql://USER:PASSWORD@HOST:PORT/DATABASE (a PostgreSQL "
        "database several service nodes share)"
    )


def is_postgres(spec: Optional[str]) -> bool:
    """Whether C{spec} names a PostgreSQL database."""
    return bool(spec) and spec.startswith(POSTGRES_PREFIXES)  # type: ignore[union-attr]


def sqlite_path(spec: Optional[str], state_dir: str) -> str:
    """The SQLite file of C{spec} (None: the default one in C{state_dir})."""
    from tunnelkit.service.store_sqlite import DATABASE_NAME

    if not spec:
        return os.path.join(state_dir, DATABASE_NAME)
    return os.path.abspath(spec[len(SQLITE_PREFIX):])


def describe_store(spec: Optional[str], state_dir: str) -> str:
    """C{spec} for a message or a log (a PostgreSQL password is C{***})."""
    if is_postgres(spec):
        from tunnelkit.service.store_postgres import redact_dsn

        return redact_dsn(spec or "")
    return SQLITE_PREFIX + sqlite_path(spec, state_dir)


def open_configured_store(spec: Optional[str], state_dir: str, reactor: Any = None) -> Any:
    """
    The store C{spec} names (None: SQLite in C{state_dir}), its migrations applied.  With C{reactor}
    its queries run on a thread pool; otherwise synchronously in the calling thread.

    @raise StoreError: the database cannot be opened (the message says what to fix).
    """
    if is_postgres(spec):
        from tunnelkit.service.store_postgres import open_postgres

        return open_postgres(spec or "", reactor)
    if spec and not spec.startswith(SQLITE_PREFIX):
        raise StoreError(f"--store {spec!r}: {check_store.__doc__}")
    from tunnelkit.service.store_sqlite import open_sqlite

    return open_sqlite(sqlite_path(spec, state_dir), reactor)
