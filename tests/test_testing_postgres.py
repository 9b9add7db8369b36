"""Tests for L{tunnelkit.testing.postgres}: a real, throw-away PostgreSQL on a unix socket only."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tunnelkit.testing.postgres import PostgresServer, fresh_database, shared_server, skip_reason


class SharedServerTests(TestCase):
    skip = skip_reason()

    def test_fresh_database_isolated(self) -> None:
        """Two fresh places do not see each other's tables; each is empty."""
        import psycopg

        first, second = fresh_database(self), fresh_database(self)
        with psycopg.connect(first, autocommit=True) as db:
            db.execute("CREATE TABLE t (x INTEGER)")
            db.execute("INSERT INTO t VALUES (1)")
        with psycopg.connect(second, autocommit=True) as db:
            db.execute("CREATE TABLE t (x INTEGER)")
            self.assertEqual(db.execute("SELECT COUNT(*) FROM t").fetchone(), (0,))

    def test_no_tcp(self) -> None:
        """The server listens on its unix socket only."""
        import psycopg

        with psycopg.connect(fresh_database(self)) as db:
            self.assertEqual(db.execute("SHOW listen_addresses").fetchone(), ("",))
        self.assertIn(".s.PGSQL.5432", os.listdir(shared_server().directory))


class OwnServerTests(TestCase):
    skip = skip_reason()

    def test_stop_removes_everything(self) -> None:
        """stop() ends the server and deletes its directory; a database made in it worked."""
        import psycopg

        server = PostgresServer(port=5433).start()
        self.addCleanup(server.stop)
        directory = server.directory
        with psycopg.connect(server.create_database("own"), autocommit=True) as db:
            self.assertEqual(db.execute("SELECT current_database()").fetchone(), ("own",))
        server.stop()
        self.assertFalse(os.path.exists(directory))
        server.stop()
