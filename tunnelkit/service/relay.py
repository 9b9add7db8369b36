# -*- test-case-name: tests.test_relay -*-
"""
The tunnel service's data plane: the C{GET /tunnel} WebSocket handshake and the relay between a
tunnel's source and destination.

Handshake (reference sections 1.2 and 1.3)
==========================================
The first failed check answers the upgrade with its status, a C{channel-id} header and a one-line
C{text/plain} body (the AWS texts where AWS documents one).  4xx means the client must change
something; only the service's own failures are 5xx (the reference local proxy retries those every
2.5 s and gives up at once on a 4xx).  Each check raises L{HandshakeRejected} with its status,
reason and text where it is made: the code is the table.  The checks, in the order of
L{PeerProtocol.onConnect}: L{HandshakeLimiter.check_address} (429: the address spent its failure
budget; first, so that it blocks only itself), L{check_handshake} (431/400/401: the request
itself), then L{Relay.admit}: the store's verdict on the token (its reasons' statuses are
L{tunnelkit.service.tokens.STATUS_BY_REASON}), with L{HandshakeLimiter.check_tunnel} and
L{Relay._may_join} (429s checked once the token is found valid and before it is spent, so the
client retries with the same token), a 429 instead of the store's 4xx when the token's routing key
failed too often just now, and 500 when the store failed.

Every failure (a 4xx from these checks) is counted against the client's address, and a token
failure against the token's routing key too (see L{HandshakeLimiter}).

Malformed WebSocket requests (no C{Upgrade}, bad key or version, not C{GET}) get autobahn's own 4xx
answer, with the same kind of text body.

After the upgrade
=================
The service sends C{SERVICE_IDS} (the tunnel's services, possibly none: C{00 02 08 05}) to each peer
at once, whatever the subprotocol, then relays tunnel frames unchanged between source and
destination.  Every frame a peer sends is decoded and checked against
L{tunnelkit.protocol.rules.PeerRules}; the raw frame bytes are forwarded, never re-encoded.  Toward a
peer, DATA frames are packed into WebSocket messages of up to 131076 bytes, and a message always ends
right after a STREAM_START or CONNECTION_START (the reference client stalls otherwise).  Pings are
answered; text messages and frames over 131076 bytes close the sender.

Frames arriving while the other side is not connected: a STREAM_START is answered at once with a
STREAM_RESET (same stream and service id) and a CONNECTION_START with a CONNECTION_RESET, so the
source closes its local connection instead of waiting; every other frame is dropped (counted in
C{tunnelkit_dropped_frames_total{reason="peer_absent"}}).

When a peer goes away (or is replaced), the other side gets a STREAM_RESET for each stream the
source had started and not reset, so it closes the local connections at once.

Liveness: every C{--ping-interval} seconds each peer that sent nothing since the last check gets a
ping (AWS's proxies answer pings); one silent for C{--peer-timeout} seconds is taken for gone (a
peer that vanished without a FIN): its connection is reset, its side recorded DISCONNECTED, and the
other side gets the STREAM_RESETs above.  A peer the relay is not reading (backpressure) counts as
alive.

tunnelkit's extensions
======================
The 101 answer carries C{X-Tunnelkit-Extensions: flow-control/1 half-close/1}
(L{tunnelkit.protocol.flowcontrol}).  A peer's ANNOUNCE is kept, not forwarded, until the other
peer announced too; then each gets the other's (and a new peer that replaces one gets the stored
one when it announces).  WINDOW_UPDATE and EOF frames pass untouched only between two peers that
were told of each other; otherwise they are dropped (C{tunnelkit_dropped_frames_total
{reason="extension_not_announced"}}).  When a peer goes away or is replaced, the other one (if it was
told) gets an empty ANNOUNCE: its partner announces nothing now.  AWS's clients never announce, so
they never see an extension message.

Close codes the service sends
=============================
C{CLOSE_NORMAL} with C{REASON_CLOSED} or C{REASON_EXPIRED}, C{CLOSE_POLICY} with C{REASON_ROTATED},
C{REASON_REPLACED} or a protocol violation's text, C{CLOSE_GOING_AWAY} at L{Relay.shutdown} (the
constants below; L{Relay._close_peer} and L{Relay.token_rotated} choose them), and autobahn's 1009
for a WebSocket frame or message over 131076 bytes.

Flow control
============
Each peer's transport has a producer registered on it (L{_SinkWatcher}).  When a peer's outgoing
buffer is full, Twisted pauses that producer (on every write while full: the watcher is idempotent),
and the relay stops reading from the other peer until the buffer drains.  The per-tunnel bandwidth
limit is a token bucket on the injected clock: a peer that overdraws it is not read until the bucket
refills.  So a fast source and a slow destination leave at most a few hundred KB in the relay.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import struct
from dataclasses import dataclass
from itertools import count
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.errors import FramingError, ProtocolViolation
from tunnelkit.protocol.framing import (
    MAX_WEBSOCKET_FRAME,
    FrameDecoder,
    encode_message,
    parse_message,
)
from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.protocol.flowcontrol import (
    ANNOUNCE,
    EOF,
    EXTENSION_TYPES,
    EXTENSIONS_HEADER,
    OFFERED,
    WITHDRAWAL_FRAME,
)
from tunnelkit.protocol.rules import PeerRules
from tunnelkit.protocol.tokens import CLIENT_TOKEN_RE
from tunnelkit.service.audit import NO_AUDIT
from tunnelkit.service.interfaces import (
    DESTINATION,
    SOURCE,
    HandshakeRejected,
    ITunnelEvents,
    ITunnelStateObserver,
    ITunnelStore,
    PeerGrant,
)
from tunnelkit.service.logbounds import bounded
from tunnelkit.service.statechanges import StateChanges
from tunnelkit.service.tokens import routing_key
from tunnelkit.service.metrics import (
    DESTINATION_TO_SOURCE,
    SOURCE_TO_DESTINATION,
    IRelayMetrics,
    RelayMetrics,
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
    "check_handshake",
    "new_channel_id",
]

log = Logger()

#: Subprotocols the service accepts, in order of preference, with the protocol version each means.
SUBPROTOCOLS: Dict[str, int] = {
    "aws.iot.securetunneling-3.0": 3,
    "aws.iot.securetunneling-2.0": 2,
    "aws.iot.securetunneling-1.0": 1,
    "aws.iot.securedtunneling-1.0": 1,  # the browser sample's spelling
}

#: The largest handshake request (request line and headers) the service reads.
MAX_REQUEST_SIZE = 4096

TOKEN_HEADER = "access-token"
TOKEN_COOKIE = "awsiot-tunnel-token"
CLIENT_TOKEN_HEADER = "client-token"

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008

#: Seconds a peer that ignored our close frame gets to read what is left before it is aborted.
ABORT_AFTER = 10.0

REASON_CLOSED = "Tunnel closed"
REASON_EXPIRED = "Tunnel expired"
REASON_ROTATED = "Access token rotated"
REASON_REPLACED = "Connection replaced by a new peer"

_OTHER_SIDE = {SOURCE: DESTINATION, DESTINATION: SOURCE}
_FLOOD_REASONS = frozenset({"too-many-failures", "tunnel-failures-limited"})
_DIRECTION = {SOURCE: SOURCE_TO_DESTINATION, DESTINATION: DESTINATION_TO_SOURCE}

_DATA = Message.DATA
_STREAM_START = Message.STREAM_START
_CONNECTION_START = Message.CONNECTION_START
_STREAM_RESET = Message.STREAM_RESET
_CONNECTION_RESET = Message.CONNECTION_RESET
_START_TYPES = frozenset({_STREAM_START, _CONNECTION_START})
_pack_length = struct.Struct(">H").pack


@dataclass(frozen=True)
class HandshakeRequest:
    """A handshake that passed the request checks (its token is not claimed yet)."""

    mode: str
    access_token: str
    client_token: Optional[str]
    subprotocol: str
    version: int


def _header_values(raw_request: bytes) -> Tuple[int, Dict[str, List[str]]]:
    """
    The size of C{raw_request}'s request line and headers, and every value of each header (names
    lower-cased, one entry per header line, in order).
    """
    end = raw_request.find(b"\r\n\r\n")
    head = raw_request if end < 0 else raw_request[:end]
    size = len(head) + 4
    values: Dict[str, List[str]] = {}
    for line in head.decode("iso-8859-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            values.setdefault(name.strip().lower(), []).append(value.strip())
    return size, values


def _split_list(values: Iterable[str]) -> List[str]:
    """Header values as a list, splitting comma-joined ones (a proxy may fold repeated headers)."""
    return [item.strip() for value in values for item in value.split(",")]


def _cookie_values(cookie_headers: Iterable[str], name: str) -> List[str]:
    found = []
    for header in cookie_headers:
        for pair in re.split(r"[;,]", header):
            key, sep, value = pair.partition("=")
            if sep and key.strip() == name:
                found.append(value.strip().strip('"'))
    return found


def check_handshake(
    raw_request: bytes,
    path: str,
    params: Mapping[str, Sequence[str]],
    offered_protocols: Sequence[str],
) -> HandshakeRequest:
    """
    Check a C{GET /tunnel} upgrade request (everything but the token's validity).

    @param raw_request: the request line and headers as received (autobahn's C{http_request_data}).
    @param path: the request path, without the query.
    @param params: the query parameters, each with all its values.
    @param offered_protocols: the C{Sec-WebSocket-Protocol} values, in the client's order.
    @raise HandshakeRejected: with the status, reason and text of the first check that fails.
    """
    size, headers = _header_values(raw_request)
    if size > MAX_REQUEST_SIZE:
        raise HandshakeRejected(
            431,
            "request-too-large",
            f"Request too large: the handshake request is {size} bytes, the limit is "
            f"{MAX_REQUEST_SIZE}",
        )
    if path != "/tunnel":
        raise HandshakeRejected(400, "bad-path", "Invalid path: the tunnel endpoint is /tunnel")
    modes = params.get("local-proxy-mode", [])
    if len(modes) != 1 or modes[0] not in (SOURCE, DESTINATION):
        shown = ", ".join(repr(m) for m in modes) if modes else "missing"
        raise HandshakeRejected(
            400,
            "bad-mode",
            f"Invalid local-proxy-mode ({shown}): give exactly one of "
            "?local-proxy-mode=source or ?local-proxy-mode=destination",
        )
    tokens = [t for t in _split_list(headers.get(TOKEN_HEADER, []))]
    tokens += _cookie_values(headers.get("cookie", []), TOKEN_COOKIE)
    present = [t for t in tokens if t]
    if not present:
        raise HandshakeRejected(
            401,
            "missing-token",
            f"Missing access token: send it in an {TOKEN_HEADER} header or an "
            f"{TOKEN_COOKIE} cookie",
        )
    if len(tokens) > 1:
        raise HandshakeRejected(
            400,
            "duplicate-token",
            f"Invalid access token: give the token exactly once, in one {TOKEN_HEADER} header or "
            f"one {TOKEN_COOKIE} cookie",
        )
    client_tokens = _split_list(headers.get(CLIENT_TOKEN_HEADER, []))
    if len(client_tokens) > 1:
        raise HandshakeRejected(
            400, "bad-client-token", "Invalid client token: give at most one client-token header"
        )
    client_token = client_tokens[0] if client_tokens else None
    if client_token is not None and not CLIENT_TOKEN_RE.match(client_token):
        raise HandshakeRejected(
            400,
            "bad-client-token",
            "Invalid client token: it must be 32 to 128 characters of a-z, A-Z, 0-9 and -",
        )
    chosen = None
    for protocol in SUBPROTOCOLS:
        if protocol in offered_protocols:
            chosen = protocol
            break
    if chosen is None:
        raise HandshakeRejected(
            400,
            "no-subprotocol",
            "Unsupported subprotocol: offer aws.iot.securetunneling-3.0, -2.0 or -1.0 in "
            "Sec-WebSocket-Protocol",
        )
    return HandshakeRequest(modes[0], present[0], client_token, chosen, SUBPROTOCOLS[chosen])


_MACHINE_ID = secrets.token_hex(8)
_CHANNEL_SEQUENCE = count(1)


def new_channel_id(now: float) -> str:
    """
    A unique id for one WebSocket session, shaped like AWS's (16-8-8-16-8 hex digits):
    machine, process, sequence, time in microseconds, random.
    """
    return "%s-%08x-%08x-%016x-%s" % (
        _MACHINE_ID,
        os.getpid() & 0xFFFFFFFF,
        next(_CHANNEL_SEQUENCE) & 0xFFFFFFFF,
        int(now * 1_000_000) & 0xFFFFFFFFFFFFFFFF,
        secrets.token_hex(4),
    )


class TokenBucket:
    """
    A token bucket on an injected clock: C{rate} units a second, holding at most C{capacity}.

    L{take} may overdraw the bucket (a WebSocket message is never split); it returns how long to wait
    until the bucket is back at zero.
    """

    __slots__ = ("rate", "capacity", "_clock", "_level", "_stamp")

    def __init__(self, rate: float, capacity: float, clock: IReactorTime) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("a token bucket needs a positive rate and capacity")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._level = capacity
        self._stamp = clock.seconds()

    def _refill(self) -> float:
        now = self._clock.seconds()
        level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        self._level = level
        return level

    def take(self, amount: float) -> float:
        """Take C{amount}; return 0.0, or the seconds until the debt is repaid."""
        level = self._refill() - amount
        self._level = level
        return 0.0 if level >= 0 else -level / self.rate

    def try_take(self, amount: float = 1.0) -> bool:
        """Take C{amount} only if the bucket holds it."""
        if self._refill() < amount:
            return False
        self._level -= amount
        return True

    def holds(self, amount: float = 1.0) -> bool:
        """Whether L{try_take} of C{amount} would succeed now (takes nothing)."""
        return self._refill() >= amount

    @property
    def full(self) -> bool:
        """Whether the bucket has refilled completely (an idle bucket can be forgotten)."""
        return self._refill() >= self.capacity


@dataclass(frozen=True)
class RelayLimits:
    """
    The relay's limits (see L{tunnelkit.service.dataplane.DataPlaneOptions}).

    @ivar tunnel_bandwidth: bytes per second per tunnel, both directions together; None: unlimited.
    @ivar handshakes_per_second: accepted handshakes per tunnel per second (burst of as many); only
        a valid token can spend it.
    @ivar failed_handshakes_per_address: failed handshakes per second one client address may make
        (burst of twice as many) before its next attempts get 429 without a look at their token.
    @ivar failed_handshakes_per_key: failed handshakes per second counted per routing key; beyond
        them a failing attempt is answered 429 (and not logged one by one).  A valid token is always
        checked first, so this never refuses one.
    @ivar max_websockets_per_account: open WebSockets per account; None: unlimited.
    @ivar ping_interval: seconds a peer may stay silent before the service pings it.
    @ivar peer_timeout: seconds of silence (no frame, no pong) after which a peer is taken for gone:
        its connection is reset, its side recorded DISCONNECTED and the other side told with a
        STREAM_RESET for each active stream.  A silent peer is dropped within
        C{peer_timeout + ping_interval} seconds.
    @ivar relay_buffer: bytes a peer's transport may buffer before the other peer is paused, and
        the largest socket read.  Python allocates each read's buffer at this size: above 128 KiB
        glibc serves it with a fresh mmap, so every read costs ~70 us more (page faults).
    """

    tunnel_bandwidth: Optional[int] = None
    handshakes_per_second: float = 10.0
    failed_handshakes_per_address: float = 10.0
    failed_handshakes_per_key: float = 10.0
    max_websockets_per_account: Optional[int] = None
    relay_buffer: int = 131072
    ping_interval: float = 20.0
    peer_timeout: float = 60.0


class _BucketTable:
    """
    One L{TokenBucket} per key, made on first use; idle (full) buckets are forgotten when the table
    grows past C{max_keys}, and if none is idle the table starts afresh (memory stays bounded).
    """

    def __init__(self, rate: float, burst: float, clock: IReactorTime, max_keys: int = 8192) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: Dict[str, TokenBucket] = {}

    def get(self, key: str) -> Optional[TokenBucket]:
        """The bucket of C{key} (None when the rate is 0: no limit)."""
        if self.rate <= 0:
            return None
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                for stale in [k for k, b in buckets.items() if b.full]:
                    del buckets[stale]
                if len(buckets) >= self.max_keys:
                    buckets.clear()
            bucket = buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


def address_budget_key(host: str) -> str:
    """
    The key of a client address's failure budget: an IPv4 address as it is, an IPv6 address by its
    /64 (one site's network: a host can take any address in it, so one budget per address would
    be none), anything else (a unix socket's empty host) as it is.
    """
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d on a dual-stack listener: the IPv4 client
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class HandshakeLimiter:
    """
    Who may try a WebSocket handshake now, on an injected clock (no I/O).

    Three budgets, so that failed attempts never cost a valid token its connection:
      - failures per client address (IPv6: per /64, L{address_budget_key}): an address that spent
        it gets 429 before its token is even looked at.  It blocks only that address: behind NAT,
        CGNAT or a reverse proxy that does not send the PROXY protocol, that is everyone behind it
        (use C{haproxy:} listeners, or C{--failed-handshakes-per-address 0} and rely on the next
        budget);
      - failures per routing key (the token's non-secret prefix, shared by a tunnel's tokens): only
        failures are counted, and only after the token was checked, so a valid token always passes;
        past the budget a failing attempt gets 429 instead of its 4xx;
      - accepted handshakes per tunnel: spent only by valid tokens (a client's reconnect loop).
    """

    def __init__(self, limits: RelayLimits, clock: IReactorTime) -> None:
        self.clock = clock
        self._per_address = _BucketTable(
            limits.failed_handshakes_per_address, 2 * limits.failed_handshakes_per_address, clock
        )
        self._per_key = _BucketTable(limits.failed_handshakes_per_key, 2 * limits.failed_handshakes_per_key, clock)
        self._per_tunnel = _BucketTable(limits.handshakes_per_second, limits.handshakes_per_second, clock)

    @staticmethod
    def _wait(bucket: TokenBucket) -> int:
        return max(1, int(-(-(1.0 - bucket._refill()) // bucket.rate)))

    def check_address(self, address: str) -> None:
        """@raise HandshakeRejected: 429 if C{address} spent its failure budget."""
        bucket = self._per_address.get(address_budget_key(address))
        if bucket is not None and not bucket.holds():
            raise HandshakeRejected(
                429,
                "too-many-failures",
                f"Too many failed connection attempts from this address: retry in {self._wait(bucket)} s",
            )

    def check_tunnel(self, tunnel_id: str) -> None:
        """@raise HandshakeRejected: 429 if the tunnel had too many accepted handshakes just now."""
        bucket = self._per_tunnel.get(tunnel_id)
        if bucket is not None and not bucket.holds():
            raise HandshakeRejected(
                429,
                "rate-limited",
                f"Too many connections to this tunnel just now: retry in {self._wait(bucket)} s",
            )

    def accepted(self, tunnel_id: str) -> None:
        """A valid token connected to C{tunnel_id}."""
        bucket = self._per_tunnel.get(tunnel_id)
        if bucket is not None:
            bucket.take(1.0)

    def failed(self, address: str, key: Optional[str]) -> bool:
        """
        A handshake from C{address} (presenting routing key C{key}, if any) failed.  Returns
        whether C{key} had spent its failure budget already (the attempt is then answered 429).
        """
        bucket = self._per_address.get(address_budget_key(address))
        if bucket is not None:
            bucket.take(1.0)
        if key is None:
            return False
        bucket = self._per_key.get(key)
        return bucket is not None and not bucket.try_take()


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


class TunnelLink:
    """
    One tunnel's live state on this relay: its connected peers and the streams its source started.

    @ivar active_streams: service id (C{""} for none) -> stream id of each stream the source started
        and nobody reset.
    """

    def __init__(self, relay: "Relay", grant: PeerGrant) -> None:
        self.relay = relay
        self.tunnel_id = grant.tunnel_id
        self.account_id = grant.account_id
        self.services: Tuple[str, ...] = ()
        self.expires_at = grant.expires_at
        self.peers: Dict[str, PeerProtocol] = {}
        self.active_streams: Dict[str, int] = {}
        self.closed_reason: Optional[str] = None
        self.bucket: Optional[TokenBucket] = None
        bandwidth = relay.limits.tunnel_bandwidth
        if bandwidth:
            self.bucket = TokenBucket(
                bandwidth, max(bandwidth / 4.0, 2.0 * MAX_WEBSOCKET_FRAME), relay.clock
            )
        self.expiry_call: Optional[IDelayedCall] = None
        self.service_ids_frame = b""
        #: The audit trail's ledger of this tunnel's connections (L{tunnelkit.service.audit}); None: off.
        self.ledger: Any = None
        self.set_services(grant.services)

    def set_services(self, services: Sequence[str]) -> None:
        """The tunnel's service ids (and the SERVICE_IDS frame each new peer gets)."""
        self.services = tuple(services)
        self.service_ids_frame = encode_message(
            Message(type=Message.SERVICE_IDS, availableServiceIds=self.services)
        )

    def stream_resets(self) -> List[bytes]:
        """A STREAM_RESET frame for each active stream; forgets them."""
        frames = []
        for service_id, stream_id in self.active_streams.items():
            frames.append(
                encode_message(
                    Message(type=_STREAM_RESET, streamId=stream_id, serviceId=service_id)
                )
            )
        self.active_streams.clear()
        return frames


class _NoPlacement:
    """The relay's C{placement} hook when the service is a single node: nothing to record."""

    def peer_attached(self, peer: Any) -> None:
        pass

    def peer_detached(self, peer: Any) -> None:
        pass

    def before_state(self, tunnel_id: str, side: str, connected: bool) -> None:
        pass

    def after_state(self, tunnel_id: str, side: str, connected: bool) -> None:
        pass


NO_PLACEMENT = _NoPlacement()


@implementer(ITunnelEvents)
class Relay:
    """
    The live tunnels of one service process, and the decisions that involve more than one peer:
    admission (limits, the store's token rules), pairing, replacement, and closing on the control
    plane's events.

    @ivar links: tunnel id -> L{TunnelLink} of every tunnel with a peer connected.
    """

    def __init__(
        self,
        store: ITunnelStore,
        clock: IReactorTime,
        limits: Optional[RelayLimits] = None,
        metrics: Optional[IRelayMetrics] = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.limits = limits or RelayLimits()
        self.metrics: IRelayMetrics = metrics if metrics is not None else RelayMetrics()
        self.links: Dict[str, TunnelLink] = {}
        self._websockets_per_account: Dict[str, int] = {}
        #: Connection states to record, and the sides being written (L{_set_state}).
        self._latest_state: Dict[Tuple[str, str], Tuple[bool, float, Optional[str]]] = {}
        self._writing_state: Set[Tuple[str, str]] = set()
        self.limiter = HandshakeLimiter(self.limits, clock)
        self._liveness: Optional[LoopingCall] = None
        #: The audit trail's hooks (L{tunnelkit.service.audit}); the service sets its trail here.
        self.audit: Any = NO_AUDIT
        #: Told of each peer that attaches and detaches (a cluster node records where peers are:
        #: L{tunnelkit.service.cluster.node.ClusterNode}); nothing on a single node.
        self.placement: Any = NO_PLACEMENT
        #: Told once each connection state is recorded (L{ITunnelStateObserver}: the console's live pages).
        self.state_changes: ITunnelStateObserver = StateChanges()

    # --- admission ---

    async def admit(self, request: HandshakeRequest, address: str = "") -> PeerGrant:
        """
        Decide whether a checked handshake from client C{address} may connect: the failure budgets
        (L{HandshakeLimiter}), then the store's token rules, with the tunnel's rate and the account's
        WebSocket limit checked before the token is spent (a refused client keeps its token).

        @raise HandshakeRejected: if not.
        """
        self.limiter.check_address(address)
        try:
            grant: PeerGrant = await self.store.claim_peer(
                request.access_token,
                request.mode,
                request.client_token,
                self.clock.seconds(),
                admit=self._may_join,
            )
        except HandshakeRejected as e:  # the store's TokenRejected: its status, reason and text as they are
            if e.status < 500 and e.status != 429:
                if self.limiter.failed(address, routing_key(request.access_token)):
                    raise HandshakeRejected(
                        429,
                        "tunnel-failures-limited",
                        "Too many failed connection attempts for this tunnel: check the access token, "
                        "then retry in a second",
                    ) from None
            raise
        except Exception:
            log.failure("The tunnel store failed while checking an access token")
            raise HandshakeRejected(
                500, "internal-error", "Internal error: the service could not check the token; retry"
            ) from None
        self.limiter.accepted(grant.tunnel_id)
        return grant

    def _may_join(self, grant: PeerGrant) -> None:
        """Checked by the store before it spends a valid token: the tunnel's and account's limits."""
        self.limiter.check_tunnel(grant.tunnel_id)
        limit = self.limits.max_websockets_per_account
        if limit is not None:
            link = self.links.get(grant.tunnel_id)
            replacing = link is not None and grant.side in link.peers
            open_now = self._websockets_per_account.get(grant.account_id, 0)
            if open_now - (1 if replacing else 0) >= limit:
                raise HandshakeRejected(
                    429,
                    "too-many-websockets",
                    f"Too many connections: this account has {open_now} open tunnel connections, "
                    f"the limit is {limit}; the access token was not used, retry when one closes",
                )

    # --- pairing ---

    def attach(self, peer: "PeerProtocol") -> None:
        """A peer finished its handshake: send it SERVICE_IDS and pair it with the other side."""
        grant = peer.grant
        assert grant is not None
        link = self.links.get(grant.tunnel_id)
        if link is None:
            link = self.links[grant.tunnel_id] = TunnelLink(self, grant)
            delay = max(0.0, link.expires_at - self.clock.seconds())
            link.expiry_call = self.clock.callLater(delay, self.tunnel_closed, link.tunnel_id, "expired")
            self.metrics.relay_tunnels(len(self.links))
        side = grant.side
        if tuple(grant.services) != link.services:
            # RotateTunnelAccessToken may have given the tunnel a new destinationConfig: the peer
            # still connected may use the new service ids too (it learns them when it reconnects).
            link.set_services(grant.services)
            for connected in link.peers.values():
                if connected.rules is not None:
                    connected.rules.services = frozenset(link.services)
        peer.link = link
        peer.heard = False
        peer.silent_since = self.clock.seconds()
        self._watch_liveness()
        peer.rules = PeerRules(side, link.services, peer.version)
        self._websockets_per_account[link.account_id] = (
            self._websockets_per_account.get(link.account_id, 0) + 1
        )
        self.metrics.peer_connected(side, 1)
        peer.send_frames([link.service_ids_frame])
        old = link.peers.get(side)
        link.peers[side] = peer
        other = link.peers.get(_OTHER_SIDE[side])
        if old is not None:
            old.replaced = True
            log.info(
                "Replacing the {side} of tunnel {tunnel_id}: channel {old_channel} is replaced by "
                "{channel_id}",
                side=side,
                tunnel_id=link.tunnel_id,
                old_channel=old.channel_id,
                channel_id=peer.channel_id,
            )
            old.close_by_service(CLOSE_POLICY, REASON_REPLACED, "replaced")
        if other is not None:
            if old is not None:
                other.send_frames(link.stream_resets())
                withdraw_announcement(other)
            if side == DESTINATION and other.rules is not None:
                for service_id in other.rules.started_services:
                    peer.rules.note_stream_started(service_id)
            # Backpressure follows the new pairing: the old peer's full buffer no longer matters.
            other.resume_reading("backpressure")
            if other.sink is not None and other.sink.full:
                peer.pause_reading("backpressure")
        self.placement.peer_attached(peer)  # before the state: see _write_state
        self._set_state(link.tunnel_id, side, True, link.account_id)
        self.audit.peer_connected(peer)
        log.info(
            "The {side} of tunnel {tunnel_id} connected on channel {channel_id} ({subprotocol})",
            side=side,
            tunnel_id=link.tunnel_id,
            channel_id=peer.channel_id,
            subprotocol=peer.subprotocol,
        )
        if link.closed_reason is not None:
            self._close_peer(peer, link.closed_reason)

    # --- liveness ---

    def _watch_liveness(self) -> None:
        """Check every connected peer each L{RelayLimits.ping_interval} (while any is connected)."""
        if self._liveness is not None:
            return
        self._liveness = LoopingCall(self._check_liveness)
        self._liveness.clock = self.clock
        self._liveness.start(self.limits.ping_interval, now=False)

    def _stop_liveness(self) -> None:
        if self._liveness is not None and self._liveness.running:
            self._liveness.stop()
        self._liveness = None

    def _check_liveness(self) -> None:
        """
        Ping each peer that has sent nothing since the last check; reset the connection of one that
        has been silent for L{RelayLimits.peer_timeout} (its side becomes DISCONNECTED and the other
        side gets a STREAM_RESET per active stream, through L{detach}).  A peer the relay is not
        reading (backpressure, bandwidth) counts as alive: its pong could not be read.
        """
        now = self.clock.seconds()
        timeout = self.limits.peer_timeout
        for link in list(self.links.values()):
            for peer in list(link.peers.values()):
                if peer.heard or peer.reading_paused or peer.closing:
                    peer.heard = False
                    peer.silent_since = now
                elif now - peer.silent_since >= timeout:
                    log.info(
                        "The {side} of tunnel {tunnel_id} (channel {channel_id}) sent nothing, not even "
                        "a pong, for {seconds:.0f} s: taking it for gone",
                        side=peer.side,
                        tunnel_id=link.tunnel_id,
                        channel_id=peer.channel_id,
                        seconds=now - peer.silent_since,
                    )
                    self.metrics.peer_closed("timeout")
                    peer.closing = True
                    peer.dropConnection(abort=True)
                elif peer.state == peer.STATE_OPEN:
                    peer.sendPing()
        if not self.links:
            self._stop_liveness()

    def detach(self, peer: "PeerProtocol") -> None:
        """A paired peer's connection ended."""
        link = peer.link
        if link is None or peer.detached:
            return
        peer.detached = True
        self.audit.peer_disconnected(peer)
        self.placement.peer_detached(peer)
        side = peer.side
        self.metrics.peer_connected(side, -1)
        count_now = self._websockets_per_account.get(link.account_id, 1) - 1
        if count_now > 0:
            self._websockets_per_account[link.account_id] = count_now
        else:
            self._websockets_per_account.pop(link.account_id, None)
        peer.cancel_timers()
        if link.peers.get(side) is not peer:
            return  # replaced: the new peer took over the side
        del link.peers[side]
        other = link.peers.get(_OTHER_SIDE[side])
        if other is not None:
            other.resume_reading("backpressure")
            if link.closed_reason is None:
                other.send_frames(link.stream_resets())
            withdraw_announcement(other)
        link.active_streams.clear()
        if link.closed_reason != "shutdown":
            self._set_state(link.tunnel_id, side, False, link.account_id)
        log.info(
            "The {side} of tunnel {tunnel_id} disconnected (channel {channel_id})",
            side=side,
            tunnel_id=link.tunnel_id,
            channel_id=peer.channel_id,
        )
        if not link.peers:
            if link.expiry_call is not None and link.expiry_call.active():
                link.expiry_call.cancel()
            link.expiry_call = None
            del self.links[link.tunnel_id]
            self.metrics.relay_tunnels(len(self.links))
            if not self.links:
                self._stop_liveness()

    def _set_state(self, tunnel_id: str, side: str, connected: bool, account_id: Optional[str] = None) -> None:
        """
        Record a side's state.  One write per side at a time, in order: a state set while one is
        being written follows it (only the latest), so a quick connect-disconnect never ends CONNECTED
        whatever the store's threads do.  L{state_changes} is told once each write is done.
        """
        key = (tunnel_id, side)
        self._latest_state[key] = (connected, self.clock.seconds(), account_id)
        if key not in self._writing_state:
            self._write_state(key)

    def _write_state(self, key: Tuple[str, str]) -> None:
        tunnel_id, side = key
        connected, now, account_id = self._latest_state.pop(key)
        self._writing_state.add(key)
        # A cluster node records where the peer is before its CONNECTED (and forgets it after its
        # DISCONNECTED): a node killed in between leaves a record its survivors clean up.
        d = maybeDeferred(self.placement.before_state, tunnel_id, side, connected)
        d.addBoth(lambda _: self.store.set_connection_state(tunnel_id, side, connected, now))
        d.addCallback(lambda _: self.placement.after_state(tunnel_id, side, connected))

        def failed(failure: Failure) -> None:
            log.failure(
                "Could not record the {side} of tunnel {tunnel_id} as {state}",
                failure,
                side=side,
                tunnel_id=tunnel_id,
                state="CONNECTED" if connected else "DISCONNECTED",
            )

        def written(_: Any) -> None:
            self._writing_state.discard(key)
            if key in self._latest_state:
                self._write_state(key)

        d.addCallbacks(lambda _: self.state_changes.tunnel_changed(account_id, tunnel_id), failed)
        d.addBoth(written)

    def websockets_of(self, account_id: str) -> int:
        """How many WebSockets of C{account_id} are open here."""
        return self._websockets_per_account.get(account_id, 0)

    # --- ITunnelEvents ---

    def _close_peer(self, peer: "PeerProtocol", why: str) -> None:
        if why == "shutdown":
            peer.close_by_service(CLOSE_GOING_AWAY, "Service shutting down", "shutdown")
        elif why == "expired":
            peer.close_by_service(CLOSE_NORMAL, REASON_EXPIRED, "tunnel-expired")
        else:
            peer.close_by_service(CLOSE_NORMAL, REASON_CLOSED, "tunnel-closed")

    def tunnel_closed(self, tunnel_id: str, reason: str) -> None:
        """Close both sides of a CLOSED tunnel (C{reason}: C{"closed"} or C{"expired"})."""
        link = self.links.get(tunnel_id)
        if link is None or link.closed_reason is not None:
            return
        link.closed_reason = reason
        if link.expiry_call is not None and link.expiry_call.active():
            link.expiry_call.cancel()
        link.expiry_call = None
        log.info("Tunnel {tunnel_id} is {reason}: closing its connections", tunnel_id=tunnel_id, reason=reason)
        for peer in list(link.peers.values()):
            self._close_peer(peer, reason)

    def token_rotated(self, tunnel_id: str, side: str) -> None:
        """Close C{side}'s connection: its token was revoked."""
        link = self.links.get(tunnel_id)
        peer = link.peers.get(side) if link is not None else None
        if peer is None:
            return
        log.info(
            "The {side} token of tunnel {tunnel_id} was rotated: closing channel {channel_id}",
            side=side,
            tunnel_id=tunnel_id,
            channel_id=peer.channel_id,
        )
        peer.close_by_service(CLOSE_POLICY, REASON_ROTATED, "token-rotated")

    def shutdown(self, reason: str = "Service shutting down") -> None:
        """
        Close every peer with 1001 (going away): call it when the service stops, before the store
        closes.  Each side is recorded DISCONNECTED at once (the closing handshakes finish later).
        """
        self._stop_liveness()
        for link in list(self.links.values()):
            link.closed_reason = "shutdown"
            if link.expiry_call is not None and link.expiry_call.active():
                link.expiry_call.cancel()
            link.expiry_call = None
            for side, peer in list(link.peers.items()):
                self._set_state(link.tunnel_id, side, False, link.account_id)
                peer.close_by_service(CLOSE_GOING_AWAY, reason, "shutdown")

    # --- introspection ---

    def buffered_bytes(self, tunnel_id: str) -> int:
        """Bytes this relay holds for C{tunnel_id} right now (see L{PeerProtocol.buffered_bytes})."""
        link = self.links.get(tunnel_id)
        if link is None:
            return 0
        return sum(peer.buffered_bytes() for peer in link.peers.values())


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


class PeerProtocol(FastWebSocket, WebSocketServerProtocol):
    """
    One tunnel client's WebSocket, service side.

    Its factory (L{build_factory}) carries the C{relay} (a L{Relay}).  The hot path (the shared
    fast path L{FastWebSocket}, then L{fast_message}, L{onMessage}) unmasks each whole binary
    message, decodes its tunnel frames,
    checks them, and hands the raw frame bytes to the other peer's outbox; the outbox is flushed as
    WebSocket messages at the end of each read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channel_id = ""
        self._checking = False  # onConnect's token check is under way
        self.grant: Optional[PeerGrant] = None
        self.side = ""
        self.subprotocol = ""
        self.version = 3
        self.link: Optional[TunnelLink] = None
        self.rules: Optional[PeerRules] = None
        self.sink: Optional[_SinkWatcher] = None
        self.replaced = False
        self.detached = False
        self.closing = False
        self._decoder = FrameDecoder()
        self._outbox: List[bytes] = []
        self._outbox_size = 0
        self._flush_target: Optional[PeerProtocol] = None
        self._pauses: set = set()
        self._resume_call: Optional[IDelayedCall] = None
        self._direction = ""
        self._producer_registered = False
        self._abort_call: Optional[IDelayedCall] = None
        self._pieces: List[Any] = []  # the start of a frame that is still arriving (the fast path's)
        self._framed: Optional[bytes] = None  # the message onMessage has, as a frame to send on
        self.announcement: Optional[bytes] = None  # the peer's ANNOUNCE frame (tunnelkit extensions)
        self.told = False  # whether this peer was sent its current partner's announcement
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

    def onConnect(self, request: Any) -> "Deferred[Tuple[str, Dict[str, str]]]":
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
            emit = log.debug if e.reason in _FLOOD_REASONS else log.info
            emit(
                "Refused a handshake on channel {channel_id} from {address}: {status} {reason}",
                channel_id=self.channel_id,
                address=address,
                status=e.status,
                reason=e.reason,
            )
            raise ConnectionDeny(e.status, e.text)
        relay.metrics.handshake_accepted()
        self.grant = grant
        self.side = grant.side
        self.subprotocol = checked.subprotocol
        self.version = checked.version
        self._direction = _DIRECTION[grant.side]
        return checked.subprotocol, {"channel-id": self.channel_id, EXTENSIONS_HEADER: OFFERED}

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Answer a refused upgrade with a short text body and the channel id."""
        from http import HTTPStatus

        self.wasNotCleanReason = reason
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        body = (reason + "\n").encode("utf-8")
        lines = [f"HTTP/1.1 {code} {phrase}"]
        for name, value in responseHeaders or ():
            lines.append(f"{name}: {value}")
        if self.channel_id:
            lines.append(f"channel-id: {self.channel_id}")
        lines += [
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "",
            "",
        ]
        self.sendData("\r\n".join(lines).encode("utf-8") + body)
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

    def connectionLost(self, reason: Any) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self.unregisterProducer()
        super().connectionLost(reason)

    def partner(self) -> Optional["PeerProtocol"]:
        """The connected peer of the other side, if any."""
        link = self.link
        if link is None or link.peers.get(self.side) is not self:
            return None
        return link.peers.get(_OTHER_SIDE[self.side])

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
        """A whole masked binary message in C{parts}: unmask it (one copy) and hand it to L{onMessage}."""
        if not size:
            self.onMessage(b"", True)
            return
        assert mask is not None
        frame, payload = _unmasked_frame(mask, parts, size)
        self._framed = frame
        try:
            self.onMessage(payload, True)
        finally:
            self._framed = None

    def onPing(self, payload: bytes) -> None:
        self._charge(len(payload) + 2)
        if self.state == self.STATE_OPEN:
            self.sendPong(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.closing or self.link is None:
            return
        if not isBinary:
            self.violation(
                ProtocolViolation("text_message", "a text WebSocket message: tunnels carry binary messages only")
            )
            return
        self._charge(len(payload))
        decoder = self._decoder
        whole = decoder.buffered == 0
        bodies = decoder.feed(payload)
        whole = whole and decoder.buffered == 0
        rules = self.rules
        assert rules is not None
        link = self.link
        ledger = link.ledger  # the audit trail's, or None
        side = self.side
        partner = link.peers.get(_OTHER_SIDE[side])
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
                if index and partner is not None:
                    self._forward(partner, bodies[:index], [i for i in cuts if i < index], False)
                self.violation(e)
                return
            size += len(body) + 2
            kind = message.type
            if kind == _DATA:
                if ledger is not None:
                    ledger.data(side, message, len(body))
            elif kind in _START_TYPES:
                cuts.append(index)
                service_id = message.serviceId
                if partner is not None:
                    if kind == _STREAM_START or service_id not in link.active_streams:
                        link.active_streams[service_id] = message.streamId
                    if partner.rules is not None:
                        partner.rules.note_stream_started(service_id)
                    if ledger is not None:
                        ledger.started(side, message)
                else:
                    self._refuse_start(message)
                    if ledger is not None:
                        ledger.refused(message, "the destination is not connected")
            elif kind == _CONNECTION_RESET:
                if ledger is not None:
                    ledger.reset(side, message)
            elif kind == _STREAM_RESET:
                service_id = message.serviceId
                if link.active_streams.get(service_id) == message.streamId:
                    del link.active_streams[service_id]
                if ledger is not None:
                    ledger.stream_reset(side, message)
            elif kind in EXTENSION_TYPES:
                # Announcements are exchanged by the relay; the others go only between peers that
                # were both told of each other's announcement.
                if kind == ANNOUNCE:
                    skip.append(index)
                    if message.payload and self.announcement is None:
                        self.announcement = _pack_length(len(body)) + bytes(body)
                        announced = True
                elif not self.told or partner is None or not partner.told:
                    skip.append(index)
                elif kind == EOF and ledger is not None:
                    ledger.eof(side, message)  # forwarded: the partner learns this side is done
        if skip:
            metrics = self.factory.relay.metrics
            dropped = len(skip) - (1 if announced else 0)
            if dropped:
                metrics.dropped("extension_not_announced", dropped)
            skipped = set(skip)
            kept = [i for i in range(len(bodies)) if i not in skipped]
            cuts = [kept.index(i) for i in cuts if i in kept]
            bodies = [bodies[i] for i in kept]
            size = sum(len(b) + 2 for b in bodies)
            whole = False
            last = len(bodies) - 1
        if bodies:
            if partner is None:
                self.factory.relay.metrics.dropped("peer_absent", len(bodies))
            else:
                self.factory.relay.metrics.relayed(self._direction, len(bodies), size)
                if whole and (not cuts or cuts == [last]):
                    partner.queue(payload, bool(cuts), self._framed)
                    self._flush_target = partner
                else:
                    self._forward(partner, bodies, cuts, True)
        if announced and partner is not None:
            exchange_announcements(self, partner)

    def _forward(self, partner: "PeerProtocol", bodies: List[bytes], cuts: List[int], defer: bool) -> None:
        cut_set = set(cuts)
        queue = partner.queue
        for index, body in enumerate(bodies):
            queue(_pack_length(len(body)) + body, index in cut_set)
        if defer:
            self._flush_target = partner
        else:
            partner.flush_outbox()

    def _refuse_start(self, message: Message) -> None:
        """Answer a STREAM_START/CONNECTION_START that cannot reach an absent destination."""
        if message.type == _STREAM_START:
            reset = Message(type=_STREAM_RESET, streamId=message.streamId, serviceId=message.serviceId)
        else:
            reset = Message(
                type=_CONNECTION_RESET,
                streamId=message.streamId,
                serviceId=message.serviceId,
                connectionId=message.connectionId,
            )
        self.send_frames([encode_message(reset)])

    def violation(self, error: Exception) -> None:
        """Close this peer for breaking a rule; the other side keeps its connection."""
        rule = getattr(error, "rule", "unparseable_frame")
        relay = self.factory.relay
        relay.metrics.violation(rule)
        log.info(
            "Closing the {side} of tunnel {tunnel_id} (channel {channel_id}): {rule}: {detail}",
            side=self.side,
            tunnel_id=self.link.tunnel_id if self.link else "",
            channel_id=self.channel_id,
            rule=bounded(rule),
            detail=bounded(error),
        )
        self.close_by_service(CLOSE_POLICY, f"Protocol violation ({rule}): {error}", "violation")

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
        total = self._outbox_size + self._decoder.buffered + len(getattr(self, "data", b"") or b"")
        total += sum(len(piece) for piece in self._pieces)
        message = getattr(self, "message_data", None)
        if message:
            total += sum(len(part) for part in message)
        return total + transport_buffered(self.transport)


def exchange_announcements(one: PeerProtocol, other: PeerProtocol) -> None:
    """Once both peers announced tunnelkit's extensions, give each the other's announcement."""
    if one.announcement is None or other.announcement is None:
        return
    for peer, partner in ((one, other), (other, one)):
        if not peer.told:
            peer.flush_outbox()
            peer.send_frames([partner.announcement])
            peer.told = True


def withdraw_announcement(peer: PeerProtocol) -> None:
    """The peer's partner went away or was replaced: it must not use the extensions until told again."""
    if peer.told:
        peer.told = False
        peer.send_frames([WITHDRAWAL_FRAME])


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
