"""
The console's in-service tunnel source (L{tunnelkit.service.console.terminal.TunnelSource}) reaching
the service's own first listener, whatever it is: an C{ssl:} listener with a certificate not signed by
the generated CA and naming another host, a listener on another loopback address, a C{unix:} listener.
The whole service runs in-process on the real reactor; the source must get the tunnel's service ids.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from typing import Any, List

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from tunnelkit.service import tap
from tunnelkit.service.console.terminal import TunnelSource


def foreign_certificate(directory: str) -> str:
    """A self-signed key and certificate (PEM, one file) for tunnels.example.com only: not the generated CA's."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnels.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("tunnels.example.com")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, "foreign.pem")
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return path


class ConsoleSourceTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tunnelkit-console-src-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    @inlineCallbacks
    def start(self, *listen: str) -> Any:
        options = tap.Options()
        argv = ["--mode", "service", "--state-dir", os.path.join(self.dir, "state")]
        for description in listen:
            argv += ["--listen", description]
        options.parseOptions(argv)
        service = tap.TunnelService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        for listener in service.listeners:
            yield listener.listening
        return service

    @inlineCallbacks
    def source_events(self, service: Any) -> Any:
        opened = yield service.control.call("OpenTunnel", service.account, {"destinationConfig": {"services": ["SSH"]}})
        events: List[str] = []
        done: Deferred = Deferred()

        def ready() -> None:
            events.append("ready")
            done.callback(None)

        def ended(message: str) -> None:
            events.append(message)
            if not done.called:
                done.callback(None)

        source = TunnelSource("SSH", ready, lambda data: None, ended)
        service.console.terminal.connect_source(source, opened["sourceAccessToken"], "consoletestclienttoken0000000000001")
        yield done
        source.close()
        return events

    @inlineCallbacks
    def assert_source_connects(self, service: Any) -> Any:
        events = yield self.source_events(service)
        self.assertEqual(events, ["ready"])

    @inlineCallbacks
    def test_foreign_certificate(self) -> Any:
        """The first listener's certificate is not from the generated CA and names tunnels.example.com only."""
        pem = foreign_certificate(self.dir)
        service = yield self.start(f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}")
        yield self.assert_source_connects(service)

    @inlineCallbacks
    def test_other_interface(self) -> Any:
        """The first listener is bound to another address (127.0.0.2), not 127.0.0.1."""
        service = yield self.start("ssl:0:interface=127.0.0.2")
        yield self.assert_source_connects(service)

    @inlineCallbacks
    def test_unix_listener(self) -> Any:
        """The first listener is a unix socket (a TCP one follows)."""
        service = yield self.start(f"unix:{os.path.join(self.dir, 's.sock')}", "tcp:0:interface=127.0.0.1")
        yield self.assert_source_connects(service)

    @inlineCallbacks
    def test_pinned_certificate(self) -> Any:
        """Another certificate than the listener's own is refused: the pin is checked, not skipped."""
        with open(foreign_certificate(self.dir), "rb") as f:
            other = x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)
        service = yield self.start("ssl:0:interface=127.0.0.1")
        listener = service.listeners[0]
        self.assertIsNotNone(listener.certificate)
        service.console.terminal._data_plane = lambda: tap.DataPlaneAddress(listener.port.getHost(), other)
        events = yield self.source_events(service)
        self.assertEqual(len(events), 1)
        self.assertIn("The connection to the tunnel ended", events[0])
