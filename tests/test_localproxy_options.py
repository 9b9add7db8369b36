"""Tests of the local proxy's options (tunnelkit.localproxy.tap) and endpoint parsing."""

import os

from twisted.python import usage
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase

from tunnelkit.errors import ConfigError
from tunnelkit.localproxy.endpoint import parse_proxy_endpoint, region_host
from tunnelkit.localproxy import tap
from tunnelkit.localproxy.tap import Options
from tests.test_process import Events
from tunnelkit.process import ModeService

TOKEN = "AQGAAXiVzSmRL1VaJ22G7eRb"


def parse(args, mode="source", environ=None):
    options = Options()
    options.mode = mode
    options.environ = environ if environ is not None else {}
    options.parseOptions(["--mode", mode] + args)
    return options


class EndpointTests(TestCase):
    def test_forms(self):
        self.assertEqual(parse_proxy_endpoint("example.test"), ("example.test", 443, True))
        self.assertEqual(parse_proxy_endpoint("Example.TEST:8443"), ("example.test", 8443, True))
        self.assertEqual(parse_proxy_endpoint("[::1]:8443"), ("::1", 8443, True))
        self.assertEqual(parse_proxy_endpoint("wss://h.test"), ("h.test", 443, True))
        self.assertEqual(parse_proxy_endpoint("ws://127.0.0.1:8080/"), ("127.0.0.1", 8080, False))
        self.assertEqual(parse_proxy_endpoint("ws://h.test"), ("h.test", 80, False))

    def test_errors(self):
        for text in ["http://h.test", "h.test:0", "h.test:x", "wss://h.test/other", "bad host", "ws://h.test:99999",
                     "8443", "127.0.1:8443", "wss://8443"]:
            with self.assertRaises(ConfigError, msg=text):
                parse_proxy_endpoint(text)

    def test_port_only_says_give_a_host(self):
        e = self.assertRaises(ConfigError, parse_proxy_endpoint, "8443")
        self.assertIn("give HOST:PORT (e.g. 127.0.0.1:8443)", str(e))
        self.assertEqual(parse_proxy_endpoint("127.0.0.1"), ("127.0.0.1", 443, True))

    def test_region(self):
        self.assertEqual(region_host("us-east-1"), "data.tunneling.iot.us-east-1.amazonaws.com")
        self.assertEqual(region_host("cn-north-1"), "data.tunneling.iot.cn-north-1.amazonaws.com.cn")
        with self.assertRaises(ConfigError):
            region_host("US EAST")


class OptionsTests(TestCase):
    def test_tls_library(self):
        """--tls-library: stdlib by default (tunnelkit's TLS), pyopenssl (Twisted's), anything else refused."""
        from twisted.internet.testing import MemoryReactor

        from tunnelkit.transport.stdtls import TLSClientEndpoint

        base = ["-t", TOKEN, "-e", "127.0.0.1:8443", "-s", "SSH1=5555"]
        default = parse(base).service_endpoint
        self.assertEqual(default.tls_library, "stdlib")
        self.assertIsInstance(default.client_endpoint(MemoryReactor()), TLSClientEndpoint)
        chosen = parse(base + ["--tls-library", "pyopenssl"]).service_endpoint
        self.assertEqual(chosen.tls_library, "pyopenssl")
        self.assertNotIsInstance(chosen.client_endpoint(MemoryReactor()), TLSClientEndpoint)
        with self.assertRaises(UsageError) as caught:
            parse(base + ["--tls-library", "gnutls"])
        self.assertIn("--tls-library 'gnutls'", str(caught.exception))

    def test_source(self):
        options = parse(["-t", TOKEN, "-e", "127.0.0.1:8443", "-s", "SSH1=5555,HTTP1=0", "-b", "127.0.0.1"])
        self.assertEqual(options.mapping, {"SSH1": 5555, "HTTP1": 0})
        self.assertEqual(options.bind_address, "127.0.0.1")
        self.assertEqual(options.service_endpoint.port, 8443)
        self.assertTrue(options.service_endpoint.secure)
        self.assertTrue(options.token_on_command_line)
        self.assertTrue(options.client_token_generated)
        self.assertRegex(options["client-token"], r"^[a-zA-Z0-9-]{32,128}$")
        self.assertEqual(options["destination-client-type"], "V3")
        self.assertEqual(options["max-connections"], 128)

    def test_destination(self):
        options = parse(
            ["-e", "ws://127.0.0.1:80", "-d", "SSH1=22,WEB=/tmp/x.sock", "-b", "::1", "--connect-retries", "0",
             "--connect-retry-delay", "0.5"],
            mode="destination",
            environ={"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN},
        )
        self.assertEqual(options.mapping, {"SSH1": ("::1", 22), "WEB": "/tmp/x.sock"})
        self.assertFalse(options.token_on_command_line)
        self.assertEqual(options["connect-retries"], 0)
        self.assertEqual(options["connect-retry-delay"], 0.5)
        self.assertFalse(options.service_endpoint.secure)

    def test_environment(self):
        client = "c" * 40
        options = parse(
            ["-s", "5555"],
            environ={
                "AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN,
                "AWSIOT_TUNNEL_CLIENT_TOKEN": client,
                "AWSIOT_TUNNEL_REGION": "eu-west-1",
                "HTTPS_PROXY": "http://user:p%40ss@proxy.test",
            },
        )
        self.assertEqual(options["access-token"], TOKEN)
        self.assertEqual(options["client-token"], client)
        self.assertEqual(options.service_endpoint.host, "data.tunneling.iot.eu-west-1.amazonaws.com")
        proxy = options.service_endpoint.web_proxy
        self.assertEqual((proxy.host, proxy.port, proxy.username, proxy.password), ("proxy.test", 3128, "user", "p@ss"))

    def test_command_line_beats_environment(self):
        options = parse(
            ["-t", TOKEN, "-e", "a.test", "-s", "1"],
            environ={"AWSIOT_TUNNEL_ACCESS_TOKEN": "other", "AWSIOT_TUNNEL_ENDPOINT": "b.test"},
        )
        self.assertEqual(options["access-token"], TOKEN)
        self.assertEqual(options.service_endpoint.host, "a.test")

    def test_config_dir(self):
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "src.ini"), "w") as f:
            f.write("SSH1=3333\nSSH2=0\n")
        options = parse(["-t", TOKEN, "-e", "a.test", "--config-dir", directory, "-s", "SSH1=4444"])
        self.assertEqual(options.mapping, {"SSH1": 4444, "SSH2": 0})

    def test_source_without_mapping_listens_for_every_service(self):
        self.assertEqual(parse(["-t", TOKEN, "-e", "a.test"]).mapping, {})

    def test_errors(self):
        cases = [
            (["-e", "a.test", "-s", "1"], "source", "access-token"),
            (["-t", TOKEN, "-s", "1"], "source", "one and only one of --region/-r or --proxy-endpoint/-e"),
            (["-t", TOKEN, "-e", "a.test", "-r", "us-east-1", "-s", "1"], "source", "one and only one"),
            (["-t", TOKEN, "-e", "a.test", "-s", "1", "-d", "2"], "source", "one and only one of --source"),
            (["-t", TOKEN, "-e", "a.test", "-d", "22"], "source", "destination option"),
            (["-t", TOKEN, "-e", "a.test", "-s", "22"], "destination", "source option"),
            (["-t", TOKEN, "-e", "a.test"], "destination", "--destination-app"),
            (["-t", TOKEN, "-e", "a.test", "-s", "1", "-y", "V9"], "source", "V1 or V2"),
            (["-t", TOKEN, "-e", "a.test", "-d", "1", "-y", "V1"], "destination", "source option"),
            (["-t", TOKEN, "-e", "a.test", "-s", "1", "-i", "short"], "source", "client-token"),
            (["-t", TOKEN, "-e", "a.test", "-s", "1", "-v", "300"], "source", "0-255"),
            (["-t", TOKEN, "-e", "a.test", "-s", "1", "--max-connections", "0"], "source", "at least 1"),
            (["-t", TOKEN, "-e", "a.test", "-s", "1", "-c", "/nonexistent/ca.pem"], "source", "capath"),
            (["-t", TOKEN, "-e", "http://a.test", "-s", "1"], "source", "proxy-endpoint"),
            (["-t", TOKEN, "-e", "a.test", "-s", "1", "--adapter", "SSH1=nonesuch"], "source", "unknown adapter"),
            (["-t", "a\x01b", "-e", "a.test", "-s", "1"], "source", "control characters"),
        ]
        for args, mode, fragment in cases:
            with self.assertRaises(usage.UsageError, msg=repr(args)) as caught:
                parse(args, mode=mode)
            self.assertIn(fragment, str(caught.exception), repr(args))

    def test_bad_web_proxy(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse(["-t", TOKEN, "-e", "a.test", "-s", "1"], environ={"https_proxy": "socks5://p.test"})
        self.assertIn("unsupported protocol", str(caught.exception))

    def test_adapter_override(self):
        options = parse(["-t", TOKEN, "-e", "a.test", "-s", "1", "--adapter", "X1=ssh", "--adapter", "Y=tcp"])
        self.assertEqual(options.adapter_overrides, {"X1": "ssh", "Y": "tcp"})

    def test_adapter_options(self):
        options = parse(["-t", TOKEN, "-e", "a.test", "-d", "HTTP1=80", "--adapter-option", "HTTP1.host=intra.test"],
                        mode="destination")
        self.assertEqual(options.adapter_options, {"HTTP1": {"host": "intra.test"}})
        for bad, fragment in [("HTTP1host=x", "SERVICE.KEY=VALUE"), ("HTTP1.nonesuch=1", "nonesuch")]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(["-t", TOKEN, "-e", "a.test", "-d", "HTTP1=80", "--adapter-option", bad], mode="destination")
            self.assertIn(fragment, str(caught.exception))

    def test_tap_yml(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "destination:\n  destination-app: SSH1=2222\n  proxy-endpoint: ws://127.0.0.1:9\n"
                "  adapters: [SSH1=tcp, 'X=ssh,Y=tcp']\n  connect-retries: 2\n"
            )
        options = parse(["-t", TOKEN, "--config", path, "--connect-retries", "3"], mode="destination")
        self.assertEqual(options.mapping, {"SSH1": ("127.0.0.1", 2222)})
        self.assertEqual(options["connect-retries"], 3)
        self.assertEqual(options.adapter_overrides, {"SSH1": "tcp", "X": "ssh", "Y": "tcp"})


class HelpTests(TestCase):
    def test_help_states_exit_status(self):
        text = " ".join(str(Options()).split())
        self.assertIn("Exit status: 0 when the tunnel is closed", text)
        self.assertIn("or a listen port in use", text)


class VerbosityTests(TestCase):
    def begin(self, verbosity):
        """The observer makeService's log filter puts in front of twistd's (here: a list)."""
        options = parse(["-t", "the-token", "-i", "the-client-token-0123456789abcdef0123", "-e", "a.test", "-s", "1",
                         "--allow-slow-websocket", "-v", str(verbosity)])
        service = tap.makeService(options)
        self.assertIsInstance(service, ModeService)
        seen = Events()
        return service.log_filter.wrap(seen), seen

    def emit(self, observer, level, text="x"):
        from twisted.logger import LogLevel

        observer({"log_level": getattr(LogLevel, level), "log_namespace": "t", "log_format": text, "value": text})

    def test_levels(self):
        for verbosity, shown in [(0, []), (2, ["error"]), (3, ["warn", "error"]), (4, ["info", "warn", "error"]),
                                 (5, ["debug", "info", "warn", "error"])]:
            observer, seen = self.begin(verbosity)
            for level in ["debug", "info", "warn", "error"]:
                self.emit(observer, level, level)
            self.assertEqual([e["value"] for e in seen], shown, verbosity)

    def test_trace_redacts_the_token(self):
        observer, seen = self.begin(6)
        self.emit(observer, "debug", "GET /tunnel\r\naccess-token: the-token\r\n")
        self.assertEqual(seen[0]["value"], "GET /tunnel\r\naccess-token: ***ACCESS_TOKEN_REMOVED***\r\n")

    def test_trace_redacts_the_client_token(self):
        observer, seen = self.begin(6)
        self.emit(observer, "debug", "client-token: the-client-token-0123456789abcdef0123\r\n")
        self.assertEqual(seen[0]["value"], "client-token: ***CLIENT_TOKEN_REMOVED***\r\n")


class NvxTests(TestCase):
    def test_refuses_without_nvx_unless_allowed(self):
        from tunnelkit.transport import nvx

        self.patch(nvx, "nvx_status", lambda: "autobahn's NVX accelerator is not available")
        args = ["-t", TOKEN, "-e", "a.test", "-s", "1"]
        with self.assertRaises(usage.UsageError) as caught:
            parse(args)
        self.assertIn("--allow-slow-websocket", str(caught.exception))
        parse(args + ["--allow-slow-websocket"])
