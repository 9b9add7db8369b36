"""
Tests for the C{tunnelkit} command (L{tunnelkit.cli}): shorthand parsing and the admin commands on a
state directory (its API commands against a real service: tests/e2e/test_cli_api.py).
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from typing import Any, Tuple

from twisted.trial.unittest import TestCase

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
