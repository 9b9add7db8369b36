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


for _name in test_store.CONTRACT:
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


class PostgresNotificationQueueTests(TestCase):
    """The MQTT notification queue in the shared database (what every node's notifier uses)."""

    skip = SKIP

    def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.store = PostgresStore(self.dsn)
        self.addCleanup(self.store.close)
        self.queue: Any = Blocking(self.store.notification_queue())

    def test_interface(self) -> None:
        from zope.interface.verify import verifyObject

        from tunnelkit.service.notify import INotificationQueue

        verifyObject(INotificationQueue, self.queue.store)

    def test_put_replace_remove(self) -> None:
        a = self.queue.put("tun-a", "t1", b"A1\x00\xff", 10.0)
        b = self.queue.put("tun-b", "t2", b"B1", 11.0)
        a2 = self.queue.put("tun-a", "t1", b"A2", 12.0)
        self.assertLess(a.seq, b.seq)
        self.assertLess(b.seq, a2.seq)
        self.assertEqual([(q.tunnel_id, q.payload) for q in self.queue.pending()], [("tun-b", b"B1"), ("tun-a", b"A2")])
        self.assertFalse(self.queue.remove("tun-a", a.seq))
        self.assertTrue(self.queue.remove("tun-a", a2.seq))
        self.assertTrue(self.queue.remove("tun-b"))
        self.assertFalse(self.queue.remove("tun-b"))
        self.assertEqual(self.queue.pending(), [])

    def test_shared_between_nodes(self) -> None:
        """What one node queued, another (its own store instance) sees, bytes intact; seqs keep growing."""
        first = self.queue.put("tun-a", "t1", b"\x00token\xff", 10.0)
        other = PostgresStore(self.dsn)
        self.addCleanup(other.close)
        queue = Blocking(other.notification_queue())
        [seen] = queue.pending()
        self.assertEqual((seen.seq, seen.tunnel_id, seen.payload), (first.seq, "tun-a", b"\x00token\xff"))
        self.assertGreater(queue.put("tun-b", "t1", b"B", 11.0).seq, first.seq)
        queue.close()  # the store's runner: the store still works
        self.assertEqual(len(Blocking(other).list_accounts()), 0)


class PostgresConsoleUserTests(TestCase):
    """The console's users and host keys in the shared database (a user made on one node signs in on any)."""

    skip = SKIP

    def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.store = PostgresStore(self.dsn)
        self.addCleanup(self.store.close)
        self.db: Any = Blocking(self.store.console_users())

    def test_interface(self) -> None:
        from zope.interface.verify import verifyObject

        from tunnelkit.service.console.users import IConsoleUsers

        verifyObject(IConsoleUsers, self.db.store)

    def test_create_check_reset_delete(self) -> None:
        from tunnelkit.service.console import users

        created = self.db.create_user("111111111111", "alice", "password-1", 1764000000.25)
        self.assertEqual(self.db.check_password("111111111111", "alice", "password-1"), created)
        self.assertIsNone(self.db.check_password("111111111111", "alice", "password-2"))
        self.assertRaises(users.UserExists, self.db.create_user, "111111111111", "alice", "password-9", 11.0)
        self.db.set_password("111111111111", "alice", "password-4", 1764000013.5)
        self.assertTrue(self.db.still_valid("111111111111", "alice", 1764000013.5))
        self.assertFalse(self.db.still_valid("111111111111", "alice", 1764000013.25))  # full precision
        other = PostgresStore(self.dsn)
        self.addCleanup(other.close)
        self.assertEqual([u.name for u in Blocking(other.console_users()).list_users(None)], ["alice"])
        self.db.delete_user("111111111111", "alice")
        self.assertRaises(users.NoSuchUser, self.db.delete_user, "111111111111", "alice")

    def test_host_keys(self) -> None:
        from tunnelkit.service.console import users

        self.assertIsNone(self.db.get_host_key("1", "thing1"))
        self.db.remember_host_key("1", "thing1", "ssh-ed25519", "SHA256:abc", 5.0)
        self.assertEqual(self.db.get_host_key("1", "thing1"), users.HostKey("thing1", "ssh-ed25519", "SHA256:abc", 5.0))
        self.db.remember_host_key("1", "thing1", "ssh-rsa", "SHA256:def", 6.0)
        self.assertEqual(self.db.get_host_key("1", "thing1").fingerprint, "SHA256:def")
        self.assertTrue(self.db.forget_host_key("1", "thing1"))
        self.assertFalse(self.db.forget_host_key("1", "thing1"))


class AdminCommandTests(TestCase):
    """C{tunnelkit admin ... --store postgresql://...}: the CLI's operator commands on the shared database."""

    skip = SKIP

    def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.state = self.mktemp()  # never made: a PostgreSQL store needs no state directory

    def admin(self, *argv: str) -> Any:
        from tests.test_cli import run

        return run("admin", *argv, "--store", self.dsn, "--state-dir", self.state)

    def test_migrate_then_accounts(self) -> None:
        import json

        status, out, err = self.admin("migrate")
        self.assertEqual(status, 0, err)
        result = json.loads(out)
        self.assertEqual([m["Version"] for m in result["Applied"]], [m[0] for m in MIGRATIONS])
        self.assertIn(f"applied {len(MIGRATIONS)} migration(s)", result["Message"])
        status, out, err = self.admin("migrate")
        self.assertEqual(json.loads(out)["Applied"], [])
        self.assertIn("nothing to apply", json.loads(out)["Message"])
        status, out, err = self.admin("create-account", "acme", "--account-id", "123456789012")
        self.assertEqual(status, 0, err)
        status, out, err = self.admin("list-accounts")
        self.assertEqual([a["Name"] for a in json.loads(out)["Accounts"]], ["acme"])

    def test_unreachable_database(self) -> None:
        """A DSN naming no server: status 1, one line naming what to fix, no password, no traceback."""
        from tests.test_cli import run

        status, out, err = run(
            "admin", "list-accounts", "--store", "postgresql://op:hunter2-pw@/db?host=/nonexistent-tunnelkit"
        )
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertNotIn("hunter2-pw", err)
        self.assertNotIn("Traceback", err)
        self.assertIn("cannot connect to PostgreSQL", err)
        self.assertIn("postgresql://op:***@/db", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_bad_store_option(self) -> None:
        from tests.test_cli import run

        status, out, err = run("admin", "list-accounts", "--store", "mysql://x")
        self.assertEqual(status, 2)
        self.assertIn("sqlite:PATH", err)


class ServiceOnPostgresTests(TestCase):
    """The service built with C{--store postgresql://...} keeps its state there (accounts, keys, queue, users)."""

    skip = SKIP

    def test_built_on_postgres(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from tunnelkit.service import tap

        dsn = fresh_database(self)
        options = tap.Options()
        options.parseOptions(["--mode", "service", "--state-dir", self.mktemp(), "--store", dsn])
        service = tap.TunnelService(options, MemoryReactorClock())  # built, never started
        self.addCleanup(service.store.close)
        self.assertIsInstance(service.store, PostgresStore)
        check = Blocking(PostgresStore(dsn))
        self.addCleanup(check.close)
        self.assertEqual([a.name for a in check.list_accounts()], ["default"])
        self.assertEqual(len(check.list_access_keys()), 1)

    def test_unreachable_exits_with_one_line(self) -> None:
        """twistd's makeService: a database it cannot reach is a ConfigError (one line, status 1), no password."""
        import io
        import sys

        from tunnelkit.errors import ConfigError

        from tunnelkit.service import tap

        options = tap.Options()
        options.parseOptions(["--mode", "service", "--state-dir", self.mktemp(),
                              "--store", "postgresql://op:pw-77x@/db?host=/nonexistent-tunnelkit"])
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        problem = self.assertRaises(ConfigError, tap.makeService, options)
        self.assertIn("cannot connect to PostgreSQL", str(problem))
        self.assertNotIn("pw-77x", str(problem))
        self.assertEqual(err.getvalue(), "")  # the plugin writes the one line (tests/test_api_tap.py)
