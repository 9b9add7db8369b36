"""
Tests for the SQLite store (L{tunnelkit.service.store_sqlite}) behind L{IControlStore}: the data plane's
L{ITunnelStore.claim_peer} contract, connection states, lifecycle queries, accounts and keys, and
durability.

The contract tests (every class but L{SQLiteOnlyTests}) build their store with
L{StoreTestCase.make_store}: another implementation (PostgreSQL) runs them by subclassing each with
its own C{make_store}.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import tempfile
from typing import Any, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunnelkit.service import tokens
from tunnelkit.service.interfaces import DESTINATION, SOURCE, ITunnelStore, PeerGrant, TokenRejected
from tunnelkit.service.store import (
    AccessKey,
    AccountExists,
    IControlStore,
    NewTunnel,
    NoSuchAccount,
    NoSuchKey,
    StoreError,
)
from tunnelkit.service.dbrunner import Blocking, IDatabaseRunner, SynchronousRunner
from tunnelkit.service.store_sqlite import DATABASE_NAME, MEMORY, SQLiteStore, connect, open_store

ACCOUNT = "111111111111"
OTHER = "222222222222"
CLIENT_A = "a" * 32
CLIENT_B = "b" * 32


class StoreTestCase(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tunnelkit-store-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.real_store = self.make_store(self.dir)
        self.addCleanup(self.real_store.close)
        self.store: Any = Blocking(self.real_store)
        self.store.create_account("default", ACCOUNT, 0)
        self.store.create_account("other", OTHER, 0)

    def make_store(self, directory: str) -> IControlStore:
        """The store under test, fresh, keeping any files in C{directory}."""
        return open_store(directory)

    def open(
        self,
        tunnel_id: str = "t1",
        account: str = ACCOUNT,
        services: Optional[Tuple[str, ...]] = ("SSH",),
        minutes: int = 10,
        now: float = 1000.0,
        thing: Optional[str] = "thing",
        max_open: Optional[int] = None,
    ) -> Tuple[str, str]:
        source, destination = tokens.new_access_token(tunnel_id), tokens.new_access_token(tunnel_id)
        created = self.store.create_tunnel(
            NewTunnel(
                tunnel_id, account, "d", thing, services, minutes, (("k", "v"),),
                tokens.token_hash(source), tokens.token_hash(destination), now,
            ),
            max_open,
        )
        self.assertTrue(created)
        return source, destination


class InterfaceTests(StoreTestCase):
    def test_provides(self) -> None:
        self.assertTrue(verifyObject(IControlStore, self.real_store))
        self.assertTrue(verifyObject(ITunnelStore, self.real_store))


class SQLiteOnlyTests(StoreTestCase):
    """What is particular to the SQLite file."""

    def test_private_file(self) -> None:
        mode = stat.S_IMODE(os.stat(os.path.join(self.dir, DATABASE_NAME)).st_mode)
        self.assertEqual(mode, 0o600)

    def test_wal_full(self) -> None:
        db = self.store._db
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)  # FULL

    def test_not_a_database(self) -> None:
        path = os.path.join(self.dir, "junk")
        with open(path, "wb") as f:
            f.write(b"this is not sqlite" * 100)
        from tunnelkit.service.store import StoreError

        error = self.assertRaises(StoreError, SQLiteStore, path)
        self.assertIn(path, str(error))


#: The tokens table as schema version 1 had it (client tokens in clear), for the upgrade test.
_VERSION_1_TOKENS = """
CREATE TABLE tokens (
    token_hash TEXT PRIMARY KEY,
    tunnel_id TEXT NOT NULL REFERENCES tunnels(tunnel_id) ON DELETE CASCADE,
    side TEXT NOT NULL,
    generation INTEGER NOT NULL,
    client_token TEXT,
    used_at REAL,
    revoked_at REAL
);
CREATE INDEX tokens_by_tunnel ON tokens (tunnel_id, side);
CREATE INDEX tokens_by_client_token ON tokens (client_token) WHERE client_token IS NOT NULL;
"""


class SchemaTests(TestCase):
    """Client tokens are kept hashed; older databases are upgraded in place."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tunnelkit-schema-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, DATABASE_NAME)

    def file_bytes(self) -> bytes:
        data = b""
        for suffix in ("", "-wal"):
            if os.path.exists(self.path + suffix):
                with open(self.path + suffix, "rb") as f:
                    data += f.read()
        return data

    def test_client_token_kept_hashed(self) -> None:
        store = Blocking(SQLiteStore(self.path))
        self.addCleanup(store.close)
        store.create_account("default", ACCOUNT, 0)
        source = tokens.new_access_token("t1")
        store.create_tunnel(
            NewTunnel("t1", ACCOUNT, None, None, ("SSH",), 10, (), tokens.token_hash(source), "0" * 64, 1000.0), None
        )
        client = "Zq7-client-token-0123456789abcdef"
        store.claim_peer(source, SOURCE, client, 1001.0)
        (kept,) = store._db.execute("SELECT client_token_hash FROM tokens WHERE side = 'source'").fetchone()
        self.assertEqual(kept, tokens.client_token_hash(client))
        self.assertNotIn(client.encode(), self.file_bytes())
        store.claim_peer(source, SOURCE, client, 1002.0)  # the same client token reconnects

    def test_upgrade_from_version_1(self) -> None:
        """A version-1 database opens with its tunnels, and its bound client tokens still work."""
        store = Blocking(SQLiteStore(self.path))
        store.create_account("default", ACCOUNT, 0)
        source, destination = tokens.new_access_token("t1"), tokens.new_access_token("t1")
        store.create_tunnel(
            NewTunnel(
                "t1", ACCOUNT, "old", "thing", ("SSH",), 10, (("k", "v"),),
                tokens.token_hash(source), tokens.token_hash(destination), 1000.0,
            ),
            None,
        )
        store.close()
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("DROP TABLE tokens")
        db.executescript(_VERSION_1_TOKENS)
        db.executemany(
            "INSERT INTO tokens (token_hash, tunnel_id, side, generation, client_token, used_at) VALUES (?, 't1', ?, 0, ?, ?)",
            [(tokens.token_hash(source), SOURCE, CLIENT_A, 1001.0), (tokens.token_hash(destination), DESTINATION, None, None)],
        )
        db.execute("PRAGMA user_version=1")
        db.close()

        upgraded = Blocking(SQLiteStore(self.path))
        self.addCleanup(upgraded.close)
        self.assertEqual(upgraded._db.execute("PRAGMA user_version").fetchone()[0], 2)
        tunnel = upgraded.get_tunnel(ACCOUNT, "t1")
        assert tunnel is not None
        self.assertEqual((tunnel.description, tunnel.services, tunnel.tags), ("old", ("SSH",), (("k", "v"),)))
        self.assertEqual(upgraded.claim_peer(source, SOURCE, CLIENT_A, 1002.0).tunnel_id, "t1")
        error = self.assertRaises(TokenRejected, upgraded.claim_peer, source, SOURCE, CLIENT_B, 1003.0)
        self.assertEqual(error.reason, "client-token-mismatch")
        upgraded.claim_peer(destination, DESTINATION, None, 1003.0)
        self.assertNotIn(CLIENT_A.encode(), upgraded._db.execute("SELECT group_concat(client_token_hash) FROM tokens").fetchone()[0].encode())

    def test_newer_version_refused(self) -> None:
        SQLiteStore(self.path).close()
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA user_version=99")
        db.close()
        from tunnelkit.service.store import StoreError

        error = self.assertRaises(StoreError, SQLiteStore, self.path)
        self.assertIn("schema version 99", str(error))


class ClaimPeerTests(StoreTestCase):
    def test_grant(self) -> None:
        source, destination = self.open(services=("SSH", "HTTP"))
        grant = self.store.claim_peer(source, SOURCE, None, 1001.0)
        self.assertEqual(grant, PeerGrant("t1", ACCOUNT, SOURCE, ("SSH", "HTTP"), 1000.0 + 600, 0))
        self.assertEqual(self.store.claim_peer(destination, DESTINATION, None, 1001.0).side, DESTINATION)

    def test_no_services(self) -> None:
        source, _ = self.open(services=None, thing=None)
        self.assertEqual(self.store.claim_peer(source, SOURCE, None, 1001.0).services, ())

    def test_single_use(self) -> None:
        source, _ = self.open()
        self.store.claim_peer(source, SOURCE, None, 1001.0)
        error = self.assertRaises(TokenRejected, self.store.claim_peer, source, SOURCE, None, 1002.0)
        self.assertEqual((error.status, error.reason, error.text), (401, "token-used", tokens.TOKEN_USED_TEXT))

    def test_client_token_binding(self) -> None:
        source, _ = self.open()
        self.store.claim_peer(source, SOURCE, CLIENT_A, 1001.0)
        self.store.claim_peer(source, SOURCE, CLIENT_A, 1002.0)
        self.store.claim_peer(source, SOURCE, CLIENT_A, 1003.0)
        error = self.assertRaises(TokenRejected, self.store.claim_peer, source, SOURCE, CLIENT_B, 1004.0)
        self.assertEqual(error.text, tokens.CLIENT_TOKEN_MISMATCH_TEXT)
        error = self.assertRaises(TokenRejected, self.store.claim_peer, source, SOURCE, None, 1004.0)
        self.assertEqual(error.reason, "token-used")

    def test_client_token_unique_per_account(self) -> None:
        """A client token bound in one open tunnel cannot bind in another of the same account."""
        first, _ = self.open("t1")
        second, _ = self.open("t2")
        third, _ = self.open("t3", account=OTHER)
        self.store.claim_peer(first, SOURCE, CLIENT_A, 1001.0)
        error = self.assertRaises(TokenRejected, self.store.claim_peer, second, SOURCE, CLIENT_A, 1001.0)
        self.assertEqual(error.reason, "client-token-in-use")
        self.store.claim_peer(third, SOURCE, CLIENT_A, 1001.0)
        self.store.close_tunnel(ACCOUNT, "t1", 1002.0)
        self.store.claim_peer(second, SOURCE, CLIENT_A, 1003.0)

    def test_mode_mismatch(self) -> None:
        source, _ = self.open()
        error = self.assertRaises(TokenRejected, self.store.claim_peer, source, DESTINATION, None, 1001.0)
        self.assertEqual(error.reason, "mode-mismatch")
        # A rejected attempt does not consume the token.
        self.store.claim_peer(source, SOURCE, None, 1001.0)

    def test_unknown_and_malformed(self) -> None:
        self.open()
        for token in (tokens.new_access_token("t1"), "garbage", "", "x" * 5000):
            error = self.assertRaises(TokenRejected, self.store.claim_peer, token, SOURCE, None, 1001.0)
            self.assertEqual((error.status, error.reason), (401, "unknown-token"))

    def test_expired_and_closed(self) -> None:
        source, destination = self.open(minutes=1)
        error = self.assertRaises(TokenRejected, self.store.claim_peer, source, SOURCE, None, 1060.0)
        self.assertEqual((error.status, error.reason), (410, "tunnel-expired"))
        self.store.close_tunnel(ACCOUNT, "t1", 1010.0)
        error = self.assertRaises(TokenRejected, self.store.claim_peer, destination, DESTINATION, None, 1011.0)
        self.assertEqual(error.reason, "tunnel-closed")

    def test_rotation(self) -> None:
        source, destination = self.open()
        self.store.claim_peer(source, SOURCE, CLIENT_A, 1001.0)
        new_source = tokens.new_access_token("t1")
        tunnel = self.store.rotate_tokens(ACCOUNT, "t1", [(SOURCE, tokens.token_hash(new_source))], None, 1002.0)
        self.assertIsNotNone(tunnel)
        error = self.assertRaises(TokenRejected, self.store.claim_peer, source, SOURCE, CLIENT_A, 1003.0)
        self.assertEqual(error.reason, "token-rotated")
        grant = self.store.claim_peer(new_source, SOURCE, CLIENT_A, 1003.0)
        self.assertEqual(grant.token_generation, 1)
        self.assertEqual(self.store.claim_peer(destination, DESTINATION, None, 1003.0).token_generation, 0)

    def test_rotation_other_account(self) -> None:
        self.open()
        self.assertIsNone(self.store.rotate_tokens(OTHER, "t1", [(SOURCE, "0" * 64)], None, 1002.0))


class ConnectionStateTests(StoreTestCase):
    def test_states(self) -> None:
        self.open()
        self.store.set_connection_state("t1", SOURCE, True, 1005.0)
        tunnel = self.store.get_tunnel(ACCOUNT, "t1")
        assert tunnel is not None
        self.assertEqual((tunnel.source.status, tunnel.source.last_updated_at), ("CONNECTED", 1005.0))
        self.assertEqual((tunnel.destination.status, tunnel.destination.last_updated_at), ("DISCONNECTED", 1000.0))
        self.store.set_connection_state("t1", SOURCE, False, 1006.0)
        tunnel = self.store.get_tunnel(ACCOUNT, "t1")
        assert tunnel is not None
        self.assertEqual((tunnel.source.status, tunnel.source.last_updated_at), ("DISCONNECTED", 1006.0))

    def test_close_disconnects(self) -> None:
        """Closing shows both sides DISCONNECTED; a late CONNECTED from the relay is ignored."""
        self.open()
        self.store.set_connection_state("t1", DESTINATION, True, 1005.0)
        self.store.close_tunnel(ACCOUNT, "t1", 1010.0)
        self.store.set_connection_state("t1", SOURCE, True, 1011.0)
        tunnel = self.store.get_tunnel(ACCOUNT, "t1")
        assert tunnel is not None
        self.assertEqual((tunnel.destination.status, tunnel.destination.last_updated_at), ("DISCONNECTED", 1010.0))
        self.assertEqual(tunnel.source.status, "DISCONNECTED")

    def test_bad_side(self) -> None:
        self.open()
        self.assertRaises(ValueError, self.store.set_connection_state, "t1", "sideways", True, 1.0)


class SoftStateSyncTests(StoreTestCase):
    """Connection states commit without an fsync of their own; everything else stays FULL."""

    def statements(self, call: Any) -> List[str]:
        seen: List[str] = []
        db = self.store._db
        db.set_trace_callback(seen.append)
        try:
            call()
        finally:
            db.set_trace_callback(None)
        return [s.strip() for s in seen]

    def test_connection_state_commits_normal(self) -> None:
        self.open()
        seen = self.statements(lambda: self.store.set_connection_state("t1", SOURCE, True, 1005.0))
        self.assertEqual(seen[0], "PRAGMA synchronous=NORMAL")
        self.assertEqual(seen[-2:], ["COMMIT", "PRAGMA synchronous=FULL"])
        self.assertEqual(self.store._db.execute("PRAGMA synchronous").fetchone()[0], 2)  # FULL again

    def test_token_writes_stay_full(self) -> None:
        """A claim after a connection state is committed with synchronous=FULL."""
        self.open()
        self.store.set_connection_state("t1", SOURCE, True, 1005.0)
        seen = self.statements(lambda: self.store.close_tunnel(ACCOUNT, "t1", 1010.0))
        self.assertIn("COMMIT", seen)
        self.assertNotIn("PRAGMA synchronous=NORMAL", seen)
        self.assertEqual(self.store._db.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_failed_state_write_restores_full(self) -> None:
        self.open()
        self.store._db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON tunnels BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        self.assertRaises(sqlite3.Error, self.store.set_connection_state, "t1", SOURCE, True, 1005.0)
        self.assertFalse(self.store._db.in_transaction)
        self.assertEqual(self.store._db.execute("PRAGMA synchronous").fetchone()[0], 2)


@implementer(IDatabaseRunner)
class HeldRunner:
    """
    A runner that holds each call until L{release} (the store's thread, one call at a time): runs it
    then on a real SQLite connection, through a L{SynchronousRunner}.
    """

    def __init__(self, path: str) -> None:
        self.inner = SynchronousRunner(lambda: connect(path))
        self.held: List[Tuple[Any, Tuple[Any, ...], Deferred]] = []
        self.transactions = 0

    def run(self, fn: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.held.append((fn, args, d))
        return d

    def release(self) -> None:
        fn, args, d = self.held.pop(0)
        self.transactions += 1
        self.inner.run(fn, *args).chainDeferred(d)

    def close(self) -> None:
        self.inner.close()


class GroupedStateTests(TestCase):
    """Connection states set while a group is being written go together in the next transaction."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="tunnelkit-store-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, DATABASE_NAME)
        setup = Blocking(SQLiteStore(path))
        setup.create_account("default", ACCOUNT, 0)
        for tunnel_id in ("t1", "t2"):
            source, destination = (tokens.token_hash(tokens.new_access_token(tunnel_id)) for _ in "sd")
            setup.create_tunnel(
                NewTunnel(tunnel_id, ACCOUNT, "d", "thing", ("SSH",), 10, (), source, destination, 1000.0), None
            )
        self.runner = HeldRunner(path)
        self.store = SQLiteStore(path, runner=self.runner)
        self.addCleanup(self.store.close)
        self.reader = Blocking(SQLiteStore(path))

    def states(self, tunnel_id: str) -> Tuple[str, str]:
        tunnel = self.reader.get_tunnel(ACCOUNT, tunnel_id)
        return tunnel.source.status, tunnel.destination.status

    def test_grouped_in_order(self) -> None:
        """The first state goes at once; the next three wait for it and go in one transaction, in order."""
        fired: List[int] = []
        calls = [("t1", SOURCE, True), ("t1", DESTINATION, True), ("t2", SOURCE, True), ("t1", SOURCE, False)]
        for index, (tunnel_id, side, connected) in enumerate(calls):
            self.store.set_connection_state(tunnel_id, side, connected, 1001.0 + index).addCallback(
                lambda _, index: fired.append(index), index)
        self.assertEqual(len(self.runner.held), 1)  # the rest wait for the first group
        self.runner.release()
        self.assertEqual(fired, [0])
        self.assertEqual(self.states("t1"), ("CONNECTED", "DISCONNECTED"))
        self.assertEqual(len(self.runner.held), 1)  # one transaction for the other three
        self.runner.release()
        self.assertEqual(fired, [0, 1, 2, 3])
        self.assertEqual(self.states("t1"), ("DISCONNECTED", "CONNECTED"))  # connected, then disconnected
        self.assertEqual(self.states("t2"), ("CONNECTED", "DISCONNECTED"))
        self.assertEqual((self.runner.transactions, self.runner.held), (2, []))

    def test_failed_group(self) -> None:
        """A group whose transaction fails fails each of its Deferreds; the next group is still written."""
        first = self.store.set_connection_state("t1", SOURCE, True, 1001.0)
        second = self.store.set_connection_state("t2", SOURCE, True, 1002.0)
        third = self.store.set_connection_state("t2", DESTINATION, True, 1003.0)
        refused: List[Any] = []
        for d in (second, third):
            d.addErrback(lambda f: refused.append((f.trap(sqlite3.Error), str(f.value))))
        self.runner.release()
        self.runner.inner.run(lambda db: db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON tunnels BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        self.runner.release()
        self.assertEqual(refused, [(sqlite3.Error, "refused")] * 2)
        self.runner.inner.run(lambda db: db.execute("DROP TRIGGER refuse"))
        fourth = self.store.set_connection_state("t2", SOURCE, True, 1004.0)
        self.runner.release()
        self.assertIsNone(self.successResultOf(fourth))
        self.assertIsNone(self.successResultOf(first))
        self.assertEqual(self.states("t2"), ("CONNECTED", "DISCONNECTED"))

    def test_closed_while_waiting(self) -> None:
        """States waiting when the store closes are dropped quietly (the next start resets them all)."""
        self.store.set_connection_state("t1", SOURCE, True, 1001.0)
        waiting = self.store.set_connection_state("t2", SOURCE, True, 1002.0)
        self.store._closed = True  # as close() does, with the first group still in the runner
        self.runner.release()
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(self.runner.held, [])


class LifecycleQueryTests(StoreTestCase):
    def test_expire_due(self) -> None:
        self.open("t1", minutes=1)
        self.open("t2", minutes=2)
        self.assertEqual(self.store.expire_due(1059.0), [])
        self.assertEqual(self.store.expire_due(1100.0), ["t1"])
        self.assertEqual(self.store.expire_due(1100.0), [])
        tunnel = self.store.get_tunnel(ACCOUNT, "t1")
        assert tunnel is not None
        self.assertEqual((tunnel.status, tunnel.closed_at), ("CLOSED", 1060.0))
        self.assertEqual(self.store.open_deadlines(), [("t2", 1120.0)])

    def test_purge(self) -> None:
        source, _ = self.open("t1")
        self.open("t2")
        self.store.close_tunnel(ACCOUNT, "t1", 2000.0)
        self.assertEqual(self.store.purge_closed(2000.0), 0)
        self.assertEqual(self.store.purge_closed(2000.5), 1)
        self.assertIsNone(self.store.get_tunnel(ACCOUNT, "t1"))
        self.assertIsNotNone(self.store.get_tunnel(ACCOUNT, "t2"))
        self.assertEqual(self.store._db.execute("SELECT COUNT(*) FROM tokens WHERE tunnel_id='t1'").fetchone()[0], 0)
        self.assertEqual(self.store._db.execute("SELECT COUNT(*) FROM tags WHERE tunnel_id='t1'").fetchone()[0], 0)

    def test_quota_atomic(self) -> None:
        self.open("t1", max_open=2)
        self.open("t2", max_open=2)
        created = self.store.create_tunnel(
            NewTunnel("t3", ACCOUNT, None, None, None, 1, (), "1" * 64, "2" * 64, 0.0), 2
        )
        self.assertFalse(created)
        self.assertIsNone(self.store.get_tunnel(ACCOUNT, "t3"))
        self.assertEqual(self.store.count_open_tunnels(ACCOUNT), 2)
        self.assertEqual(self.store.count_open_tunnels(OTHER), 0)


class AccountTests(StoreTestCase):
    def test_accounts(self) -> None:
        self.assertEqual([a.name for a in self.store.list_accounts()], ["default", "other"])
        self.assertEqual(self.store.get_account("other").account_id, OTHER)
        self.assertEqual(self.store.get_account(OTHER).name, "other")
        self.assertRaises(AccountExists, self.store.create_account, "other", "333333333333", 0)
        self.assertRaises(AccountExists, self.store.create_account, "third", OTHER, 0)
        self.assertRaises(NoSuchAccount, self.store.get_account, "nobody")

    def test_keys(self) -> None:
        key = AccessKey("TKIAAAAAAAAAAAAAAAAA", ACCOUNT, "secret", 1.0)
        self.store.add_access_key(key)
        self.assertEqual(self.store.get_access_key(key.access_key_id), key)
        revoked = self.store.revoke_access_key(key.access_key_id, 5.0)
        self.assertEqual(revoked.revoked_at, 5.0)
        self.assertEqual(self.store.revoke_access_key(key.access_key_id, 9.0).revoked_at, 5.0)
        self.assertEqual(self.store.list_access_keys(), [revoked])
        self.assertRaises(NoSuchKey, self.store.revoke_access_key, "TKIANOPE", 1.0)
        self.assertRaises(NoSuchAccount, self.store.add_access_key, AccessKey("TKIAB", "999999999999", "s", 1.0))


class DurabilityTests(StoreTestCase):
    def test_reopen(self) -> None:
        """Everything committed is there for a second connection (another process, or after a restart)."""
        source, _ = self.open()
        self.store.claim_peer(source, SOURCE, CLIENT_A, 1001.0)
        other = Blocking(SQLiteStore(os.path.join(self.dir, DATABASE_NAME)))
        self.addCleanup(other.close)
        self.assertEqual(other.get_tunnel(ACCOUNT, "t1"), self.store.get_tunnel(ACCOUNT, "t1"))
        self.assertRaises(TokenRejected, other.claim_peer, source, SOURCE, CLIENT_B, 1002.0)
        other.claim_peer(source, SOURCE, CLIENT_A, 1002.0)

    def test_failed_transaction_rolls_back(self) -> None:
        """A failing write leaves nothing behind (the tunnel and its tags and tokens are one transaction)."""
        self.open("t1")
        self.assertRaises(
            sqlite3.IntegrityError,
            self.store.create_tunnel,
            NewTunnel("t2", ACCOUNT, None, None, None, 1, (("a", "1"), ("a", "2")), "3" * 64, "4" * 64, 0.0),
            None,
        )
        self.assertIsNone(self.store.get_tunnel(ACCOUNT, "t2"))
        self.assertFalse(self.store._db.in_transaction)


class CountTests(StoreTestCase):
    def test_count_by_status(self) -> None:
        """The data plane's tunnels gauge counts every account's tunnels by status."""
        from tunnelkit.service.metrics import ITunnelCounts

        self.assertTrue(verifyObject(ITunnelCounts, self.store))
        self.assertEqual(self.store.count_tunnels_by_status(), {"OPEN": 0, "CLOSED": 0})
        self.open("t1")
        self.open("t2", account=OTHER)
        self.store.close_tunnel(ACCOUNT, "t1", 1001.0)
        self.assertEqual(self.store.count_tunnels_by_status(), {"OPEN": 1, "CLOSED": 1})


class ResetTests(StoreTestCase):
    def test_reset_connection_states(self) -> None:
        """After a restart no peer is connected: every CONNECTED side becomes DISCONNECTED."""
        self.open("t1")
        self.open("t2")
        self.store.set_connection_state("t1", SOURCE, True, 1001.0)
        self.store.set_connection_state("t1", DESTINATION, True, 1001.0)
        self.assertEqual(self.store.reset_connection_states(1100.0), 2)
        tunnel = self.store.get_tunnel(ACCOUNT, "t1")
        assert tunnel is not None
        self.assertEqual((tunnel.source.status, tunnel.source.last_updated_at), ("DISCONNECTED", 1100.0))
        self.assertEqual(tunnel.destination.status, "DISCONNECTED")
        self.assertEqual(self.store.get_tunnel(ACCOUNT, "t2").source.last_updated_at, 1000.0)  # type: ignore[union-attr]

    def test_after_close(self) -> None:
        """A disconnection reported while the service stops (store closed) is dropped quietly."""
        self.open("t1")
        self.store.close()
        self.store.set_connection_state("t1", SOURCE, False, 1001.0)


class _InMemory:
    """The contract on a private in-memory database (what L{tunnelkit.testing.MemoryTunnelStore} runs on)."""

    def make_store(self, directory: str) -> IControlStore:
        return SQLiteStore(MEMORY)


#: The store contract's test classes, run again on every other store (in memory here; PostgreSQL in
#: tests/e2e/test_store_postgres.py).
CONTRACT = (
    "InterfaceTests",
    "ClaimPeerTests",
    "ConnectionStateTests",
    "LifecycleQueryTests",
    "AccountTests",
    "CountTests",
    "ResetTests",
)
for _name in CONTRACT:
    globals()["InMemory" + _name] = type("InMemory" + _name, (_InMemory, globals()[_name]), {"__module__": __name__})
del _name


class InMemoryOnlyTests(TestCase):
    """An in-memory database leaves no file and has one connection, on the synchronous runner."""

    def test_no_file(self) -> None:
        cwd = os.getcwd()
        before = set(os.listdir(cwd))
        store = SQLiteStore(MEMORY)
        self.addCleanup(store.close)
        self.assertEqual(store.applied, [(2, "created the tables (schema version 2)")])
        self.assertEqual(set(os.listdir(cwd)), before)
        self.assertRaises(StoreError, store.connect)

    def test_no_threaded_runner(self) -> None:
        from tunnelkit.service.dbrunner import SynchronousRunner

        error = self.assertRaises(StoreError, SQLiteStore, MEMORY, runner=SynchronousRunner(lambda: None))
        self.assertIn("SynchronousRunner only", str(error))
