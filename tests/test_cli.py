"""
Tests for the C{tunnelkit} command (L{tunnelkit.cli}): shorthand parsing, the admin commands on a state
directory, and the API commands against an in-process service over real HTTPS.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import sys
from typing import Any, Tuple

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e.test_service_inprocess import boto3_client, endpoint_url, start_service
from tunnelkit import cli
from tunnelkit.service.store_sqlite import open_store


def run(*argv: str) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        status = cli.main(list(argv), out=out, err=err)
    except SystemExit as e:  # argparse usage errors
        status = int(e.code or 0)
    return status, out.getvalue(), err.getvalue()


class ShorthandTests(TestCase):
    def test_destination_config(self) -> None:
        self.assertEqual(
            cli.parse_structure("thingName=dev1,services=SSH,HTTP", "--destination-config", lists=("services",)),
            {"thingName": "dev1", "services": ["SSH", "HTTP"]},
        )
        self.assertEqual(
            cli.parse_structure("services=SSH", "--destination-config", lists=("services",)), {"services": ["SSH"]}
        )
        self.assertEqual(
            cli.parse_structure('{"thingName": "x", "services": ["A"]}', "--destination-config"),
            {"thingName": "x", "services": ["A"]},
        )

    def test_timeout_config(self) -> None:
        self.assertEqual(
            cli.parse_structure("maxLifetimeTimeoutMinutes=5", "--timeout-config", integers=("maxLifetimeTimeoutMinutes",)),
            {"maxLifetimeTimeoutMinutes": 5},
        )
        error = self.assertRaises(
            cli.CliError, cli.parse_structure, "maxLifetimeTimeoutMinutes=x", "--timeout-config",
            integers=("maxLifetimeTimeoutMinutes",),
        )
        self.assertIn("whole number", str(error))

    def test_errors(self) -> None:
        for text in ("nothing", "=x", "a=1,a=2", "{bad json"):
            error = self.assertRaises(cli.CliError, cli.parse_structure, text, "--destination-config")
            self.assertIn("--destination-config", str(error))

    def test_tags(self) -> None:
        self.assertEqual(
            cli.parse_tags(["key=a,value=1", "Key=b,Value=2", "key=c"]),
            [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}, {"key": "c", "value": ""}],
        )
        self.assertEqual(cli.parse_tags(['[{"key": "a", "value": "b"}]']), [{"key": "a", "value": "b"}])
        self.assertRaises(cli.CliError, cli.parse_tags, ["name=a"])

    def test_file_values(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('{"services": ["SSH"]}')
        self.assertEqual(cli.parse_structure(f"file://{path}", "--destination-config"), {"services": ["SSH"]})
        self.assertRaises(cli.CliError, cli.parse_structure, "file:///nonexistent/x", "--x")


class TokenFileTests(TestCase):
    def test_token_kept_in_output_when_its_file_cannot_be_written(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        args = cli.build_parser().parse_args(["open-tunnel", "--source-token-file", directory])
        response = {"tunnelId": "t", "sourceAccessToken": "tok"}
        problems = cli._divert_tokens(args, response)
        self.assertEqual(response["sourceAccessToken"], "tok")
        self.assertEqual(len(problems), 1)
        self.assertIn("the token is in the output instead", problems[0])


class AdminTests(TestCase):
    def setUp(self) -> None:
        self.state = self.mktemp()
        os.makedirs(self.state)
        store = open_store(self.state)
        store.close()

    def admin(self, *argv: str) -> Any:
        status, out, err = run("admin", *argv, "--state-dir", self.state)
        self.assertEqual(status, 0, err)
        return json.loads(out)

    def test_accounts_and_keys(self) -> None:
        account = self.admin("create-account", "acme", "--account-id", "123456789012")["Account"]
        self.assertEqual((account["AccountId"], account["Name"]), ("123456789012", "acme"))
        credentials = os.path.join(self.state, "acme-credentials")
        key = self.admin("create-key", "acme", "--credentials-file", credentials, "--profile", "acme")["AccessKey"]
        self.assertEqual(key["AccountId"], "123456789012")
        self.assertEqual(key["Status"], "Active")
        with open(credentials) as f:
            text = f.read()
        self.assertIn("[acme]", text)
        self.assertIn(key["SecretAccessKey"], text)
        self.assertEqual(stat.S_IMODE(os.stat(credentials).st_mode), 0o600)
        by_id = self.admin("create-key", "123456789012")["AccessKey"]
        listed = self.admin("list-keys")["AccessKeys"]
        self.assertEqual([k["AccessKeyId"] for k in listed], [key["AccessKeyId"], by_id["AccessKeyId"]])
        self.assertNotIn("SecretAccessKey", json.dumps(listed))
        revoked = self.admin("revoke-key", key["AccessKeyId"])
        self.assertEqual(revoked["Status"], "Revoked")
        self.assertEqual([k["Status"] for k in self.admin("list-keys")["AccessKeys"]], ["Revoked", "Active"])
        self.assertEqual([a["Name"] for a in self.admin("list-accounts")["Accounts"]], ["acme"])

    def test_errors(self) -> None:
        self.admin("create-account", "acme")
        status, _, err = run("admin", "create-account", "acme", "--state-dir", self.state)
        self.assertEqual(status, 1)
        self.assertIn("exists already", err)
        status, _, err = run("admin", "create-key", "nobody", "--state-dir", self.state)
        self.assertEqual(status, 1)
        self.assertIn("nobody", err)
        status, _, err = run("admin", "revoke-key", "TKIANOPE", "--state-dir", self.state)
        self.assertEqual(status, 1)
        self.assertIn("TKIANOPE", err)
        status, _, err = run("admin", "create-account", "x", "--account-id", "12", "--state-dir", self.state)
        self.assertEqual(status, 2)
        status, _, err = run("admin", "list-keys", "--state-dir", os.path.join(self.state, "missing"))
        self.assertEqual(status, 1)
        self.assertIn("no state directory", err)

    def test_usage(self) -> None:
        self.assertEqual(run()[0], 2)
        self.assertEqual(run("open-tunnel", "--bogus")[0], 2)
        self.assertEqual(run("rotate-tunnel-access-token", "--tunnel-id", "x", "--client-mode", "BOTH")[0], 2)
        status, out, _ = run("--version")
        self.assertEqual(status, 0)

    def test_help_documents_exit_status(self) -> None:
        for argv in (["--help"], ["open-tunnel", "--help"]):
            printed = io.StringIO()
            self.patch(sys, "stdout", printed)  # argparse prints help there
            status, _, _ = run(*argv)
            self.assertEqual(status, 0)
            self.assertIn("Exit status: 0 on success, 2 for a usage error, 255", printed.getvalue())


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
