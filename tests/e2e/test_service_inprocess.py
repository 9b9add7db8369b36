"""
The whole service (L{tunnelkit.service.tap}) started in-process on the real reactor, driven by boto3
over real HTTPS with real signatures; a port in use; the HTTP idle timeout and WebSockets.
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
from twisted.trial.unittest import SkipTest, TestCase

from tunnelkit.service import tap


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
        key = (yield self.service.store.list_access_keys())[0]

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
        self.assertEqual((yield self.service.store.count_open_tunnels(self.service.account.account_id)), 0)

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
        import io
        import sys

        from tunnelkit.process import ModeService

        service = ModeService()  # the top of every mode: a ConfigError at start is one line, status 1
        tap.TunnelService(options, reactor).setServiceParent(service)

        from twisted.logger import globalLogPublisher

        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        error = self.assertRaises(SystemExit, service.startService)
        self.assertEqual(error.code, 1)
        self.assertEqual(stderr.getvalue().count("cannot listen"), 1)
        self.assertFalse([e for e in events if "cannot listen" in str(e.get("message", ""))])  # not logged twice
        self.assertIn("Address already in use", stderr.getvalue())
        self.assertIn("choose another port", stderr.getvalue())
        service.stopService()


class WebSocketTimeoutTests(TestCase):
    """The HTTP idle timeout does not touch a connection upgraded to a WebSocket (real reactor)."""

    timeout = 30

    @inlineCallbacks
    def test_upgraded_connection_outlives_http_timeout(self) -> Any:
        from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
        from twisted.internet.protocol import Factory, Protocol

        if tap.mount_data_plane is None:
            raise SkipTest("the data plane is not built")
        service = yield start_service(self)
        service.site.timeOut = 0.5
        account = service.account
        opened = yield service.control.call("OpenTunnel", account, {})
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
        # A plain HTTPS connection opened after the WebSocket, idle: once the site's timeout has closed
        # it, the WebSocket's would have fired too, had it applied to an upgraded connection.
        idle_closed: Deferred = Deferred()

        class Idle(Protocol):
            def connectionLost(self, reason: Any = None) -> None:
                idle_closed.callback(None)

        yield SSL4ClientEndpoint(reactor, "127.0.0.1", port, options).connect(Factory.forProtocol(Idle))
        yield idle_closed
        self.assertEqual([e for e in events if e.startswith("close")], [])
        self.assertEqual((yield service.store.get_tunnel(account.account_id, opened["tunnelId"])).source.status, "CONNECTED")
        closed: Deferred = Deferred()
        client.onClose = lambda *args: closed.callback(None)
        client.sendClose()
        yield closed
