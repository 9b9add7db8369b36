"""
The service's front door against a real service process (issue 11): token and rate-limit cases with
real sockets on 127.0.0.0/8 (several source addresses), the request-head deadline, 431, and client
tokens kept hashed in the database file.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness, wait_until
from tunnelkit.testing import http_attempt as attempt, upgrade_request

CLIENT_TOKEN = "e2e-frontdoor-client-token-0123456789"


def upgrade(token: str, mode: str = "source", client_token: Optional[str] = None) -> bytes:
    """The reference local proxy's upgrade request (L{upgrade_request}), with C{client_token} if given."""
    return upgrade_request(mode, token, extra=[("client-token", client_token)] if client_token else [])


def wrong_secret(token: str) -> str:
    return token[:17] + ("A" if token[17] != "A" else "B") + token[18:]


class FrontDoorTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.harness = Harness(self)

    def test_flood_of_bad_secrets_does_not_lock_out_the_tunnel(self) -> None:
        service = self.harness.start_service()
        tunnel = self.harness.open_tunnel(["SSH"])
        bad = upgrade(wrong_secret(tunnel.source_token))
        statuses = [attempt(service.port, bad, "127.0.0.2")[0] for _ in range(200)]
        self.assertEqual(statuses[0], 401)
        self.assertIn(429, statuses)  # the flooding address is slowed down
        for source in ("127.0.0.1", "127.0.0.3"):  # the real peers, elsewhere: never refused
            statuses_ok = [attempt(service.port, upgrade(tunnel.source_token, client_token=CLIENT_TOKEN), source)[0]]
            self.assertEqual(statuses_ok, [101])
        self.assertEqual(attempt(service.port, upgrade(tunnel.destination_token, "destination"))[0], 101)

    def test_account_limit_does_not_spend_the_token(self) -> None:
        service = self.harness.start_service(extra=["--max-websockets-per-account", "1"])
        first = self.harness.open_tunnel()
        second = self.harness.open_tunnel()
        status, _, held = attempt(service.port, upgrade(first.source_token), keep=True)
        self.assertEqual(status, 101)
        status, head, _ = attempt(service.port, upgrade(second.destination_token, "destination"))
        self.assertEqual(status, 429)
        self.assertIn(b"token was not used", head)
        assert held is not None
        held.close()

        def admitted() -> bool:
            return attempt(service.port, upgrade(second.destination_token, "destination"))[0] == 101

        wait_until(admitted, 15, "the refused token to connect once a connection closed")

    def test_client_token_kept_hashed(self) -> None:
        service = self.harness.start_service()
        tunnel = self.harness.open_tunnel()
        request = upgrade(tunnel.source_token, client_token=CLIENT_TOKEN)
        self.assertEqual(attempt(service.port, request)[0], 101)
        self.assertEqual(attempt(service.port, request)[0], 101)  # reconnects with the same client token
        other = upgrade(tunnel.source_token, client_token=CLIENT_TOKEN[::-1])
        self.assertEqual(attempt(service.port, other)[0], 401)
        stored = b""
        for name in os.listdir(service.state_dir):
            if name.startswith("tunnelkit.sqlite3"):
                with open(os.path.join(service.state_dir, name), "rb") as f:
                    stored += f.read()
        self.assertNotIn(CLIENT_TOKEN.encode(), stored)
        self.assertNotIn(CLIENT_TOKEN, service.process.log())

    def test_idle_connection_reset_and_oversize_line(self) -> None:
        service = self.harness.start_service(extra=["--handshake-timeout", "2"])
        # Without the deadline this recv waits for the 120 s idle timeout and raises socket.timeout.
        idle = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        try:
            data = idle.recv(1)
        except ConnectionResetError:
            data = b""
        self.assertEqual(data, b"")
        idle.close()
        status, head, _ = attempt(service.port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        self.assertEqual(status, 431)
