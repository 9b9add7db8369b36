# -*- test-case-name: tests.test_relay -*-
"""
The tunnel service's data plane at the WebSocket edge: one L{PeerProtocol} (autobahn, Twisted) per
tunnel client, over the modules that decide:

  - L{tunnelkit.service.handshake}: the C{GET /tunnel} upgrade checks, the statuses and close codes;
  - L{tunnelkit.service.pairing}: admission and limits, which peer pairs with which, replacement,
    liveness, the control plane's events (L{Relay});
  - L{tunnelkit.service.relaycore}: what goes from one peer to the other (sans-IO: this module only
    performs its actions).

The public names other modules import from here (L{Relay}, L{RelayLimits}, L{check_handshake}, ...)
are re-exported.

After the upgrade the service sends C{SERVICE_IDS} (the tunnel's services, possibly none:
C{00 02 08 05}) to each peer at once, whatever the subprotocol, then relays tunnel frames unchanged.
Toward a peer, DATA frames are packed into WebSocket messages of up to 131076 bytes (an outbox
flushed at the end of each read), and a message ends where the core says.  Pings are answered;
text messages close the sender, and autobahn closes one whose frames or messages are over 131076
bytes.  The 101 answer carries C{X-Tunnelkit-Extensions: flow-control/1 half-close/1}
(L{tunnelkit.protocol.flowcontrol}).

Flow control
============
Each peer's transport has a producer registered on it (L{_SinkWatcher}).  When a peer's outgoing
buffer is full, Twisted pauses that producer (on every write while full: the watcher is idempotent),
and the relay stops reading from the other peer until the buffer drains.  A peer that overdraws its
tunnel's bandwidth bucket is not read until the bucket refills.  So a fast source and a slow
destination leave at most a few hundred KB in the relay.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.errors import ProtocolViolation
from tunnelkit.protocol.flowcontrol import EXTENSIONS_HEADER, OFFERED
from tunnelkit.protocol.framing import MAX_WEBSOCKET_FRAME
from tunnelkit.protocol.rules import PeerRules
from tunnelkit.service.handshake import (
    FLOOD_REASONS,
    MAX_REQUEST_SIZE,
    SUBPROTOCOLS,
    HandshakeRequest,
    check_handshake,
    new_channel_id,
    refusal_response,
    violation_close,
)
from tunnelkit.service.interfaces import HandshakeRejected, PeerGrant
from tunnelkit.service.logbounds import bounded
from tunnelkit.service.pairing import Relay, RelayLimits, TokenBucket, TunnelLink
from tunnelkit.service.relaycore import (
    AS_IS,
    AS_IS_END,
    Action,
    Close,
    Forward,
    ForwardMessage,
    PeerState,
    Send,
)
from tunnelkit.transport.fastpath import FastWebSocket, set_buffer_size, transport_buffered
from tunnelkit.transport.websocket import masked_frame

__all__ = [
    "SUBPROTOCOLS",
    "MAX_REQUEST_SIZE",
    "HandshakeRejected",
    "HandshakeRequest",
    "RelayLimits",
    "Relay",
    "PeerProtocol",
    "TokenBucket",
    "build_factory",
    "check_handshake",
    "new_channel_id",
]

log = Logger()

#: Seconds a peer that ignored our close frame gets to read what is left before it is aborted.
ABORT_AFTER = 10.0


@implementer(IPushProducer)
class _SinkWatcher:
    """
    Registered as the producer on one peer's transport: when that transport's buffer is full,
    stop reading the other peer; when it drains, read again.  Twisted calls L{pauseProducing} on
    every write while the buffer is full, so it only acts on a change.
    """

    __slots__ = ("peer", "full")

    def __init__(self, peer: "PeerProtocol") -> None:
        self.peer = peer
        self.full = False

    def pauseProducing(self) -> None:
        if self.full:
            return
        self.full = True
        other = self.peer.partner()
        if other is not None:
            other.pause_reading("backpressure")

    def resumeProducing(self) -> None:
        if not self.full:
            return
        self.full = False
        other = self.peer.partner()
        if other is not None:
            other.resume_reading("backpressure")

    def stopProducing(self) -> None:
        self.resumeProducing()


def _unmasked_frame(mask: bytes, parts: Sequence[Any], size: int) -> Tuple[bytes, memoryview]:
    """
    A client's masked payload (C{size} bytes in C{parts}) unmasked, as a whole unmasked WebSocket
    frame ready to send on (header included), and a view of its payload.  One copy, XORed in place
    (see L{masked_frame}).
    """
    header = _ws_header(size)
    frame = masked_frame(header, mask, parts)
    return frame, memoryview(frame)[len(header) :]


def _ws_header(size: int) -> bytes:
    """The header of an unmasked, final, binary WebSocket frame of C{size} bytes."""
    if size < 126:
        return bytes((0x82, size))
    if size < 65536:
        return struct.pack("!BBH", 0x82, 126, size)
    return struct.pack("!BBQ", 0x82, 127, size)


# autobahn's own bases disagree on two attribute types (its stubs, not this class).
class PeerProtocol(FastWebSocket, WebSocketServerProtocol):  # type: ignore[misc]
    """
    One tunnel client's WebSocket, service side.

    Its factory (L{build_factory}) carries the C{relay} (a L{Relay}).  The hot path (the shared
    fast path L{FastWebSocket}, then L{fast_message}, L{onMessage}) unmasks each whole binary
    message and hands it to the tunnel's core (L{tunnelkit.service.relaycore.TunnelCore.received});
    what the core forwards goes to the other peer's outbox, flushed as WebSocket messages at the end
    of each read.
    """

    #: Why the upgrade was refused (the refusal's reason header); set only on a refusal.
    _refusal_reason = ""

    def __init__(self) -> None:
        super().__init__()
        self.channel_id = ""
        self._checking = False  # onConnect's token check is under way
        self.grant: Optional[PeerGrant] = None
        self.side = ""
        self.subprotocol = ""
        self.version = 3
        self.link: Optional[TunnelLink] = None
        self.core_peer: Optional[PeerState] = None  # the core's view of this peer, once attached
        self.sink: Optional[_SinkWatcher] = None
        self.replaced = False
        self.detached = False
        self.closing = False
        self._outbox: List[bytes] = []
        self._outbox_size = 0
        self._flush_target: Optional[PeerProtocol] = None
        self._pauses: set = set()
        self._resume_call: Optional[IDelayedCall] = None
        self._producer_registered = False
        self._abort_call: Optional[IDelayedCall] = None
        self._pieces: List[Any] = []  # the start of a frame that is still arriving (the fast path's)
        self._outbox_framed: Optional[bytes] = None  # the outbox's only message, already framed
        self.heard = True  # something arrived since the last liveness check
        self.silent_since = 0.0  # when the last liveness check found it had heard something

    # --- handshake ---

    def processHandshake(self) -> None:
        # While the store checks the token (asynchronously), bytes that arrive wait in self.data:
        # autobahn would otherwise parse the request again and claim the token a second time.
        if self._checking:
            return
        super().processHandshake()

    def onConnect(self, request: Any) -> "Deferred[Tuple[str, Dict[str, str]]]":  # type: ignore[override]
        self._checking = True
        d = Deferred.fromCoroutine(self._connect(request))

        def checked(result: Any) -> Any:
            self._checking = False
            return result

        d.addBoth(checked)
        return d

    async def _connect(self, request: Any) -> Tuple[str, Dict[str, str]]:
        relay = self.factory.relay
        self.channel_id = new_channel_id(relay.clock.seconds())
        address = str(getattr(self.transport.getPeer(), "host", ""))
        try:
            relay.limiter.check_address(address)
            try:
                checked = check_handshake(
                    self.http_request_data, request.path, request.params, request.protocols
                )
            except HandshakeRejected:
                relay.limiter.failed(address, None)
                raise
            grant = await relay.admit(checked, address)
        except HandshakeRejected as e:
            relay.metrics.handshake_rejected(e.reason)
            # Refusals by a failure budget come in floods: counted in the metrics, logged at debug.
            emit = log.debug if e.reason in FLOOD_REASONS else log.info
            emit(
                "Refused a handshake on channel {channel_id} from {address}: {status} {reason}",
                channel_id=self.channel_id,
                address=address,
                status=e.status,
                reason=e.reason,
            )
            self._refusal_reason = e.reason
            raise ConnectionDeny(e.status, e.text)
        relay.metrics.handshake_accepted()
        self.grant = grant
        self.side = grant.side
        self.subprotocol = checked.subprotocol
        self.version = checked.version
        return checked.subprotocol, {"channel-id": self.channel_id, EXTENSIONS_HEADER: OFFERED}

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Answer a refused upgrade with a short text body and the channel id."""
        self.wasNotCleanReason = reason
        self.sendData(
            refusal_response(code, reason, responseHeaders or (), self.channel_id, self._refusal_reason)
        )
        self.dropConnection(abort=False)

    # --- life cycle ---

    def onOpen(self) -> None:
        set_buffer_size(self.transport, self.factory.relay.limits.relay_buffer)
        self.sink = _SinkWatcher(self)
        self.transport.registerProducer(self.sink, True)
        self._producer_registered = True
        self.factory.relay.attach(self)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.closing = True
        self._outbox = []
        self._outbox_size = 0
        self._outbox_framed = None
        if self.link is not None:
            self.factory.relay.detach(self)

    def unregisterProducer(self) -> None:
        # autobahn calls this when it drops the connection; only undo what onOpen did.
        if self._producer_registered:
            self._producer_registered = False
            self.transport.unregisterProducer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self.unregisterProducer()
        super().connectionLost(reason)

    def partner(self) -> Optional["PeerProtocol"]:
        """The connected peer of the other side, if any."""
        state = self.core_peer
        if state is None or state.partner is None:
            return None
        partner: PeerProtocol = state.partner.owner
        return partner

    @property
    def rules(self) -> Optional[PeerRules]:
        """The protocol rules this peer must follow (once attached)."""
        return self.core_peer.rules if self.core_peer is not None else None

    def close_by_service(self, code: int, reason: str, cause: str) -> None:
        """Close this WebSocket with C{code} and C{reason}, counted under C{cause}."""
        if self.closing:
            return
        self.closing = True
        self.factory.relay.metrics.peer_closed(cause)
        self._outbox = []
        self._outbox_size = 0
        self._outbox_framed = None
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
        else:
            self.dropConnection(abort=True)

    def cancel_timers(self) -> None:
        """Forget scheduled calls (the peer is gone)."""
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None

    def onCloseHandshakeTimeout(self) -> None:
        # autobahn aborts here (TCP RST), which can destroy our close frame while it still sits
        # unread at the peer.  End the connection gracefully instead; abort only if the peer does
        # not even read what is left within ABORT_AFTER seconds.
        self.closeHandshakeTimeoutCall = None
        if self.state == self.STATE_CLOSED:
            return
        self.wasClean = False
        self.wasNotCleanReason = "the peer did not answer the closing handshake in time"
        self.wasCloseHandshakeTimeout = True
        transport = self.transport
        self.dropConnection(abort=False)
        self._abort_call = self.factory.relay.clock.callLater(
            ABORT_AFTER, self._abort_if_open, transport
        )

    def _abort_if_open(self, transport: Any) -> None:
        self._abort_call = None
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()

    # --- reading: pause and resume ---

    def pause_reading(self, cause: str) -> None:
        """Stop reading this peer for C{cause} (until every cause is lifted)."""
        if cause in self._pauses:
            return
        if not self._pauses and self.transport is not None:
            self.transport.pauseProducing()
        self._pauses.add(cause)
        self.factory.relay.metrics.reads_paused(cause)

    def resume_reading(self, cause: str) -> None:
        """Lift C{cause}; read again when no cause is left."""
        if cause not in self._pauses:
            return
        self._pauses.discard(cause)
        if not self._pauses and self.transport is not None and not self.detached:
            self.transport.resumeProducing()

    @property
    def reading_paused(self) -> bool:
        """Whether the relay is not reading this peer now."""
        return bool(self._pauses)

    def _charge(self, size: int) -> None:
        link = self.link
        bucket = link.bucket if link is not None else None
        if bucket is None:
            return
        wait = bucket.take(size)
        if wait > 0 and self._resume_call is None:
            self.pause_reading("bandwidth")
            self._resume_call = self.factory.relay.clock.callLater(wait, self._bandwidth_refilled)

    def _bandwidth_refilled(self) -> None:
        self._resume_call = None
        self.resume_reading("bandwidth")

    # --- the hot path ---

    masked_in = True  # the fast path (L{FastWebSocket}): clients mask their frames

    def dataReceived(self, data: bytes) -> None:
        self.heard = True  # alive (see Relay._check_liveness)
        super().dataReceived(data)
        target = self._flush_target
        if target is not None:
            self._flush_target = None
            target.flush_outbox()

    def fast_message(self, mask: Optional[bytes], parts: Sequence[Any], size: int) -> None:
        """
        A whole masked binary message in C{parts}: unmask it (one copy) and relay it, as
        L{onMessage} does (written out here: the hot path makes no call it does not need).
        """
        link = self.link
        if self.closing or link is None:
            return
        if not size:
            self.onMessage(b"", True)
            return
        assert mask is not None
        framed, payload = _unmasked_frame(mask, parts, size)
        if link.bucket is not None:
            self._charge(size)
        state: PeerState = self.core_peer  # type: ignore[assignment]  # set with self.link
        actions = link.core.received(state, payload)
        if actions is AS_IS or actions is AS_IS_END:
            # The common case: the message goes on as it is, already framed.
            partner: PeerProtocol = state.partner.owner  # type: ignore[union-attr]
            partner.queue(payload, actions is AS_IS_END, framed)
            self._flush_target = partner
        elif actions:
            self.perform(actions, payload, framed)

    def onPing(self, payload: bytes) -> None:
        self._charge(len(payload) + 2)
        if self.state == self.STATE_OPEN:
            self.sendPong(payload)

    def onMessage(self, payload: Union[bytes, memoryview], isBinary: bool) -> None:
        link = self.link
        if self.closing or link is None:
            return
        if not isBinary:
            self.violation(
                ProtocolViolation("text_message", "a text WebSocket message: tunnels carry binary messages only")
            )
            return
        self._charge(len(payload))
        assert self.core_peer is not None
        actions = link.core.received(self.core_peer, payload)
        if actions:
            self.perform(actions, payload)

    def perform(self, actions: Iterable[Action], payload: Any = None, framed: Optional[bytes] = None) -> None:
        """
        Carry out the core's C{actions}, in order (L{tunnelkit.service.relaycore}); C{payload} is the
        message they answer, if any (C{framed}: as a whole WebSocket frame).  What is forwarded is
        flushed at the end of this peer's read.
        """
        for action in actions:
            if isinstance(action, Forward):
                partner: PeerProtocol = action.to.owner
                queue = partner.queue
                for frame, end_message in action.frames:
                    queue(frame, end_message)
                self._flush_target = partner
            elif isinstance(action, ForwardMessage):
                assert self.core_peer is not None and self.core_peer.partner is not None
                partner = self.core_peer.partner.owner
                partner.queue(payload, action.end_message, framed)
                self._flush_target = partner
            elif isinstance(action, Send):
                action.to.owner.send_frames(action.frames)
            elif isinstance(action, Close):
                peer: PeerProtocol = action.peer.owner
                if action.error is not None:
                    peer._violated(action.error)
                peer.close_by_service(action.code, action.reason, action.cause)
            else:  # pragma: no cover - a new action type
                raise TypeError(f"no handler for {action!r}")

    def violation(self, error: Exception) -> None:
        """Close this peer for breaking a rule; the other side keeps its connection."""
        code, reason = violation_close(getattr(error, "rule", "unparseable_frame"), error)
        self._violated(error)
        self.close_by_service(code, reason, "violation")

    def _violated(self, error: Exception) -> None:
        """Count and log the rule this peer broke (it is being closed)."""
        rule = getattr(error, "rule", "unparseable_frame")
        self.factory.relay.metrics.violation(rule)
        log.info(
            "Closing the {side} of tunnel {tunnel_id} (channel {channel_id}): {rule}: {detail}",
            side=self.side,
            tunnel_id=self.link.tunnel_id if self.link else "",
            channel_id=self.channel_id,
            rule=bounded(rule),
            detail=bounded(error),
        )

    # --- writing toward this peer ---

    def queue(self, frames: Any, end_message: bool, framed: Optional[bytes] = None) -> None:
        """
        Add whole tunnel frames (bytes or a view) to the next WebSocket message toward this peer;
        with C{end_message}, the message ends after them.  C{framed}, if given, is C{frames} as a
        whole WebSocket message already (sent as it is if nothing joins it).
        """
        if self.closing:
            return
        if self._outbox_size + len(frames) > MAX_WEBSOCKET_FRAME:
            self.flush_outbox()
        self._outbox_framed = None if self._outbox else framed
        self._outbox.append(frames)
        self._outbox_size += len(frames)
        if end_message:
            self.flush_outbox()

    def flush_outbox(self) -> None:
        """Send what is queued as one WebSocket message."""
        if not self._outbox:
            return
        pieces = self._outbox
        size = self._outbox_size
        framed = self._outbox_framed
        self._outbox = []
        self._outbox_size = 0
        self._outbox_framed = None
        if self.state != self.STATE_OPEN:
            return
        if framed is None or len(pieces) != 1:
            framed = b"".join([_ws_header(size), *pieces])
        self.transport.write(framed)

    def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send each of C{frames} (whole, length-prefixed) as its own WebSocket message, now."""
        self.flush_outbox()
        if self.state != self.STATE_OPEN:
            return
        for frame in frames:
            self.transport.writeSequence([_ws_header(len(frame)), frame])

    def buffered_bytes(self) -> int:
        """
        Bytes held for this peer: unsent outbox, a partial incoming frame, autobahn's unparsed
        input, and what its transport (TLS and TCP) has not written yet.
        """
        total = self._outbox_size + len(getattr(self, "data", b"") or b"")
        if self.core_peer is not None:
            total += self.core_peer.decoder.buffered
        total += sum(len(piece) for piece in self._pieces)
        message = getattr(self, "message_data", None)
        if message:
            total += sum(len(part) for part in message)
        return total + transport_buffered(self.transport)


def build_factory(relay: Relay) -> WebSocketServerFactory:
    """An autobahn factory making L{PeerProtocol}s for C{relay}, with the tunnel's limits."""
    factory = WebSocketServerFactory(server="tunnelkit")
    factory.protocol = PeerProtocol
    factory.relay = relay  # type: ignore[attr-defined]
    factory.setProtocolOptions(
        maxFramePayloadSize=MAX_WEBSOCKET_FRAME,
        maxMessagePayloadSize=MAX_WEBSOCKET_FRAME,
        autoFragmentSize=0,
        webStatus=False,
        utf8validateIncoming=False,
        closeHandshakeTimeout=1,
        openHandshakeTimeout=10,
        failByDrop=False,
        tcpNoDelay=True,
    )
    return factory
