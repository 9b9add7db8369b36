"""
Tests for C{--mode service} (L{tunnelkit.service.tap}): its options, and the whole service started
in-process on the real reactor, driven by boto3 over real HTTPS with real signatures.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import json
import tempfile
from typing import Any, List

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SkipTest, TestCase

from tunnelkit.service import tap
from tunnelkit.service.certs import ensure_certificates


class OptionsTests(TestCase):
    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--mode", "service", *args])
        return options

    def test_help_states_exit_status(self) -> None:
        self.assertIn("Exit status: 1 on a usage error or when it cannot listen; stopped by a signal", " ".join(str(tap.Options()).split()))

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
        described = tap.listen_description("ssl:8443:interface=127.0.0.1", certs)
        self.assertIn("privateKey=", described)
        self.assertIn("certKey=", described)
        self.assertEqual(tap.listen_description("ssl:443:privateKey=/k.pem", certs), "ssl:443:privateKey=/k.pem")
        self.assertEqual(tap.listen_description("tcp:80", certs), "tcp:80")


def start_service(test: TestCase, *args: str) -> "Deferred[tap.TunnelService]":
    """Start a whole service in-process on the real reactor (stopped at cleanup)."""
    state_dir = tempfile.mkdtemp(prefix="tunnelkit-svc-")
    test.addCleanup(shutil.rmtree, state_dir, True)
    options = tap.Options()
    options.parseOptions(["--mode", "service", "--state-dir", state_dir, "--listen", "ssl:0:interface=127.0.0.1", *args])
    service = tap.TunnelService(options, reactor)
    service.startService()
    test.addCleanup(service.stopService)
    listening = service.listeners[0].listening
    assert listening is not None
    return listening.addCallback(lambda _: service)


def endpoint_url(service: tap.TunnelService) -> str:
    port = service.listeners[0].port
    assert port is not None
    return f"https://127.0.0.1:{port.getHost().port}"


def boto3_client(service: tap.TunnelService, **kwargs: Any) -> Any:
    """A boto3 client for the service: its credentials file and CA, real HTTPS."""
    session = boto3.session.Session(profile_name="default", **kwargs) if not kwargs else boto3.session.Session(**kwargs)
    return session.client(
        "iotsecuretunneling",
        region_name="us-east-1",
        endpoint_url=endpoint_url(service),
        verify=service.certificates.ca_cert,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


class InProcessHTTPSTests(TestCase):
    """boto3 over real HTTPS (keep-alive) against the service, signatures checked for real."""

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        os.environ.pop("AWS_ACCESS_KEY_ID", None)
        self.service = yield start_service(self)
        self.patch(os, "environ", dict(os.environ, AWS_SHARED_CREDENTIALS_FILE=self.service.credentials_path,
                                       AWS_CONFIG_FILE=os.devnull))

    def client(self, **kwargs: Any) -> Any:
        return boto3_client(self.service, **kwargs)

    @inlineCallbacks
    def test_tutorial_calls(self) -> Any:
        """Open with a destination, describe, rotate DESTINATION, close, close --delete, via boto3."""

        def calls() -> List[Any]:
            api = self.client()
            opened = api.open_tunnel(
                description="tutorial", timeoutConfig={"maxLifetimeTimeoutMinutes": 30},
                destinationConfig={"thingName": "RemoteDeviceA", "services": ["SSH"]},
            )
            described = api.describe_tunnel(tunnelId=opened["tunnelId"])["tunnel"]
            rotated = api.rotate_tunnel_access_token(
                tunnelId=opened["tunnelId"], clientMode="DESTINATION",
                destinationConfig={"thingName": "RemoteDeviceA", "services": ["SSH"]},
            )
            api.close_tunnel(tunnelId=opened["tunnelId"])
            closed = api.describe_tunnel(tunnelId=opened["tunnelId"])["tunnel"]["status"]
            api.close_tunnel(tunnelId=opened["tunnelId"], delete=True)
            listed = api.list_tunnels()["tunnelSummaries"]
            api.close()
            return [opened, described, rotated, closed, listed]

        opened, described, rotated, closed, listed = yield deferToThread(calls)
        self.assertEqual(described["status"], "OPEN")
        self.assertEqual(described["destinationConfig"], {"thingName": "RemoteDeviceA", "services": ["SSH"]})
        self.assertEqual(set(rotated) - {"ResponseMetadata"}, {"tunnelArn", "destinationAccessToken"})
        self.assertEqual(closed, "CLOSED")
        self.assertEqual(listed, [])

    @inlineCallbacks
    def test_wrong_secret(self) -> Any:
        """A wrong secret over real HTTPS: 403 InvalidSignatureException, nothing created."""
        key = self.service.store.list_access_keys()[0]

        def call() -> Any:
            bad = self.client(aws_access_key_id=key.access_key_id, aws_secret_access_key="wrong" * 8)
            try:
                bad.open_tunnel()
            except ClientError as e:
                return e.response
            finally:
                bad.close()
            return None

        response = yield deferToThread(call)
        self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 403)
        self.assertEqual(response["Error"]["Code"], "InvalidSignatureException")
        self.assertEqual(self.service.store.count_open_tunnels(self.service.account.account_id), 0)

    @inlineCallbacks
    def test_large_body_refused_early(self) -> Any:
        """A 10 MB Content-Length gets 413 before the body is sent; the service keeps serving."""
        port = self.service.listeners[0].port.getHost().port
        ca = self.service.certificates.ca_cert

        def raw() -> bytes:
            context = ssl.create_default_context(cafile=ca)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
                with context.wrap_socket(plain, server_hostname="127.0.0.1") as tls:
                    tls.sendall(
                        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Amz-Target: IoTSecuredTunneling.OpenTunnel\r\n"
                        b"Content-Type: application/x-amz-json-1.1\r\nContent-Length: 10485760\r\n\r\n"
                        + b"{" * 4096
                    )
                    data = b""
                    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    return data

        data = yield deferToThread(raw)
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data[:100])
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["__type"], "RequestEntityTooLargeException")
        listed = yield deferToThread(self._list)
        self.assertEqual(listed, [])

    @inlineCallbacks
    def test_generated_certificate(self) -> Any:
        """The server certificate verifies against ca.pem for 127.0.0.1 and localhost."""
        port = self.service.listeners[0].port.getHost().port
        ca = self.service.certificates.ca_cert

        def handshake(name: str) -> str:
            context = ssl.create_default_context(cafile=ca)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
                with context.wrap_socket(plain, server_hostname=name) as tls:
                    return tls.version() or ""

        for name in ("127.0.0.1", "localhost"):
            version = yield deferToThread(handshake, name)
            self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        failed = yield deferToThread(lambda: self._fails(handshake, "example.com"))
        self.assertTrue(failed)

    def _list(self) -> Any:
        api = self.client()
        try:
            return api.list_tunnels()["tunnelSummaries"]
        finally:
            api.close()

    @staticmethod
    def _fails(function: Any, *args: Any) -> bool:
        try:
            function(*args)
        except ssl.SSLError:
            return True
        return False


class ListenFailureTests(TestCase):
    def test_port_in_use(self) -> None:
        """Listening on a port in use is a clear error at start."""
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        state_dir = self.mktemp()
        options = tap.Options()
        options.parseOptions(
            ["--mode", "service", "--state-dir", state_dir, "--listen", f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"]
        )
        service = tap.TunnelService(options, reactor)
        import io
        import sys

        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, service.startService)
        self.assertEqual(error.code, 1)
        self.assertIn("cannot listen", stderr.getvalue())
        self.assertIn("Address already in use", stderr.getvalue())
        self.assertIn("choose another port", stderr.getvalue())
        service.stopService()


class StateDirTests(TestCase):
    def test_state_dir_is_a_file(self) -> None:
        """A --state-dir that is a file is one clear line and status 1."""
        import io
        import sys

        path = self.mktemp()
        with open(path, "w"):
            pass
        options = tap.Options()
        options.parseOptions(["--mode", "service", "--state-dir", path, "--listen", "tcp:0:interface=127.0.0.1"])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, tap.makeService, options)
        self.assertEqual(error.code, 1)
        self.assertIn(f"--state-dir {path}: not a directory", stderr.getvalue())


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
        service = tap.TunnelService(options, reactor)  # built, never started: nothing listens
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


class WebSocketTimeoutTests(TestCase):
    """The HTTP idle timeout does not touch a connection upgraded to a WebSocket (real reactor)."""

    timeout = 30

    @inlineCallbacks
    def test_upgraded_connection_outlives_http_timeout(self) -> Any:
        from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
        from twisted.internet.task import deferLater

        if tap.mount_data_plane is None:
            raise SkipTest("the data plane is not built")
        service = yield start_service(self)
        service.site.timeOut = 0.5
        account = service.account
        opened = service.control.call("OpenTunnel", account, {})
        port = service.listeners[0].port.getHost().port
        events: List[str] = []
        connected: Deferred = Deferred()

        class Client(WebSocketClientProtocol):
            def onOpen(self) -> None:
                events.append("open")
                connected.callback(self)

            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                events.append("message")

            def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
                events.append(f"close {code} {reason}")
                if not connected.called:
                    connected.errback(Exception(reason))

        from twisted.internet import ssl as tssl
        from twisted.internet.endpoints import SSL4ClientEndpoint

        url = f"wss://127.0.0.1:{port}/tunnel?local-proxy-mode=source"
        factory = WebSocketClientFactory(
            url, protocols=["aws.iot.securetunneling-3.0"], headers={"access-token": opened["sourceAccessToken"]}
        )
        factory.protocol = Client
        with open(service.certificates.ca_cert, "rb") as f:
            authority = tssl.Certificate.loadPEM(f.read())
        options = tssl.optionsForClientTLS("127.0.0.1", trustRoot=authority)
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, options)
        client = yield endpoint.connect(factory)
        yield connected
        yield deferLater(reactor, 1.5, lambda: None)
        self.assertEqual([e for e in events if e.startswith("close")], [])
        self.assertEqual(service.store.get_tunnel(account.account_id, opened["tunnelId"]).source.status, "CONNECTED")
        closed: Deferred = Deferred()
        client.onClose = lambda *args: closed.callback(None)
        client.sendClose()
        yield closed
