"""
Tests for the byte-stream adapters in C{services}: C{tcp}, C{ssh} and C{vnc}.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from services.ssh import SSHAdapter, check_ssh_banner, ssh_adapter_factory
from services.tcp import StreamAdapter, tcp_adapter_factory
from services.vnc import VNCAdapter, check_rfb_version, vnc_adapter_factory
from tunnelkit.adapters import IDestinationContext, IServiceAdapter, ProbeFailed
from tunnelkit.errors import ConfigError


@implementer(IDestinationContext)
class DestinationContext:
    def __init__(self, target) -> None:
        self.service_id = "SVC"
        self.reactor = None
        self.default_target = target


def feed_in_pieces(check, data: bytes, cuts):
    """Run C{check} on growing prefixes of C{data} as a probe would; the first verdict."""
    points = sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
    for point in points:
        verdict = check(data[:point], False)
        if verdict is not None:
            return verdict
    return check(data, True)


class SSHBannerTests(SynchronousTestCase):
    def test_plain_banner(self) -> None:
        self.assertEqual(
            check_ssh_banner(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", False),
            "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
        )

    def test_lines_before_banner(self) -> None:
        data = b"Welcome\r\n\r\nto the box\r\nSSH-2.0-dropbear\r\n"
        self.assertEqual(check_ssh_banner(data, False), "SSH-2.0-dropbear")

    def test_compat_version(self) -> None:
        self.assertEqual(check_ssh_banner(b"SSH-1.99-x\n", False), "SSH-1.99-x")

    def test_needs_more(self) -> None:
        for partial in (b"", b"S", b"SSH-2.0-Open", b"hello\r\n"):
            self.assertIsNone(check_ssh_banner(partial, False), partial)

    def test_not_ssh(self) -> None:
        for wrong in (b"HTTP/1.1 400 Bad Request\r\n", b"RFB 003.008\n", b"220 FTP ready\r\n", b"\x16\x03\x01"):
            with self.assertRaises(ProbeFailed, msg=repr(wrong)) as caught:
                check_ssh_banner(wrong, False)
            self.assertIn("instead of an SSH banner", str(caught.exception))
        with self.assertRaises(ProbeFailed) as caught:
            check_ssh_banner(b"\x16\x03\x01\x02", False)
        self.assertIn("TLS", str(caught.exception))

    def test_old_version(self) -> None:
        with self.assertRaises(ProbeFailed):
            check_ssh_banner(b"SSH-1.5-old\r\n", False)

    def test_overlong_identification(self) -> None:
        with self.assertRaises(ProbeFailed):
            check_ssh_banner(b"SSH-2.0-" + b"x" * 300, False)

    @given(st.lists(st.integers(min_value=0, max_value=60)))
    @settings(max_examples=100, deadline=None)
    def test_any_split(self, cuts) -> None:
        data = b"Pre line\r\nSSH-2.0-OpenSSH_9.2p1\r\n"
        self.assertEqual(feed_in_pieces(check_ssh_banner, data, cuts), "SSH-2.0-OpenSSH_9.2p1")


class RFBVersionTests(SynchronousTestCase):
    def test_versions(self) -> None:
        for version in (b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n", b"RFB 003.889\n"):
            self.assertEqual(check_rfb_version(version, False), version[:11].decode())

    def test_needs_more(self) -> None:
        for partial in (b"", b"R", b"RFB 003.00"):
            self.assertIsNone(check_rfb_version(partial, False))

    def test_not_rfb(self) -> None:
        for wrong in (b"SSH-2.0-x\r\n", b"RFB 3.8\nxxxxx", b"HTTP/1.1 200"):
            with self.assertRaises(ProbeFailed, msg=repr(wrong)):
                check_rfb_version(wrong, False)

    @given(st.lists(st.integers(min_value=0, max_value=12)))
    @settings(max_examples=50, deadline=None)
    def test_any_split(self, cuts) -> None:
        self.assertEqual(feed_in_pieces(check_rfb_version, b"RFB 003.008\n", cuts), "RFB 003.008")


class StreamAdapterTests(SynchronousTestCase):
    def test_factories(self) -> None:
        for factory, name, cls in (
            (tcp_adapter_factory, "tcp", StreamAdapter),
            (ssh_adapter_factory, "ssh", SSHAdapter),
            (vnc_adapter_factory, "vnc", VNCAdapter),
        ):
            adapter = factory.build("S1", {})
            self.assertIsInstance(adapter, cls)
            self.assertEqual(adapter.name, name)
            verifyObject(IServiceAdapter, adapter)
            with self.assertRaises(ConfigError):
                factory.build("S1", {"x": 1})
        self.assertEqual(ssh_adapter_factory.prefixes, ("SSH",))
        self.assertEqual(vnc_adapter_factory.prefixes, ("VNC",))

    def test_bytes_pass_untouched_to_the_configured_target(self) -> None:
        context = DestinationContext(("127.0.0.1", 22))
        for factory in (tcp_adapter_factory, ssh_adapter_factory, vnc_adapter_factory):
            adapter = factory.build("S1", {})
            self.assertIsNone(adapter.source_filter(None, 1))
            self.assertIsNone(adapter.destination_filter(context, 1))
            self.assertEqual(adapter.destination_target(context, 7), ("127.0.0.1", 22))

    def probe(self, adapter, answer: bytes):
        reactor = MemoryReactorClock()
        results = []
        adapter.probe(reactor, ("127.0.0.1", 5900), 3).addBoth(results.append)
        proto = reactor.tcpClients[0][2].buildProtocol(IPv4Address("TCP", "127.0.0.1", 5900))
        transport = StringTransport()
        proto.makeConnection(transport)
        if answer:
            proto.dataReceived(answer)
        return results, transport

    def test_tcp_probe_is_connecting(self) -> None:
        results, transport = self.probe(tcp_adapter_factory.build("X", {}), b"")
        self.assertEqual(results, ["accepts TCP connections"])
        self.assertTrue(transport.disconnecting)

    def test_vnc_probe(self) -> None:
        results, transport = self.probe(vnc_adapter_factory.build("VNC1", {}), b"RFB 003.008\n")
        self.assertEqual(results, ["RFB 003.008"])
        self.assertEqual(transport.value(), b"")  # the probe says nothing to the server

    def test_vnc_probe_against_ssh(self) -> None:
        results, _ = self.probe(vnc_adapter_factory.build("VNC1", {}), b"SSH-2.0-x\r\n")
        self.assertIsInstance(results[0], Failure)
        self.assertIn("instead of an RFB version", results[0].getErrorMessage())
