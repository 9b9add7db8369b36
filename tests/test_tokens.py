"""
Tests for L{tunnelkit.service.tokens}: the token format and the handshake rules.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import TestCase

from tunnelkit.protocol import tokens as token_shapes
from tunnelkit.service import tokens
from tunnelkit.service.interfaces import TokenRejected

CLIENT = "c" * 32


def state(**overrides: object) -> tokens.TokenState:
    values = dict(side="source", revoked=False, used=False, bound_client_token_hash=None, tunnel_status="OPEN", expires_at=100.0)
    values.update(overrides)
    return tokens.TokenState(**values)  # type: ignore[arg-type]


class FormatTests(TestCase):
    def test_shape(self) -> None:
        """<16-char routing>.<43-char secret>, URL-safe, 256 bits of secret."""
        token = tokens.new_access_token("tunnel-1")
        self.assertEqual(len(token), tokens.TOKEN_LENGTH)
        self.assertRegex(token, r"^[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]{43}$")
        self.assertTrue(tokens.is_well_formed(token))
        self.assertEqual(tokens.SECRET_BYTES * 8, 256)

    def test_sendable(self) -> None:
        """What a client may put in its access-token header: 1-4096 characters, no control characters."""
        self.assertTrue(token_shapes.sendable_access_token(tokens.new_access_token("tunnel-1")))
        self.assertTrue(token_shapes.sendable_access_token("AQGAAXiV" * 512))
        for bad in ("", "x" * 4097, "tok\n", "tok\r\nX-Injected: 1", "\x7f"):
            self.assertFalse(token_shapes.sendable_access_token(bad), bad)

    def test_routing(self) -> None:
        """Every token of a tunnel has the same routing part; it does not reveal the tunnel id."""
        a, b = tokens.new_access_token("t-1"), tokens.new_access_token("t-1")
        self.assertNotEqual(a, b)
        self.assertEqual(tokens.routing_key(a), tokens.routing_key(b))
        self.assertEqual(tokens.routing_key(a), tokens.routing_key_for_tunnel("t-1"))
        self.assertNotEqual(tokens.routing_key_for_tunnel("t-2"), tokens.routing_key(a))
        self.assertNotIn("t-1", a)

    def test_unique(self) -> None:
        secrets = {tokens.new_access_token("t").split(".")[1] for _ in range(1000)}
        self.assertEqual(len(secrets), 1000)

    def test_malformed(self) -> None:
        for bad in ("", "abc", "a" * 60, "a" * 16 + "." + "b" * 42, "a" * 16 + "." + "b" * 43 + "\n", "a" * 16 + ".+" + "b" * 42):
            self.assertFalse(tokens.is_well_formed(bad), bad)
            self.assertIsNone(tokens.routing_key(bad))

    def test_hash(self) -> None:
        token = tokens.new_access_token("t")
        self.assertRegex(tokens.token_hash(token), r"^[0-9a-f]{64}$")
        self.assertNotIn(token.split(".")[1], tokens.token_hash(token))


class ClaimTests(TestCase):
    def assertRejected(self, reason: str, status: int, *args: object, **kwargs: object) -> TokenRejected:
        error = self.assertRaises(TokenRejected, tokens.check_claim, *args, **kwargs)
        self.assertEqual((error.reason, error.status), (reason, status))
        return error

    def test_first_use(self) -> None:
        self.assertEqual(tokens.check_claim(state(), "source", None, 1.0), tokens.Claim(True, None))
        self.assertEqual(
            tokens.check_claim(state(), "source", CLIENT, 1.0), tokens.Claim(True, tokens.client_token_hash(CLIENT))
        )

    def test_reuse_without_client_token(self) -> None:
        error = self.assertRejected("token-used", 401, state(used=True), "source", None, 1.0)
        self.assertEqual(error.text, "Invalid access token: The access token was previously used and cannot be used again")
        self.assertRejected("token-used", 401, state(used=True), "source", CLIENT, 1.0)

    def test_reconnect_with_client_token(self) -> None:
        bound = state(used=True, bound_client_token_hash=tokens.client_token_hash(CLIENT))
        self.assertEqual(tokens.check_claim(bound, "source", CLIENT, 1.0), tokens.Claim(False, None))
        error = self.assertRejected("client-token-mismatch", 401, bound, "source", "d" * 32, 1.0)
        self.assertEqual(
            error.text,
            "Invalid client token: The provided client token does not match the client token that was previously set.",
        )
        self.assertRejected("token-used", 401, bound, "source", None, 1.0)

    def test_unknown(self) -> None:
        self.assertRejected("unknown-token", 401, None, "source", None, 1.0)

    def test_rotated(self) -> None:
        self.assertRejected("token-rotated", 401, state(revoked=True), "source", None, 1.0)

    def test_closed_and_expired(self) -> None:
        error = self.assertRejected("tunnel-closed", 410, state(tunnel_status="CLOSED"), "source", None, 1.0)
        self.assertTrue(error.text.endswith("; open a new tunnel"))
        error = self.assertRejected("tunnel-expired", 410, state(), "source", None, 100.0)
        self.assertIn("maximum lifetime has elapsed; open a new tunnel", error.text)

    def test_mode(self) -> None:
        error = self.assertRejected("mode-mismatch", 403, state(), "destination", None, 1.0)
        self.assertIn("use the destination token, or run the local proxy with --mode source", error.text)
        self.assertRejected("bad-mode", 400, state(), "src", None, 1.0)

    def test_client_token_format(self) -> None:
        for bad in ("short", "x" * 129, "a" * 31 + "_", "é" * 32):
            self.assertRejected("bad-client-token", 400, state(), "source", bad, 1.0)
        self.assertTrue(re.match(token_shapes.CLIENT_TOKEN_RE, "2da438cf-9a30-4148-b236-c338182f243c"))

    def test_client_token_in_use(self) -> None:
        self.assertRejected("client-token-in-use", 403, state(), "source", CLIENT, 1.0, client_token_taken=True)
