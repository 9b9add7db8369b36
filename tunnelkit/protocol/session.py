# -*- test-case-name: tests.test_session -*-
"""
The source and destination state machines of a local proxy (reference sections 1.9 to 1.11), sans-IO.

A session is fed what happens (tunnel messages from the WebSocket, events of the local TCP
connections) and returns a list of I{actions} for the caller to perform, in order.  It never does I/O,
never reads the clock and never imports the reactor.

Actions (frozen dataclasses)
============================
  - L{SendFrames}C{(data, boundary)}: one or more whole tunnel frames (length prefix + protobuf) to
    send on the WebSocket.  C{data} is never larger than C{MAX_WEBSOCKET_FRAME} (131076) bytes.  With
    C{boundary=True} (after STREAM_START and CONNECTION_START, and the WINDOW_UPDATE that follows
    them toward a peer that announced flow control) the WebSocket message must end right after these
    bytes: AWS's localproxy holds DATA that shares a WebSocket message with a STREAM_START.  Frames
    without a boundary may be sent one per message or merged.
  - L{StartListening}C{(service_id, mapping_key)} (source): the tunnel's SERVICE_IDS matched the
    configured mapping; open the listener configured under C{mapping_key} (C{""} for a bare V1 port)
    for C{service_id}.  Emitted once per service for the life of the session object: listeners
    survive WebSocket reconnects (accepts while the WebSocket is down are refused).
  - L{ConnectTarget}C{(service_id, connection_id, mapping_key)} (destination): open a TCP connection
    to the target configured under C{mapping_key}; report the outcome with C{local_connected} or, after
    the proxy's own retries, C{local_connect_failed}.
  - L{WriteLocal}C{(service_id, connection_id, data)}: write to that local connection.  The destination
    holds the data that arrives while a connection is still being opened and releases it from
    C{local_connected} (see C{DestinationSession.buffered_bytes} to pause the WebSocket meanwhile).
  - L{CloseLocal}C{(service_id, connection_id, reason, abort)}: with C{abort=False} flush what was
    written, then close (FIN): the far application closed.  With C{abort=True} reset the connection
    (RST): the WebSocket was lost or replaced, the service reset the session, a V3 stream was reset,
    the source restarted a stream: anything but the far application's own close.
  - L{Fatal}C{(message)}: stop the proxy with this message (exit status 1): only a configuration that
    does not match the tunnel (SERVICE_IDS).  Nothing a peer sends is fatal: a frame that breaks the
    rules is dropped, or answered by resetting its stream or connection.

Local connections are named by C{(service_id, connection_id)}: the service id is the tunnel's
(C{""} when the tunnel has no services), the connection id an integer the session chooses (source:
returned by C{local_accepted}) or learns (destination: from ConnectTarget).

Source
======
::

    session = SourceSession(["SSH"], client_type="V3")    # or None: listen for every tunnel service
    session.websocket_opened()                            # each (re)connected WebSocket
    session.feed(websocket_bytes) / session.receive(message)   # SERVICE_IDS -> StartListening ...
    cid, actions = session.local_accepted("SSH")          # raises LocalConnectionRefused: close it
    session.local_accepted("FTP", connection_id=0x80000001)   # V3: carry it under a chosen id
    session.local_data("SSH", cid, data)                  # DATA frames, <= 64512 payload bytes each
    session.local_closed("SSH", cid)                      # CONNECTION_RESET (V3) / STREAM_RESET (V1/V2)
    session.websocket_lost()                              # CloseLocal for every connection

C{client_type} is the destination's message format (C{--destination-client-type}): C{"V3"} (stream
ids, service ids, connection ids; up to C{max_connections} connections per service on one stream),
C{"V2"} (no connection id) or C{"V1"} (no service id either, a tunnel of at most one service).  V1/V2
carry one TCP connection per stream: each accept starts a new stream, each close resets it, and while
a connection is open a second accept of the same service is refused (as AWS's localproxy does).

Destination
===========
::

    session = DestinationSession(["SSH"])                 # [""] for a bare V1 target
    session.websocket_opened()
    session.feed(websocket_bytes) / session.receive(message)   # STREAM_START -> ConnectTarget ...
    session.local_connected(sid, cid) / session.local_connect_failed(sid, cid)
    session.local_data(sid, cid, data) / session.local_closed(sid, cid) / session.websocket_lost()

The destination answers each stream in the format of the STREAM_START / CONNECTION_START that opened
it: with or without a service id (V1), with or without a connection id (V2); a connection opened
without a connection id is reset with STREAM_RESET, one with an id with CONNECTION_RESET.

Both sides wait for SERVICE_IDS on each WebSocket before acting (a source does not listen, a
destination ignores stream messages), validate the mapping against it (a bare-port mapping C{""} is
renamed to the tunnel's service when it has exactly one), and ignore later SERVICE_IDS.  Stale DATA,
STREAM_RESET and CONNECTION_RESET (unknown service, wrong stream id, unknown connection) are dropped;
duplicate CONNECTION_RESETs are harmless.  A source that receives STREAM_START or CONNECTION_START
(which only a source may send) logs an error and drops it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tunnelkit.errors import ConfigError, TunnelkitError
from tunnelkit.protocol.flowcontrol import (
    ANNOUNCE,
    DEFAULT_WINDOW,
    EOF,
    EXTENSION_TYPES,
    FLOW_CONTROL,
    HALF_CLOSE,
    MAX_CONNECTION_WINDOW,
    TUNNEL_GROWTH_BUDGET,
    WINDOW_UPDATE,
    ConnectionFlow,
    Extensions,
    announcement_frame,
    blocked_frame,
    eof_frame,
    parse_announcement,
    window_increment,
    window_update_frame,
)
from tunnelkit.protocol.framing import (
    MAX_PAYLOAD_SIZE,
    MAX_WEBSOCKET_FRAME,
    FrameDecoder,
    Message,
    encode_message,
    parse_message,
)

__all__ = [
    "SendFrames",
    "StartListening",
    "ConnectTarget",
    "WriteLocal",
    "CloseLocal",
    "PauseLocal",
    "ResumeLocal",
    "HalfCloseLocal",
    "Fatal",
    "Action",
    "LocalConnectionRefused",
    "CLIENT_TYPES",
    "INT32_MAX",
    "UINT32_MAX",
    "WRONG_CONFIGURATION",
    "DataFrameEncoder",
    "SourceSession",
    "DestinationSession",
]


#: The message formats a source can speak to its destination (C{--destination-client-type}).
CLIENT_TYPES = ("V1", "V2", "V3")
#: The largest stream id; the next one is 1.
INT32_MAX = 2**31 - 1
#: The largest connection id; the next one is 1.
UINT32_MAX = 2**32 - 1
#: The start of the fatal message for a mapping that does not match the tunnel (localproxy's text).
WRONG_CONFIGURATION = (
    "Wrong configurations detected in local proxy. "
    "Please starts local proxy with right sets of service ids."
)

#: Why a source closes its connections on a STREAM_RESET: the service sends one when no destination is
#: connected, the destination when its target refuses.
DESTINATION_RESET = (
    "the destination reset the stream: is a destination local proxy connected to the tunnel, and its "
    "target reachable? (see the destination's log)"
)

_DATA = Message.DATA
_STREAM_START = Message.STREAM_START
_STREAM_RESET = Message.STREAM_RESET
_SESSION_RESET = Message.SESSION_RESET
_SERVICE_IDS = Message.SERVICE_IDS
_CONNECTION_START = Message.CONNECTION_START
_CONNECTION_RESET = Message.CONNECTION_RESET


# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendFrames:
    """Whole tunnel frames to send on the WebSocket; C{boundary}: end the WebSocket message after them."""

    data: bytes
    boundary: bool = False


@dataclass(frozen=True, slots=True)
class StartListening:
    """Source: open the listener configured under C{mapping_key} for the tunnel's C{service_id}."""

    service_id: str
    mapping_key: str


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    """Destination: connect to the target configured under C{mapping_key}, as this connection."""

    service_id: str
    connection_id: int
    mapping_key: str


@dataclass(frozen=True, slots=True)
class WriteLocal:
    """Write C{data} to a local connection."""

    service_id: str
    connection_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseLocal:
    """
    Close a local connection.  C{abort=False}: flush, then close with a FIN (the far application
    closed); C{abort=True}: reset it (TCP RST) at once, because something failed and the local
    application must not mistake what it received for the whole.
    """

    service_id: str
    connection_id: int
    reason: str
    abort: bool = False


@dataclass(frozen=True, slots=True)
class PauseLocal:
    """Stop reading a local connection: the peer granted no more credit for it (flow control)."""

    service_id: str
    connection_id: int


@dataclass(frozen=True, slots=True)
class ResumeLocal:
    """Read a local connection again: the peer granted credit (flow control)."""

    service_id: str
    connection_id: int


@dataclass(frozen=True, slots=True)
class HalfCloseLocal:
    """The far application sent its last byte: flush, then shut down the write side (a FIN) only."""

    service_id: str
    connection_id: int


@dataclass(frozen=True, slots=True)
class Fatal:
    """Stop the proxy (exit status 1) with this message."""

    message: str


@dataclass(frozen=True, slots=True)
class LogEvent:
    """
    Something for the proxy's log: C{level} (C{"debug"}, C{"info"}, C{"warn"} or C{"error"}), a
    C{twisted.logger} format string and its fields (the session itself never logs).
    """

    level: str
    format: str
    fields: Mapping[str, Any] = field(default_factory=dict)


def _log(level: str, format: str, **fields: Any) -> LogEvent:
    return LogEvent(level, format, fields)


_STALE = LogEvent("debug", "Stale message received. Dropping")
_LATE_SERVICE_IDS = LogEvent("debug", "Receive service Ids during data transfer. ignore")


Action = Union[
    SendFrames,
    StartListening,
    ConnectTarget,
    WriteLocal,
    CloseLocal,
    PauseLocal,
    ResumeLocal,
    HalfCloseLocal,
    Fatal,
    LogEvent,
]


class LocalConnectionRefused(TunnelkitError):
    """The source cannot take a newly accepted local connection now; close it.  The text says why."""


# --- DATA encoding --------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative values as 64-bit two's complement (int32 fields)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_prefix(length: int) -> bytes:
    return length.to_bytes(2, "big")


class DataFrameEncoder:
    """
    Builds the DATA frames of one local connection, byte for byte what protobuf would serialize.

    The fields around the payload are fixed for a connection, so they are encoded once; each frame is
    then assembled with a single join (the payload is copied once, straight into the frame).
    """

    __slots__ = ("_head", "_tail", "_full_prefix", "_fixed")

    def __init__(self, stream_id: int, service_id: str = "", connection_id: int = 0) -> None:
        head = b"\x08\x01"
        if stream_id:
            head += b"\x10" + _varint(stream_id)
        tail = b""
        if service_id:
            encoded = service_id.encode("utf-8")
            tail += b"\x2a" + _varint(len(encoded)) + encoded
        if connection_id:
            tail += b"\x38" + _varint(connection_id)
        self._head = head
        self._tail = tail
        # Body bytes besides the payload and its length varint: head, payload tag, tail.
        self._fixed = len(head) + 1 + len(tail)
        self._full_prefix = self._prefix(MAX_PAYLOAD_SIZE)

    def _prefix(self, size: int) -> bytes:
        """Length prefix, head, payload tag and payload length of a frame with C{size} payload bytes."""
        size_varint = _varint(size)
        return (
            _length_prefix(self._fixed + len(size_varint) + size)
            + self._head
            + b"\x22"
            + size_varint
        )

    def encode(self, data: Union[bytes, bytearray, memoryview]) -> List[bytes]:
        """
        Frame C{data} as DATA messages of at most C{MAX_PAYLOAD_SIZE} payload bytes each.

        @return: the frames, merged into chunks of at most C{MAX_WEBSOCKET_FRAME} bytes each (one per
            WebSocket message); empty for empty C{data}.
        """
        size = len(data)
        tail = self._tail
        if size <= MAX_PAYLOAD_SIZE:
            if not size:
                return []
            return [b"".join((self._prefix(size), data, tail))]
        view = memoryview(data)
        batches: List[bytes] = []
        pieces: List[Union[bytes, memoryview]] = []
        batch_size = 0
        full_prefix = self._full_prefix
        fixed = len(full_prefix) + len(tail)
        for start in range(0, size, MAX_PAYLOAD_SIZE):
            chunk = view[start : start + MAX_PAYLOAD_SIZE]
            chunk_size = len(chunk)
            if chunk_size == MAX_PAYLOAD_SIZE:
                prefix = full_prefix
                frame_size = fixed + chunk_size
            else:
                prefix = self._prefix(chunk_size)
                frame_size = len(prefix) + chunk_size + len(tail)
            if batch_size + frame_size > MAX_WEBSOCKET_FRAME:
                batches.append(b"".join(pieces))
                pieces = []
                batch_size = 0
            pieces += (prefix, chunk, tail)
            batch_size += frame_size
        batches.append(b"".join(pieces))
        return batches


def _control(
    message_type: int, stream_id: int = 0, service_id: str = "", connection_id: int = 0
) -> bytes:
    """One framed control message (proto3: fields at their default are left out)."""
    return encode_message(
        Message(
            type=message_type,
            streamId=stream_id,
            serviceId=service_id,
            connectionId=connection_id,
        )
    )


def _reset_or_close(service_id: str, connection_id: int, connection: "_Connection", peer: str) -> CloseLocal:
    """
    The peer's CONNECTION_RESET.  Without the extensions it is the protocol's normal end (FIN); with
    them a connection ends normally by EOF, so a reset before the peer's EOF is a failure (RST).
    """
    flow = connection.flow
    if flow is not None and not flow.eof_received:
        return CloseLocal(service_id, connection_id, f"{peer} reset the connection", True)
    return CloseLocal(service_id, connection_id, f"{peer} closed the connection")


def _bounded(text: str, limit: int = 64) -> str:
    """C{text} as a peer sent it, cut to C{limit} characters for a log line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _type_name(message_type: int) -> str:
    try:
        return Message.Type.Name(message_type)
    except ValueError:
        return f"type {message_type}"


def _match_mapping(
    configured: Optional[Tuple[str, ...]], available: Sequence[str]
) -> Optional[Dict[str, str]]:
    """
    Match the configured mapping keys with the tunnel's service ids (from SERVICE_IDS).

    @param configured: the mapping keys, or L{None} to take whatever the tunnel has.
    @return: service id -> mapping key, or L{None} if they do not match.
    """
    tunnel = list(dict.fromkeys(available))
    if configured is None:
        return {service_id: service_id for service_id in tunnel} if tunnel else {"": ""}
    if configured == ("",):
        # A bare port (V1 format): fine for a tunnel without services, renamed for a single one.
        if not tunnel:
            return {"": ""}
        if len(tunnel) == 1:
            return {tunnel[0]: ""}
        return None
    if set(configured) == set(tunnel):
        return {service_id: service_id for service_id in tunnel}
    return None


def _check_mapping_keys(service_ids: Iterable[str]) -> Tuple[str, ...]:
    keys = tuple(service_ids)
    if not keys:
        raise ConfigError("the service-id mapping is empty: give at least one service id or port")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"the service-id mapping names a service id twice: {list(keys)}")
    if "" in keys and len(keys) > 1:
        raise ConfigError(
            "a bare port (no service id) cannot be combined with other service ids in one mapping"
        )
    return keys


def _mismatch(configured: Optional[Tuple[str, ...]], available: Sequence[str]) -> Fatal:
    return Fatal(
        f"{WRONG_CONFIGURATION} The tunnel's services are "
        f"{sorted(set(available)) or 'none'}; this local proxy is configured for "
        f"{['(bare port)' if key == '' else key for key in configured or ()]}."
    )


# --- common session machinery ---------------------------------------------------------------------


class _Session(ABC):
    """What both sides share: the WebSocket's state, frame decoding, service lookup."""

    _services: Dict[str, "_Service"]
    _default: Optional["_Service"]

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self._decoder = FrameDecoder()
        self._ready = False  # SERVICE_IDS seen on this WebSocket
        self._services = {}
        self._default = None
        self.window = window  # the receive window this side announces, each connection's first
        self.max_window = MAX_CONNECTION_WINDOW  # what a connection's receive window may grow to
        self.growth_budget = TUNNEL_GROWTH_BUDGET  # growth above `window`, all connections together
        self._offered = False  # the service said it passes tunnelkit's extensions on
        self._peer: Optional[Extensions] = None  # what the far peer announced, if usable
        self._far_connected = False  # the far peer's announcement came (and was not withdrawn)

    @property
    def far_peer_connected(self) -> Optional[bool]:
        """
        Whether the tunnel's other side is connected, as far as this side can know: None when the
        service does not pass tunnelkit's extensions (AWS's, an older one: it never says), else
        whether the far peer's ANNOUNCE came through the relay and was not withdrawn since (the
        relay sends an empty one when the other side goes away).  A far peer that does not speak
        the extensions (AWS's clients) never announces: False then means "not known to be there".
        """
        if not (self._offered and self._ready):
            return None
        return self._far_connected

    @property
    def peer_extensions(self) -> Optional[Extensions]:
        """What the far peer announced (flow control and half-close), or None."""
        return self._peer

    def flow_controlled(self, service_id: str, connection_id: int) -> bool:
        """Whether that connection uses flow control and half-close (both peers announced them)."""
        service = self._services.get(service_id)
        connection = service.connections.get(connection_id) if service is not None else None
        return connection is not None and connection.flow is not None

    @property
    def ready(self) -> bool:
        """Whether SERVICE_IDS arrived on the current WebSocket and matched the mapping."""
        return self._ready

    @property
    def services(self) -> Dict[str, str]:
        """Service id -> mapping key, once SERVICE_IDS has been matched (empty before)."""
        return {sid: service.mapping_key for sid, service in self._services.items()}

    @property
    def active_streams(self) -> Dict[str, int]:
        """Service id -> its active stream id, for the services with an active stream."""
        return {sid: s.stream_id for sid, s in self._services.items() if s.stream_id}

    def connections(self, service_id: str) -> Tuple[int, ...]:
        """The open local connection ids of a service, in the order they were opened."""
        service = self._services.get(service_id)
        return tuple(service.connections) if service is not None else ()

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> List[Action]:
        """
        Take bytes of the WebSocket stream (any split); decode, parse and L{receive} each whole frame.

        @raise tunnelkit.errors.FramingError: if a frame cannot be parsed (reconnect the WebSocket).
        """
        actions: List[Action] = []
        for body in self._decoder.feed(data):
            actions += self.receive(parse_message(body))
        return actions

    @abstractmethod
    def receive(self, message: Message) -> List[Action]:
        """React to one message from the tunnel."""

    def websocket_opened(self, extensions: str = "") -> List[Action]:
        """
        A new WebSocket is up (also after a reconnect): forget the old streams, wait for SERVICE_IDS.

        @param extensions: the service's L{tunnelkit.protocol.flowcontrol.EXTENSIONS_HEADER} value
            (empty: AWS's service, or an older one): this side announces its extensions only if the
            service passes them on.
        """
        actions = self._close_all("the tunnel's WebSocket was replaced")
        self._ready = False
        self._decoder = FrameDecoder()
        offered = extensions.split()
        self._offered = FLOW_CONTROL in offered and HALF_CLOSE in offered
        self._peer = None
        self._far_connected = False
        return actions

    def websocket_lost(self) -> List[Action]:
        """The WebSocket is gone: every local connection is reset, every stream forgotten."""
        self._ready = False
        self._peer = None
        self._far_connected = False
        return self._close_all("the tunnel's WebSocket connection was lost")

    def _ready_now(self, actions: List[Action], was_ready: bool) -> List[Action]:
        """After SERVICE_IDS: announce the extensions when the WebSocket just became ready."""
        if self._offered and self._ready and not was_ready:
            actions.append(SendFrames(announcement_frame(self.window), True))
        return actions

    # --- tunnelkit's extensions (flowcontrol) ---

    def _extension(self, message: Message) -> List[Action]:
        """An ANNOUNCE, WINDOW_UPDATE or EOF from the far peer."""
        if not self._offered or not self._ready:
            return []
        kind = message.type
        if kind == ANNOUNCE:
            extensions = parse_announcement(message.payload)
            self._far_connected = extensions is not None  # an empty one: the other side went away
            self._peer = extensions if extensions is not None and extensions.usable else None
            return self._upgrade_connections() if self._peer is not None else []
        service = self._lookup(message.serviceId)
        connection_id = message.connectionId
        if service is None or not connection_id or message.streamId != service.stream_id:
            return []
        connection = service.connections.get(connection_id)
        if connection is None:
            return []
        if kind == WINDOW_UPDATE:
            return self._window_update(service, connection_id, connection, window_increment(message.payload))
        flow = connection.flow
        if flow is None or flow.eof_received:
            return []
        flow.eof_received = True
        if flow.ended:
            return self._both_ended(service, connection_id)
        if not connection.connected:
            return []  # a destination's target is still being connected: local_connected says it
        return [HalfCloseLocal(service.service_id, connection_id)]

    def _adopt_flow(self, connection: "_Connection", increment: int) -> Optional[ConnectionFlow]:
        """A WINDOW_UPDATE for a connection without flow control (the destination overrides)."""
        return None

    def _upgrade_connections(self) -> List[Action]:
        """The far peer's announcement arrived (the source overrides: connections opened just before)."""
        return []

    def _window_update(
        self, service: "_Service", connection_id: int, connection: "_Connection", increment: int
    ) -> List[Action]:
        flow = connection.flow
        if increment == 0:
            return self._peer_blocked(service, connection, flow)
        if flow is None:
            connection.flow = self._adopt_flow(connection, increment)
            if connection.flow is None:
                return []
        elif not flow.grant(increment):
            return [
                _log(
                    "warn",
                    "Ignoring a window update of {increment} bytes for connection {connection_id} of {service_id}",
                    increment=increment,
                    connection_id=connection_id,
                    service_id=service.service_id or "-",
                )
            ]
        return self._release(service, connection_id, connection)

    def _peer_blocked(
        self, service: "_Service", connection: "_Connection", flow: Optional[ConnectionFlow]
    ) -> List[Action]:
        """A "blocked" WINDOW_UPDATE: the peer waits for credit; the window grows if the reader keeps up."""
        if flow is None:
            return []
        increment = flow.blocked(self._growth_room())
        if not increment:
            return []
        return self._grant(service, connection, increment)

    def _blocked(self, service: "_Service", connection: "_Connection", flow: ConnectionFlow) -> List[Action]:
        """This side has bytes and no credit: tell a peer that understands it, once per grant."""
        if flow.blocked_sent or self._peer is None or not self._peer.blocked:
            return []
        flow.blocked_sent = True
        return [SendFrames(blocked_frame(service.stream_id, service.wire_service_id, connection.wire_connection_id))]

    def _release(self, service: "_Service", connection_id: int, connection: "_Connection") -> List[Action]:
        """Send what credit now allows of the bytes held for lack of it (and a waiting EOF)."""
        flow = connection.flow
        assert flow is not None
        actions: List[Action] = []
        held = connection.held
        if held:
            allowed = flow.take(len(held))
            if allowed:
                actions += [SendFrames(batch) for batch in connection.encoder.encode(held[:allowed])]
                connection.held = held[allowed:]
            if connection.held:
                return actions + self._blocked(service, connection, flow)
            connection.held = b""
            actions.append(ResumeLocal(service.service_id, connection_id))
        if flow.eof_pending:
            flow.eof_pending = False
            actions += self._send_eof(service, connection_id, connection)
        return actions

    def _send_data(
        self, service: "_Service", connection_id: int, connection: "_Connection", data: Union[bytes, bytearray, memoryview]
    ) -> List[Action]:
        """DATA frames for bytes read from a local connection, within its credit."""
        flow = connection.flow
        if flow is None:
            connection.sent += len(data)
            return [SendFrames(batch) for batch in connection.encoder.encode(data)]
        if connection.held or flow.eof_pending:
            connection.held = bytes(connection.held) + bytes(data)
            return []
        size = len(data)
        allowed = flow.take(size)
        if allowed == size:
            return [SendFrames(batch) for batch in connection.encoder.encode(data)]
        view = memoryview(data)
        actions: List[Action] = [SendFrames(batch) for batch in connection.encoder.encode(view[:allowed])]
        connection.held = view[allowed:]
        actions.append(PauseLocal(service.service_id, connection_id))
        return actions + self._blocked(service, connection, flow)

    def _send_eof(self, service: "_Service", connection_id: int, connection: "_Connection") -> List[Action]:
        flow = connection.flow
        assert flow is not None
        flow.eof_sent = True
        actions: List[Action] = [
            SendFrames(eof_frame(service.stream_id, service.wire_service_id, connection.wire_connection_id))
        ]
        if flow.ended:
            actions += self._both_ended(service, connection_id)
        return actions

    def _both_ended(self, service: "_Service", connection_id: int) -> List[Action]:
        """Both applications shut down their write sides: the connection ends normally."""
        connection = service.connections.pop(connection_id)
        return [
            CloseLocal(service.service_id, connection_id, "both applications closed their side"),
            SendFrames(
                _control(
                    _CONNECTION_RESET, service.stream_id, service.wire_service_id, connection.wire_connection_id
                )
            ),
        ]

    def _flow_violation(self, service: "_Service", connection_id: int, size: int) -> List[Action]:
        """The peer sent more than it was granted: reset that connection only."""
        connection = service.connections.pop(connection_id)
        flow = connection.flow
        return [
            _log(
                "error",
                "Resetting connection {connection_id} of {service_id}: the peer sent {size} bytes with only "
                "{allowed} granted (a flow-control error of the far proxy)",
                connection_id=connection_id,
                service_id=service.service_id or "-",
                size=size,
                allowed=flow.allowed if flow is not None else 0,
            ),
            CloseLocal(service.service_id, connection_id, "the peer broke flow control", True),
            SendFrames(
                _control(
                    _CONNECTION_RESET, service.stream_id, service.wire_service_id, connection.wire_connection_id
                )
            ),
        ]

    def local_delivered(self, service_id: str, connection_id: int, size: int) -> List[Action]:
        """
        C{size} bytes of DATA (as received, before any adapter filter) were accepted by that local
        socket's buffer: grant them back to the peer once enough are waiting (flow control).
        """
        service = self._services.get(service_id)
        if service is None:
            return []
        connection = service.connections.get(connection_id)
        if connection is None:
            return []
        flow = connection.flow
        if flow is None:
            return []
        increment = flow.delivered(size)
        if not increment:
            return []
        return self._grant(service, connection, increment)

    def _grant(self, service: "_Service", connection: "_Connection", increment: int) -> List[Action]:
        return [
            SendFrames(
                window_update_frame(
                    service.stream_id, service.wire_service_id, connection.wire_connection_id, increment
                )
            )
        ]

    def _connection(self, service_id: str, connection_id: int) -> Optional["_Connection"]:
        service = self._services.get(service_id)
        if service is None:
            return None
        return service.connections.get(connection_id)

    def _flow(self, service_id: str, connection_id: int) -> Optional[ConnectionFlow]:
        connection = self._connection(service_id, connection_id)
        return connection.flow if connection is not None else None

    def local_buffer_full(self, service_id: str, connection_id: int, now: float) -> None:
        """
        That local socket's send buffer filled at C{now}: what is written to it until it drains is
        held back from the grants (L{local_buffer_drained}).
        """
        flow = self._flow(service_id, connection_id)
        if flow is not None:
            flow.filled(now)

    def local_buffer_drained(self, service_id: str, connection_id: int, held: int, now: float) -> List[Action]:
        """
        That local socket's send buffer drained at C{now}; C{held} bytes were written to it since it
        filled.  They are delivered now, and the connection's receive window adapts to how fast the
        application took them (L{ConnectionFlow.drained}: a slow one shrinks it).
        """
        flow = self._flow(service_id, connection_id)
        if flow is None:
            return []
        flow.drained(held, now)
        return self.local_delivered(service_id, connection_id, held) if held else []

    def _growth_room(self) -> int:
        """Bytes the tunnel-wide budget leaves for one more connection window to grow (rarely asked)."""
        used = 0
        for service in self._services.values():
            for connection in service.connections.values():
                if connection.flow is not None:
                    used += connection.flow.growth
        return max(0, self.growth_budget - used)

    @abstractmethod
    def local_closed(self, service_id: str, connection_id: int) -> List[Action]:
        """A local connection closed: the far peer is told (each side in its own format)."""

    def local_eof(self, service_id: str, connection_id: int) -> List[Action]:
        """
        The local application shut down its write side (read EOF).  With flow control and half-close:
        an EOF to the far peer (after the bytes still held), the other direction stays open.  Without:
        the connection ends, as with AWS's clients (its reset goes to the peer), and the local
        application gets a reset: the answer it may wait for will not come.
        """
        service = self._services.get(service_id)
        if service is None:
            return []
        connection = service.connections.get(connection_id)
        if connection is None:
            return []
        flow = connection.flow
        if flow is None:
            # The far application did not close: whatever answer it had is cut off, so the local
            # application (which may be waiting for it) gets a reset, not an end of stream.
            return self.local_closed(service_id, connection_id) + [
                CloseLocal(
                    service_id,
                    connection_id,
                    "the application shut down its sending side, and the tunnel's far peer cannot carry "
                    "a half-close (AWS's protocol has none): the connection ends",
                    True,
                )
            ]
        if flow.eof_sent or flow.eof_pending:
            return []
        if connection.held:
            flow.eof_pending = True
            return []
        return self._send_eof(service, connection_id, connection)

    def _close_all(self, reason: str) -> List[Action]:
        """Reset every connection (the WebSocket or the session failed: nothing ended cleanly)."""
        actions: List[Action] = []
        for service in self._services.values():
            actions += service.close_all(reason, abort=True)
        return actions

    def _lookup(self, service_id: str) -> Optional["_Service"]:
        """The service a message is for: by its service id, or the only service if it has none."""
        if service_id:
            return self._services.get(service_id)
        return self._default

    def _set_services(self, services: Dict[str, "_Service"]) -> None:
        self._services = services
        if len(services) == 1:
            (self._default,) = services.values()
        else:
            self._default = None

    def _unknown_type(self, message: Message) -> List[Action]:
        if message.ignorable:
            return [_log("debug", "Ignoring a message of unknown type {type} marked ignorable", type=message.type)]
        # AWS's localproxy exits here; a peer's message never stops this proxy.
        return [
            _log(
                "error",
                "Dropping a message of unexpected type {type} (neither known nor marked ignorable)",
                type=_type_name(message.type),
            )
        ]


class _Connection:
    """
    One local connection: its DATA encoder, (destination) whether it is connected yet, and with
    flow control its windows and the bytes read but not sent for lack of credit (C{held}).
    """

    __slots__ = ("encoder", "wire_connection_id", "connected", "pending", "flow", "held", "sent", "received")

    def __init__(
        self,
        encoder: DataFrameEncoder,
        wire_connection_id: int,
        connected: bool,
        flow: Optional[ConnectionFlow] = None,
    ) -> None:
        self.encoder = encoder
        self.wire_connection_id = wire_connection_id
        self.connected = connected
        self.pending: List[bytes] = []
        self.flow = flow
        self.held: Union[bytes, memoryview] = b""
        self.sent = 0  # DATA bytes sent without flow control
        self.received = 0  # (source) DATA bytes received without flow control


class _Service:
    """One service id's stream and connections."""

    __slots__ = (
        "service_id",
        "mapping_key",
        "wire_service_id",
        "stream_id",
        "last_stream_id",
        "last_connection_id",
        "connections",
    )

    def __init__(self, service_id: str, mapping_key: str, wire_service_id: str) -> None:
        self.service_id = service_id
        self.mapping_key = mapping_key
        self.wire_service_id = wire_service_id
        self.stream_id = 0  # 0: no active stream
        self.last_stream_id = 0
        self.last_connection_id = 0
        self.connections: Dict[int, _Connection] = {}

    def close_all(self, reason: str, abort: bool) -> List[Action]:
        """Forget the stream; close (C{abort=False}) or reset (C{abort=True}) every connection."""
        actions: List[Action] = [
            CloseLocal(self.service_id, connection_id, reason, abort) for connection_id in self.connections
        ]
        self.connections = {}
        self.stream_id = 0
        return actions

    def next_stream_id(self) -> int:
        """The next stream id: +1 per new stream, INT32_MAX wraps to 1."""
        stream_id = self.last_stream_id + 1 if self.last_stream_id < INT32_MAX else 1
        self.last_stream_id = stream_id
        return stream_id

    def next_connection_id(self) -> int:
        """The next connection id not in use: +1 per connection, UINT32_MAX wraps to 1."""
        connection_id = self.last_connection_id
        while True:
            connection_id = connection_id + 1 if connection_id < UINT32_MAX else 1
            if connection_id not in self.connections:
                self.last_connection_id = connection_id
                return connection_id


# --- source ---------------------------------------------------------------------------------------


class SourceSession(_Session):
    """
    The source local proxy's state machine: listeners' connections become streams and connections.

    @param service_ids: the configured mapping's keys (C{""} = a bare V1 port), or L{None} to listen
        for every service the tunnel has (the proxy picks ports).
    @param client_type: the destination's message format: C{"V1"}, C{"V2"} or C{"V3"}.
    @param max_connections: most simultaneous connections per service (V3; V1/V2 carry one).
    """

    def __init__(
        self,
        service_ids: Optional[Sequence[str]],
        client_type: str = "V3",
        max_connections: int = 128,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        super().__init__(window)
        if client_type not in CLIENT_TYPES:
            raise ConfigError(
                f"destination client type must be one of {', '.join(CLIENT_TYPES)}, not {client_type!r}"
            )
        if max_connections < 1:
            raise ConfigError(f"max connections per service must be at least 1, not {max_connections}")
        self._configured = None if service_ids is None else _check_mapping_keys(service_ids)
        if client_type == "V1" and self._configured is not None and len(self._configured) > 1:
            raise ConfigError(
                "destination client type V1 carries no service id, so it supports one service only; "
                f"the mapping has {len(self._configured)}"
            )
        self.client_type = client_type
        self._v3 = client_type == "V3"
        self._limit = max_connections if self._v3 else 1

    # tunnel -> source

    def receive(self, message: Message) -> List[Action]:
        """React to one message from the tunnel."""
        message_type = message.type
        if message_type == _DATA:
            service = self._lookup(message.serviceId)
            if service is None or not self._ready:
                return []
            stream_id = message.streamId
            if stream_id != service.stream_id or not stream_id:
                return [_STALE]
            connection_id = self._connection_of(service, message.connectionId)
            connection = service.connections.get(connection_id)
            if connection is None:
                return []
            payload = message.payload
            flow = connection.flow
            if flow is None:
                connection.received += len(payload)
            elif not flow.received(len(payload)):
                return self._flow_violation(service, connection_id, len(payload))
            return [WriteLocal(service.service_id, connection_id, payload)]
        if message_type == _STREAM_RESET:
            service = self._lookup(message.serviceId)
            if service is None or not service.stream_id or message.streamId != service.stream_id:
                return []
            # V1/V2: the normal end of the stream's one connection; V3: the stream failed.
            return service.close_all(DESTINATION_RESET, abort=self._v3)
        if message_type == _CONNECTION_RESET:
            service = self._lookup(message.serviceId)
            if service is None or not service.stream_id or message.streamId != service.stream_id:
                return []
            connection_id = self._connection_of(service, message.connectionId)
            connection = service.connections.pop(connection_id, None)
            if connection is None:
                return []  # unknown or already closed: duplicates are normal
            if not self._v3:
                service.stream_id = 0
            return [_reset_or_close(service.service_id, connection_id, connection, "the destination")]
        if message_type == _SESSION_RESET:
            return self._close_all("the tunnel service reset the session")
        if message_type == _SERVICE_IDS:
            was_ready = self._ready
            return self._ready_now(self._service_ids(message.availableServiceIds), was_ready)
        if message_type in EXTENSION_TYPES:
            return self._extension(message)
        if message_type == _STREAM_START or message_type == _CONNECTION_START:
            return [
                _log(
                    "error",
                    "Dropping {type} for stream {stream_id}: only a source sends it, and this is the source",
                    type=_type_name(message_type),
                    stream_id=message.streamId,
                )
            ]
        return self._unknown_type(message)

    def _upgrade_connections(self) -> List[Action]:
        """
        Connections accepted in the round trip before the destination's announcement arrived: those
        that received nothing yet switch to flow control now (a WINDOW_UPDATE after the DATA already
        sent tells the destination; every byte it sent is still to arrive, so both count alike).
        """
        actions: List[Action] = []
        if not self._v3:
            return actions
        assert self._peer is not None
        for service in self._services.values():
            for connection_id, connection in service.connections.items():
                if connection.flow is None and not connection.received:
                    connection.flow = ConnectionFlow(self._peer.window, self.window, self.max_window)
                    actions.append(
                        SendFrames(window_update_frame(service.stream_id, service.wire_service_id, connection_id, self.window))
                    )
        return actions

    def _connection_of(self, service: _Service, wire_connection_id: int) -> int:
        if self._v3:
            return wire_connection_id or 1
        # V1/V2: the stream's one connection.
        for connection_id in service.connections:
            return connection_id
        return 0

    def _service_ids(self, available: Sequence[str]) -> List[Action]:
        if self._ready:
            return [_LATE_SERVICE_IDS]
        mapping = _match_mapping(self._configured, available)
        if mapping is None:
            return [_mismatch(self._configured, available)]
        if self.client_type == "V1" and len(mapping) > 1:
            return [
                Fatal(
                    f"The tunnel has {len(mapping)} services, but destination client type V1 "
                    "carries no service id and supports one service only"
                )
            ]
        self._ready = True
        if self._services:
            if {sid: s.mapping_key for sid, s in self._services.items()} != mapping:
                return [_mismatch(tuple(s.mapping_key for s in self._services.values()), available)]
            return []
        self._set_services(
            {
                service_id: _Service(service_id, key, service_id if self.client_type != "V1" else "")
                for service_id, key in mapping.items()
            }
        )
        return [StartListening(service_id, key) for service_id, key in mapping.items()]

    # local -> tunnel

    def local_accepted(
        self, service_id: str, connection_id: Optional[int] = None
    ) -> Tuple[int, List[Action]]:
        """
        A listener accepted a connection: name it and start its stream or connection.

        @param connection_id: carry the connection under exactly this id (V3 only; e.g. an FTP data
            connection an adapter announced to the destination), instead of the next free one.
        @return: the connection id, and the actions (a STREAM_START or CONNECTION_START).
        @raise LocalConnectionRefused: the connection cannot be carried now; close it.
        """
        service = self._services.get(service_id)
        if service is None:
            raise LocalConnectionRefused(f"no listener is open for service id {service_id!r}")
        if not self._ready:
            raise LocalConnectionRefused(
                "the tunnel is not connected (waiting for the WebSocket and the tunnel's service ids)"
            )
        if len(service.connections) >= self._limit:
            if self._v3:
                raise LocalConnectionRefused(
                    f"service {service_id or '(no service id)'} already has {self._limit} "
                    "connections, the most allowed"
                )
            raise LocalConnectionRefused(
                f"service {service_id or '(no service id)'} already has a connection, and "
                f"destination client type {self.client_type} carries one connection at a time"
            )
        if connection_id is None:
            connection_id = service.next_connection_id()
        elif not self._v3:
            raise LocalConnectionRefused(
                f"destination client type {self.client_type} has no connection ids, so connection "
                f"{connection_id} cannot be carried under its own id"
            )
        elif not 0 < connection_id <= UINT32_MAX or connection_id in service.connections:
            raise LocalConnectionRefused(
                f"connection id {connection_id} of service {service_id or '(no service id)'} is "
                + ("already in use" if connection_id in service.connections else "out of range")
            )
        wire_service_id = service.wire_service_id
        if not self._v3:
            stream_id = service.stream_id = service.next_stream_id()
            frame = _control(_STREAM_START, stream_id, wire_service_id)
            wire_connection_id = 0
        elif not service.stream_id:
            stream_id = service.stream_id = service.next_stream_id()
            frame = _control(_STREAM_START, stream_id, wire_service_id, connection_id)
            wire_connection_id = connection_id
        else:
            stream_id = service.stream_id
            frame = _control(_CONNECTION_START, stream_id, wire_service_id, connection_id)
            wire_connection_id = connection_id
        flow = None
        if self._peer is not None and self._v3:
            # Both peers announced: the destination's window is this connection's first credit;
            # the WINDOW_UPDATE right after the start grants ours and tells the destination.  It
            # shares the start's WebSocket message (a peer that announced is no AWS localproxy).
            flow = ConnectionFlow(self._peer.window, self.window, self.max_window)
            frame += window_update_frame(stream_id, wire_service_id, connection_id, self.window)
        actions: List[Action] = [SendFrames(frame, True)]
        service.connections[connection_id] = _Connection(
            DataFrameEncoder(stream_id, wire_service_id, wire_connection_id), wire_connection_id, True, flow
        )
        return connection_id, actions

    def local_data(
        self, service_id: str, connection_id: int, data: Union[bytes, bytearray, memoryview]
    ) -> List[Action]:
        """Bytes read from a local connection: DATA frames (nothing if the connection is gone)."""
        service = self._services.get(service_id)
        if service is None:
            return []
        connection = service.connections.get(connection_id)
        if connection is None:
            return []
        return self._send_data(service, connection_id, connection, data)

    def local_closed(self, service_id: str, connection_id: int) -> List[Action]:
        """A local connection closed: CONNECTION_RESET (V3) or STREAM_RESET (V1/V2)."""
        service = self._services.get(service_id)
        if service is None:
            return []
        if service.connections.pop(connection_id, None) is None:
            return []
        stream_id = service.stream_id
        if self._v3:
            return [
                SendFrames(
                    _control(_CONNECTION_RESET, stream_id, service.wire_service_id, connection_id)
                )
            ]
        service.stream_id = 0
        return [SendFrames(_control(_STREAM_RESET, stream_id, service.wire_service_id))]


# --- destination ----------------------------------------------------------------------------------


class DestinationSession(_Session):
    """
    The destination local proxy's state machine: streams become connections to the targets.

    @param service_ids: the configured mapping's keys (C{""} = a bare V1 target).
    """

    def __init__(self, service_ids: Sequence[str], window: int = DEFAULT_WINDOW) -> None:
        super().__init__(window)
        self._configured = _check_mapping_keys(service_ids)
        self._buffered = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes received for connections still being opened (released by C{local_connected})."""
        return self._buffered

    def receive(self, message: Message) -> List[Action]:
        """React to one message from the tunnel."""
        message_type = message.type
        if message_type == _DATA:
            service = self._lookup(message.serviceId)
            if service is None:
                return []
            stream_id = message.streamId
            if stream_id != service.stream_id or not stream_id:
                return [_STALE]
            connection_id = message.connectionId or 1
            connection = service.connections.get(connection_id)
            if connection is None:
                return []
            payload = message.payload
            flow = connection.flow
            if flow is not None and not flow.received(len(payload)):
                self._drop_pending(connection)
                return self._flow_violation(service, connection_id, len(payload))
            if connection.connected:
                return [WriteLocal(service.service_id, connection_id, payload)]
            connection.pending.append(payload)
            self._buffered += len(payload)
            return []
        if message_type == _SERVICE_IDS:
            was_ready = self._ready
            return self._ready_now(self._service_ids(message.availableServiceIds), was_ready)
        if message_type in EXTENSION_TYPES:
            return self._extension(message)
        if message_type not in (
            _STREAM_START,
            _CONNECTION_START,
            _STREAM_RESET,
            _CONNECTION_RESET,
            _SESSION_RESET,
        ):
            return self._unknown_type(message)
        if not self._ready:
            return [_log("warn", "Ignoring {type} received before the tunnel's service ids", type=_type_name(message_type))]
        if message_type == _STREAM_START:
            return self._stream_start(message)
        if message_type == _CONNECTION_START:
            return self._connection_start(message)
        if message_type == _SESSION_RESET:
            return self._close_all("the tunnel service reset the session")
        service = self._lookup(message.serviceId)
        if service is None or not service.stream_id or message.streamId != service.stream_id:
            return []
        if message_type == _STREAM_RESET:
            # V1/V2 (no connection id): the normal end of the stream's one connection; V3: a failure.
            for connection in service.connections.values():
                self._drop_pending(connection)
            actions: List[Action] = [
                CloseLocal(service.service_id, cid, "the source reset the stream", bool(c.wire_connection_id))
                for cid, c in service.connections.items()
            ]
            service.connections = {}
            service.stream_id = 0
            return actions
        # CONNECTION_RESET
        connection_id = message.connectionId or 1
        connection = service.connections.pop(connection_id, None)
        if connection is None:
            return []  # unknown or already closed: duplicates are normal
        self._drop_pending(connection)
        return [_reset_or_close(service.service_id, connection_id, connection, "the source")]

    def _drop_pending(self, connection: _Connection) -> None:
        if connection.pending:
            self._buffered -= sum(map(len, connection.pending))
            connection.pending = []

    def _close_all(self, reason: str) -> List[Action]:
        self._buffered = 0
        for service in self._services.values():
            for connection in service.connections.values():
                connection.pending = []
        return super()._close_all(reason)

    def _service_ids(self, available: Sequence[str]) -> List[Action]:
        if self._ready:
            return [_LATE_SERVICE_IDS]
        mapping = _match_mapping(self._configured, available)
        if mapping is None:
            return [_mismatch(self._configured, available)]
        self._ready = True
        if {sid: s.mapping_key for sid, s in self._services.items()} != mapping:
            self._set_services(
                {service_id: _Service(service_id, key, service_id) for service_id, key in mapping.items()}
            )
        return []

    def _refuse_start(self, message: Message) -> List[Action]:
        """
        A STREAM_START / CONNECTION_START for a service this destination does not serve: log it and
        reset that stream or connection (the source closes its local connection; nothing else stops).
        """
        service_id = message.serviceId
        if service_id:
            why = f"Invalid service id received for stream start: {_bounded(service_id)}"
        else:
            why = (
                "Invalid service id received for stream start: the source sent no service id "
                f"(V1 format), but this destination serves {len(self._services)} services "
                f"({', '.join(sorted(self._services))}); a V1 source needs a tunnel of one service"
            )
        logged = _log("error", "{why}; resetting stream {stream_id}", why=why, stream_id=message.streamId)
        if message.streamId <= 0:
            return [logged]
        if message.type == _STREAM_START:
            return [logged, SendFrames(_control(_STREAM_RESET, message.streamId, service_id))]
        return [logged, SendFrames(_control(_CONNECTION_RESET, message.streamId, service_id, message.connectionId))]

    def _stream_start(self, message: Message) -> List[Action]:
        service = self._lookup(message.serviceId)
        if service is None:
            return self._refuse_start(message)
        stream_id = message.streamId
        if stream_id <= 0:
            return [_log("error", "Dropping STREAM_START with invalid stream id {stream_id}", stream_id=stream_id)]
        actions: List[Action] = []
        if service.connections:
            for connection in service.connections.values():
                self._drop_pending(connection)
            actions += service.close_all("the source started a new stream", abort=True)
        service.stream_id = stream_id
        return actions + self._open_connection(service, message)

    def _connection_start(self, message: Message) -> List[Action]:
        service = self._lookup(message.serviceId)
        if service is None:
            return self._refuse_start(message)
        stream_id = message.streamId
        if not service.stream_id:
            if stream_id <= 0:
                return []
            service.stream_id = stream_id  # accepted in place of a first STREAM_START
        elif stream_id != service.stream_id:
            return []
        connection_id = message.connectionId or 1
        connection = service.connections.pop(connection_id, None)
        if connection is not None:
            # Already open: an error of the source; reset that connection on both sides.
            self._drop_pending(connection)
            return [
                CloseLocal(service.service_id, connection_id, "the source started it a second time", True),
                SendFrames(
                    _control(_CONNECTION_RESET, stream_id, message.serviceId, message.connectionId)
                ),
            ]
        return self._open_connection(service, message)

    def _open_connection(self, service: _Service, message: Message) -> List[Action]:
        wire_connection_id = message.connectionId
        connection_id = wire_connection_id or 1
        service.connections[connection_id] = _Connection(
            DataFrameEncoder(service.stream_id, message.serviceId, wire_connection_id),
            wire_connection_id,
            False,
        )
        service.wire_service_id = message.serviceId
        return [ConnectTarget(service.service_id, connection_id, service.mapping_key)]

    def _adopt_flow(self, connection: _Connection, increment: int) -> Optional[ConnectionFlow]:
        """
        The source's first WINDOW_UPDATE for a connection (right after its start): the source uses
        flow control and half-close on it.  Our window is what the source assumed (we announced it).
        What we sent before counts against the grant (the source counts it on arrival; should that
        exceed its window, the source resets the connection: honest, if rare).
        """
        if not connection.wire_connection_id:
            return None
        return ConnectionFlow(max(0, increment - connection.sent), self.window, self.max_window)

    def local_connected(self, service_id: str, connection_id: int) -> List[Action]:
        """The target connection is open: release what arrived meanwhile."""
        connection = self._connection(service_id, connection_id)
        if connection is None:
            return [CloseLocal(service_id, connection_id, "the stream was reset while connecting", True)]
        connection.connected = True
        pending = connection.pending
        actions: List[Action] = []
        if pending:
            connection.pending = []
            self._buffered -= sum(map(len, pending))
            actions = [WriteLocal(service_id, connection_id, data) for data in pending]
        if connection.flow is not None and connection.flow.eof_received:
            actions.append(HalfCloseLocal(service_id, connection_id))
        return actions

    def local_connect_failed(self, service_id: str, connection_id: int) -> List[Action]:
        """The target could not be reached (after the proxy's retries): reset the connection or stream."""
        return self._local_gone(service_id, connection_id)

    def local_data(
        self, service_id: str, connection_id: int, data: Union[bytes, bytearray, memoryview]
    ) -> List[Action]:
        """Bytes read from a target connection: DATA frames in the source's format."""
        service = self._services.get(service_id)
        if service is None:
            return []
        connection = service.connections.get(connection_id)
        if connection is None:
            return []
        return self._send_data(service, connection_id, connection, data)

    def local_closed(self, service_id: str, connection_id: int) -> List[Action]:
        """A target connection closed: CONNECTION_RESET, or STREAM_RESET for a V1/V2 stream."""
        return self._local_gone(service_id, connection_id)

    def _local_gone(self, service_id: str, connection_id: int) -> List[Action]:
        service = self._services.get(service_id)
        if service is None:
            return []
        connection = service.connections.pop(connection_id, None)
        if connection is None:
            return []
        self._drop_pending(connection)
        stream_id = service.stream_id
        wire_service_id = service.wire_service_id
        if connection.wire_connection_id:
            return [
                SendFrames(
                    _control(_CONNECTION_RESET, stream_id, wire_service_id, connection.wire_connection_id)
                )
            ]
        # V1/V2: one connection per stream; closing it ends the stream.
        actions: List[Action] = [SendFrames(_control(_STREAM_RESET, stream_id, wire_service_id))]
        for connection in service.connections.values():
            self._drop_pending(connection)
        actions += service.close_all("the stream was reset", abort=True)
        return actions
