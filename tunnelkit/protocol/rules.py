# -*- test-case-name: tests.test_rules -*-
"""
What a tunnel client may send, per negotiated protocol version (reference section 1.7).

The service's relay keeps one L{PeerRules} per WebSocket connection and calls L{PeerRules.check} on
every tunnel frame that client sends; a broken rule raises
L{tunnelkit.errors.ProtocolViolation}, whose C{rule} is a short name (see the C{RULE_*} constants) fit
for a metrics label and whose text tells the user what was wrong.

Version rules only forbid what the negotiated subprotocol cannot carry.  AWS's localproxy always
negotiates C{aws.iot.securetunneling-3.0}, even when it speaks the V1 or V2 message format
(C{-y V1|V2}); a V3 session may therefore carry messages without a service id or a connection id, as
long as it does not alternate between with and without a service id within the session.

Rule 9 (DATA needs a prior STREAM_START for its service id) needs to know what the I{source} started:
a source's rules learn it from the source's own STREAM_START / CONNECTION_START frames; a destination
never sends STREAM_START, so the relay must call L{PeerRules.note_stream_started} on the destination's
rules each time it delivers a source's STREAM_START or CONNECTION_START that passed the source's
check.  A relay that replaces a destination connection can seed the new rules from
L{PeerRules.started_services} of the source's rules.  The rule applies to messages without a service
id too (they count as service id C{""}): a DATA frame before any stream was started is meaningless.
"""

from __future__ import annotations

from typing import Any, FrozenSet, Iterable, Optional, Set, cast

from google.protobuf.unknown_fields import UnknownFieldSet

from tunnelkit.errors import ProtocolViolation
from tunnelkit.protocol.framing import MAX_PAYLOAD_SIZE
from tunnelkit.protocol.message_pb2 import Message

__all__ = [
    "PROTOCOL_VERSIONS",
    "SIDES",
    "PeerRules",
    "RULE_TYPE_ZERO",
    "RULE_UNKNOWN_TYPE",
    "RULE_SOURCE_ONLY_TYPE",
    "RULE_SERVICE_ONLY_TYPE",
    "RULE_STREAM_ID",
    "RULE_PAYLOAD_SIZE",
    "RULE_FIELD_NOT_IN_VERSION",
    "RULE_UNKNOWN_FIELD",
    "RULE_UNKNOWN_SERVICE_ID",
    "RULE_SERVICE_ID_MIXING",
    "RULE_MISSING_SERVICE_ID",
    "RULE_DATA_BEFORE_STREAM_START",
    "payload_size",
]

#: The subprotocols a client may offer, and the protocol version each one means.
PROTOCOL_VERSIONS = {
    "aws.iot.securetunneling-1.0": 1,
    "aws.iot.securetunneling-2.0": 2,
    "aws.iot.securetunneling-3.0": 3,
}

#: The two kinds of tunnel client.
SIDES = ("source", "destination")

RULE_TYPE_ZERO = "type_zero"
RULE_UNKNOWN_TYPE = "unknown_type"
RULE_SOURCE_ONLY_TYPE = "source_only_type"
RULE_SERVICE_ONLY_TYPE = "service_only_type"
RULE_STREAM_ID = "stream_id"
RULE_PAYLOAD_SIZE = "payload_size"
RULE_FIELD_NOT_IN_VERSION = "field_not_in_version"
RULE_UNKNOWN_FIELD = "unknown_field"
RULE_UNKNOWN_SERVICE_ID = "unknown_service_id"
RULE_SERVICE_ID_MIXING = "service_id_mixing"
RULE_MISSING_SERVICE_ID = "missing_service_id"
RULE_DATA_BEFORE_STREAM_START = "data_before_stream_start"

_DATA = Message.DATA
_STREAM_START = Message.STREAM_START
_STREAM_RESET = Message.STREAM_RESET
_SESSION_RESET = Message.SESSION_RESET
_SERVICE_IDS = Message.SERVICE_IDS
_CONNECTION_START = Message.CONNECTION_START
_CONNECTION_RESET = Message.CONNECTION_RESET

#: The message types each protocol version knows.
_TYPES_OF_VERSION = {
    1: frozenset({_DATA, _STREAM_START, _STREAM_RESET, _SESSION_RESET}),
    2: frozenset({_DATA, _STREAM_START, _STREAM_RESET, _SESSION_RESET, _SERVICE_IDS}),
    3: frozenset(
        {
            _DATA,
            _STREAM_START,
            _STREAM_RESET,
            _SESSION_RESET,
            _SERVICE_IDS,
            _CONNECTION_START,
            _CONNECTION_RESET,
        }
    ),
}

#: Types tied to a stream: they need a positive stream id.
_STREAM_TYPES = frozenset(
    {_DATA, _STREAM_START, _STREAM_RESET, _CONNECTION_START, _CONNECTION_RESET}
)
#: Types that start a stream or a connection: only a source sends them.
_START_TYPES = frozenset({_STREAM_START, _CONNECTION_START})
#: Types only the service sends.
_SERVICE_TYPES = frozenset({_SESSION_RESET, _SERVICE_IDS})


def _type_name(message_type: int) -> str:
    try:
        return Message.Type.Name(message_type)
    except ValueError:
        return f"type {message_type}"


def _check_payload_size(message: Message, message_type: int) -> None:
    """The payload is at most L{MAX_PAYLOAD_SIZE} bytes (reading it copies it: call only when needed)."""
    payload_size = len(message.payload)
    if payload_size > MAX_PAYLOAD_SIZE:
        raise ProtocolViolation(
            RULE_PAYLOAD_SIZE,
            f"{_type_name(message_type)} carries {payload_size} payload bytes, more than the "
            f"{MAX_PAYLOAD_SIZE}-byte limit",
        )


def _varint_size(value: int) -> int:
    """Bytes of C{value} as a protobuf varint (a negative int32 takes 10)."""
    if value < 128:
        return 1 if value >= 0 else 10
    if value < 16384:
        return 2
    if value < 2097152:
        return 3
    return 4 if value < 268435456 else 5


def payload_size(message: Message, size: int) -> int:
    """
    The length of the payload of C{message}, whose protobuf body is C{size} bytes, computed from the
    other fields a tunnel message carries (type, stream id, ignorable, service id, connection id):
    reading C{message.payload} would copy the payload (upb), this does not, and costs less than
    that copy.  Exact for a body as protobuf libraries encode it (each field once, shortest
    varints: every client's frames); for a body encoded otherwise (or carrying
    C{availableServiceIds}, which no client puts in a DATA frame) it can only come out larger than
    the payload really is, and never below 0.
    """
    message_type = message.type
    rest = size - (2 if 0 < message_type < 128 else 1 + _varint_size(message_type) if message_type else 0)
    stream_id = message.streamId
    if stream_id:
        rest -= 2 if 0 < stream_id < 128 else 1 + _varint_size(stream_id)
    service_id = message.serviceId
    if service_id:
        length = len(service_id) if service_id.isascii() else len(service_id.encode("utf-8"))
        rest -= 2 + length if length < 128 else 1 + _varint_size(length) + length
    connection_id = message.connectionId
    if connection_id:
        rest -= 2 if connection_id < 128 else 1 + _varint_size(connection_id)
    if message.ignorable:
        rest -= 2
    # What is left is the payload field: a tag byte, the length as a varint, the bytes.
    if rest < 130:
        return rest - 2 if rest > 2 else 0
    if rest < 16387:
        return rest - 3
    if rest < 2097156:
        return rest - 4
    return rest - 5


class PeerRules:
    """
    The rules one tunnel client (one WebSocket connection, service side) must follow.

    @ivar side: C{"source"} or C{"destination"}.
    @ivar services: the tunnel's service ids (C{destinationConfig.services}).
    @ivar version: the protocol version of the negotiated subprotocol (1, 2 or 3).
    """

    __slots__ = ("side", "services", "version", "_known_types", "_uses_service_id", "_started")

    def __init__(self, side: str, services: Iterable[str], version: int = 3) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be 'source' or 'destination', not {side!r}")
        if version not in _TYPES_OF_VERSION:
            raise ValueError(f"protocol version must be 1, 2 or 3, not {version!r}")
        self.side = side
        self.services: FrozenSet[str] = frozenset(services)
        self.version = version
        self._known_types = _TYPES_OF_VERSION[version]
        # None until the first stream message shows whether this client uses service ids.
        self._uses_service_id: Optional[bool] = None
        self._started: Set[str] = set()

    @property
    def started_services(self) -> FrozenSet[str]:
        """Service ids (C{""} for none) the source has started a stream for, on this connection."""
        return frozenset(self._started)

    def note_stream_started(self, service_id: str) -> None:
        """
        Record that the source started a stream for C{service_id}; DATA for it is now allowed.

        The relay calls this on a destination's rules when it delivers a source's STREAM_START or
        CONNECTION_START; a source's own rules record its starts themselves.
        """
        self._started.add(service_id)

    def check(self, message: Message, size: int) -> None:
        """
        Check one message this client sent.

        @param size: the length of the frame's protobuf body, in bytes.
        @raise ProtocolViolation: if the message breaks a rule; the connection should then be closed.
        """
        message_type = message.type
        # Who may send what comes first, whatever the version: an "ignorable" SERVICE_IDS on a V1
        # connection would still be read as SERVICE_IDS by a newer peer.
        if message_type in _SERVICE_TYPES:
            raise ProtocolViolation(
                RULE_SERVICE_ONLY_TYPE,
                f"a {self.side} sent {_type_name(message_type)}, which only the service may send",
            )
        if message_type in _START_TYPES and self.side == "destination":
            raise ProtocolViolation(
                RULE_SOURCE_ONLY_TYPE,
                f"a destination sent {_type_name(message_type)}: only the source starts streams "
                "and connections",
            )
        if message_type not in self._known_types:
            self._check_unknown_type(message, message_type)
            return
        stream_id = message.streamId
        if stream_id <= 0:
            raise ProtocolViolation(
                RULE_STREAM_ID,
                f"{_type_name(message_type)} has stream id {stream_id}: stream messages need a "
                "positive stream id",
            )
        service_id = message.serviceId
        if size > MAX_PAYLOAD_SIZE and self._payload_bound(message, size, service_id) > MAX_PAYLOAD_SIZE:
            # Reading the payload copies it: only when the frame's size cannot rule out a large one.
            _check_payload_size(message, message_type)
        self._check_fields(message, message_type)
        uses_service_id = service_id != ""
        if uses_service_id is not self._uses_service_id:
            if self._uses_service_id is not None:
                raise ProtocolViolation(
                    RULE_SERVICE_ID_MIXING,
                    f"{_type_name(message_type)} "
                    + (f"carries service id {service_id!r}" if uses_service_id else "has no service id")
                    + " but earlier messages of this connection "
                    + ("did not" if uses_service_id else "did")
                    + ": a client must not alternate between messages with and without a service id",
                )
            self._uses_service_id = uses_service_id
        if not uses_service_id and len(self.services) > 1:
            raise ProtocolViolation(
                RULE_MISSING_SERVICE_ID,
                f"{_type_name(message_type)} has no service id, but the tunnel has "
                f"{len(self.services)} services ({', '.join(sorted(self.services))}): a message "
                "without one (V1 format) cannot say which it is for",
            )
        if uses_service_id and service_id not in self.services:
            raise ProtocolViolation(
                RULE_UNKNOWN_SERVICE_ID,
                f"{_type_name(message_type)} carries service id {service_id!r}, which is not one of "
                f"the tunnel's services ({', '.join(sorted(self.services)) or 'none'})",
            )
        if message_type in _START_TYPES:
            self._started.add(service_id)
        elif message_type == _DATA and service_id not in self._started:
            raise ProtocolViolation(
                RULE_DATA_BEFORE_STREAM_START,
                "DATA for "
                + (f"service id {service_id!r}" if service_id else "a stream")
                + " before the source started a stream for it",
            )

    @staticmethod
    def _payload_bound(message: Message, size: int, service_id: str) -> int:
        """
        The largest payload a frame body of C{size} bytes with these fields can hold.

        A payload over 16383 bytes costs 4 bytes of tag and length; the type (2 bytes), the stream
        id, the service id (at least one byte per character) and the connection id take the rest.
        """
        stream_id = message.streamId
        bound = size - 7 - (stream_id.bit_length() + 6) // 7
        if service_id:
            bound -= 2 + len(service_id)
        connection_id = message.connectionId
        if connection_id:
            bound -= 1 + (connection_id.bit_length() + 6) // 7
        return bound

    def _check_unknown_type(self, message: Message, message_type: int) -> None:
        """A type this version does not know: type 0 is never allowed, others only if ignorable."""
        if message_type == 0:
            raise ProtocolViolation(
                RULE_TYPE_ZERO, "a message has type 0 (UNKNOWN): every message needs a type"
            )
        if not message.ignorable:
            raise ProtocolViolation(
                RULE_UNKNOWN_TYPE,
                f"{_type_name(message_type)} is not a message type of protocol version "
                f"{self.version}, and the message is not marked ignorable",
            )
        _check_payload_size(message, message_type)
        self._check_fields(message, message_type)

    def _check_fields(self, message: Message, message_type: int) -> None:
        """No field unknown to the schema, none the negotiated version lacks."""
        unknown = UnknownFieldSet(message)
        if len(unknown):
            numbers = sorted({field.field_number for field in cast(Iterable[Any], unknown)})
            raise ProtocolViolation(
                RULE_UNKNOWN_FIELD,
                f"{_type_name(message_type)} has field(s) {', '.join(map(str, numbers))}, which "
                "the tunneling protocol does not define",
            )
        version = self.version
        if version == 3:
            return
        extra = []
        if version == 1:
            if message.serviceId:
                extra.append("serviceId (5)")
            if len(message.availableServiceIds):
                extra.append("availableServiceIds (6)")
        if message.connectionId:
            extra.append("connectionId (7)")
        if extra:
            raise ProtocolViolation(
                RULE_FIELD_NOT_IN_VERSION,
                f"{_type_name(message_type)} has {', '.join(extra)}, which protocol version "
                f"{version} does not have (the connection negotiated "
                f"aws.iot.securetunneling-{version}.0)",
            )
