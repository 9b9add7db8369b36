"""
Tests for L{tunnelkit.testing.MemoryTunnelStore}: the shipped harness's store is the service's SQLite
store (its SQL, its token rules) on an in-memory database, and answers at once.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tunnelkit.service.interfaces import DESTINATION, SOURCE, ITunnelStore, PeerGrant, TokenRejected
from tunnelkit.service.metrics import ITunnelCounts
from tunnelkit.service.store import IControlStore, StoreError
from tunnelkit.service.store_sqlite import SQLiteStore
from tunnelkit.testing import MemoryTunnelStore

CLIENT = "c" * 32


class MemoryTunnelStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryTunnelStore(self.clock)
        self.addCleanup(self.store.close)

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(ITunnelStore, self.store))
        self.assertTrue(verifyObject(ITunnelCounts, self.store))
        self.assertIsInstance(self.store.control, SQLiteStore)
        self.assertTrue(verifyObject(IControlStore, self.store.control))

    def test_fired_on_return(self) -> None:
        tunnel = self.store.open_tunnel(["SSH"])
        grant = self.successResultOf(self.store.claim_peer(tunnel.source_token, SOURCE, None, 1001.0))
        self.assertEqual(grant, PeerGrant(tunnel.tunnel_id, "123456789012", SOURCE, ("SSH",), 1000.0 + 720 * 60, 0))
        failure = self.failureResultOf(self.store.claim_peer(tunnel.source_token, SOURCE, None, 1002.0), TokenRejected)
        self.assertEqual(failure.value.reason, "token-used")
        self.assertIsNone(self.successResultOf(self.store.set_connection_state(tunnel.tunnel_id, SOURCE, True, 1003.0)))
        self.assertEqual(self.successResultOf(self.store.count_tunnels_by_status()), {"OPEN": 1, "CLOSED": 0})

    def test_opened_through_the_control_store(self) -> None:
        """open_tunnel makes the account and the tunnel with IControlStore's methods."""
        tunnel = self.store.open_tunnel(["SSH", "VNC"], lifetime_minutes=5, account_id="210987654321")
        account = self.successResultOf(self.store.control.get_account("210987654321"))
        self.assertEqual(account.account_id, "210987654321")
        stored = self.successResultOf(self.store.control.get_tunnel("210987654321", tunnel.tunnel_id))
        assert stored is not None
        self.assertEqual((stored.status, stored.services, stored.expires_at), ("OPEN", ("SSH", "VNC"), 1300.0))
        self.store.open_tunnel(account_id="210987654321")  # the account is made once

    def test_close(self) -> None:
        tunnel = self.store.open_tunnel(["SSH"])
        self.store.set_connection_state(tunnel.tunnel_id, DESTINATION, True, 1001.0)
        self.clock.advance(5)
        self.store.close_tunnel(tunnel.tunnel_id)
        failure = self.failureResultOf(self.store.claim_peer(tunnel.source_token, SOURCE, None, 1006.0), TokenRejected)
        self.assertEqual(failure.value.reason, "tunnel-closed")
        # The service's rules: closing disconnects both sides, and a late CONNECTED is not recorded.
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, DESTINATION), (False, 1005.0))
        self.store.set_connection_state(tunnel.tunnel_id, SOURCE, True, 1007.0)
        self.assertEqual(self.store.connection_state(tunnel.tunnel_id, SOURCE), (False, 1000.0))
        self.assertEqual([c for (_, _, c, _) in self.store.state_changes], [True, True])  # what was told
        self.assertEqual(self.successResultOf(self.store.count_tunnels_by_status()), {"OPEN": 0, "CLOSED": 1})

    def test_rotate(self) -> None:
        tunnel = self.store.open_tunnel(["SSH"])
        fresh = self.store.rotate(tunnel.tunnel_id, DESTINATION, services=["SSH", "VNC"])
        failure = self.failureResultOf(
            self.store.claim_peer(tunnel.destination_token, DESTINATION, None, 1001.0), TokenRejected
        )
        self.assertEqual(failure.value.reason, "token-rotated")
        grant = self.successResultOf(self.store.claim_peer(fresh, DESTINATION, None, 1001.0))
        self.assertEqual((grant.token_generation, grant.services), (1, ("SSH", "VNC")))
        self.store.close_tunnel(tunnel.tunnel_id)
        self.assertRaises(StoreError, self.store.rotate, tunnel.tunnel_id, SOURCE)
        self.assertRaises(StoreError, self.store.close_tunnel, "not-opened-here")

    def test_client_token_per_account(self) -> None:
        """The client-token-taken query is the service's: per account, over OPEN tunnels."""
        one = self.store.open_tunnel()
        two = self.store.open_tunnel()
        other = self.store.open_tunnel(account_id="210987654321")
        self.successResultOf(self.store.claim_peer(one.source_token, SOURCE, CLIENT, 1001.0))
        failure = self.failureResultOf(self.store.claim_peer(two.source_token, SOURCE, CLIENT, 1001.0), TokenRejected)
        self.assertEqual(failure.value.reason, "client-token-in-use")
        self.successResultOf(self.store.claim_peer(other.source_token, SOURCE, CLIENT, 1001.0))
        self.successResultOf(self.store.claim_peer(one.source_token, SOURCE, CLIENT, 1002.0))  # its reconnection

    def test_default_clock(self) -> None:
        store = MemoryTunnelStore()
        self.addCleanup(store.close)
        tunnel = store.open_tunnel()
        self.assertEqual(store.connection_state(tunnel.tunnel_id, SOURCE), (False, 0.0))
