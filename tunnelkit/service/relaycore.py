# -*- test-case-name: tests.test_relaycore -*-
"""
Relaying one tunnel's frames between its source and its destination, sans-IO.

A L{TunnelCore} is told which peers connect and go (L{TunnelCore.attach}, L{TunnelCore.detach}) and
fed the payload of each binary WebSocket message a peer sends (L{TunnelCore.received}); it returns
the actions to perform, in order.  It never does I/O, never reads the clock, never imports the
reactor; it counts into the relay's metrics and the audit trail's ledger (plain recorders).
L{tunnelkit.service.relay.PeerProtocol} performs the actions on autobahn's protocols.

Actions (frozen dataclasses)
============================
  - L{Forward}C{(to, frames)}: whole tunnel frames (length prefix included), each with whether the
    WebSocket message toward C{to} must end right after it (after STREAM_START and
    CONNECTION_START: the reference client stalls otherwise); frames without an end may be merged
    with what follows, up to 131076 bytes.
  - L{ForwardMessage}C{(end_message)}: the message just received goes to the sender's partner
    unchanged (raw frame bytes, never re-encoded: the common case, returned as the constants
    L{AS_IS} and L{AS_IS_END}, so that relaying a DATA message allocates no action).
  - L{Send}C{(to, frames)}: after what is queued toward C{to}, each frame as its own WebSocket message.
  - L{Close}C{(peer, code, reason, cause, error)}: close C{peer}'s WebSocket (codes:
    L{tunnelkit.service.handshake.CLOSE_BY_CAUSE}); C{error} is the broken rule, if that is why.

What a peer sends
=================
Every frame is decoded and checked against its L{tunnelkit.protocol.rules.PeerRules}; the first
that breaks a rule closes the sender (the frames before it still go on) and the partner keeps its
connection.  Frames arriving while the other side is not connected: a STREAM_START is answered at
once with a STREAM_RESET (same stream and service id) and a CONNECTION_START with a
CONNECTION_RESET, so the source closes its local connection instead of waiting; every other frame
is dropped (C{dropped_frames_total{reason="peer_absent"}}).  When a peer goes away or is replaced,
the other one gets a STREAM_RESET for each stream the source started and nobody reset.

tunnelkit's extensions (L{tunnelkit.protocol.flowcontrol}): a peer's ANNOUNCE is kept, not
forwarded, until the other peer announced too; then each gets the other's (a peer that replaces
one gets the stored one when it announces).  WINDOW_UPDATE and EOF pass only between two peers that
were told of each other, else they are dropped (C{reason="extension_not_announced"}).  When a peer
goes away or is replaced, its partner, if it was told, gets an empty ANNOUNCE.  AWS's clients never
announce, so they never see an extension message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

from tunnelkit.errors import FramingError, ProtocolViolation
from tunnelkit.protocol.flowcontrol import ANNOUNCE, EOF, EXTENSION_TYPES, WITHDRAWAL_FRAME
from tunnelkit.protocol.framing import FrameDecoder, encode_message, parse_message
from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.protocol.rules import PeerRules
from tunnelkit.service.handshake import CLOSE_BY_CAUSE, violation_close
from tunnelkit.service.interfaces import DESTINATION, SOURCE
from tunnelkit.service.metrics import DESTINATION_TO_SOURCE, SOURCE_TO_DESTINATION, IRelayMetrics

__all__ = [
    "Forward",
    "ForwardMessage",
    "Send",
    "Close",
    "Action",
    "AS_IS",
    "AS_IS_END",
    "PeerState",
    "TunnelCore",
]

Buffer = Union[bytes, bytearray, memoryview]

_OTHER_SIDE = {SOURCE: DESTINATION, DESTINATION: SOURCE}
_DIRECTION = {SOURCE: SOURCE_TO_DESTINATION, DESTINATION: DESTINATION_TO_SOURCE}

_DATA = Message.DATA
_STREAM_START = Message.STREAM_START
_CONNECTION_START = Message.CONNECTION_START
_STREAM_RESET = Message.STREAM_RESET
_CONNECTION_RESET = Message.CONNECTION_RESET
_START_TYPES = frozenset({_STREAM_START, _CONNECTION_START})
_pack_length = struct.Struct(">H").pack


@dataclass(frozen=True)
class Forward:
    """Queue C{frames} (each: frame bytes, whether the WebSocket message ends after it) toward C{to}."""

    to: "PeerState"
    frames: Tuple[Tuple[Buffer, bool], ...]


@dataclass(frozen=True)
class ForwardMessage:
    """Queue the message just received, unchanged, toward the sender's partner."""

    end_message: bool


@dataclass(frozen=True)
class Send:
    """Send each of C{frames} to C{to} as its own WebSocket message, after what is queued."""

    to: "PeerState"
    frames: Tuple[bytes, ...]


@dataclass(frozen=True)
class Close:
    """Close C{peer}'s WebSocket with C{code} and C{reason}, counted under C{cause}."""

    peer: "PeerState"
    code: int
    reason: str
    cause: str
    error: Optional[Exception] = None  # the broken rule (cause "violation")


Action = Union[Forward, ForwardMessage, Send, Close]

#: L{TunnelCore.received}'s answer when the message goes on unchanged (and, for C{AS_IS_END}, ends
#: the WebSocket message toward the partner).
AS_IS: Tuple[Action, ...] = (ForwardMessage(False),)
AS_IS_END: Tuple[Action, ...] = (ForwardMessage(True),)
_NOTHING: Tuple[Action, ...] = ()


class PeerState:
    """
    One connected peer (one WebSocket), as the core sees it.

    @ivar owner: the I/O layer's object for this peer (the core never touches it).
    @ivar partner: the connected peer of the other side, if any.
    @ivar announcement: the peer's ANNOUNCE frame (length prefix included), once it announced.
    @ivar told: whether it was sent its current partner's announcement.
    """

    __slots__ = ("side", "rules", "decoder", "direction", "partner", "announcement", "told", "owner")

    def __init__(self, side: str, rules: PeerRules, owner: Any = None) -> None:
        self.side = side
        self.rules = rules
        self.decoder = FrameDecoder()
        self.direction = _DIRECTION[side]
        self.partner: Optional[PeerState] = None
        self.announcement: Optional[bytes] = None
        self.told = False
        self.owner = owner

    def __repr__(self) -> str:
        return f"<PeerState {self.side} {self.owner!r}>"


class TunnelCore:
    """
    One tunnel's relaying: its connected peers, and the streams its source started.

    @ivar services: the tunnel's service ids.
    @ivar service_ids_frame: the SERVICE_IDS frame each peer gets when it connects.
    @ivar peers: side -> the L{PeerState} connected there.
    @ivar active_streams: service id (C{""} for none) -> stream id of each stream the source
        started and nobody reset.
    @ivar ledger: the audit trail's ledger of the tunnel's connections
        (L{tunnelkit.service.audit.TunnelLedger}); None: off.
    """

    __slots__ = ("services", "_service_set", "service_ids_frame", "peers", "active_streams", "metrics", "ledger")

    def __init__(self, services: Sequence[str], metrics: IRelayMetrics) -> None:
        self.metrics = metrics
        self.peers: Dict[str, PeerState] = {}
        self.active_streams: Dict[str, int] = {}
        self.ledger: Any = None
        self.services: Tuple[str, ...] = ()
        self._service_set: FrozenSet[str] = frozenset()  # shared by the peers' rules
        self.service_ids_frame = b""
        self.set_services(services)

    def set_services(self, services: Sequence[str]) -> None:
        """
        The tunnel's service ids changed (RotateTunnelAccessToken may give a new destinationConfig):
        the peers connected may use the new ones too (they learn them when they reconnect).
        """
        self.services = tuple(services)
        self._service_set = frozenset(self.services)
        self.service_ids_frame = encode_message(
            Message(type=Message.SERVICE_IDS, availableServiceIds=self.services)
        )
        for peer in self.peers.values():
            peer.rules.services = self._service_set

    # --- peers come and go ---

    def attach(self, side: str, version: int = 3, owner: Any = None) -> Tuple[PeerState, List[Action]]:
        """
        A peer finished its handshake on C{side} (protocol C{version}): it gets SERVICE_IDS, and
        replaces the peer connected there, if any.
        """
        peer = PeerState(side, PeerRules(side, self._service_set, version), owner)
        actions: List[Action] = [Send(peer, (self.service_ids_frame,))]
        peers = self.peers
        old = peers.get(side)
        peers[side] = peer
        other = peers.get(_OTHER_SIDE[side])
        if old is not None:
            old.partner = None
            code, reason = CLOSE_BY_CAUSE["replaced"]
            actions.append(Close(old, code, reason, "replaced"))
        if other is not None:
            if old is not None:
                actions += self._stream_resets(other)
                actions += self._withdraw(other)
            if side == DESTINATION:
                for service_id in other.rules.started_services:
                    peer.rules.note_stream_started(service_id)
            other.partner = peer
            peer.partner = other
        return peer, actions

    def detach(self, peer: PeerState, reset_streams: bool = True) -> List[Action]:
        """
        C{peer}'s connection ended: its partner gets a STREAM_RESET per active stream (unless not
        C{reset_streams}: the tunnel is closing anyway) and, if it was told, an empty ANNOUNCE.
        Nothing if C{peer} was replaced.
        """
        if self.peers.get(peer.side) is not peer:
            return []
        del self.peers[peer.side]
        other = peer.partner
        peer.partner = None
        actions: List[Action] = []
        if other is not None:
            other.partner = None
            if reset_streams:
                actions += self._stream_resets(other)
            actions += self._withdraw(other)
        self.active_streams.clear()
        return actions

    def _stream_resets(self, to: PeerState) -> List[Action]:
        """A STREAM_RESET toward C{to} for each active stream; forgets them."""
        if not self.active_streams:
            return []
        frames = tuple(
            encode_message(Message(type=_STREAM_RESET, streamId=stream_id, serviceId=service_id))
            for service_id, stream_id in self.active_streams.items()
        )
        self.active_streams.clear()
        return [Send(to, frames)]

    @staticmethod
    def _withdraw(peer: PeerState) -> List[Action]:
        """C{peer}'s partner went away: it must not use the extensions until told again."""
        if not peer.told:
            return []
        peer.told = False
        return [Send(peer, (WITHDRAWAL_FRAME,))]

    @staticmethod
    def _exchange(one: PeerState, other: PeerState) -> List[Action]:
        """Once both peers announced tunnelkit's extensions, give each the other's announcement."""
        if one.announcement is None or other.announcement is None:
            return []
        actions: List[Action] = []
        for peer, partner in ((one, other), (other, one)):
            if not peer.told:
                actions.append(Send(peer, (partner.announcement,)))  # type: ignore[arg-type]
                peer.told = True
        return actions

    # --- what a peer sends ---

    def received(self, peer: PeerState, payload: Buffer) -> Sequence[Action]:
        """
        C{peer} sent a binary WebSocket message: C{payload} (its tunnel frames, or pieces of them).
        Returns L{AS_IS} or L{AS_IS_END} when it goes on unchanged.
        """
        decoder = peer.decoder
        whole = decoder.buffered == 0
        bodies = decoder.feed(payload)
        whole = whole and decoder.buffered == 0
        rules = peer.rules
        ledger = self.ledger
        side = peer.side
        partner = peer.partner
        active_streams = self.active_streams
        replies: Optional[List[Action]] = None  # resets answering starts that cannot be delivered
        cuts: List[int] = []  # indexes of frames after which a WebSocket message must end
        skip: List[int] = []  # extension frames not forwarded
        announced = False
        size = 0
        last = len(bodies) - 1
        for index, body in enumerate(bodies):
            try:
                message = parse_message(body)
                rules.check(message, len(body))
            except (FramingError, ProtocolViolation) as e:
                actions: List[Action] = replies or []
                if index and partner is not None:
                    # the frames before the broken one go on, but never an extension frame the
                    # partner may not see (the filter below is not reached)
                    kept, kept_cuts = _without(range(index), skip, cuts)
                    if kept:
                        actions.append(Forward(partner, _framed([bodies[i] for i in kept], kept_cuts)))
                rule = getattr(e, "rule", "unparseable_frame")
                code, reason = violation_close(rule, e)
                actions.append(Close(peer, code, reason, "violation", e))
                return actions
            size += len(body) + 2
            kind = message.type
            if kind == _DATA:
                if ledger is not None:
                    ledger.data(side, message, len(body))
            elif kind in _START_TYPES:
                cuts.append(index)
                service_id = message.serviceId
                if partner is not None:
                    if kind == _STREAM_START or service_id not in active_streams:
                        active_streams[service_id] = message.streamId
                    partner.rules.note_stream_started(service_id)
                    if ledger is not None:
                        ledger.started(side, message)
                else:
                    if replies is None:
                        replies = []
                    replies.append(Send(peer, (_refusal(message),)))
                    if ledger is not None:
                        ledger.refused(message, "the destination is not connected")
            elif kind == _CONNECTION_RESET:
                if ledger is not None:
                    ledger.reset(side, message)
            elif kind == _STREAM_RESET:
                service_id = message.serviceId
                if active_streams.get(service_id) == message.streamId:
                    del active_streams[service_id]
                if ledger is not None:
                    ledger.stream_reset(side, message)
            elif kind in EXTENSION_TYPES:
                # Announcements are exchanged by the core; the others go only between peers that
                # were both told of each other's announcement.
                if kind == ANNOUNCE:
                    skip.append(index)
                    if message.payload and peer.announcement is None:
                        peer.announcement = _pack_length(len(body)) + bytes(body)
                        announced = True
                elif not peer.told or partner is None or not partner.told:
                    skip.append(index)
                elif kind == EOF and ledger is not None:
                    ledger.eof(side, message)  # forwarded: the partner learns this side is done
        if skip:
            dropped = len(skip) - (1 if announced else 0)
            if dropped:
                self.metrics.dropped("extension_not_announced", dropped)
            kept, cuts = _without(range(len(bodies)), skip, cuts)
            bodies = [bodies[i] for i in kept]
            size = sum(len(b) + 2 for b in bodies)
            whole = False
            last = len(bodies) - 1
        forward: Optional[Forward] = None
        if bodies:
            if partner is None:
                self.metrics.dropped("peer_absent", len(bodies))
            else:
                self.metrics.relayed(peer.direction, len(bodies), size)
                if whole and (not cuts or cuts == [last]):
                    return AS_IS_END if cuts else AS_IS  # nothing else to do: see the branches above
                forward = Forward(partner, _framed(bodies, cuts))
        if replies is None and forward is None and not announced:
            return _NOTHING
        actions = replies or []
        if forward is not None:
            actions.append(forward)
        if announced and partner is not None:
            actions += self._exchange(peer, partner)
        return actions


def _without(indexes: Iterable[int], skip: Sequence[int], cuts: Sequence[int]) -> Tuple[List[int], List[int]]:
    """
    The frame C{indexes} left once C{skip} is dropped, and the message ends (C{cuts}, indexes into
    the frames) renumbered to those left: linear in the frames (a message may hold thousands).
    """
    skipped = set(skip)
    kept = [i for i in indexes if i not in skipped]
    position = {old: new for new, old in enumerate(kept)}
    return kept, [position[i] for i in cuts if i in position]


def _framed(bodies: Sequence[bytes], cuts: Sequence[int]) -> Tuple[Tuple[Buffer, bool], ...]:
    """C{bodies} as length-prefixed frames, each marked whether a message ends after it (C{cuts})."""
    cut_set = set(cuts)
    return tuple((_pack_length(len(body)) + body, index in cut_set) for index, body in enumerate(bodies))


def _refusal(message: Message) -> bytes:
    """The reset answering a STREAM_START/CONNECTION_START that cannot reach an absent destination."""
    if message.type == _STREAM_START:
        reset = Message(type=_STREAM_RESET, streamId=message.streamId, serviceId=message.serviceId)
    else:
        reset = Message(
            type=_CONNECTION_RESET,
            streamId=message.streamId,
            serviceId=message.serviceId,
            connectionId=message.connectionId,
        )
    return encode_message(reset)
