"""
The C{tunnelkit} command's API commands (L{tunnelkit.cli}) against a whole service started in-process
on the real reactor, over real HTTPS (the shorthand parsing and the admin commands on a state
directory are unit-tested in tests/test_cli.py).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Any, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e.test_service_inprocess import boto3_client, endpoint_url, start_service
from tests.test_cli import run


class ApiCommandTests(TestCase):
    """The API commands against a real service over HTTPS, defaults from its state directory."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.service = yield start_service(self)
        self.common = ["--state-dir", self.service.state_dir, "--endpoint-url", endpoint_url(self.service)]

    def cli(self, *argv: str) -> Any:
        return deferToThread(run, *argv, *self.common)

    @inlineCallbacks
    def test_tutorial(self) -> Any:
        """open-tunnel, rotate DESTINATION with a destination config, close-tunnel, close-tunnel --delete."""
        status, out, err = yield self.cli(
            "open-tunnel", "--description", "demo", "--destination-config", "thingName=RemoteDeviceA,services=SSH",
            "--timeout-config", "maxLifetimeTimeoutMinutes=30", "--tags", "key=team,value=ops",
        )
        self.assertEqual(status, 0, err)
        opened = json.loads(out)
        self.assertEqual(sorted(opened), ["destinationAccessToken", "sourceAccessToken", "tunnelArn", "tunnelId"])
        self.assertTrue(out.startswith('{\n    "tunnelId": '))
        tunnel_id = opened["tunnelId"]

        status, out, err = yield self.cli("describe-tunnel", "--tunnel-id", tunnel_id)
        tunnel = json.loads(out)["tunnel"]
        self.assertEqual(tunnel["tags"], [{"key": "team", "value": "ops"}])
        self.assertEqual(tunnel["timeoutConfig"], {"maxLifetimeTimeoutMinutes": 30})
        self.assertIsInstance(tunnel["createdAt"], float)

        status, out, err = yield self.cli(
            "rotate-tunnel-access-token", "--tunnel-id", tunnel_id, "--client-mode", "DESTINATION",
            "--destination-config", "thingName=RemoteDeviceA,services=SSH",
        )
        self.assertEqual(status, 0, err)
        self.assertEqual(sorted(json.loads(out)), ["destinationAccessToken", "tunnelArn"])

        status, out, err = yield self.cli("close-tunnel", "--tunnel-id", tunnel_id)
        self.assertEqual((status, out), (0, ""))
        status, out, err = yield self.cli("list-tunnels")
        self.assertEqual([s["status"] for s in json.loads(out)["tunnelSummaries"]], ["CLOSED"])
        status, out, err = yield self.cli("close-tunnel", "--tunnel-id", tunnel_id, "--delete")
        self.assertEqual((status, out), (0, ""))
        status, out, err = yield self.cli("describe-tunnel", "--tunnel-id", tunnel_id)
        self.assertEqual(status, 255)
        self.assertIn(
            "An error occurred (ResourceNotFoundException) when calling the DescribeTunnel operation", err
        )

    @inlineCallbacks
    def test_unwritable_token_file_refused_before_opening(self) -> Any:
        """A token file that cannot be written is refused before the tunnel is opened (no lost tokens)."""
        missing = os.path.join(self.service.state_dir, "no-such-dir", "src.token")
        for path, expected in ((missing, "no directory"), (self.service.state_dir, "is a directory")):
            status, out, err = yield self.cli("open-tunnel", "--source-token-file", path)
            self.assertEqual(status, 2)
            self.assertIn(f"--source-token-file {path}: {expected}", err)
        status, out, err = yield self.cli("list-tunnels")
        self.assertEqual(json.loads(out), {"tunnelSummaries": []})

    @inlineCallbacks
    def test_token_files(self) -> Any:
        """--source-token-file/--destination-token-file write the tokens (0600), not the output."""
        source = os.path.join(self.service.state_dir, "source.token")
        destination = os.path.join(self.service.state_dir, "destination.token")
        status, out, err = yield self.cli(
            "open-tunnel", "--source-token-file", source, "--destination-token-file", destination
        )
        self.assertEqual(status, 0, err)
        opened = json.loads(out)
        self.assertEqual(sorted(opened), ["tunnelArn", "tunnelId"])
        for path in (source, destination):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(source) as f:
            token = f.read().strip()
        grant = yield self.service.store.claim_peer(token, "source", None, self.service.control.clock.seconds())
        self.assertEqual(grant.tunnel_id, opened["tunnelId"])
        status, out, err = yield self.cli(
            "rotate-tunnel-access-token", "--tunnel-id", opened["tunnelId"], "--client-mode", "SOURCE",
            "--source-token-file", source,
        )
        self.assertEqual(sorted(json.loads(out)), ["tunnelArn"])
        with open(source) as f:
            self.assertNotEqual(f.read().strip(), token)

    @inlineCallbacks
    def test_list_pages(self) -> Any:
        """list-tunnels prints one page, as the AWS CLI does (no paginator exists for it)."""

        key_id, secret = yield self.key()

        def open_many() -> None:
            api = boto3_client(self.service, aws_access_key_id=key_id, aws_secret_access_key=secret)
            for _ in range(103):
                api.open_tunnel()
            api.close()

        yield deferToThread(open_many)
        status, out, err = yield self.cli("list-tunnels")
        first = json.loads(out)
        self.assertEqual(len(first["tunnelSummaries"]), 100)
        status, out, err = yield self.cli("list-tunnels", "--next-token", first["nextToken"])
        self.assertEqual(len(json.loads(out)["tunnelSummaries"]), 3)
        self.assertNotIn("nextToken", json.loads(out))
        status, out, err = yield self.cli("list-tunnels", "--max-results", "2")
        self.assertEqual(len(json.loads(out)["tunnelSummaries"]), 2)
        self.assertIn("nextToken", json.loads(out))

    def key(self) -> "Deferred[Tuple[str, str]]":
        return self.service.store.list_access_keys().addCallback(  # type: ignore[no-any-return]
            lambda keys: (keys[0].access_key_id, keys[0].secret_access_key)
        )

    @inlineCallbacks
    def test_errors(self) -> Any:
        """Validation errors and connection problems are one clear message with status 255."""
        status, out, err = yield self.cli("open-tunnel", "--timeout-config", "maxLifetimeTimeoutMinutes=721")
        self.assertEqual(status, 255)
        self.assertIn("ValidationException", err)
        self.assertIn("maxLifetimeTimeoutMinutes", err)
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            nobody = f"https://127.0.0.1:{unused.getsockname()[1]}"
        status, out, err = yield deferToThread(
            run, "list-tunnels", "--state-dir", self.service.state_dir, "--endpoint-url", nobody
        )
        self.assertEqual(status, 255)
        self.assertIn("is the service running?", err)
        status, out, err = yield deferToThread(run, "list-tunnels", "--state-dir", self.mktemp())
        self.assertEqual(status, 1)
        self.assertIn("no credentials file", err)
        other_ca = os.path.join(self.service.state_dir, "other")
        from tunnelkit.service.certs import ensure_certificates

        ensure_certificates(other_ca)
        status, out, err = yield self.cli("list-tunnels", "--ca-bundle", os.path.join(other_ca, "ca.pem"))
        self.assertEqual(status, 255)
        self.assertIn("--ca-bundle", err)
        host_port = endpoint_url(self.service)[len("https://") :]
        state = ["--state-dir", self.service.state_dir]
        for url in (host_port, "https://8443"):
            status, out, err = yield deferToThread(run, "list-tunnels", *state, "--endpoint-url", url)
            self.assertEqual(status, 2)
            self.assertIn("expected https://HOST[:PORT]", err)
        status, out, err = yield deferToThread(run, "list-tunnels", *state, "--endpoint-url", "http://" + host_port)
        self.assertEqual(status, 255)
        self.assertIn("use https:// in --endpoint-url", err)

    @inlineCallbacks
    def test_revoked_key(self) -> Any:
        """After 'admin revoke-key' the running service refuses that key at once (403)."""
        key_id, _ = yield self.key()
        status, out, err = yield deferToThread(run, "admin", "revoke-key", key_id, "--state-dir", self.service.state_dir)
        self.assertEqual(status, 0, err)
        status, out, err = yield self.cli("list-tunnels")
        self.assertEqual(status, 255)
        self.assertIn("UnrecognizedClientException", err)


class EnvironmentTests(TestCase):
    """The defaults from TUNNELKIT_ENDPOINT_URL, TUNNELKIT_STATE_DIR and TUNNELKIT_REGION."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.service = yield start_service(self)

    @inlineCallbacks
    def test_environment(self) -> Any:
        self.patch(os, "environ", dict(os.environ, TUNNELKIT_ENDPOINT_URL=endpoint_url(self.service),
                                       TUNNELKIT_STATE_DIR=self.service.state_dir, TUNNELKIT_REGION="us-east-1"))
        status, out, err = yield deferToThread(run, "list-tunnels")
        self.assertEqual((status, json.loads(out)), (0, {"tunnelSummaries": []}), err)
        self.patch(os, "environ", dict(os.environ, TUNNELKIT_REGION="eu-west-1"))
        status, out, err = yield deferToThread(run, "list-tunnels")
        self.assertEqual(status, 255)
        self.assertIn("eu-west-1", err)
