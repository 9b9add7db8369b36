# -*- test-case-name: tests.test_testing_postgres -*-
"""
A real PostgreSQL for tests: a throw-away cluster in a temporary directory, reachable only through a
unix socket in that directory (C{listen_addresses=''}: no TCP port at all).

Debian's binaries (C{/usr/lib/postgresql/<version>/bin}, apt package C{postgresql}) are used; as
C{initdb} and C{postgres} refuse to run as root, a root process runs them as the C{postgres} user
(C{runuser}).  The cluster runs without fsync (a test database need not survive a power cut).

The API, for a test case::

    from tunnelkit.testing.postgres import fresh_database, skip_reason

    class MyTests(TestCase):
        skip = skip_reason()            # None when PostgreSQL and psycopg are here

        def setUp(self):
            self.dsn = fresh_database(self)  # a new, empty database, dropped at the test's end

L{shared_server} starts one cluster per test process (per trial worker) at its first call and stops
it (and deletes its directory) when the process exits (a watchdog process does it if the test process
is killed); L{fresh_database} creates one database in it
per test (a schema of one shared database: half a millisecond each).  L{PostgresServer} is the cluster itself, for a test that wants its own (to stop it, say).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from typing import Any, List, Optional

DEFAULT_BINDIRS = "/usr/lib/postgresql/*/bin"
_SUPERUSER = "postgres"
#: The database of L{PostgresServer.create_schema}'s schemas.
SHARED_DATABASE = "tunnelkit"


def postgres_bindir() -> Optional[str]:
    """The directory of C{initdb}, C{pg_ctl} and C{postgres} ($TUNNELKIT_PG_BINDIR, else Debian's newest)."""
    explicit = os.environ.get("TUNNELKIT_PG_BINDIR")
    candidates = [explicit] if explicit else sorted(glob.glob(DEFAULT_BINDIRS), key=_version_key, reverse=True)
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _version_key(path: str) -> int:
    try:
        return int(path.split(os.sep)[-2])
    except ValueError:
        return 0


def skip_reason() -> Optional[str]:
    """Why PostgreSQL tests cannot run here (a C{skip} for trial), or None if they can."""
    if postgres_bindir() is None:
        return (
            f"no PostgreSQL server binaries in {DEFAULT_BINDIRS} (apt-get install postgresql, "
            "or set TUNNELKIT_PG_BINDIR)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install 'tunnelkit[postgresql]')"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(_SUPERUSER)
        except KeyError:
            return "running as root and there is no 'postgres' user to run the PostgreSQL server as"
    return None


class PostgresError(Exception):
    """The test cluster could not be made or started (the message has the server's log)."""


class PostgresServer:
    """
    One PostgreSQL cluster in a temporary directory, listening on a unix socket there only.

    @ivar directory: the temporary directory (data in C{data/}, the socket and the log beside it).
    @ivar port: the number in the socket's name (C{.s.PGSQL.<port>}); no TCP port is opened.
    """

    def __init__(self, bindir: Optional[str] = None, port: int = 5432) -> None:
        found = bindir or postgres_bindir()
        if found is None:
            raise PostgresError(skip_reason() or "no PostgreSQL binaries")
        self.bindir = found
        self.port = port
        self.directory = ""
        self.running = False
        self._names = itertools.count(1)
        self._shared_database = False
        self._watchdog: Optional[subprocess.Popen] = None

    # --- running the binaries ---

    def _as_owner(self) -> List[str]:
        return ["runuser", "-u", _SUPERUSER, "--"] if os.geteuid() == 0 else []

    def _run(self, *argv: str) -> None:
        result = subprocess.run(
            self._as_owner() + list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{' '.join(argv[:2])} failed (status {result.returncode}):\n"
                + result.stdout.decode("utf-8", "replace")
                + self._log_tail()
            )

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "postgres.log"), encoding="utf-8", errors="replace") as f:
                return "\nserver log:\n" + f.read()[-4000:]
        except OSError:
            return ""

    # --- life cycle ---

    def start(self) -> "PostgresServer":
        """initdb a cluster in a new temporary directory and start it (waits until it accepts connections)."""
        self.directory = tempfile.mkdtemp(prefix="tunnelkit-pg-")
        self._shared_database = False
        try:
            if os.geteuid() == 0:
                import pwd

                owner = pwd.getpwnam(_SUPERUSER)
                os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            data = os.path.join(self.directory, "data")
            self._run(
                os.path.join(self.bindir, "initdb"),
                "-D", data, "-U", _SUPERUSER, "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
                "--no-sync", "--no-instructions",
            )
            settings = {
                "listen_addresses": "''",
                "unix_socket_directories": f"'{self.directory}'",
                "port": str(self.port),
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "300",
                "shared_buffers": "32MB",
                "log_min_messages": "warning",
            }
            options = " ".join(f"-c {name}={value}" for name, value in settings.items())
            self._run(
                os.path.join(self.bindir, "pg_ctl"),
                "-D", data, "-l", os.path.join(self.directory, "postgres.log"), "-o", options, "-w", "-t", "60",
                "start",
            )
            self.running = True
            self._watch()
        except BaseException:
            self.stop()
            raise
        return self

    def _watch(self) -> None:
        """
        A watchdog process: when this process is gone without stopping the server (killed, or a trial
        worker ended without running atexit), it stops the server and deletes the directory.
        """
        pg_ctl = " ".join(self._as_owner() + [os.path.join(self.bindir, "pg_ctl")])
        script = (
            f'while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; '
            f'{pg_ctl} -D "$1/data" -m immediate -w stop >/dev/null 2>&1; rm -rf "$1"'
        )
        self._watchdog = subprocess.Popen(
            ["sh", "-c", script, "watchdog", self.directory],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def stop(self) -> None:
        """Stop the server (at once) and delete its directory; safe to call again."""
        watchdog = self._watchdog
        if watchdog is not None:
            self._watchdog = None
            watchdog.kill()
            watchdog.wait()
        if self.running:
            self.running = False
            try:
                self._run(
                    os.path.join(self.bindir, "pg_ctl"), "-D", os.path.join(self.directory, "data"),
                    "-m", "immediate", "-w", "stop",
                )
            except PostgresError:
                pass
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = ""

    # --- databases ---

    def dsn(self, database: str = "postgres") -> str:
        """The libpq URI of C{database} on this server (over its unix socket)."""
        return f"postgresql://{_SUPERUSER}@/{database}?host={self.directory}&port={self.port}"

    def create_database(self, name: Optional[str] = None) -> str:
        """Create an empty database (a new name unless given); return its DSN."""
        import psycopg

        name = name or f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    def create_schema(self, name: Optional[str] = None) -> str:
        """
        Create an empty schema in the shared database C{tunnelkit} (made at the first call); return a
        DSN whose C{search_path} is that schema only.  Half a millisecond, against a third of a second
        for a database: what L{fresh_database} uses.
        """
        import psycopg

        if not self._shared_database:
            with psycopg.connect(self.dsn(), autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{SHARED_DATABASE}" TEMPLATE template0')
            self._shared_database = True
        name = name or f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(SHARED_DATABASE), autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{name}"')
        return self.dsn(SHARED_DATABASE) + f"&options=-csearch_path%3D{name}"

    def drop_schema(self, dsn: str) -> None:
        """Drop the schema of a DSN L{create_schema} returned, with everything in it."""
        import psycopg

        if not self.running:
            return
        name = dsn.rsplit("%3D", 1)[1]
        with psycopg.connect(self.dsn(SHARED_DATABASE), autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def drop_database(self, dsn: str) -> None:
        """Drop the database of C{dsn} (closing its connections)."""
        import psycopg

        name = dsn.split("/")[-1].split("?")[0]
        if not self.running:
            return
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_shared: Optional[PostgresServer] = None


def shared_server() -> PostgresServer:
    """This process's cluster, started at the first call and stopped when the process exits."""
    global _shared
    if _shared is None or not _shared.running:
        _shared = PostgresServer().start()
        atexit.register(_shared.stop)
    return _shared


def fresh_database(testcase: Any) -> str:
    """
    The DSN of a new, empty place on L{shared_server} for C{testcase}, removed by its cleanup: a schema
    of the shared database (its C{search_path}), so each test case costs half a millisecond.  A test
    that needs a whole database of its own (LISTEN/NOTIFY channels are per database) calls
    C{shared_server().create_database()} and C{drop_database} instead.
    """
    server = shared_server()
    dsn = server.create_schema()
    testcase.addCleanup(server.drop_schema, dsn)
    return dsn
