"""
Tests for L{tunnelkit.agent.tap} and L{tunnelkit.agent.starter}: the agent's options (validated up front, one-line errors), the
service it builds, and the starter that runs the local proxy's destination sessions.
"""

from __future__ import annotations


from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tunnelkit.agent import DEFAULT_TARGETS, Agent, IDestinationSession, IDestinationStarter, Notification
from tunnelkit.agent.starter import LocalProxyStarter, SessionFailed
from tunnelkit.agent.tap import Options, makeService
from tests.test_process import Events
from tunnelkit.process import ModeService
from tunnelkit.localproxy.session_service import LocalProxySession, SessionEnd
from tunnelkit.mqtt import MQTTClient
from tunnelkit.tap import Options as PluginOptions

BASE = ["--mode", "agent", "--thing-name", "t1", "--mqtt", "tcp:host=127.0.0.1:port=1883"]


def parse(*extra: str) -> Options:
    options = Options()
    options.parseOptions(BASE + list(extra))
    return options


class OptionsTests(SynchronousTestCase):
    def test_minimal(self) -> None:
        """Thing name and broker suffice; the default service table applies."""
        options = parse()
        self.assertEqual(options.targets, DEFAULT_TARGETS)
        self.assertEqual(options.mqtt.client_id, "tunnelkit-agent-t1")
        self.assertIsNone(options["proxy-endpoint"])

    def test_help_states_exit_status(self) -> None:
        self.assertIn("Exit status: 1 on a usage error; stopped by a signal", " ".join(str(parse()).split()))

    def test_plugin_dispatch(self) -> None:
        """C{twistd tunnelkit --mode agent} reaches these options."""
        options = PluginOptions()
        options.parseOptions(BASE)
        self.assertIsInstance(options.modeOptions, Options)

    def test_destination_app(self) -> None:
        """-d gives the whole table, in the destination mode's syntax."""
        options = parse("-d", "SSH=2222,HTTP1=10.0.0.5:8080,APP=/run/app.sock")
        self.assertEqual(
            options.targets,
            {"SSH": ("127.0.0.1", 2222), "HTTP1": ("10.0.0.5", 8080), "APP": "/run/app.sock"},
        )

    def test_errors(self) -> None:
        """Each wrong option gives one line naming it."""
        cases = [
            (["--mode", "agent", "--mqtt", "tcp:host=h:port=1"], "--thing-name NAME is required"),
            (["--mode", "agent", "--thing-name", "t1"], "--mqtt ENDPOINT is required"),
            (BASE[:2] + ["--thing-name", "t/1", "--mqtt", "tcp:host=h:port=1"], "--thing-name 't/1'"),
            (BASE[:2] + ["--thing-name", "t1", "--mqtt", "udp:x"], "bad client endpoint"),
            (BASE + ["-d", "22"], "name each service"),
            (BASE + ["-d", "SSH=notaport"], "-d/--destination-app"),
            (BASE + ["-e", "ftp://x"], "-e/--proxy-endpoint"),
            (BASE + ["-c", "/nonexistent/ca.pem"], "-c/--capath"),
            (BASE + ["--mqtt-password", "p"], "--mqtt-password needs --mqtt-username"),
            (BASE + ["--adapter", "SSH=nosuch"], "unknown adapter"),
        ]
        for args, message in cases:
            options = Options()
            e = self.assertRaises(usage.UsageError, options.parseOptions, args)
            self.assertIn(message, str(e), args)
            self.assertNotIn("\n", str(e))

    def test_nvx_required(self) -> None:
        """Without autobahn's NVX the agent refuses to start (one line) unless --allow-slow-websocket."""
        import autobahn.websocket

        self.patch(autobahn.websocket, "USES_NVX", False)
        e = self.assertRaises(usage.UsageError, parse)
        self.assertIn("--allow-slow-websocket", str(e))
        parse("--allow-slow-websocket")

    def test_config_file(self) -> None:
        """tap.yml's agent section fills the options; the command line wins."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("agent:\n  thing-name: from-file\n  mqtt: tcp:host=127.0.0.1:port=1\n  destination-app: SSH=2200\n")
        options = Options()
        options.parseOptions(["--mode", "agent", "--config", path, "--thing-name", "t9"])
        self.assertEqual(options["thing-name"], "t9")
        self.assertEqual(options.targets, {"SSH": ("127.0.0.1", 2200)})


class ServiceTests(SynchronousTestCase):
    def test_verbose(self) -> None:
        """-v 0-5 as the local proxy's (4 by default); trace levels, which would log tokens, are refused."""
        self.assertEqual(parse()["verbose"], 4)
        self.assertEqual(parse("-v", "5")["verbose"], 5)
        e = self.assertRaises(usage.UsageError, parse, "-v", "6")
        self.assertIn("-v/--verbose expects 0-5", str(e))

    def test_default_verbosity_hides_debug(self) -> None:
        """At -v 4 makeService's log filter leaves debug lines out of the process's log; -v 5 shows them."""
        from twisted.logger import LogLevel

        for verbosity, shown in (("4", False), ("5", True)):
            service = makeService(parse("--allow-slow-websocket", "-e", "ws://127.0.0.1:9", "-v", verbosity))
            assert service.log_filter is not None
            seen = Events()
            observer = service.log_filter.wrap(seen)
            observer({"log_level": LogLevel.debug, "log_namespace": "t", "log_format": "x"})
            self.assertEqual(bool(seen), shown)

    def test_make_service(self) -> None:
        """makeService gives an agent and its MQTT client, not started."""
        service = makeService(parse("--allow-slow-websocket", "-e", "ws://127.0.0.1:9"))
        self.assertIsInstance(service, ModeService)
        kinds = sorted(type(child).__name__ for child in service)
        self.assertEqual(kinds, sorted([Agent.__name__, MQTTClient.__name__]))
        agent = [child for child in service if isinstance(child, Agent)][0]
        self.assertEqual(agent.proxy_endpoint, "ws://127.0.0.1:9")
        self.assertFalse(service.running)


class NoVerifyTests(SynchronousTestCase):
    def test_no_ssl_host_verify(self) -> None:
        """-k reaches the sessions (no certificate check) and is warned about loudly."""
        from twisted.logger import globalLogPublisher

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        service = makeService(parse("--allow-slow-websocket", "-k", "--max-sessions", "4"))
        agent = [child for child in service if isinstance(child, Agent)][0]
        self.assertFalse(agent._starter.verify)
        self.assertEqual(agent.max_sessions, 4)
        from tunnelkit.transport.tls import NO_VERIFY_WARNING

        warned = [e.get("line") for e in logged if e.get("log_format") == "{line}"]
        self.assertEqual(warned, NO_VERIFY_WARNING.splitlines())


class StarterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.starter = LocalProxyStarter(self.reactor)

    def test_interfaces(self) -> None:
        verifyObject(IDestinationStarter, self.starter)

    def test_start_connects_and_stops(self) -> None:
        """A session connects to the endpoint with the notification's token, and stops cleanly."""
        running = self.starter.start(
            Notification("the-token", ("SSH",), "us-east-1"), "ws://127.0.0.1:8080", {"SSH": ("127.0.0.1", 22)}
        )
        verifyObject(IDestinationSession, running)
        self.assertIsInstance(running.session, LocalProxySession)
        self.assertEqual(running.session.url, "ws://127.0.0.1:8080/tunnel?local-proxy-mode=destination")
        host, port = self.reactor.tcpClients[0][:2]
        self.assertEqual((host, port), ("127.0.0.1", 8080))
        self.successResultOf(running.stop())
        self.assertFalse(running.session.running)
        self.assertIsNone(self.successResultOf(running.ended))

    def test_ended_by_service(self) -> None:
        """The session's end reaches the agent: status 0 as a result, others as SessionFailed."""
        closed = self.starter.start(Notification("a", ("SSH",), "r"), "ws://127.0.0.1:1", {"SSH": ("127.0.0.1", 22)})
        refused = self.starter.start(Notification("b", ("SSH",), "r"), "ws://127.0.0.1:1", {"SSH": ("127.0.0.1", 22)})
        closed.session.finish(0, "tunnel closed")
        refused.session.finish(1, "token refused")
        self.assertEqual(self.successResultOf(closed.ended), SessionEnd(0, "tunnel closed"))
        self.failureResultOf(refused.ended, SessionFailed)


