"""
Tests for L{tunnelkit.adapters}: plugin discovery, the service-ID -> adapter mapping, option
helpers and probes.
"""

from __future__ import annotations

import os
import sys
import textwrap

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import services
from tunnelkit.adapters import (
    IServiceAdapter,
    IServiceAdapterFactory,
    ProbeFailed,
    UnknownAdapter,
    available_adapters,
    check_options,
    default_adapter_name,
    describe_target,
    option_bool,
    parse_adapter_options,
    parse_adapter_overrides,
    probe_and_log,
    probe_target,
    resolve_adapter,
    resolve_adapters,
)
from tunnelkit.errors import ConfigError

BUILT_IN = ("ftp", "http", "ssh", "tcp", "vnc")


class DiscoveryTests(SynchronousTestCase):
    def test_built_in_adapters_found(self) -> None:
        found = available_adapters()
        for name in BUILT_IN:
            self.assertIn(name, found)
            self.assertTrue(verifyObject(IServiceAdapterFactory, found[name]))

    def test_every_built_in_adapter_provides_the_interface(self) -> None:
        for name, factory in available_adapters().items():
            adapter = factory.build("X1", {})
            self.assertTrue(verifyObject(IServiceAdapter, adapter))
            self.assertEqual(adapter.name, name)

    def test_default_by_prefix(self) -> None:
        expected = {
            "SSH1": "ssh",
            "ssh-admin": "ssh",
            "FTP1": "ftp",
            "VNC": "vnc",
            "HTTP1": "http",
            "HTTPS1": "tcp",
            "RDP": "tcp",
            "MQTT": "tcp",
        }
        for service_id, name in expected.items():
            self.assertEqual(resolve_adapter(service_id).name, name, service_id)

    def test_longest_prefix_wins(self) -> None:
        factories = available_adapters()
        self.assertEqual(default_adapter_name("HTTPSX", factories), "tcp")
        self.assertEqual(default_adapter_name("HTTPX", factories), "http")
        self.assertEqual(default_adapter_name("X", {}), "tcp")

    def test_override_wins_over_prefix(self) -> None:
        overrides = parse_adapter_overrides("SSH1=tcp,WEB=HTTP")
        self.assertEqual(resolve_adapter("SSH1", overrides).name, "tcp")
        self.assertEqual(resolve_adapter("WEB", overrides).name, "http")
        self.assertEqual(resolve_adapter("FTP9", overrides).name, "ftp")

    def test_unknown_adapter_is_a_clear_error(self) -> None:
        with self.assertRaises(UnknownAdapter) as caught:
            resolve_adapter("SSH1", {"SSH1": "telnet"})
        message = str(caught.exception)
        self.assertIn("SSH1", message)
        self.assertIn("'telnet'", message)
        for name in BUILT_IN:
            self.assertIn(name, message)
        self.assertIsInstance(caught.exception, ConfigError)

    def test_missing_default_adapter(self) -> None:
        with self.assertRaises(UnknownAdapter) as caught:
            resolve_adapter("X1", factories={})
        self.assertIn("default adapter 'tcp'", str(caught.exception))

    def test_options_reach_the_adapter(self) -> None:
        adapter = resolve_adapter("HTTP1", None, {"HTTP1": {"host": "device.test:8080"}})
        self.assertEqual(adapter.host, "device.test:8080")

    def test_unknown_option_rejected_by_adapter(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            resolve_adapter("SSH1", None, {"SSH1": {"colour": "blue"}})
        self.assertIn("'colour'", str(caught.exception))
        self.assertIn("ssh", str(caught.exception))

    def test_options_must_be_a_mapping(self) -> None:
        with self.assertRaises(ConfigError):
            resolve_adapter("HTTP1", None, {"HTTP1": ["host"]})

    def test_resolve_adapters_warns_on_unknown_service(self) -> None:
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        result = resolve_adapters(["SSH1", "FTP1"], {"SHH1": "ssh"}, {"HTTP9": {}})
        self.assertEqual({k: v.name for k, v in result.items()}, {"SSH1": "ssh", "FTP1": "ftp"})
        warned = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(sorted(e["service_id"] for e in warned), ["HTTP9", "SHH1"])


class ThirdPartyPluginTests(SynchronousTestCase):
    """An adapter dropped into a C{services/} directory on sys.path is discovered and used."""

    PLUGIN = textwrap.dedent(
        '''
        from twisted.plugin import IPlugin
        from zope.interface import implementer
        from tunnelkit.adapters import IServiceAdapterFactory
        from services.tcp import StreamAdapter

        class EchoAdapter(StreamAdapter):
            name = "echo"

        @implementer(IPlugin, IServiceAdapterFactory)
        class EchoFactory:
            name = "echo"
            prefixes = ("ECHO",)

            def build(self, service_id, options):
                adapter = EchoAdapter(service_id)
                adapter.options = dict(options)
                return adapter

        echo_factory = EchoFactory()
        '''
    )

    def setUp(self) -> None:
        root = self.mktemp()
        os.makedirs(os.path.join(root, "services"))
        with open(os.path.join(root, "services", "tk_test_echo.py"), "w") as f:
            f.write(self.PLUGIN)
        path_before = list(services.__path__)
        sys.path.insert(0, os.path.abspath(root))

        def restore() -> None:
            sys.path.remove(os.path.abspath(root))
            services.__path__[:] = path_before
            sys.modules.pop("services.tk_test_echo", None)

        self.addCleanup(restore)

    def test_discovered_by_prefix(self) -> None:
        adapter = resolve_adapter("ECHO1")
        self.assertEqual(adapter.name, "echo")
        self.assertEqual(type(adapter).__module__, "services.tk_test_echo")

    def test_discovered_by_name_with_options(self) -> None:
        adapter = resolve_adapter("SVC", {"SVC": "echo"}, {"SVC": {"a": 1}})
        self.assertEqual(adapter.name, "echo")
        self.assertEqual(adapter.options, {"a": 1})
        self.assertIn("echo", available_adapters())

    def test_gone_when_removed(self) -> None:
        self.assertEqual(resolve_adapter("ECHO1").name, "echo")
        self.doCleanups()
        self.assertEqual(resolve_adapter("ECHO1").name, "tcp")


class ParseOverridesTests(SynchronousTestCase):
    def test_string(self) -> None:
        self.assertEqual(
            parse_adapter_overrides("SSH1=ssh,WEB=http"), {"SSH1": "ssh", "WEB": "http"}
        )

    def test_spaces_case_and_empty_items(self) -> None:
        self.assertEqual(parse_adapter_overrides(" SSH1 = SSH ,, "), {"SSH1": "ssh"})

    def test_list_and_mapping_and_none(self) -> None:
        self.assertEqual(
            parse_adapter_overrides(["SSH1=ssh", "WEB=http,FTP2=ftp"]),
            {"SSH1": "ssh", "WEB": "http", "FTP2": "ftp"},
        )
        self.assertEqual(parse_adapter_overrides({"A": "TCP"}), {"A": "tcp"})
        self.assertEqual(parse_adapter_overrides(None), {})

    def test_repeated_same_is_fine(self) -> None:
        self.assertEqual(parse_adapter_overrides(["A=tcp", "A=TCP"]), {"A": "tcp"})

    def test_errors(self) -> None:
        for bad in ("SSH1", "=ssh", "SSH1=", ["A=tcp", "A=ssh"]):
            with self.assertRaises(ConfigError, msg=repr(bad)):
                parse_adapter_overrides(bad)
        with self.assertRaises(ConfigError) as caught:
            parse_adapter_overrides("SSH1:ssh")
        self.assertIn("SERVICE=ADAPTER", str(caught.exception))


class ParseOptionsTests(SynchronousTestCase):
    def test_flags(self) -> None:
        self.assertEqual(
            parse_adapter_options(["HTTP1.host=device.test:8080", "HTTP1.forwarded=true,FTP1.passive-host=reply"]),
            {"HTTP1": {"host": "device.test:8080", "forwarded": "true"}, "FTP1": {"passive-host": "reply"}},
        )
        self.assertEqual(parse_adapter_options("a.b.c=1"), {"a.b": {"c": "1"}})
        self.assertEqual(parse_adapter_options(None), {})

    def test_mapping(self) -> None:
        spec = {"HTTP1": {"host": "device.test", "forwarded": True}}
        self.assertEqual(parse_adapter_options(spec), spec)

    def test_errors(self) -> None:
        for bad in ("HTTP1=host", "host=x", ".host=x", "HTTP1.=x", {"HTTP1": "host"}, {"HTTP1": {"host": ["a"]}}):
            with self.assertRaises(ConfigError, msg=repr(bad)):
                parse_adapter_options(bad)

    def test_reaches_the_adapter(self) -> None:
        options = parse_adapter_options("HTTP1.host=device.test,HTTP1.rewrite_host=yes")
        adapter = resolve_adapter("HTTP1", None, options)
        self.assertEqual((adapter.host, adapter.rewrite_host), ("device.test", True))


class OptionHelperTests(SynchronousTestCase):
    def test_check_options_normalises(self) -> None:
        self.assertEqual(
            check_options("x", "S", {"rewrite_host": 1, "host": 2}, ("rewrite-host", "host")),
            {"rewrite-host": 1, "host": 2},
        )

    def test_check_options_rejects(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            check_options("http", "HTTP1", {"hots": "x"}, ("host",))
        self.assertIn("'hots'", str(caught.exception))
        self.assertIn("host", str(caught.exception))

    def test_option_bool(self) -> None:
        for value, expected in ((True, True), ("yes", True), ("0", False), ("Off", False)):
            self.assertEqual(option_bool("S", "k", value), expected)
        with self.assertRaises(ConfigError):
            option_bool("S", "k", "maybe")

    def test_describe_target(self) -> None:
        self.assertEqual(describe_target(("127.0.0.1", 22)), "127.0.0.1:22")
        self.assertEqual(describe_target(("::1", 22)), "[::1]:22")
        self.assertEqual(describe_target("/run/x.sock"), "/run/x.sock")


def _banner_check(received: bytes, closed: bool):
    if received.startswith(b"OK\n"):
        return "ok banner"
    if received and not b"OK\n".startswith(received[:3]):
        raise ProbeFailed("wrong banner")
    return None


class ProbeTargetTests(SynchronousTestCase):
    """L{probe_target} over a memory reactor: the test plays the target."""

    def connect(self, reactor: MemoryReactorClock, greeting_check=_banner_check, greeting=b""):
        results = []
        d = probe_target(reactor, ("127.0.0.1", 4242), 5, greeting_check, greeting)
        d.addBoth(results.append)
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 4242))
        return results, factory

    def serve(self, factory):
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_success(self) -> None:
        reactor = MemoryReactorClock()
        results, factory = self.connect(reactor, greeting=b"HELLO\n")
        proto, transport = self.serve(factory)
        self.assertEqual(transport.value(), b"HELLO\n")
        proto.dataReceived(b"O")
        self.assertEqual(results, [])
        proto.dataReceived(b"K\nmore")
        self.assertEqual(results, ["ok banner"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_wrong_protocol(self) -> None:
        reactor = MemoryReactorClock()
        results, factory = self.connect(reactor)
        proto, transport = self.serve(factory)
        proto.dataReceived(b"NOPE")
        self.assertIsInstance(results[0], Failure)
        results[0].trap(ProbeFailed)
        self.assertIn("127.0.0.1:4242: wrong banner", results[0].getErrorMessage())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_closed_early(self) -> None:
        reactor = MemoryReactorClock()
        results, factory = self.connect(reactor)
        proto, transport = self.serve(factory)
        proto.dataReceived(b"O")
        proto.connectionLost(Failure(ConnectionRefusedError()))
        self.assertIn("closed before", results[0].getErrorMessage())

    def test_timeout(self) -> None:
        reactor = MemoryReactorClock()
        results, factory = self.connect(reactor)
        proto, transport = self.serve(factory)
        reactor.advance(4.9)
        self.assertEqual(results, [])
        reactor.advance(0.2)
        results[0].trap(ProbeFailed)
        self.assertIn("no answer within 5 s", results[0].getErrorMessage())
        self.assertTrue(transport.disconnected)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_timeout_while_connecting(self) -> None:
        reactor = MemoryReactorClock()
        results, factory = self.connect(reactor)
        reactor.advance(5)
        results[0].trap(ProbeFailed)
        self.assertIn("no answer within 5 s", results[0].getErrorMessage())

    def test_refused(self) -> None:
        reactor = MemoryReactorClock()
        results, factory = self.connect(reactor)
        connector = reactor.connectors[0]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        results[0].trap(ProbeFailed)
        self.assertIn("cannot connect to 127.0.0.1:4242", results[0].getErrorMessage())
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_too_much_without_greeting(self) -> None:
        reactor = MemoryReactorClock()
        results, factory = self.connect(reactor, greeting_check=lambda r, c: None)
        proto, transport = self.serve(factory)
        proto.dataReceived(b"x" * 9000)
        results[0].trap(ProbeFailed)
        self.assertIn("9000 bytes", results[0].getErrorMessage())

    def test_unix_and_hostname_targets(self) -> None:
        reactor = MemoryReactorClock()
        probe_target(reactor, "/tmp/x.sock", 5, _banner_check)
        self.assertEqual(reactor.unixClients[0][0], "/tmp/x.sock")
        probe_target(reactor, ("::1", 22), 5, _banner_check)
        self.assertEqual(reactor.tcpClients[0][:2], ("::1", 22))


class ProbeAndLogTests(SynchronousTestCase):
    """L{probe_and_log} with the real ssh adapter probing a target played over a memory reactor."""

    def setUp(self) -> None:
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def probe(self, answer: bytes):
        reactor = MemoryReactorClock()
        results = []
        adapter = resolve_adapter("SSH1")
        probe_and_log(adapter, reactor, "SSH1", ("127.0.0.1", 2222)).addCallback(results.append)
        factory = reactor.tcpClients[0][2]
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2222))
        proto.makeConnection(StringTransport())
        proto.dataReceived(answer)
        return results

    def test_logs_success(self) -> None:
        self.assertEqual(self.probe(b"SSH-2.0-Test_1.0\r\n"), [True])
        info = [e for e in self.events if e.get("description") == "SSH-2.0-Test_1.0"]
        self.assertEqual(info[0]["log_level"], LogLevel.info)

    def test_logs_failure_with_the_fix(self) -> None:
        self.assertEqual(self.probe(b"HTTP/1.1 400 Bad Request\r\n"), [False])
        warning = [e for e in self.events if e.get("log_level") == LogLevel.warn][0]
        text = formatEvent(warning)
        self.assertIn("SSH1", text)
        self.assertIn("127.0.0.1:2222", text)
        self.assertIn("ssh server", text)
        self.assertIn("HTTP/1.1 400", text)
        self.assertIn("--adapter SSH1=NAME", text)

    def test_logs_unreachable_target(self) -> None:
        """Nothing listening at the target: say so and point at -d, not at the adapter."""
        reactor = MemoryReactorClock()
        results = []
        probe_and_log(resolve_adapter("SSH1"), reactor, "SSH1", ("127.0.0.1", 2222)).addCallback(results.append)
        reactor.tcpClients[0][2].clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.assertEqual(results, [False])
        text = formatEvent([e for e in self.events if e.get("log_level") == LogLevel.warn][0])
        self.assertIn("Service SSH1: cannot connect to 127.0.0.1:2222", text)
        self.assertIn("is its server running? Check -d/--destination-app (SSH1=HOST:PORT)", text)
        self.assertNotIn("does not look like", text)
