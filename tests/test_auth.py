"""
Tests for L{tunnelkit.service.auth}: SigV4 verification of real botocore signatures, the 403 error types,
and the accounts' keys and credentials file.
"""

from __future__ import annotations

import configparser
import os
import stat
import json
from typing import Any, Optional

from botocore.exceptions import ClientError
from twisted.logger import globalLogPublisher

from tests.test_api_helpers import REGION, ServiceTestCase
from tunnelkit.service import auth
from tunnelkit.service.dbrunner import Blocking
from tunnelkit.service.store_sqlite import open_store

TARGET = "IoTSecuredTunneling.ListTunnels"


class RejectedTests(ServiceTestCase):
    """Requests that are not correctly signed get 403 and change nothing."""

    def assertRejected(self, raw: bytes, error_type: str, text: str = "") -> None:
        before = self.service.store.count_open_tunnels(self.service.account.account_id)
        status, headers, body, _ = self.service.exchange(raw)
        import json

        error = json.loads(body)
        self.assertEqual((status, error["__type"]), (403, error_type), error)
        self.assertEqual(headers["x-amzn-errortype"], error_type)
        self.assertIn(text, error["message"])
        self.assertEqual(self.service.store.count_open_tunnels(self.service.account.account_id), before)

    def open_request(self, **kwargs: Any) -> bytes:
        return self.service.signed("IoTSecuredTunneling.OpenTunnel", b"{}", **kwargs)

    def test_good_signature(self) -> None:
        status, _, _, _ = self.service.exchange(self.open_request())
        self.assertEqual(status, 200)
        self.assertEqual(self.service.store.count_open_tunnels(self.service.account.account_id), 1)

    def test_unsigned(self) -> None:
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: IoTSecuredTunneling.OpenTunnel\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        )

    def test_wrong_secret(self) -> None:
        key = self.service.key
        wrong = auth.AccessKey(key.access_key_id, key.account_id, "x" * 40, key.created_at)
        self.assertRejected(self.open_request(key=wrong), "InvalidSignatureException", "does not match")

    def test_wrong_secret_botocore(self) -> None:
        """Through botocore: a ClientError with HTTP 403."""
        client = self.service.client(secret="not the secret")
        with self.assertRaises(ClientError) as raised:
            client.open_tunnel()
        self.assertEqual(raised.exception.response["ResponseMetadata"]["HTTPStatusCode"], 403)
        self.assertEqual(raised.exception.response["Error"]["Code"], "InvalidSignatureException")
        self.assertEqual(self.service.store.count_open_tunnels(self.service.account.account_id), 0)

    def test_refusal_logged_with_the_operation(self) -> None:
        """The service's log names the operation a wrongly signed request asked for."""
        logged: list = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        with self.assertRaises(ClientError):
            self.service.client(secret="not the secret").list_tunnels()
        (event,) = [e for e in logged if e.get("log_format", "").startswith("API {operation} refused")]
        self.assertEqual((event["operation"], event["error_type"]), ("ListTunnels", "InvalidSignatureException"))

    def test_unknown_key(self) -> None:
        unknown = auth.AccessKey("TKIAAAAAAAAAAAAAAAAA", "1", "secret", 0)
        self.assertRejected(self.open_request(key=unknown), "UnrecognizedClientException", "security token")

    def test_revoked_key(self) -> None:
        self.service.store.revoke_access_key(self.service.key.access_key_id, self.clock.seconds())
        self.assertRejected(self.open_request(), "UnrecognizedClientException")

    def test_tampered_body(self) -> None:
        raw = self.service.signed("IoTSecuredTunneling.OpenTunnel", b'{"description": "aaaa"}')
        self.assertRejected(raw.replace(b"aaaa", b"bbbb"), "InvalidSignatureException")

    def test_tampered_target(self) -> None:
        raw = self.open_request()
        self.assertRejected(raw.replace(b"OpenTunnel", b"ListTunnels"), "InvalidSignatureException")

    def test_content_sha256_mismatch(self) -> None:
        raw = self.service.signed(
            "IoTSecuredTunneling.OpenTunnel", b"{}", extra_headers=[("X-Amz-Content-SHA256", "0" * 64)]
        )
        self.assertRejected(raw, "InvalidSignatureException", "x-amz-content-sha256")

    def test_content_sha256_matching(self) -> None:
        import hashlib

        raw = self.service.signed(
            "IoTSecuredTunneling.OpenTunnel", b"{}", extra_headers=[("X-Amz-Content-SHA256", hashlib.sha256(b"{}").hexdigest())]
        )
        self.assertEqual(self.service.exchange(raw)[0], 200)

    def test_wrong_region(self) -> None:
        self.assertRejected(self.open_request(region="eu-west-1"), "InvalidSignatureException", "eu-west-1")

    def test_wrong_service(self) -> None:
        self.assertRejected(self.open_request(service="iot"), "InvalidSignatureException", "IoTSecuredTunneling")

    def test_clock_skew(self) -> None:
        """Signatures over 15 minutes old or ahead are refused; within 15 minutes they pass."""
        raw = self.open_request()
        self.clock.advance(15 * 60 + 1)
        self.assertRejected(raw, "InvalidSignatureException", "Signature expired")
        self.clock.advance(-(15 * 60 + 1) * 2)
        self.assertRejected(raw, "InvalidSignatureException", "not yet current")
        self.clock.advance(15 * 60 + 1 + 14 * 60)
        self.assertEqual(self.service.exchange(raw)[0], 200)

    def test_session_token(self) -> None:
        raw = self.service.signed(
            "IoTSecuredTunneling.OpenTunnel", b"{}", extra_headers=[("X-Amz-Security-Token", "abc")]
        )
        self.assertRejected(raw, "UnrecognizedClientException")

    def test_malformed_authorization(self) -> None:
        base = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Date: 20270115T080000Z\r\nContent-Length: 2\r\n"
        for value, text in (
            (b"Basic dXNlcjpwYXNz", "Unsupported authorization type"),
            (b"AWS4-HMAC-SHA256 Credential=a/b/c/d/e", "SignedHeaders"),
            (b"AWS4-HMAC-SHA256 Credential=abc, SignedHeaders=host, Signature=00", "Credential must have the form"),
            (b"AWS4-HMAC-SHA256 garbage", "malformed"),
        ):
            self.assertRejected(base + b"Authorization: " + value + b"\r\n\r\n{}", "IncompleteSignatureException", text)

    def test_host_must_be_signed(self) -> None:
        raw = self.open_request()
        self.assertRejected(raw.replace(b"SignedHeaders=content-type;host;", b"SignedHeaders=content-type;"), "InvalidSignatureException", "host")

    def unsigned_target(self, signed_target: Optional[str], sent_target: str, body: bytes) -> bytes:
        """A request signed for C{signed_target} (None: no X-Amz-Target at signing), sent as C{sent_target}."""
        raw = self.service.signed(signed_target, body)
        head, _, rest = raw.partition(b"\r\n")
        lines = [line for line in rest.split(b"\r\n") if not line.lower().startswith(b"x-amz-target:")]
        return head + b"\r\nX-Amz-Target: " + sent_target.encode() + b"\r\n" + b"\r\n".join(lines)

    def test_target_must_be_signed(self) -> None:
        """A request whose X-Amz-Target is not signed cannot be replayed as another operation."""
        client = self.service.client()
        tunnel_id = client.open_tunnel()["tunnelId"]
        body = json.dumps({"tunnelId": tunnel_id}).encode()
        replay = self.unsigned_target(None, "IoTSecuredTunneling.CloseTunnel", body)
        self.assertRejected(replay, "InvalidSignatureException", "X-Amz-Target header must be signed")
        self.assertEqual(client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]["status"], "OPEN")

    def test_content_type_must_be_signed(self) -> None:
        raw = self.open_request()
        unsigned = raw.replace(b"SignedHeaders=content-type;", b"SignedHeaders=")
        self.assertRejected(unsigned, "InvalidSignatureException", "Content-Type header must be signed")

    def test_auth_before_operation(self) -> None:
        """An unsigned request for an unknown operation is refused for its signature first."""
        self.assertRejected(
            b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: Nope\r\nContent-Length: 2\r\n\r\n{}",
            "MissingAuthenticationTokenException",
        )


class CredentialsTests(ServiceTestCase):
    def test_initial_credentials(self) -> None:
        """The first start writes one key to <state>/credentials, private, profile default."""
        path = os.path.join(self.state_dir, "credentials")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        parser = configparser.RawConfigParser()
        parser.read(path)
        self.assertEqual(parser.get("default", "aws_access_key_id"), self.service.key.access_key_id)
        self.assertEqual(parser.get("default", "aws_secret_access_key"), self.service.key.secret_access_key)
        self.assertRegex(self.service.key.access_key_id, r"^TKIA[A-Z2-7]{16}$")
        self.assertEqual(len(self.service.key.secret_access_key), 40)
        self.assertEqual(self.service.account.name, "default")
        self.assertRegex(self.service.account.account_id, r"^[1-9][0-9]{11}$")

    def test_not_twice(self) -> None:
        """A later start with a usable key creates none."""
        real = open_store(self.state_dir)
        self.addCleanup(real.close)
        store = Blocking(real)
        account, created = auth.ensure_initial_credentials(real, self.state_dir, None, 0)
        self.assertIsNone(created)
        self.assertEqual(account, self.service.account)
        self.assertEqual(len(store.list_access_keys()), 1)

    def test_after_all_revoked(self) -> None:
        """When every key is revoked, the next start creates a new one (the operator is not locked out)."""
        real = open_store(self.state_dir)
        self.addCleanup(real.close)
        Blocking(real).revoke_access_key(self.service.key.access_key_id, 0)
        _, created = auth.ensure_initial_credentials(real, self.state_dir, None, 0)
        self.assertIsNotNone(created)
        parser = configparser.RawConfigParser()
        parser.read(os.path.join(self.state_dir, "credentials"))
        self.assertEqual(parser.get("default", "aws_access_key_id"), created.access_key_id)

    def test_write_keeps_other_profiles(self) -> None:
        path = os.path.join(self.state_dir, "other-credentials")
        key_a = auth.AccessKey("TKIAAAAAAAAAAAAAAAAA", "1", "sa", 0)
        key_b = auth.AccessKey("TKIABBBBBBBBBBBBBBBB", "1", "sb", 0)
        auth.write_credentials_file(path, key_a, "a")
        auth.write_credentials_file(path, key_b, "b")
        parser = configparser.RawConfigParser()
        parser.read(path)
        self.assertEqual(parser.get("a", "aws_access_key_id"), "TKIAAAAAAAAAAAAAAAAA")
        self.assertEqual(parser.get("b", "aws_secret_access_key"), "sb")

    def test_account_id_option(self) -> None:
        """--account-id names the default account at its creation."""
        state = os.path.join(self.state_dir, "fresh")
        store = open_store(state)
        self.addCleanup(store.close)
        account, _ = auth.ensure_initial_credentials(store, state, "123456789012", 0)
        self.assertEqual(account.account_id, "123456789012")
        self.assertRaises(ValueError, auth.check_account_id, "12345")

    def test_region_in_scope(self) -> None:
        """The verifier's region is the service's."""
        self.assertEqual(REGION, "us-east-1")
        self.assertEqual(self.service.client().list_tunnels()["tunnelSummaries"], [])
        with self.assertRaises(ClientError):
            self.service.client(region="us-west-2").list_tunnels()
