"""
Tests of what a local proxy checks and keeps before it presents its single-use access token
(issue 11): the kept client token (L{tunnelkit.localproxy.client_token}), the token file options, and
the source's listen ports bound first (L{SourceSide.reserve_ports}, L{StartAfterLocalChecks}).
"""

import os
import stat

from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import TestCase

from tunnelkit.errors import ConfigError, TunnelkitError
from tunnelkit.localproxy import tap
from tunnelkit.localproxy.client_token import KEEP_SECONDS, default_directory, keep_client_token, token_file_name
from tunnelkit.localproxy.endpoint import ServiceEndpoint
from tunnelkit.localproxy.session_service import LocalProxySession
from tunnelkit.localproxy.source import SourceSide
from tunnelkit.protocol.session import StartListening

TOKEN = "AQGAAXiVzSmRL1VaJ22G7eRb"
OTHER_TOKEN = "AQGAAXiVzSmRL1VaJ22G7eRc"


class KeepClientTokenTests(TestCase):
    def setUp(self):
        self.state = self.mktemp()
        self.environ = {"XDG_STATE_HOME": self.state}

    def test_generated_once_then_found_again(self):
        first = keep_client_token(TOKEN, environ=self.environ)
        self.assertTrue(first.created)
        self.assertRegex(first.token, r"^[a-zA-Z0-9-]{32,128}$")
        self.assertEqual(os.path.dirname(first.path), os.path.join(self.state, "tunnelkit", "client-tokens"))
        self.assertEqual(stat.S_IMODE(os.stat(first.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(first.path)).st_mode), 0o700)
        again = keep_client_token(TOKEN, environ=self.environ)
        self.assertEqual((again.token, again.path, again.created), (first.token, first.path, False))
        other = keep_client_token(OTHER_TOKEN, environ=self.environ)
        self.assertNotEqual(other.token, first.token)

    def test_the_access_token_is_not_written(self):
        kept = keep_client_token(TOKEN, environ=self.environ)
        self.assertNotIn(TOKEN, kept.path)
        with open(kept.path) as f:
            self.assertNotIn(TOKEN, f.read())
        self.assertEqual(os.path.basename(kept.path), token_file_name(TOKEN))

    def test_default_directory(self):
        self.assertEqual(default_directory({"XDG_STATE_HOME": "/s"}), "/s/tunnelkit/client-tokens")
        self.assertTrue(default_directory({}).endswith("/.local/state/tunnelkit/client-tokens"))

    def test_explicit_file(self):
        path = os.path.join(self.mktemp(), "client.token")
        first = keep_client_token(TOKEN, path)
        self.assertEqual((first.path, first.created), (path, True))
        self.assertEqual(keep_client_token(OTHER_TOKEN, path).token, first.token)  # the file decides

    def test_bad_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("short\n")
        e = self.assertRaises(ConfigError, keep_client_token, TOKEN, path)
        self.assertIn(f"--client-token-file {path}: expected a client token", str(e))

    def test_unwritable(self):
        blocker = self.mktemp()
        open(blocker, "w").close()  # a file where the directory should be
        e = self.assertRaises(ConfigError, keep_client_token, TOKEN, os.path.join(blocker, "x"))
        self.assertIn("Not a directory", str(e))

    def test_old_files_are_pruned(self):
        old = keep_client_token(TOKEN, environ=self.environ)
        kept = keep_client_token(OTHER_TOKEN, environ=self.environ)
        os.utime(old.path, (1000, 1000))
        keep_client_token(OTHER_TOKEN, environ=self.environ, now=1000 + KEEP_SECONDS + 1)
        self.assertFalse(os.path.exists(old.path))
        self.assertTrue(os.path.exists(kept.path))


def parse(args, mode="source", environ=None):
    options = tap.Options()
    options.mode = mode
    options.environ = environ if environ is not None else {}
    options.parseOptions(["--mode", mode, "-e", "ws://127.0.0.1:9", *args])
    return options


class TokenFileOptionTests(TestCase):
    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_access_token_file(self):
        options = parse(["--access-token-file", self.write(TOKEN + "\n"), "-s", "SSH1=0"])
        self.assertEqual(options["access-token"], TOKEN)
        self.assertFalse(options.token_on_command_line)

    def test_access_token_file_errors(self):
        e = self.assertRaises(usage.UsageError, parse, ["--access-token-file", self.write(""), "-s", "1"])
        self.assertIn("the file is empty", str(e))
        e = self.assertRaises(usage.UsageError, parse, ["--access-token-file", "/nonexistent/t", "-s", "1"])
        self.assertIn("--access-token-file /nonexistent/t: cannot read it", str(e))
        e = self.assertRaises(usage.UsageError, parse, ["-t", TOKEN, "--access-token-file", self.write(TOKEN), "-s", "1"])
        self.assertIn("give one of -t/--access-token and --access-token-file", str(e))

    def test_client_token_file(self):
        path = os.path.join(self.mktemp(), "client.token")
        first = parse(["-t", TOKEN, "--client-token-file", path, "-s", "SSH1=0"])
        self.assertFalse(first.client_token_generated)
        second = parse(["-t", TOKEN, "--client-token-file", path, "-s", "SSH1=0"])
        self.assertEqual(second["client-token"], first["client-token"])
        e = self.assertRaises(usage.UsageError, parse, ["-t", TOKEN, "-i", "a" * 32, "--client-token-file", path, "-s", "1"])
        self.assertIn("give one of -i/--client-token", str(e))

    def test_generated_token_is_kept_per_access_token(self):
        environ = {"XDG_STATE_HOME": self.mktemp()}
        tokens = []
        for _ in range(2):
            options = parse(["-t", TOKEN, "-s", "SSH1=0"], environ=environ)
            tap._keep_generated_client_token(options)
            tokens.append(options["client-token"])
            self.assertIsNotNone(options.kept_client_token)
        self.assertEqual(tokens[0], tokens[1])

    def test_nowhere_to_keep_it(self):
        blocker = self.mktemp()
        open(blocker, "w").close()
        options = parse(["-t", TOKEN, "-s", "SSH1=0"], environ={"XDG_STATE_HOME": blocker})
        generated = options["client-token"]
        tap._keep_generated_client_token(options)  # logs a warning, goes on
        self.assertEqual(options["client-token"], generated)
        self.assertIsNone(options.kept_client_token)

    def test_mapped_adapters_are_built_first(self):
        e = self.assertRaises(usage.UsageError, parse, ["-t", TOKEN, "-d", "WEB1=80", "--adapter", "WEB1=nosuch"],
                              "destination")
        self.assertIn("nosuch", str(e))


class BusyPortReactor(MemoryReactorClock):
    """A memory reactor where one port is taken."""

    busy = 5555

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port == self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


class ReservedPortTests(TestCase):
    def session(self, mapping):
        self.reactor = BusyPortReactor()
        side = SourceSide(mapping, "127.0.0.1", self.reactor)
        return LocalProxySession(side, ServiceEndpoint("127.0.0.1", 9, secure=False), TOKEN, "c" * 36,
                                 self.reactor, self.reactor)

    def test_busy_port_ends_before_the_token_is_presented(self):
        session = self.session({"SSH1": 2222, "HTTP1": 5555, "VNC1": 0})
        top = tap.StartAfterLocalChecks(session)
        top.startService()
        end = self.successResultOf(session.ended)
        self.assertEqual(end.status, 1)
        self.assertIn("fails to bind address 127.0.0.1:5555 for service HTTP1", end.message)
        self.assertIn("-s HTTP1=PORT", end.message)
        self.assertEqual(self.reactor.tcpClients, [])  # never connected to the service
        self.assertFalse(session.running)

    def test_ports_bound_then_session_started(self):
        session = self.session({"SSH1": 2222, "VNC1": 0})
        top = tap.StartAfterLocalChecks(session)
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual([port for port, *_ in self.reactor.tcpServers], [2222])  # port 0 binds later
        self.assertTrue(session.running)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # connecting to the service now
        side = session.side
        side.start_listening(StartListening("SSH1", "SSH1"))
        self.assertEqual(len(self.reactor.tcpServers), 1)  # the reserved listener, not a second one
        self.assertEqual(side.ports["SSH1"], 2222)
        self.assertIn("SSH1", side.listeners)

    def test_reserve_ports_failure_closes_the_others(self):
        self.reactor = BusyPortReactor()
        side = SourceSide({"SSH1": 2222, "HTTP1": 5555}, "127.0.0.1", self.reactor)
        failure = self.failureResultOf(side.reserve_ports(), TunnelkitError)
        self.assertIn("5555", failure.getErrorMessage())
        self.assertEqual(side._reserved, {})
