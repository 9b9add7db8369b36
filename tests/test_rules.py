"""
Tests for L{tunnelkit.protocol.rules}: each rule of reference section 1.7, per side and version.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.errors import ProtocolError, ProtocolViolation
from tunnelkit.protocol import rules
from tunnelkit.protocol.framing import MAX_PAYLOAD_SIZE, Message, parse_message
from tunnelkit.protocol.rules import PROTOCOL_VERSIONS, PeerRules

DATA = Message.DATA
STREAM_START = Message.STREAM_START
STREAM_RESET = Message.STREAM_RESET
SESSION_RESET = Message.SESSION_RESET
SERVICE_IDS = Message.SERVICE_IDS
CONNECTION_START = Message.CONNECTION_START
CONNECTION_RESET = Message.CONNECTION_RESET


def check(peer: PeerRules, message: Message) -> None:
    peer.check(message, message.ByteSize())


class RuleTestCase(SynchronousTestCase):
    def assertViolation(self, rule: str, peer: PeerRules, message: Message) -> ProtocolViolation:
        error = self.assertRaises(ProtocolViolation, check, peer, message)
        self.assertEqual(error.rule, rule, str(error))
        self.assertIsInstance(error, ProtocolError)
        return error


class ConstructionTests(SynchronousTestCase):
    def test_versions(self) -> None:
        self.assertEqual(
            PROTOCOL_VERSIONS,
            {
                "aws.iot.securetunneling-1.0": 1,
                "aws.iot.securetunneling-2.0": 2,
                "aws.iot.securetunneling-3.0": 3,
            },
        )

    def test_bad_side(self) -> None:
        error = self.assertRaises(ValueError, PeerRules, "src", ())
        self.assertIn("'src'", str(error))

    def test_bad_version(self) -> None:
        self.assertRaises(ValueError, PeerRules, "source", (), 4)

    def test_attributes(self) -> None:
        peer = PeerRules("source", ["SSH", "HTTP"], 2)
        self.assertEqual((peer.side, peer.services, peer.version), ("source", {"SSH", "HTTP"}, 2))
        self.assertEqual(peer.started_services, frozenset())


class ValidConversationTests(RuleTestCase):
    """What real clients send passes."""

    def test_v3_source(self) -> None:
        peer = PeerRules("source", ["SSH", "HTTP"])
        for message in [
            Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1),
            Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x"),
            Message(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=2),
            Message(type=DATA, streamId=1, serviceId="SSH", connectionId=2, payload=b"y" * MAX_PAYLOAD_SIZE),
            Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1),
            Message(type=STREAM_RESET, streamId=1, serviceId="SSH"),
            Message(type=STREAM_START, streamId=1, serviceId="HTTP", connectionId=1),
        ]:
            check(peer, message)
        self.assertEqual(peer.started_services, {"SSH", "HTTP"})

    def test_v3_destination(self) -> None:
        peer = PeerRules("destination", ["SSH"])
        peer.note_stream_started("SSH")
        check(peer, Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x"))
        check(peer, Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1))
        check(peer, Message(type=STREAM_RESET, streamId=1, serviceId="SSH"))

    def test_v1_format_on_v3_session(self) -> None:
        """localproxy -y V1 negotiates 3.0 but sends V1 messages: allowed."""
        source = PeerRules("source", ["SSH"], 3)
        destination = PeerRules("destination", ["SSH"], 3)
        check(source, Message(type=STREAM_START, streamId=1))
        destination.note_stream_started("")
        check(source, Message(type=DATA, streamId=1, payload=b"x"))
        check(destination, Message(type=DATA, streamId=1, payload=b"y"))
        check(source, Message(type=STREAM_RESET, streamId=1))
        check(source, Message(type=STREAM_START, streamId=2))

    def test_v2_format_on_v3_session(self) -> None:
        peer = PeerRules("source", ["SSH"], 3)
        check(peer, Message(type=STREAM_START, streamId=1, serviceId="SSH"))
        check(peer, Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x"))

    def test_v1_session(self) -> None:
        peer = PeerRules("source", [], 1)
        check(peer, Message(type=STREAM_START, streamId=5))
        check(peer, Message(type=DATA, streamId=5, payload=b"x"))
        check(peer, Message(type=STREAM_RESET, streamId=5))

    def test_v2_session(self) -> None:
        peer = PeerRules("source", ["A", "B"], 2)
        check(peer, Message(type=STREAM_START, streamId=1, serviceId="A"))
        check(peer, Message(type=STREAM_START, streamId=1, serviceId="B"))
        check(peer, Message(type=DATA, streamId=1, serviceId="B", payload=b"x"))

    def test_ignorable_unknown_type(self) -> None:
        """An unknown type marked ignorable passes (the peer may skip it)."""
        for side in rules.SIDES:
            check(PeerRules(side, []), Message(type=42, ignorable=True))
            check(PeerRules(side, [], 1), Message(type=CONNECTION_RESET, ignorable=True))
            check(PeerRules(side, [], 2), Message(type=CONNECTION_START if side == "source" else 9, ignorable=True))

    def test_ignorable_known_type(self) -> None:
        """WEBSSH marks everything ignorable: harmless."""
        peer = PeerRules("source", [])
        check(peer, Message(type=STREAM_START, streamId=3, ignorable=True))

    def test_size_argument_only_hints(self) -> None:
        """A frame larger than a payload can be (long service id) with a small payload passes."""
        peer = PeerRules("source", ["S"])
        message = Message(type=STREAM_START, streamId=1, serviceId="S")
        peer.check(message, MAX_PAYLOAD_SIZE + 100)


class TypeRuleTests(RuleTestCase):
    def test_type_zero(self) -> None:
        for side in rules.SIDES:
            for version in (1, 2, 3):
                for ignorable in (False, True):
                    error = self.assertViolation(
                        rules.RULE_TYPE_ZERO,
                        PeerRules(side, [], version),
                        Message(type=0, streamId=1, ignorable=ignorable),
                    )
        self.assertIn("type 0", str(error))

    def test_unknown_type(self) -> None:
        error = self.assertViolation(rules.RULE_UNKNOWN_TYPE, PeerRules("source", []), Message(type=8))
        self.assertIn("not marked ignorable", str(error))

    def test_v3_types_on_v1_and_v2(self) -> None:
        """CONNECTION_START/RESET are unknown types before V3; SERVICE_IDS... is service-only anyway."""
        for version in (1, 2):
            self.assertViolation(
                rules.RULE_UNKNOWN_TYPE,
                PeerRules("source", [], version),
                Message(type=CONNECTION_RESET, streamId=1, connectionId=0),
            )

    def test_destination_start(self) -> None:
        """A destination must not start streams or connections, in any version."""
        for message_type in (STREAM_START, CONNECTION_START):
            for version in (1, 2, 3):
                for ignorable in (False, True):
                    error = self.assertViolation(
                        rules.RULE_SOURCE_ONLY_TYPE,
                        PeerRules("destination", ["SSH"], version),
                        Message(type=message_type, streamId=1, ignorable=ignorable),
                    )
        self.assertIn("destination sent CONNECTION_START", str(error))

    def test_service_only(self) -> None:
        """Clients never send SESSION_RESET or SERVICE_IDS, even marked ignorable on V1."""
        for side in rules.SIDES:
            for version in (1, 2, 3):
                for message_type in (SESSION_RESET, SERVICE_IDS):
                    for ignorable in (False, True):
                        error = self.assertViolation(
                            rules.RULE_SERVICE_ONLY_TYPE,
                            PeerRules(side, [], version),
                            Message(type=message_type, ignorable=ignorable),
                        )
        self.assertIn("only the service may send", str(error))


class StreamIdRuleTests(RuleTestCase):
    def test_zero_and_negative(self) -> None:
        for message_type in (DATA, STREAM_START, STREAM_RESET, CONNECTION_START, CONNECTION_RESET):
            for stream_id in (0, -1, -(2**31)):
                peer = PeerRules("source", [])
                peer.note_stream_started("")
                error = self.assertViolation(
                    rules.RULE_STREAM_ID, peer, Message(type=message_type, streamId=stream_id)
                )
                self.assertIn(f"stream id {stream_id}", str(error))


class PayloadRuleTests(RuleTestCase):
    def test_too_large(self) -> None:
        peer = PeerRules("source", [])
        check(peer, Message(type=STREAM_START, streamId=1))
        check(peer, Message(type=DATA, streamId=1, payload=b"x" * MAX_PAYLOAD_SIZE))
        error = self.assertViolation(
            rules.RULE_PAYLOAD_SIZE, peer, Message(type=DATA, streamId=1, payload=b"x" * (MAX_PAYLOAD_SIZE + 1))
        )
        self.assertIn("64513 payload bytes", str(error))

    def test_payload_on_ignorable_unknown_type(self) -> None:
        self.assertViolation(
            rules.RULE_PAYLOAD_SIZE,
            PeerRules("source", []),
            Message(type=42, ignorable=True, payload=b"x" * (MAX_PAYLOAD_SIZE + 1)),
        )

    def test_payload_on_other_types(self) -> None:
        peer = PeerRules("source", [])
        self.assertViolation(
            rules.RULE_PAYLOAD_SIZE,
            peer,
            Message(type=STREAM_START, streamId=1, payload=b"x" * (MAX_PAYLOAD_SIZE + 1)),
        )


class PayloadBoundTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        payload_size=st.integers(min_value=MAX_PAYLOAD_SIZE - 200, max_value=MAX_PAYLOAD_SIZE + 3),
        stream_id=st.integers(min_value=1, max_value=2**31 - 1),
        service_id=st.sampled_from(["", "S", "é" * 40, "x" * 128]),
        connection_id=st.integers(min_value=0, max_value=2**32 - 1),
        ignorable=st.booleans(),
    )
    def test_exact_limit(
        self, payload_size: int, stream_id: int, service_id: str, connection_id: int, ignorable: bool
    ) -> None:
        """The size shortcut never lets a payload over the limit through, nor refuses one within it."""
        peer = PeerRules("source", [service_id] if service_id else [])
        message = Message(
            type=STREAM_START,
            streamId=stream_id,
            serviceId=service_id,
            connectionId=connection_id,
            ignorable=ignorable,
            payload=b"p" * payload_size,
        )
        if payload_size > MAX_PAYLOAD_SIZE:
            error = self.assertRaises(ProtocolViolation, check, peer, message)
            self.assertEqual(error.rule, rules.RULE_PAYLOAD_SIZE)
        else:
            check(peer, message)


class FieldRuleTests(RuleTestCase):
    def test_unknown_field(self) -> None:
        """A field the schema does not define (here 8 and 15) is refused, found from the raw bytes."""
        message = parse_message(bytes.fromhex("0802 1001 4005 7801"))
        self.assertEqual(message.type, STREAM_START)
        error = self.assertViolation(rules.RULE_UNKNOWN_FIELD, PeerRules("source", []), message)
        self.assertIn("field(s) 8, 15", str(error))

    def test_unknown_field_on_ignorable_unknown_type(self) -> None:
        message = parse_message(bytes.fromhex("082a 1801 4005"))
        self.assertViolation(rules.RULE_UNKNOWN_FIELD, PeerRules("source", []), message)

    def test_v1_fields(self) -> None:
        """Fields 5, 6 and 7 do not exist in V1."""
        for message, field in [
            (Message(type=STREAM_START, streamId=1, serviceId="SSH"), "serviceId (5)"),
            (Message(type=STREAM_START, streamId=1, availableServiceIds=["SSH"]), "availableServiceIds (6)"),
            (Message(type=STREAM_START, streamId=1, connectionId=1), "connectionId (7)"),
        ]:
            error = self.assertViolation(
                rules.RULE_FIELD_NOT_IN_VERSION, PeerRules("source", ["SSH"], 1), message
            )
            self.assertIn(field, str(error))
            self.assertIn("aws.iot.securetunneling-1.0", str(error))

    def test_v2_fields(self) -> None:
        """V2 has fields 5 and 6, not 7."""
        peer = PeerRules("source", ["SSH"], 2)
        check(peer, Message(type=STREAM_START, streamId=1, serviceId="SSH"))
        error = self.assertViolation(
            rules.RULE_FIELD_NOT_IN_VERSION,
            peer,
            Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x"),
        )
        self.assertIn("connectionId (7)", str(error))

    def test_v3_fields(self) -> None:
        peer = PeerRules("source", ["SSH"], 3)
        check(peer, Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=9))

    def test_empty_service_id_is_absent(self) -> None:
        """An explicitly encoded empty service id (2a 00) is the same as none, even on V1."""
        message = parse_message(bytes.fromhex("0802 1001 2a00"))
        check(PeerRules("source", [], 1), message)


class ServiceIdRuleTests(RuleTestCase):
    def test_unknown_service_id(self) -> None:
        peer = PeerRules("source", ["SSH", "HTTP"])
        error = self.assertViolation(
            rules.RULE_UNKNOWN_SERVICE_ID,
            peer,
            Message(type=STREAM_START, streamId=1, serviceId="FTP", connectionId=1),
        )
        self.assertIn("'FTP'", str(error))
        self.assertIn("HTTP, SSH", str(error))

    def test_service_id_on_tunnel_without_services(self) -> None:
        error = self.assertViolation(
            rules.RULE_UNKNOWN_SERVICE_ID,
            PeerRules("source", []),
            Message(type=STREAM_START, streamId=1, serviceId="SSH"),
        )
        self.assertIn("(none)", str(error))

    def test_unknown_service_id_on_data(self) -> None:
        peer = PeerRules("destination", ["SSH"])
        peer.note_stream_started("SSH")
        self.assertViolation(
            rules.RULE_UNKNOWN_SERVICE_ID,
            peer,
            Message(type=DATA, streamId=1, serviceId="FTP", payload=b"x"),
        )

    def test_missing_service_id_on_a_tunnel_of_two(self) -> None:
        for side, message in (
            ("source", Message(type=STREAM_START, streamId=1, connectionId=1)),
            ("source", Message(type=CONNECTION_START, streamId=1, connectionId=2)),
            ("destination", Message(type=DATA, streamId=1, payload=b"x")),
        ):
            peer = PeerRules(side, ["SSH", "HTTP"])
            peer.note_stream_started("")
            error = self.assertViolation(rules.RULE_MISSING_SERVICE_ID, peer, message)
            self.assertIn("HTTP, SSH", str(error))
        # one service, or none: messages without a service id are fine
        check(PeerRules("source", ["SSH"]), Message(type=STREAM_START, streamId=1))
        check(PeerRules("source", []), Message(type=STREAM_START, streamId=1))

    def test_mixing_without_then_with(self) -> None:
        peer = PeerRules("source", ["SSH"])
        check(peer, Message(type=STREAM_START, streamId=1))
        error = self.assertViolation(
            rules.RULE_SERVICE_ID_MIXING,
            peer,
            Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x"),
        )
        self.assertIn("must not alternate", str(error))

    def test_mixing_with_then_without(self) -> None:
        peer = PeerRules("source", ["SSH"])
        check(peer, Message(type=STREAM_START, streamId=1, serviceId="SSH"))
        self.assertViolation(
            rules.RULE_SERVICE_ID_MIXING, peer, Message(type=STREAM_RESET, streamId=1)
        )

    def test_mixing_destination(self) -> None:
        peer = PeerRules("destination", ["SSH"])
        peer.note_stream_started("SSH")
        check(peer, Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x"))
        self.assertViolation(
            rules.RULE_SERVICE_ID_MIXING, peer, Message(type=CONNECTION_RESET, streamId=1)
        )


class DataBeforeStartTests(RuleTestCase):
    def test_source_data_first(self) -> None:
        peer = PeerRules("source", ["SSH"])
        error = self.assertViolation(
            rules.RULE_DATA_BEFORE_STREAM_START,
            peer,
            Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x"),
        )
        self.assertIn("'SSH'", str(error))

    def test_source_other_service(self) -> None:
        peer = PeerRules("source", ["SSH", "HTTP"])
        check(peer, Message(type=STREAM_START, streamId=1, serviceId="SSH"))
        self.assertViolation(
            rules.RULE_DATA_BEFORE_STREAM_START,
            peer,
            Message(type=DATA, streamId=1, serviceId="HTTP", payload=b"x"),
        )

    def test_connection_start_counts(self) -> None:
        """A CONNECTION_START (accepted in place of a first STREAM_START) starts the service too."""
        peer = PeerRules("source", ["SSH"])
        check(peer, Message(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=1))
        check(peer, Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x", connectionId=1))

    def test_destination_needs_hook(self) -> None:
        """A destination's DATA is allowed only for what the relay noted the source started."""
        peer = PeerRules("destination", ["SSH", "HTTP"])
        self.assertViolation(
            rules.RULE_DATA_BEFORE_STREAM_START,
            peer,
            Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x"),
        )
        peer.note_stream_started("SSH")
        check(peer, Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x"))
        self.assertViolation(
            rules.RULE_DATA_BEFORE_STREAM_START,
            peer,
            Message(type=DATA, streamId=1, serviceId="HTTP", payload=b"x"),
        )
        self.assertEqual(peer.started_services, {"SSH"})

    def test_previously_active(self) -> None:
        """DATA for a service whose stream was reset is still allowed (stale, the peer drops it)."""
        peer = PeerRules("source", ["SSH"])
        check(peer, Message(type=STREAM_START, streamId=1, serviceId="SSH"))
        check(peer, Message(type=STREAM_RESET, streamId=1, serviceId="SSH"))
        check(peer, Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x"))

    def test_v1_without_start(self) -> None:
        error = self.assertViolation(
            rules.RULE_DATA_BEFORE_STREAM_START,
            PeerRules("destination", []),
            Message(type=DATA, streamId=1, payload=b"x"),
        )
        self.assertIn("DATA for a stream", str(error))


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        side=st.sampled_from(rules.SIDES),
        version=st.sampled_from((1, 2, 3)),
        body=st.binary(max_size=40),
    )
    def test_only_violations(self, side: str, version: int, body: bytes) -> None:
        """Whatever a client sends, check either passes or raises ProtocolViolation with a known rule."""
        try:
            message = parse_message(body)
        except ProtocolError:
            return
        peer = PeerRules(side, ["SSH"], version)
        try:
            peer.check(message, len(body))
        except ProtocolViolation as error:
            self.assertIn(error.rule, {getattr(rules, name) for name in rules.__all__ if name.startswith("RULE_")})
