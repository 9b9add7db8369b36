# -*- test-case-name: tests.test_api -*-
"""
An in-memory control plane for tests: the real store (SQLite in a temporary directory), the real
L{ControlPlane}, L{ApiResource} and L{ServiceSite}, an injected L{Clock}, and botocore clients whose
requests are signed for real and delivered to the site over a L{StringTransport} (botocore's
C{before-send} hook) instead of a socket.

The data plane and the notifier are recorders implementing their interfaces (they belong to other
parts of the service and are tested there).
"""

from __future__ import annotations

import datetime
import json
import tempfile
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import botocore.auth
import botocore.session
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tunnelkit.service.api import ApiResource, ServiceSite, build_root
from tunnelkit.service.auth import SigV4Verifier, create_access_key, ensure_initial_credentials
from tunnelkit.service.interfaces import INotifier, ITunnelEvents
from tunnelkit.service.operations import ControlPlane, Limits
from tunnelkit.service.store import AccessKey, Account
from tunnelkit.service.dbrunner import Blocking, resolved
from tunnelkit.service.store_sqlite import open_store
from twisted.web.resource import Resource

REGION = "us-east-1"
START = 1_800_000_000.0


@implementer(ITunnelEvents)
class RecordingEvents:
    """Records what the control plane tells the data plane."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, str, str]] = []

    def tunnel_closed(self, tunnel_id: str, reason: str) -> None:
        self.calls.append(("tunnel_closed", tunnel_id, reason))

    def token_rotated(self, tunnel_id: str, side: str) -> None:
        self.calls.append(("token_rotated", tunnel_id, side))


@implementer(INotifier)
class RecordingNotifier:
    """Records the notifications the control plane asks for."""

    def __init__(self) -> None:
        self.sent: List[Tuple[str, str, str, Tuple[str, ...], str]] = []
        self.closed: List[str] = []

    def notify_destination(
        self, tunnel_id: str, thing_name: str, access_token: str, services: Tuple[str, ...], region: str
    ) -> None:
        self.sent.append((tunnel_id, thing_name, access_token, tuple(services), region))

    def tunnel_closed(self, tunnel_id: str) -> None:
        self.closed.append(tunnel_id)


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs: Any) -> Any:
        yield self._body


def parse_response(data: bytes) -> Tuple[int, Dict[str, str], bytes]:
    """Status, lower-cased headers and body of one HTTP/1.1 response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body


class InMemoryService:
    """The control plane of one state directory, served in memory."""

    def __init__(
        self,
        state_dir: str,
        clock: Clock,
        limits: Limits = Limits(),
        closed_retention: float = 3 * 3600.0,
        start: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.real_store = open_store(state_dir)
        #: The store, read synchronously by the tests (its runner is synchronous).
        self.store: Any = Blocking(self.real_store)
        self.account, self.key = ensure_initial_credentials(self.real_store, state_dir, None, clock.seconds())
        if self.key is None:
            self.key = [k for k in self.store.list_access_keys() if k.revoked_at is None][0]
        self.events = RecordingEvents()
        self.notifier = RecordingNotifier()
        self.control = ControlPlane(
            self.real_store, clock, REGION, self.events, self.notifier, limits, closed_retention=closed_retention
        )
        self.root = build_root(Resource())
        self.root.putChild(b"", ApiResource(self.control, SigV4Verifier(self.real_store, REGION, clock.seconds)))
        self.site = ServiceSite(self.root, reactor=clock)
        if start:
            self.control.lifecycle.startService()

    def stop(self) -> None:
        if self.control.lifecycle.running:
            self.control.lifecycle.stopService()
        self.store.close()

    def new_account(self, name: str) -> Tuple[Account, AccessKey]:
        account = self.store.create_account(name, str(100000000000 + len(self.store.list_accounts())), self.clock.seconds())
        return account, resolved(create_access_key(self.real_store, account, self.clock.seconds()))

    def exchange(self, raw: bytes) -> Tuple[int, Dict[str, str], bytes, StringTransport]:
        """Send raw request bytes to the site; return the response and the transport."""
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        status, headers, body = parse_response(transport.value())
        protocol.connectionLost(None)
        return status, headers, body, transport

    def client(self, key: Optional[AccessKey] = None, secret: Optional[str] = None, region: str = REGION) -> Any:
        """A botocore client whose requests (signed for real) go to this in-memory site."""
        key = key or self.key
        assert key is not None
        session = botocore.session.get_session()
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=lambda v: v)
        client = session.create_client(
            "iotsecuretunneling",
            region_name=region,
            endpoint_url="https://127.0.0.1:8443",
            aws_access_key_id=key.access_key_id,
            aws_secret_access_key=secret if secret is not None else key.secret_access_key,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}),
        )
        client.meta.events.register("before-send.iotsecuretunneling", self._send)
        return client

    def _send(self, request: Any, **kwargs: Any) -> AWSResponse:
        body = request.body or b""
        if not isinstance(body, bytes):
            body = body.read() if hasattr(body, "read") else body.encode()
        head = f"{request.method} /{request.url.split('/', 3)[3]} HTTP/1.1\r\n"
        names = set()
        for name, value in request.headers.items():
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            head += f"{name}: {value}\r\n"
            names.add(name.lower())
        if "host" not in names:  # added by urllib3 on a real connection
            head += f"Host: {request.url.split('/')[2]}\r\n"
        if "content-length" not in names:
            head += f"Content-Length: {len(body)}\r\n"
        head += "\r\n"
        status, headers, content, _ = self.exchange(head.encode("latin-1") + body)
        return AWSResponse(request.url, status, headers, _Raw(content))

    def signed(
        self,
        target: Optional[str],
        body: bytes,
        key: Optional[AccessKey] = None,
        extra_headers: Sequence[Tuple[str, str]] = (),
        region: str = REGION,
        service: str = "IoTSecuredTunneling",
    ) -> bytes:
        """Raw bytes of a POST / signed with botocore's SigV4 signer."""
        key = key or self.key
        assert key is not None
        headers = {"Content-Type": "application/x-amz-json-1.1", "Host": "127.0.0.1:8443"}
        if target is not None:
            headers["X-Amz-Target"] = target
        for name, value in extra_headers:
            headers[name] = value
        request = AWSRequest(method="POST", url="https://127.0.0.1:8443/", data=body, headers=headers)
        botocore.auth.SigV4Auth(Credentials(key.access_key_id, key.secret_access_key), service, region).add_auth(
            request
        )
        head = "POST / HTTP/1.1\r\n"
        for name, value in request.headers.items():
            head += f"{name}: {value}\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        return head.encode("latin-1") + body


class ServiceTestCase(TestCase):
    """A test case with an in-memory service (C{self.service}) on a L{Clock} that botocore signs with."""

    limits = Limits(max_open_tunnels=5, max_services_per_tunnel=3)
    closed_retention = 3 * 3600.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.patch(
            botocore.auth,
            "get_current_datetime",
            lambda: datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc).replace(tzinfo=None),
        )
        self.state_dir = tempfile.mkdtemp(prefix="tunnelkit-test-")
        self.addCleanup(shutil.rmtree, self.state_dir, True)
        self.service = self.start_service()
        self.api = self.service.client()

    def start_service(self) -> InMemoryService:
        service = InMemoryService(self.state_dir, self.clock, self.limits, self.closed_retention)
        self.addCleanup(service.stop)
        return service

    def connect(self) -> Tuple[Any, StringTransport]:
        """A connection to the site over a L{StringTransport}, for raw HTTP bytes: (protocol, transport)."""
        protocol = self.service.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def call_raw(self, target: Optional[str], body: Any, **kwargs: Any) -> Tuple[int, Dict[str, Any]]:
        """POST a signed request; return the status and the decoded JSON body."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, headers, content, _ = self.service.exchange(self.service.signed(target, data, **kwargs))
        return status, json.loads(content) if content else {}
