"""
Tests for L{tunnelkit.config}: tap.yml loading, validation and merging under the command line.
"""

import os

from twisted.python import usage
from twisted.trial import unittest

from tunnelkit.config import (
    ModeOptions,
    client_endpoint,
    find_mode,
    load_config_file,
    positive_int,
    server_endpoint,
)
from tunnelkit.errors import ConfigError


class ExampleOptions(ModeOptions):
    """A mode's Options as every mode writes them."""

    mode = "service"
    optFlags = [["verbose", "v", "Say more."]]
    optParameters = [
        ["state-dir", None, "./state", "Where state lives."],
        ["max-open-tunnels", None, 10, "Quota.", positive_int],
    ]
    repeatable = {"listen": server_endpoint}

    def opt_listen(self, value: str) -> None:
        """Listen here (repeatable)."""
        self["listen"].append(server_endpoint(value))


class ConfigFileTests(unittest.TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, args, text=None):
        options = ExampleOptions()
        if text is not None:
            args = ["--config", self.write(text)] + list(args)
        options.parseOptions(args)
        return options

    def test_values_from_file(self):
        options = self.parse([], "service:\n  state_dir: /srv/tk\n  max-open-tunnels: 5\n  verbose: true\n"
                             "  listen: ['tcp:0', 'ssl:8443']\n")
        self.assertEqual(options["state-dir"], "/srv/tk")
        self.assertEqual(options["max-open-tunnels"], 5)
        self.assertEqual(options["verbose"], 1)
        self.assertEqual(options["listen"], ["tcp:0", "ssl:8443"])

    def test_command_line_wins(self):
        options = self.parse(["--state-dir", "/cli", "--listen", "tcp:1"],
                             "service:\n  state-dir: /file\n  listen: [tcp:2]\n")
        self.assertEqual(options["state-dir"], "/cli")
        self.assertEqual(options["listen"], ["tcp:1"])

    def test_other_sections_ignored(self):
        options = self.parse([], "source:\n  source-listen-port: '5555'\nservice:\n  state-dir: /x\n")
        self.assertEqual(options["state-dir"], "/x")

    def test_unknown_key(self):
        e = self.assertRaises(ConfigError, self.parse, [], "service:\n  stat-dir: /x\n")
        self.assertIn("service.stat-dir: unknown key", str(e))
        self.assertIn("state-dir", str(e))
        self.assertNotIn("\n", str(e))

    def test_wrong_type(self):
        e = self.assertRaises(ConfigError, self.parse, [], "service:\n  max-open-tunnels: many\n")
        self.assertIn("service.max-open-tunnels", str(e))
        self.assertIn("'many'", str(e))
        e = self.assertRaises(ConfigError, self.parse, [], "service:\n  verbose: 3\n")
        self.assertIn("service.verbose: expected true or false", str(e))
        e = self.assertRaises(ConfigError, self.parse, [], "service:\n  state-dir: [a, b]\n")
        self.assertIn("expected a single value", str(e))

    def test_bad_endpoint(self):
        e = self.assertRaises(ConfigError, self.parse, [], "service:\n  listen: [bogus:1]\n")
        self.assertIn("service.listen", str(e))
        self.assertIn("unknown type 'bogus'", str(e))

    def test_unknown_section(self):
        e = self.assertRaises(ConfigError, self.parse, [], "servce:\n  state-dir: /x\n")
        self.assertIn("servce: unknown section", str(e))

    def test_not_yaml(self):
        e = self.assertRaises(ConfigError, self.parse, [], "service: [\n")
        self.assertIn("not valid YAML", str(e))

    def test_missing_file(self):
        e = self.assertRaises(ConfigError, load_config_file, "/nonexistent/tap.yml", "service")
        self.assertIn("/nonexistent/tap.yml: cannot read", str(e))

    def test_section_not_mapping(self):
        e = self.assertRaises(ConfigError, self.parse, [], "service: 3\n")
        self.assertIn("service: must be a mapping", str(e))

    def test_empty_file(self):
        options = self.parse([], "")
        self.assertEqual(options["state-dir"], "./state")


class CoerceTests(unittest.TestCase):
    def test_server_endpoints(self):
        for good in ("tcp:0", "ssl:8443:interface=127.0.0.1", "unix:/tmp/x.sock", "tcp:port=80"):
            self.assertEqual(server_endpoint(good), good)
        for bad in ("bogus:1", "tcp:abc", "tcp:70000", "ssl"):
            self.assertRaises(ValueError, server_endpoint, bad)

    def test_proxy_protocol_endpoints(self):
        """haproxy: (PROXY protocol) wraps plain server listeners; the header precedes TLS, so not ssl:."""
        self.assertEqual(server_endpoint("haproxy:tcp:8080:interface=10.0.0.1"), "haproxy:tcp:8080:interface=10.0.0.1")
        for bad in ("haproxy:ssl:8443", "haproxy:tcp:abc", "haproxy:bogus:1", "haproxy"):
            self.assertRaises(ValueError, server_endpoint, bad)
        e = self.assertRaises(ValueError, server_endpoint, "haproxy:ssl:8443")
        self.assertIn("let HAProxy terminate TLS", str(e))
        self.assertRaises(ValueError, client_endpoint, "haproxy:tcp:host=a:port=1")

    def test_client_endpoints(self):
        for good in ("tcp:host=127.0.0.1:port=1883", "tcp:127.0.0.1:1883", "tls:localhost:8883"):
            self.assertEqual(client_endpoint(good), good)
        for bad in ("tcp:1883", "udp:x:1", "tcp:host=a:port=x"):
            self.assertRaises(ValueError, client_endpoint, bad)

    def test_positive_int(self):
        self.assertEqual(positive_int("3"), 3)
        self.assertRaises(ValueError, positive_int, "0")
        self.assertRaises(ValueError, positive_int, "x")


class FindModeTests(unittest.TestCase):
    def test_flag(self):
        self.assertEqual(find_mode(["--mode", "source"]), "source")
        self.assertEqual(find_mode(["--mode=agent"]), "agent")

    def test_from_single_section(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("destination:\n  destination-app: '22'\n")
        self.assertEqual(find_mode(["--config", path]), "destination")

    def test_ambiguous(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("service: {}\nsource: {}\n")
        self.assertIsNone(find_mode(["--config", path]))
        self.assertIsNone(find_mode([]))

    def test_config_file_read_once(self):
        """The plugin's options read --config's file once: for the mode and for the mode's options."""
        from tunnelkit import config, tap

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("service:\n  state-dir: /tmp/tunnelkit-test-state\n")
        reads = []
        read = config._read_document
        self.patch(config, "_read_document", lambda p: reads.append(p) or read(p))
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertEqual((options.mode, options.modeOptions["state-dir"]), ("service", "/tmp/tunnelkit-test-state"))
        self.assertEqual(reads, [path])


class ModeFlagTests(unittest.TestCase):
    def test_mode_mismatch(self):
        self.assertRaises(usage.UsageError, ExampleOptions().parseOptions, ["--mode", "source"])

    def test_version(self):
        self.assertRaises(SystemExit, ExampleOptions().parseOptions, ["--version"])

    def test_bad_value_names_its_option(self):
        """A value its coerce refuses is reported under the option's long name, also for a short flag."""
        e = self.assertRaises(usage.UsageError, ExampleOptions().parseOptions, ["--max-open-tunnels", "x"])
        self.assertTrue(str(e).startswith("--max-open-tunnels: expected a whole number"), str(e))
        self.assertNotIn("Parameter type enforcement", str(e))

    def test_stray_argument_named(self):
        """A positional argument (e.g. after an option that took the next flag as its value) is named."""
        e = self.assertRaises(usage.UsageError, ExampleOptions().parseOptions, ["--state-dir", "-v", "extra"])
        self.assertIn("unexpected argument 'extra'", str(e))


class MappingValueTests(unittest.TestCase):
    """A mapping in tap.yml for a repeatable option becomes KEY=VALUE items."""

    class AdapterOptions(ModeOptions):
        mode = "source"
        repeatable = {"adapters": str, "adapter-option": str}

    def parse(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        options = self.AdapterOptions()
        options.parseOptions(["--config", path])
        return options

    def test_flat_mapping(self):
        options = self.parse("source:\n  adapters: {SSH1: ssh, WEB: http}\n")
        self.assertEqual(options["adapters"], ["SSH1=ssh", "WEB=http"])

    def test_nested_mapping(self):
        options = self.parse("source:\n  adapter-option:\n    HTTP1: {host: intranet.test, forwarded: true}\n")
        self.assertEqual(options["adapter-option"], ["HTTP1.host=intranet.test", "HTTP1.forwarded=true"])

    def test_list_inside_mapping(self):
        e = self.assertRaises(ConfigError, self.parse, "source:\n  adapters: {SSH1: [a]}\n")
        self.assertIn("source.adapters: SSH1: expected a single value", str(e))

    def test_mode_alias(self):
        self.assertEqual(find_mode(["--mode", "src"]), "source")
        self.assertEqual(find_mode(["--mode", "dst"]), "destination")


class NumericOptionTests(unittest.TestCase):
    """Review 7: every numeric option of every mode refuses a bad value in one clear line naming it."""

    def numeric_options(self, options_class):
        seen = {}
        for cls in options_class.__mro__:
            for param in getattr(cls, "optParameters", None) or []:
                default = param[2]
                if isinstance(default, (int, float)) and not isinstance(default, bool):
                    seen.setdefault(param[0], param)
        return seen

    def test_bad_numbers_are_usage_errors_naming_the_option(self):
        from tunnelkit.agent.tap import Options as AgentOptions
        from tunnelkit.localproxy.tap import Options as ProxyOptions
        from tunnelkit.service.tap import Options as ServiceOptions

        checked = []
        for options_class, mode in ((ServiceOptions, "service"), (ProxyOptions, "source"), (AgentOptions, "agent")):
            names = self.numeric_options(options_class)
            self.assertGreater(len(names), 1, options_class)
            for name in names:
                if name == "verbose":
                    continue  # -v has levels of its own (4 = info ...), checked in its mode's tests
                for bad in ("x", "-5", "nan", "1e999"):
                    options = options_class()
                    options.mode = mode
                    with self.assertRaises(usage.UsageError, msg=(mode, name, bad)) as caught:
                        options.parseOptions(["--mode", mode, f"--{name}", bad])
                    text = str(caught.exception)
                    self.assertTrue(text.startswith(f"--{name}: expected "), (mode, name, bad, text))
                    self.assertIn(repr(bad), text)
                    self.assertNotIn("invalid literal", text)
                checked.append(name)
        for name in ("max-pending-per-address", "handshake-timeout", "audit-log-size", "ping-interval",
                     "max-connections", "connect-retry-delay", "pace", "max-sessions"):
            self.assertIn(name, checked)

    def test_number(self):
        from tunnelkit.config import number

        self.assertEqual(number(0, whole=True)("0"), 0)
        self.assertEqual(number(1, 32, whole=True)("32"), 32)
        self.assertEqual(number(0, duration=True, above=True)("1.5m"), 90.0)
        self.assertEqual(number(5, zero_means="off")("0"), 0)
        for coerce, bad, message in (
            (number(1, 32, whole=True), "33", "expected a whole number from 1 to 32, got '33'"),
            (number(0, whole=True), "2.5", "expected a whole number of at least 0, got '2.5'"),
            (number(0, duration=True, above=True), "0", "expected a duration of more than 0"),
            (number(5, zero_means="off"), "3", "expected 0 (off) or a number of at least 5, got '3'"),
        ):
            with self.assertRaises(ValueError) as caught:
                coerce(bad)
            self.assertIn(message, str(caught.exception))

    def test_tap_yml_values_checked_the_same_way(self):
        import tempfile

        from tunnelkit.service.tap import Options as ServiceOptions

        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
            f.write("service:\n  max-pending-per-address: -5\n")
        self.addCleanup(os.unlink, f.name)
        with self.assertRaises(ConfigError) as caught:
            ServiceOptions().parseOptions(["--mode", "service", "--config", f.name])
        self.assertIn("service.max-pending-per-address: expected a whole number of at least 0, got '-5'",
                      str(caught.exception))
