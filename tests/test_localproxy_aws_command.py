"""Tests of C{tunnelkit-localproxy}: AWS's localproxy command line turned into tunnelkit's (no process)."""

import io
import json
import os

from twisted.trial.unittest import TestCase

from tunnelkit.localproxy import aws_command
from tunnelkit.localproxy.aws_command import UsageError, twistd_arguments


def translate(*argv):
    err = io.StringIO()
    return twistd_arguments(list(argv), {}, err), err.getvalue()


class TranslateTests(TestCase):
    def test_awss_examples(self):
        args, _ = translate("-r", "us-east-1", "-s", "5555", "-t", "TOKEN")
        self.assertEqual(args, ["-n", "--pidfile=", "tunnelkit", "--mode", "source", "--access-token", "TOKEN",
                                "--region", "us-east-1", "--source-listen-port", "5555"])
        args, _ = translate("-e", "h.test:8443", "-d", "SSH1=22", "-c", "/etc/ssl/certs", "-k", "-v", "5")
        self.assertEqual(args[3:5], ["--mode", "destination"])
        for pair in (["--proxy-endpoint", "h.test:8443"], ["--destination-app", "SSH1=22"], ["--capath", "/etc/ssl/certs"],
                     ["--verbose", "5"]):
            self.assertIn(pair, [args[i:i + 2] for i in range(len(args))])
        self.assertIn("--no-ssl-host-verify", args)

    def test_mode_option(self):
        self.assertEqual(translate("-m", "dst", "-r", "r", "--config-dir", "d")[0][3:5], ["--mode", "destination"])
        self.assertRaisesRegex(UsageError, "Mode value is wrong", translate, "-m", "sideways")
        self.assertRaisesRegex(UsageError, "-s and --mode have mismatched mode. Mode is set to destination!",
                               translate, "-m", "dst", "-s", "1")
        self.assertRaisesRegex(UsageError, "Must specify one of --source-listen-port/-s or --destination-app/-d or --mode",
                               translate, "-r", "r")
        self.assertRaisesRegex(UsageError, "one and only one", translate, "-s", "1", "-d", "2")
        self.assertRaisesRegex(UsageError, "unrecognized arguments|unrecognised", translate, "-Z")

    def test_destination_client_type(self):
        args, err = translate("-s", "1", "-y", "v2")
        self.assertIn("V2", args)
        args, err = translate("-s", "1", "-y", "V9")
        self.assertNotIn("--destination-client-type", args)
        self.assertIn("assuming default protocol V3", err)

    def test_config_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# AWS's INI form\n[ignored]\nregion = us-west-2\nsource-listen-port = 5000\n"
                    "local_bind_address = ::1\n")
        args, _ = translate("--config", path, "-r", "eu-west-1")
        self.assertIn("eu-west-1", args)  # the command line wins
        self.assertNotIn("us-west-2", args)
        self.assertIn("5000", args)
        self.assertIn("::1", args)
        with open(path, "a") as f:
            f.write("colour = blue\n")
        self.assertRaisesRegex(UsageError, "unrecognised option 'colour'", translate, "--config", path)

    def test_settings_json(self):
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"tunneling": {"proxy": {"tcp": {"connection_retry_count": 2, "connection_retry_delay_ms": 500,
                                                       "max_active_connections": 16},
                                               "websocket": {"ping_period_ms": 1000}}}}, f)
        args, err = translate("-d", "22", "-r", "r", "--settings-json", path)
        self.assertIn("--connect-retries", args)
        self.assertEqual(args[args.index("--connect-retry-delay") + 1], "0.5")
        self.assertNotIn("--max-connections", args)  # a source setting
        self.assertIn("websocket.ping_period_ms is not used", err)
        args, _ = translate("-s", "22", "-r", "r", "--settings-json", path)
        self.assertEqual(args[args.index("--max-connections") + 1], "16")

    def test_token_files_pass_through(self):
        args, _ = translate("-s", "1", "-r", "r", "--access-token-file", "a", "--client-token-file", "c")
        self.assertIn("--access-token-file", args)
        self.assertIn("--client-token-file", args)

    def test_pace_passes_through(self):
        args, _ = translate("-s", "1", "-r", "r", "--pace", "50000000")
        self.assertEqual(args[args.index("--pace") + 1], "50000000")


class MainTests(TestCase):
    def test_help_version_export(self):
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(aws_command.main(["--help"], out, err), 0)
        self.assertIn("--settings-json", out.getvalue())
        out = io.StringIO()
        self.assertEqual(aws_command.main(["-V"], out, err), 0)
        self.assertIn("tunnelkit", out.getvalue())
        path = self.mktemp()
        self.assertEqual(aws_command.main(["--export-default-settings", path], out, err), 0)
        with open(path) as f:
            self.assertEqual(json.load(f), aws_command.DEFAULT_SETTINGS)

    def test_usage_error(self):
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(aws_command.main(["-r", "r"], out, err), 1)
        self.assertIn("Try 'tunnelkit-localproxy --help'", err.getvalue())
