"""
Tests of L{tunnelkit.service.audit}: connection accounting from the messages the real relay carries
(L{tunnelkit.testing.ServiceHarness}, autobahn over in-memory transports, an injected clock).
"""

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.test_relay import ServiceTestCase, data, start
from tunnelkit.protocol.flowcontrol import announcement_frame, eof_frame, window_update_frame
from tunnelkit.protocol.framing import Message
from tunnelkit.protocol.rules import PeerRules, payload_size
from tunnelkit.service.audit import AuditTrail, build_audit_trail, read_records
from tunnelkit.testing import tunnel_frame


def control(kind, stream=1, service="SSH", connection=1):
    return tunnel_frame(type=kind, streamId=stream, serviceId=service, connectionId=connection)


class AccountingTests(ServiceTestCase):
    def setUp(self):
        super().setUp()
        self.path = self.mktemp()
        self.trail = AuditTrail(self.path, self.clock)
        self.addCleanup(self.trail.close)
        self.relay.audit = self.trail

    def records(self, kind=None):
        with open(self.path) as f:
            return [r for r in read_records(f) if kind is None or r["kind"] == kind]

    def ended(self):
        return [(r["connection_id"], r["ended"]) for r in self.records("connection")]

    def announced_pair(self):
        tunnel, source, destination = self.pair()
        source.send(announcement_frame(1 << 20))
        destination.send(announcement_frame(1 << 20))
        source.take_frames(), destination.take_frames()
        return source, destination

    def test_connections_bytes_and_endings(self):
        tunnel, source, destination = self.pair()
        source.send(start() + data(b"a" * 10))
        destination.send(data(b"b" * 7))
        source.send(control(Message.CONNECTION_START, connection=2))
        self.clock.advance(2.5)
        destination.send(control(Message.CONNECTION_RESET))
        source.send(data(b"c" * 64512, connection=2))
        source.send(control(Message.STREAM_RESET))
        first, second = self.records("connection")
        self.assertEqual((first["connection_id"], first["bytes_source_to_destination"],
                          first["bytes_destination_to_source"], first["duration_s"], first["ended"]),
                         (1, 10, 7, 2.5, "reset by destination"))
        self.assertEqual((second["connection_id"], second["bytes_source_to_destination"], second["ended"]),
                         (2, 64512, "stream reset by source"))

    def test_both_eofs_then_reset_is_a_normal_close(self):
        """Review 2: a connection both applications ended (EOF each way, then the reset) is C{closed}."""
        source, destination = self.announced_pair()
        source.send(start() + window_update_frame(1, "SSH", 1, 1000) + data(b"request"))
        source.send(control(Message.CONNECTION_START, connection=2))
        source.send(control(Message.CONNECTION_START, connection=3))
        source.send(eof_frame(1, "SSH", 1))
        destination.send(data(b"answer", connection=1) + eof_frame(1, "SSH", 1))
        source.send(control(Message.CONNECTION_RESET))
        # Only one side's EOF: the reset that follows is a real one.
        source.send(eof_frame(1, "SSH", 2))
        destination.send(control(Message.CONNECTION_RESET, connection=2))
        # Both EOFs, then the stream ends: closed too.
        source.send(eof_frame(1, "SSH", 3))
        destination.send(eof_frame(1, "SSH", 3))
        destination.send(control(Message.STREAM_RESET))
        self.assertEqual(self.ended(), [(1, "closed"), (2, "reset by destination"), (3, "closed")])
        first = self.records("connection")[0]
        self.assertEqual((first["bytes_source_to_destination"], first["bytes_destination_to_source"]), (7, 6))

    def test_eofs_not_forwarded_do_not_make_a_close(self):
        """EOFs between peers that did not both announce are dropped by the relay: the reset stays a reset."""
        tunnel, source, destination = self.pair()
        source.send(start() + eof_frame(1, "SSH", 1))
        destination.send(eof_frame(1, "SSH", 1))
        source.send(control(Message.CONNECTION_RESET))
        self.assertEqual(self.ended(), [(1, "reset by source")])

    def test_a_new_stream_and_a_disconnect_end_the_old_ones(self):
        tunnel, source, destination = self.pair()
        source.send(start())
        source.send(start(stream=2))
        source.send(control(Message.CONNECTION_START, stream=2, connection=2))
        destination.lose()
        endings = [(r["stream_id"], r["connection_id"], r["ended"]) for r in self.records("connection")]
        self.assertEqual(endings, [(1, 1, "replaced by a new stream"), (2, 1, "destination disconnected"),
                                   (2, 2, "destination disconnected")])
        self.assertEqual(self.records("peer-disconnect")[0]["ended"], "connection lost")
        # With no destination, a start is refused by the relay: recorded as such.
        source.send(start(stream=3))
        self.assertEqual(self.ended()[-1], (1, "refused: the destination is not connected"))

    def test_violations_are_not_counted(self):
        tunnel, source, destination = self.pair()
        source.send(control(Message.SESSION_RESET))
        self.assertEqual(source.close_frame()[0], 1008)
        self.assertEqual(self.records("connection"), [])

    def test_the_relay_keeps_its_own_rules(self):
        """No wrapper around the peer's rules: the relay's updates (a rotation's services) reach them."""
        tunnel, source, destination = self.pair()
        self.assertIs(type(source.protocol.rules), PeerRules)
        self.assertIsNotNone(source.protocol.link.ledger)

    def test_records_are_json_lines_with_a_time(self):
        tunnel, source, destination = self.pair()
        self.trail.close()
        with open(self.path) as f:
            lines = f.read().splitlines()
        self.assertEqual([json.loads(line)["kind"] for line in lines], ["peer-connect", "peer-connect"])
        self.assertEqual(json.loads(lines[0])["time"], "2027-01-15T08:00:00.000Z")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_read_records_filters_and_skips_bad_lines(self):
        lines = ['{"kind": "api", "tunnel_id": "a"}', "not json", '{"kind": "api", "tunnel_id": "b"}', "[1]"]
        self.assertEqual([r["tunnel_id"] for r in read_records(lines, "b")], ["b"])
        self.assertEqual(len(list(read_records(lines))), 2)


class PayloadSizeTests(TestCase):
    def test_payload_size_from_the_frame_size(self):
        """payload_size equals len(payload) for every shape of DATA frame a client encodes."""
        for size in (0, 1, 127, 128, 16383, 16384, 64512):
            for service in ("", "SSH", "é" * 5):
                for connection in (0, 1, 300):
                    for stream in (1, 200, 2**31 - 1):
                        message = Message(type=Message.DATA, streamId=stream, serviceId=service,
                                          connectionId=connection, payload=b"p" * size)
                        body = message.SerializeToString()
                        parsed = Message.FromString(body)
                        self.assertEqual(payload_size(parsed, len(body)), size, (size, service, connection, stream))


class BuildTests(TestCase):
    def test_default_path_and_off(self):
        state = self.mktemp()
        os.makedirs(state)
        trail = build_audit_trail({}, state, Clock())
        self.addCleanup(trail.close)
        self.assertEqual(trail.path, os.path.join(state, "audit.jsonl"))
        self.assertIsNone(build_audit_trail({"audit-log": ""}, state, Clock()))


class RotationTests(TestCase):
    def test_rotated_and_bounded(self):
        from tunnelkit.service.audit import KEEP_ROTATED, trail_files

        path = self.mktemp()
        trail = AuditTrail(path, Clock(), rotate_size=300)
        for number in range(40):
            trail.record("api", operation="ListTunnels", n=number)
        trail.close()
        files = trail_files(path)
        self.assertEqual(files, [f"{path}.{n}" for n in range(KEEP_ROTATED, 0, -1)] + [path])
        self.assertFalse(os.path.exists(f"{path}.{KEEP_ROTATED + 1}"))
        numbers = []
        for name in files:
            self.assertLess(os.path.getsize(name), 300 + 200)
            with open(name) as f:
                numbers += [r["n"] for r in read_records(f)]
        self.assertEqual(numbers, sorted(numbers))  # oldest first, none lost within what is kept
        self.assertEqual(numbers[-1], 39)

    def test_rotated_at_the_size_in_bytes(self):
        """The size counts what the file held before and every byte written (UTF-8 too)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x" * 250 + "\n")
        trail = AuditTrail(path, Clock(), rotate_size=1000)
        trail.record("api", operation="é" * 5)
        self.assertFalse(os.path.exists(f"{path}.1"))
        self.assertEqual(os.path.getsize(path), 325)
        # 580 characters more: past 1000 bytes by its UTF-8 length only (values are bounded to 128 characters)
        trail.record("api", **{f"f{n}": "é" * 100 for n in range(5)})
        trail.close()
        self.assertTrue(os.path.exists(f"{path}.1"))
        self.assertGreaterEqual(os.path.getsize(f"{path}.1"), 1000)
