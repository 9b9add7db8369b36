"""
Tests for C{--mode service} (L{tunnelkit.service.tap}): its options, state directory, certificates
and listener warnings.  The whole service on the real reactor is in L{tests.e2e.test_service_inprocess}.
"""

from __future__ import annotations

import os
from typing import Any, List

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import TestCase

from tunnelkit import tap as plugin_tap
from tunnelkit.errors import ConfigError
from tunnelkit.service import listeners, tap
from tunnelkit.service.certs import ensure_certificates


class OptionsTests(TestCase):
    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--mode", "service", *args])
        return options

    def test_help_states_exit_status(self) -> None:
        self.assertIn("Exit status: 1 on a usage error or when it cannot listen; stopped by a signal", " ".join(str(tap.Options()).split()))

    def test_tls_library(self) -> None:
        self.assertEqual(self.parse()["tls-library"], "stdlib")
        self.assertEqual(self.parse("--tls-library", "pyopenssl")["tls-library"], "pyopenssl")
        with self.assertRaises(usage.UsageError):
            self.parse("--tls-library", "gnutls")

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertEqual(options["listen"], ["ssl:8443:interface=127.0.0.1"])
        self.assertEqual(options["state-dir"], "./tunnelkit-state")
        self.assertEqual(options["region"], "us-east-1")
        self.assertIsNone(options["account-id"])
        self.assertEqual(options["hostname"], [])
        self.assertEqual(options["max-open-tunnels"], 1000)
        self.assertEqual(options["closed-retention"], 3 * 3600.0)
        self.assertEqual(options["allow-slow-websocket"], 0)
        self.assertEqual(options["max-services-per-tunnel"], 3)

    def test_values(self) -> None:
        options = self.parse(
            "--listen", "tcp:8080:interface=127.0.0.1", "--listen", "ssl:8443",
            "--hostname", "tunnels.example.com", "--hostname", "10.0.0.1",
            "--region", "eu-west-1", "--account-id", "123456789012",
            "--max-open-tunnels", "7", "--closed-retention", "30m", "--state-dir", "/tmp/x",
        )
        self.assertEqual(options["listen"], ["tcp:8080:interface=127.0.0.1", "ssl:8443"])
        self.assertEqual(options["hostname"], ["tunnels.example.com", "10.0.0.1"])
        self.assertEqual((options["region"], options["account-id"]), ("eu-west-1", "123456789012"))
        self.assertEqual((options["max-open-tunnels"], options["closed-retention"]), (7, 1800.0))

    def test_bad_values(self) -> None:
        for args, text in (
            (("--listen", "ssl:notaport"), "--listen"),
            (("--listen", "carrier-pigeon:1"), "--listen"),
            (("--hostname", "bad host"), "--hostname"),
            (("--region", "US East"), "region"),
            (("--account-id", "12"), "account"),
            (("--max-open-tunnels", "0"), "0"),
            (("--closed-retention", "soon"), "duration"),
        ):
            error = self.assertRaises(usage.UsageError, self.parse, *args)
            self.assertIn(text, str(error), args)

    def test_peer_timeout_longer_than_ping_interval(self) -> None:
        """Review 7: a peer timeout not longer than the ping interval would drop quiet peers unpinged."""
        error = self.assertRaises(usage.UsageError, self.parse, "--ping-interval", "20", "--peer-timeout", "5")
        self.assertIn("--peer-timeout (5) must be longer than --ping-interval (20)", str(error))
        self.assertRaises(usage.UsageError, self.parse, "--ping-interval", "60")  # the default timeout is 60
        options = self.parse("--ping-interval", "5", "--peer-timeout", "6")
        self.assertEqual((options["ping-interval"], options["peer-timeout"]), (5.0, 6.0))

    def test_front_door_numbers(self) -> None:
        """Review 7: negative and non-numeric limits are usage errors; a handshake timeout of 0 is refused."""
        for args, text in (
            (("--max-pending-per-address", "-5"), "--max-pending-per-address: expected a whole number of at least 0"),
            (("--max-pending-per-address", "x"), "--max-pending-per-address: expected a whole number of at least 0"),
            (("--handshake-timeout", "0"), "--handshake-timeout: expected a duration of more than 0"),
            (("--audit-log-size", "-1"), "--audit-log-size: expected a whole number"),
        ):
            error = self.assertRaises(usage.UsageError, self.parse, *args)
            self.assertIn(text, str(error), args)
        options = self.parse("--max-pending-per-address", "0", "--handshake-timeout", "2.5")
        self.assertEqual((options["max-pending-per-address"], options["handshake-timeout"]), (0, 2.5))
        self.assertIn("cannot be turned off", " ".join(str(tap.Options()).split()))

    def test_durations(self) -> None:
        self.assertEqual(tap.duration("90"), 90.0)
        self.assertEqual(tap.duration("90s"), 90.0)
        self.assertEqual(tap.duration("1.5h"), 5400.0)
        self.assertEqual(tap.duration("1d"), 86400.0)

    def test_config_file(self) -> None:
        """The service section of tap.yml fills options; flags win."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("service:\n  listen: [tcp:9000]\n  state-dir: /srv/tk\n  max-open-tunnels: 3\n")
        options = self.parse("--config", path, "--max-open-tunnels", "4")
        self.assertEqual(options["listen"], ["tcp:9000"])
        self.assertEqual(options["state-dir"], "/srv/tk")
        self.assertEqual(options["max-open-tunnels"], 4)

    def test_listen_description(self) -> None:
        """An ssl: endpoint without a certificate gets the generated one; others are unchanged."""
        certs = ensure_certificates(self.mktemp())
        described = listeners.listen_description("ssl:8443:interface=127.0.0.1", certs)
        self.assertIn("privateKey=", described)
        self.assertIn("certKey=", described)
        self.assertEqual(listeners.listen_description("ssl:443:privateKey=/k.pem", certs), "ssl:443:privateKey=/k.pem")
        self.assertEqual(listeners.listen_description("tcp:80", certs), "tcp:80")


class StateDirTests(TestCase):
    def test_state_dir_is_a_file(self) -> None:
        """A --state-dir that is a file: makeService says so; the plugin makes it one line and status 1."""
        import io
        import sys

        path = self.mktemp()
        with open(path, "w"):
            pass
        options = tap.Options()
        options.parseOptions(["--mode", "service", "--state-dir", path, "--listen", "tcp:0:interface=127.0.0.1"])
        problem = self.assertRaises(ConfigError, tap.makeService, options)
        self.assertIn(f"--state-dir {path}: not a directory", str(problem))
        plugin = plugin_tap.Options()
        plugin.parseOptions(["--mode", "service", "--state-dir", path, "--listen", "tcp:0:interface=127.0.0.1"])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, plugin_tap.makeService, plugin)
        self.assertEqual(error.code, 1)
        self.assertEqual(stderr.getvalue(), f"tunnelkit: error: {problem}\n")


class CertificateTests(TestCase):
    def test_reissue_on_new_hostname(self) -> None:
        """A new --hostname reissues the server certificate with the same CA; no change keeps it."""
        from cryptography import x509

        state = self.mktemp()
        first = ensure_certificates(state, ["a.example"])
        with open(first.ca_cert, "rb") as f:
            ca = f.read()
        with open(first.server_cert, "rb") as f:
            server = f.read()
        ensure_certificates(state, ["a.example"])
        with open(first.server_cert, "rb") as f:
            self.assertEqual(f.read(), server)
        ensure_certificates(state, ["a.example", "b.example"])
        with open(first.ca_cert, "rb") as f:
            self.assertEqual(f.read(), ca)
        with open(first.server_cert, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            sorted(san.get_values_for_type(x509.DNSName)), ["a.example", "b.example", "localhost"]
        )
        self.assertEqual(sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)), ["127.0.0.1", "::1"])
        ca_cert = x509.load_pem_x509_certificate(ca)
        cert.verify_directly_issued_by(ca_cert)
        for name in ("ca.key", "server.key"):
            self.assertEqual(os.stat(os.path.join(state, name)).st_mode & 0o077, 0)

    def test_missing_ca(self) -> None:
        """A server certificate without its CA is an error naming the files, not a silent new CA."""
        from tunnelkit.errors import ConfigError

        state = self.mktemp()
        ensure_certificates(state)
        os.remove(os.path.join(state, "ca.pem"))
        error = self.assertRaises(ConfigError, ensure_certificates, state)
        self.assertIn("ca.pem", str(error))


class NameWarningTests(TestCase):
    def warnings_for(self, *args: str) -> List[str]:
        from twisted.logger import Logger, formatEvent

        events: List[Any] = []
        self.patch(tap, "log", Logger(observer=events.append))
        options = tap.Options()
        options.parseOptions(["--mode", "service", "--state-dir", self.mktemp(), *args])
        service = tap.TunnelService(options, MemoryReactorClock())  # built, never started
        service.store.close()
        return [formatEvent(e) for e in events if e["log_level"].name == "warn"]

    def test_all_interfaces(self) -> None:
        """An ssl: listener on every interface without --hostname gets a warning naming the fix."""
        (warning,) = self.warnings_for("--listen", "ssl:0")
        self.assertIn("every interface", warning)
        self.assertIn("--hostname", warning)

    def test_no_warning(self) -> None:
        self.assertEqual(self.warnings_for("--listen", "ssl:0:interface=127.0.0.1"), [])
        self.assertEqual(self.warnings_for("--listen", r"ssl:0:interface=\:\:1"), [])
        self.assertEqual(self.warnings_for("--listen", "ssl:0", "--hostname", "tunnels.example.com"), [])
        self.assertEqual(self.warnings_for("--listen", "tcp:0"), [])
