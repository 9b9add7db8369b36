"""Tests of L{tunnelkit.service.audit}: connection accounting from the relay's messages (injected clock)."""

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tunnelkit.protocol.framing import Message
from tunnelkit.service.audit import AccountingRules, AuditTrail, build_audit_trail, read_records


class Rules:
    """Stands for the relay's PeerRules: records what it checked."""

    def __init__(self):
        self.checked = []
        self.services = frozenset({"SSH1"})

    def check(self, message, size):
        if message.type == Message.SESSION_RESET:
            raise ValueError("a client never sends SESSION_RESET")
        self.checked.append(message.type)


class Peer:
    def __init__(self, side, tunnel_id="t-1"):
        self.side = side
        self.channel_id = f"channel-{side}"
        self.rules = Rules()
        self.replaced = False
        self.link = type("Link", (), {"tunnel_id": tunnel_id})()
        self.transport = None


class AccountingTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.path = self.mktemp()
        self.trail = AuditTrail(self.path, self.clock)
        self.source, self.destination = Peer("source"), Peer("destination")
        self.inner = self.source.rules
        self.trail.peer_connected(self.source)
        self.trail.peer_connected(self.destination)

    def records(self, kind=None):
        with open(self.path) as f:
            return [r for r in read_records(f) if kind is None or r["kind"] == kind]

    def send(self, peer, kind, connection_id=1, payload=b"", stream_id=1):
        peer.rules.check(Message(type=kind, serviceId="SSH1", streamId=stream_id, connectionId=connection_id,
                                 payload=payload), len(payload))

    def test_connections_bytes_and_endings(self):
        self.send(self.source, Message.STREAM_START)
        self.send(self.source, Message.DATA, payload=b"a" * 10)
        self.send(self.destination, Message.DATA, payload=b"b" * 7)
        self.send(self.source, Message.CONNECTION_START, connection_id=2)
        self.clock.advance(2.5)
        self.send(self.destination, Message.CONNECTION_RESET)
        self.send(self.source, Message.DATA, connection_id=2, payload=b"c" * 3)
        self.send(self.source, Message.STREAM_RESET)
        first, second = self.records("connection")
        self.assertEqual((first["connection_id"], first["bytes_source_to_destination"],
                          first["bytes_destination_to_source"], first["duration_s"], first["ended"]),
                         (1, 10, 7, 2.5, "reset by destination"))
        self.assertEqual((second["connection_id"], second["bytes_source_to_destination"], second["ended"]),
                         (2, 3, "stream reset by source"))
        self.assertEqual(self.inner.checked[0], Message.STREAM_START)  # the relay's rules still check

    def test_a_new_stream_and_a_disconnect_end_the_old_ones(self):
        self.send(self.source, Message.STREAM_START)
        self.send(self.source, Message.STREAM_START, stream_id=2)
        self.send(self.source, Message.CONNECTION_START, connection_id=2, stream_id=2)
        self.trail.peer_disconnected(self.destination)
        endings = [(r["stream_id"], r["connection_id"], r["ended"]) for r in self.records("connection")]
        self.assertEqual(endings, [(1, 1, "replaced by a new stream"), (2, 1, "destination disconnected"),
                                   (2, 2, "destination disconnected")])
        self.assertEqual(self.records("peer-disconnect")[0]["ended"], "connection lost")

    def test_violations_are_not_counted(self):
        self.assertRaises(ValueError, self.send, self.source, Message.SESSION_RESET)
        self.assertEqual(self.records("connection"), [])

    def test_attributes_reach_the_wrapped_rules(self):
        self.assertIsInstance(self.source.rules, AccountingRules)
        self.source.rules.services = frozenset({"SSH2"})  # as the relay does after a rotation
        self.assertEqual(self.inner.services, frozenset({"SSH2"}))
        self.assertEqual(self.source.rules.services, frozenset({"SSH2"}))

    def test_records_are_json_lines_with_a_time(self):
        self.trail.close()
        with open(self.path) as f:
            lines = f.read().splitlines()
        self.assertEqual([json.loads(line)["kind"] for line in lines], ["peer-connect", "peer-connect"])
        self.assertEqual(json.loads(lines[0])["time"], "1970-01-01T00:00:00.000Z")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_read_records_filters_and_skips_bad_lines(self):
        lines = ['{"kind": "api", "tunnel_id": "a"}', "not json", '{"kind": "api", "tunnel_id": "b"}', "[1]"]
        self.assertEqual([r["tunnel_id"] for r in read_records(lines, "b")], ["b"])
        self.assertEqual(len(list(read_records(lines))), 2)


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
