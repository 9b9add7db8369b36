"""
The store contract (every test class of L{tests.test_store} built with L{StoreTestCase.make_store})
against a real PostgreSQL (L{tunnelkit.testing.postgres}), and what only PostgreSQL has: versioned
migrations, DSN errors without passwords, and token claims racing between two store instances (two
service nodes, each with its own connection pool).
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests import test_store
from tunnelkit.service import tokens
from tunnelkit.service.dbrunner import Blocking
from tunnelkit.service.interfaces import SOURCE, TokenRejected
from tunnelkit.service.store import IControlStore, NewTunnel, StoreError
from tunnelkit.testing.postgres import fresh_database, skip_reason

SKIP = skip_reason()

if SKIP is None:
    from tunnelkit.service.store_postgres import (
        MIGRATIONS,
        PostgresStore,
        open_postgres,
        redact_dsn,
    )


class _OnPostgres:
    skip = SKIP

    def make_store(self, directory: str) -> IControlStore:
        dsn = fresh_database(self)
        return PostgresStore(dsn)


_CONTRACT = [
    "InterfaceTests",
    "ClaimPeerTests",
    "ConnectionStateTests",
    "LifecycleQueryTests",
    "AccountTests",
    "CountTests",
    "ResetTests",
]
for _name in _CONTRACT:
    _base = getattr(test_store, _name)
    globals()["Postgres" + _name] = type("Postgres" + _name, (_OnPostgres, _base), {"__module__": __name__})
del _name, _base


class MigrationTests(TestCase):
    skip = SKIP

    def test_applied_once(self) -> None:
        """The first open applies every migration and records it; the next applies none."""
        dsn = fresh_database(self)
        first = PostgresStore(dsn)
        self.addCleanup(first.close)
        self.assertEqual(first.applied, [(m[0], m[1]) for m in MIGRATIONS])
        second = PostgresStore(dsn)
        self.addCleanup(second.close)
        self.assertEqual(second.applied, [])
        recorded = first.connect().execute("SELECT version FROM tunnelkit_schema_migrations").fetchall()
        self.assertEqual(recorded, [(m[0],) for m in MIGRATIONS])

    def test_newer_version_refused(self) -> None:
        dsn = fresh_database(self)
        store = PostgresStore(dsn)
        self.addCleanup(store.close)
        store.connect().execute("INSERT INTO tunnelkit_schema_migrations VALUES (99, 'future', 0)")
        error = self.assertRaises(StoreError, PostgresStore, dsn)
        self.assertIn("schema version 99", str(error))


class DsnErrorTests(TestCase):
    skip = SKIP

    def test_unreachable(self) -> None:
        """No server at the socket: a StoreError naming the DSN (without its password) and what to check."""
        dsn = "postgresql://u:s3cret-pw@/db?host=/nonexistent-tunnelkit-dir"
        error = self.assertRaises(StoreError, PostgresStore, dsn)
        text = str(error)
        self.assertNotIn("s3cret-pw", text)
        self.assertIn("postgresql://u:***@/db", text)
        self.assertIn("cannot connect to PostgreSQL", text)
        self.assertIn("check the host, port", text)

    def test_malformed(self) -> None:
        error = self.assertRaises(StoreError, PostgresStore, "postgresql://u:pw@h/db?nonsense=1&password=zz9")
        self.assertNotIn("zz9", str(error))
        self.assertIn("not a valid PostgreSQL connection string", str(error))

    def test_redact(self) -> None:
        self.assertEqual(redact_dsn("postgresql://me:pa:ss@h:5/d"), "postgresql://me:***@h:5/d")
        self.assertEqual(redact_dsn("host=h password='a b' user=x"), "host=h password=*** user=x")
        self.assertEqual(redact_dsn("postgresql://h/d?password=x&user=y"), "postgresql://h/d?password=***&user=y")
        self.assertEqual(redact_dsn("postgresql://me@h/d"), "postgresql://me@h/d")


class RaceTests(TestCase):
    """Two store instances on thread pools of their own (two service nodes) race for each token."""

    skip = SKIP

    @inlineCallbacks
    def test_exactly_one_wins(self) -> Any:
        dsn = fresh_database(self)
        setup = Blocking(PostgresStore(dsn))
        self.addCleanup(setup.close)
        setup.create_account("default", test_store.ACCOUNT, 0)
        nodes = [open_postgres(dsn, reactor, threads=2) for _ in range(2)]
        for node in nodes:
            self.addCleanup(node.close)
        rounds = 100
        sources = []
        for i in range(rounds):
            source = tokens.new_access_token(f"t{i}")
            setup.create_tunnel(
                NewTunnel(f"t{i}", test_store.ACCOUNT, None, None, ("SSH",), 10, (),
                          tokens.token_hash(source), "%064d" % i, 1000.0),
                None,
            )
            sources.append(source)
        winners: List[int] = []
        for source in sources:
            results = yield DeferredList(
                [node.claim_peer(source, SOURCE, None, 1001.0) for node in nodes], consumeErrors=True
            )
            won = [ok for ok, _ in results if ok]
            for ok, value in results:
                if not ok:
                    value.trap(TokenRejected)
                    self.assertEqual(value.value.reason, "token-used")
            winners.append(len(won))
        self.assertEqual(winners, [1] * rounds)
