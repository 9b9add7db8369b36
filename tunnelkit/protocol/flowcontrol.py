# -*- test-case-name: tests.test_flowcontrol -*-
"""
tunnelkit's extensions of the tunneling protocol, sans-IO: per-connection flow control (credit
windows in the spirit of HTTP/2's WINDOW_UPDATE, RFC 9113 section 6.9) and half-close (in the spirit
of SSH's CHANNEL_EOF, RFC 4254 section 5.3).  No reactor, no clock: plain arithmetic, tested byte for
byte.  See the README, "Flow control, half-close and how connections end".

On the wire
===========
AWS's C{Message.proto} is unchanged.  The extensions are three message types well above AWS's
(proto3 enums are open), always sent with C{ignorable = true} so that a receiver that does not know
them may skip them, and using only the schema's fields:

  =================  ======  ==================================================================
  L{ANNOUNCE}        1001    C{payload}: the sender's extensions, UTF-8, e.g.
                             C{b"flow-control/1;window=2097152 half-close/1"}; an empty payload
                             (sent by the relay only) means "your peer announces nothing now"
  L{WINDOW_UPDATE}   1002    stream, service and connection id of one connection; C{payload}: a
                             4-byte big-endian count of bytes the receiver may now be sent more;
                             a count of 0 ("blocked", only to a peer that announced C{blocked}):
                             the sender has bytes to send but no credit (QUIC's
                             STREAM_DATA_BLOCKED, RFC 9000 section 19.13)
  L{EOF}             1003    stream, service and connection id: the sender will send no more
                             DATA on that connection (its local application shut down its write
                             side); the other direction stays open
  =================  ======  ==================================================================

Negotiation: tunnelkit's service answers the WebSocket upgrade with the header
L{EXTENSIONS_HEADER} (AWS's does not); only then does a tunnelkit proxy send L{ANNOUNCE} (after
SERVICE_IDS).  The relay forwards a peer's announcement to the other peer once both announced, and
extension messages only to a peer that announced, so that AWS's clients never see one.

A connection uses the extensions when its source knew, at its STREAM_START / CONNECTION_START, that
both peers announced both features: the source then follows the start with a L{WINDOW_UPDATE}
granting its own window, which tells the destination.  The source's initial credit is the window
the destination announced.  A sender never has more unacknowledged bytes than it was granted; the
receiver grants bytes back as they are accepted by the local socket's buffer, and may grant more
than that to let a window grow (L{ConnectionFlow}).  The announcement's C{blocked} parameter (e.g.
C{b"flow-control/1;window=2097152;blocked half-close/1"}) says the peer understands a "blocked"
WINDOW_UPDATE; an older peer ignores the parameter and is never sent one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional

from tunnelkit.protocol.framing import Message, encode_message

__all__ = [
    "ANNOUNCE",
    "WINDOW_UPDATE",
    "EOF",
    "EXTENSION_TYPES",
    "EXTENSIONS_HEADER",
    "FLOW_CONTROL",
    "HALF_CLOSE",
    "OFFERED",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "MAX_CONNECTION_WINDOW",
    "TUNNEL_GROWTH_BUDGET",
    "Extensions",
    "parse_announcement",
    "announcement_frame",
    "WITHDRAWAL_FRAME",
    "window_update_frame",
    "blocked_frame",
    "eof_frame",
    "window_increment",
    "ConnectionFlow",
    "Pacer",
]

#: Message types of the extensions (never one of AWS's 0-7).
ANNOUNCE = 1001
WINDOW_UPDATE = 1002
EOF = 1003
EXTENSION_TYPES = frozenset({ANNOUNCE, WINDOW_UPDATE, EOF})

#: The 101 answer's header by which tunnelkit's service says it passes the extensions on.
EXTENSIONS_HEADER = "X-Tunnelkit-Extensions"
FLOW_CONTROL = "flow-control/1"
HALF_CLOSE = "half-close/1"
#: The header's value, and the features a connection needs from both peers to use them.
OFFERED = f"{FLOW_CONTROL} {HALF_CLOSE}"

#: Bytes a receiver lets a sender have in flight per connection at first: the window it announces
#: (measured: see the README and benchmarks/flow_window.md).
DEFAULT_WINDOW = 2 << 20
#: The largest a connection's receive window grows to, while its sender waits for credit and its
#: local application keeps up (L{ConnectionFlow.grow}).
MAX_CONNECTION_WINDOW = 16 << 20
#: Bytes of growth above the announced window that all of one side's connections of a tunnel may
#: hold together: what bounds a tunnel's memory when grown connections stall (HTTP/2's connection
#: window plays this part there).
TUNNEL_GROWTH_BUDGET = 32 << 20
#: The largest window or credit (HTTP/2's limit too).
MAX_WINDOW = 2**31 - 1
#: The longest announcement payload read (longer ones are cut: a peer's bytes are bounded).
_MAX_ANNOUNCEMENT = 512


@dataclass(frozen=True)
class Extensions:
    """What a peer announced: its features and the per-connection window it grants at a start."""

    features: FrozenSet[str]
    window: int
    blocked: bool = False  # it understands a "blocked" WINDOW_UPDATE (count 0)

    @property
    def usable(self) -> bool:
        """Whether connections with this peer use flow control and half-close."""
        return FLOW_CONTROL in self.features and HALF_CLOSE in self.features and self.window > 0


def parse_announcement(payload: bytes) -> Optional[Extensions]:
    """
    Read an L{ANNOUNCE} payload; L{None} for an empty one (the relay's "nothing announced").
    Never raises: unknown features and parameters are ignored, a missing or bad window is 0.
    """
    text = bytes(payload[:_MAX_ANNOUNCEMENT]).decode("utf-8", "replace")
    features = set()
    window = 0
    blocked = False
    for token in text.split():
        name, _, parameters = token.partition(";")
        features.add(name)
        if name == FLOW_CONTROL:
            for parameter in parameters.split(";"):
                key, _, value = parameter.partition("=")
                if key == "window" and value.isdigit() and len(value) <= 10:
                    window = min(int(value), MAX_WINDOW)
                elif key == "blocked" and not value:
                    blocked = True
    if not features:
        return None
    return Extensions(frozenset(features), window, blocked)


def announcement_frame(window: int = DEFAULT_WINDOW) -> bytes:
    """The framed L{ANNOUNCE} a tunnelkit proxy sends: both features, and its window."""
    payload = f"{FLOW_CONTROL};window={window};blocked {HALF_CLOSE}".encode("ascii")
    return encode_message(Message(type=ANNOUNCE, ignorable=True, payload=payload))


#: The framed L{ANNOUNCE} the relay sends a peer whose partner went away or was replaced.
WITHDRAWAL_FRAME = encode_message(Message(type=ANNOUNCE, ignorable=True))


def window_update_frame(stream_id: int, service_id: str, connection_id: int, increment: int) -> bytes:
    """A framed L{WINDOW_UPDATE} granting C{increment} more bytes on one connection."""
    return encode_message(
        Message(
            type=WINDOW_UPDATE,
            ignorable=True,
            streamId=stream_id,
            serviceId=service_id,
            connectionId=connection_id,
            payload=increment.to_bytes(4, "big"),
        )
    )


def blocked_frame(stream_id: int, service_id: str, connection_id: int) -> bytes:
    """A framed "blocked" L{WINDOW_UPDATE} (a count of 0): bytes wait for credit on that connection."""
    return window_update_frame(stream_id, service_id, connection_id, 0)


def eof_frame(stream_id: int, service_id: str, connection_id: int) -> bytes:
    """A framed L{EOF} for one connection."""
    return encode_message(
        Message(
            type=EOF, ignorable=True, streamId=stream_id, serviceId=service_id, connectionId=connection_id
        )
    )


def window_increment(payload: bytes) -> int:
    """The increment of a L{WINDOW_UPDATE} payload; 0 if it is not 4 bytes (then ignore it)."""
    if len(payload) != 4:
        return 0
    return int.from_bytes(payload, "big")


class ConnectionFlow:
    """
    One connection's windows and half-close state.

    Sending: L{credit} bytes may be sent now; L{take} spends it, L{grant} adds to it.

    Receiving: the peer may send at most C{window} bytes not yet granted back.  L{received} counts
    what arrives (refusing more than that); L{delivered} counts what the local socket accepted and
    says when to grant it back: once a quarter of the window is waiting, so that a bulk transfer
    costs one small WINDOW_UPDATE per quarter window.

    The receive window adapts, with no change to AWS's wire format (a grant may exceed what was
    delivered; withholding part of one shrinks the window).  It starts at the announced window
    (L{base}).  When the peer says it is blocked (it has bytes but no credit) while the local
    application keeps up (its socket's buffer is not full), L{blocked} doubles the window, up to
    C{max_window} and as far as the caller's budget allows.  While the buffer is full, delivered
    bytes are held back (the caller counts them); when it drains, L{drained} judges how fast the
    application took them: under L{SHRINK_RATE}, the window halves (L{shrink}, not below L{base}:
    the next delivered bytes pay the difference before anything is granted back).  A stalled
    reader's window stops growing as soon as its buffer fills.  A window's bytes above L{base}
    (L{growth}) are what the tunnel-wide budget counts.

    @param credit: the initial send credit (what the peer granted at the start).
    @param window: the receive window this side granted the peer (its announced window).
    @param max_window: the largest the receive window may grow to (no growth if not above C{window}).
    """

    __slots__ = (
        "credit",
        "window",
        "base",
        "max_window",
        "_allowed",
        "_to_grant",
        "_threshold",
        "_floor",
        "_full_since",
        "blocked_sent",
        "eof_sent",
        "eof_received",
        "eof_pending",
    )

    def __init__(self, credit: int, window: int, max_window: int = 0) -> None:
        self.credit = credit
        self.window = window
        self.base = window
        self.max_window = max(window, min(max_window, MAX_WINDOW))
        self._allowed = window  # bytes the peer may still send
        self._to_grant = 0  # bytes delivered locally, not granted back yet
        self._floor = window  # what the window shrinks to as delivered bytes pay the difference
        self._full_since: Optional[float] = None  # when the local socket's buffer filled
        self.blocked_sent = False  # a "blocked" was sent since the last grant
        self._set_threshold()
        self.eof_sent = False
        self.eof_received = False
        self.eof_pending = False  # a local EOF waits for held bytes to be sent first

    #: Bytes per second under which a local application that drained its full buffer counts as
    #: slow (its window shrinks).
    SHRINK_RATE = 16 << 20

    def _set_threshold(self) -> None:
        self._threshold = max(1, self.window // 4)

    # sending

    def take(self, size: int) -> int:
        """Spend credit for up to C{size} bytes; how many may be sent now."""
        allowed = size if size <= self.credit else self.credit
        self.credit -= allowed
        return allowed

    def grant(self, increment: int) -> bool:
        """The peer granted C{increment} more bytes; False (nothing changed) if that overflows."""
        if increment <= 0 or self.credit + increment > MAX_WINDOW:
            return False
        self.credit += increment
        self.blocked_sent = False
        return True

    # receiving

    @property
    def allowed(self) -> int:
        """Bytes the peer may still send before its next grant."""
        return self._allowed

    @property
    def growth(self) -> int:
        """Bytes of the receive window above the announced one (some may be paying back a shrink)."""
        return self.window - self.base

    def received(self, size: int) -> bool:
        """C{size} bytes of DATA arrived; False if the peer sent more than it was granted."""
        if size > self._allowed:
            return False
        self._allowed -= size
        return True

    def delivered(self, size: int) -> int:
        """
        C{size} received bytes were accepted by the local socket's buffer.

        @return: how many bytes to grant back now (0: not yet).
        """
        if self.window > self._floor:
            # Shrinking: these bytes are not granted back until the window is down to its floor.
            paid = min(size, self.window - self._floor)
            self.window -= paid
            self._set_threshold()
            size -= paid
        waiting = self._to_grant + size
        if waiting < self._threshold:
            self._to_grant = waiting
            return 0
        self._to_grant = 0
        self._allowed += waiting
        return waiting

    def filled(self, now: float) -> None:
        """The local socket's buffer filled at C{now} (what is delivered from now on is held back)."""
        if self._full_since is None:
            self._full_since = now

    def drained(self, held: int, now: float) -> None:
        """
        The local socket's buffer drained at C{now}, after C{held} bytes were held back since it
        filled (the caller delivers them next).  A slow application shrinks the window.
        """
        since, self._full_since = self._full_since, None
        if since is not None and held >= self._threshold and held < (now - since) * self.SHRINK_RATE:
            self.shrink()

    def blocked(self, room: int) -> int:
        """
        The peer has bytes to send and no credit.  If the local application keeps up, double the
        window (by at most C{room}, up to C{max_window}; not while shrinking) and grant what waits.

        @return: the bytes to grant now (0: none; the application is the bottleneck).
        """
        if self._full_since is not None:
            return 0
        if self.window == self._floor:
            step = min(self.window, self.max_window - self.window, room)
            if step > 0:
                self.window += step
                self._floor = self.window
                self._to_grant += step
                self._set_threshold()
        increment = self._to_grant
        self._to_grant = 0
        self._allowed += increment
        return increment

    def shrink(self) -> None:
        """Halve the window (not below L{base}) as the next delivered bytes pay the difference."""
        self._floor = max(self.base, min(self._floor, self.window) // 2)

    # half-close

    @property
    def ended(self) -> bool:
        """Both directions ended: EOF sent and received."""
        return self.eof_sent and self.eof_received


class Pacer:
    """
    A token bucket for pacing one connection toward a peer without flow control (e.g. AWS's C++
    localproxy, which overflows its 131,076-byte per-connection buffer when data comes faster than
    its local socket takes it).  The caller passes the time.

    @param rate: bytes per second.
    @param burst: bytes that may go at once.
    """

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"pacing needs a positive rate and burst, not {rate!r} and {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def delay_after(self, size: int, now: float) -> float:
        """C{size} bytes were sent at C{now}: seconds to wait before sending more (0: none)."""
        elapsed = now - self._at
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._at = now
        self._tokens -= size
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate
