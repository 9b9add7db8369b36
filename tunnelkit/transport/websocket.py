# -*- test-case-name: tests.test_websocket_client -*-
"""
The local proxy's WebSocket to the tunnel service (autobahn), as AWS's localproxy speaks it.

Handshake: C{GET /tunnel?local-proxy-mode=source|destination}, C{Sec-WebSocket-Protocol:
aws.iot.securetunneling-3.0} (whatever C{-y} says: the message format is chosen per message),
C{access-token}, and C{client-token} when one is set.  The 101 must echo a subprotocol; its optional
C{channel-id} header is logged as the session id, and its C{X-Tunnelkit-Extensions} header (tunnelkit's
service only) is kept in C{extensions}: the session then announces flow control and half-close.

After the 101: a ping right away and every 20 s, its payload the epoch time in milliseconds as ASCII
digits (the pong's latency is logged at debug level).  Binary messages are a byte stream of tunnel
frames (L{FrameDecoder}); a text message is a protocol error (close 1003).

How a session ends, as L{WebSocketEnded.kind}:
  - C{"rejected"}: a 4xx answer to the upgrade.  Retrying cannot help: the proxy stops (except after
    a 429, which the session retries with a growing delay).
  - C{"closed"}: the service sent a close frame with code 1000 (CloseTunnel, expiry): the proxy stops, status 0.
  - C{"replaced"}: close code 1008: another proxy took over this token, or the service rejected
    what we sent.  The proxy stops.
  - C{"retry"}: anything else (5xx, no subprotocol in the 101, 1001/1011/1006, a lost
    connection, a handshake timeout): reconnect with backoff.

The hot path builds each outgoing binary frame with one copy and one in-place XOR pass
(L{masked_frame}; autobahn's own masker copies the payload four times); reading whole unmasked
binary frames from the service and skipping autobahn's per-call debug formatting is the fast path
it shares with the relay (L{tunnelkit.transport.fastpath}).
"""

from __future__ import annotations

import os
import platform
import struct
from dataclasses import dataclass
import re
from typing import Any, List, Optional, Sequence, Tuple, Union

import autobahn
import autobahn.websocket
import google.protobuf
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface

import tunnelkit
from tunnelkit.errors import FramingError
from tunnelkit.protocol.flowcontrol import EXTENSIONS_HEADER
from tunnelkit.protocol.framing import MAX_WEBSOCKET_FRAME, FrameDecoder, Message, parse_message
from tunnelkit.protocol.tokens import REFUSAL_HEADER
from tunnelkit.transport.fastpath import (  # noqa: F401 - binary_frame_header: also imported from here
    FRAME_INCOMPLETE,
    FRAME_NOT_PLAIN,
    FastWebSocket,
    binary_frame_header,
    direct_reads,
    masked_frame,
    set_buffer_size,
)

__all__ = [
    "SUBPROTOCOL",
    "PING_PERIOD",
    "HANDSHAKE_TIMEOUT",
    "ITunnelWebSocketHandler",
    "WebSocketEnded",
    "TunnelWebSocketProtocol",
    "TunnelWebSocketFactory",
    "tunnel_url",
    "masked_frame",
    "tune_allocator",
]

#: The subprotocol the local proxy offers (AWS's localproxy offers only this one, whatever -y says).
SUBPROTOCOL = "aws.iot.securetunneling-3.0"
#: Seconds between pings.
PING_PERIOD = 20.0
#: Seconds the TCP+TLS+HTTP upgrade may take before the attempt counts as failed.
HANDSHAKE_TIMEOUT = 30.0

#: Bytes the WebSocket's TCP transport buffers before its producer (the local connections' reads)
#: is paused, and its read size.
WEBSOCKET_BUFFER = 512 * 1024


class _MaskingKeys:
    """
    Masking keys for the frames a client sends (RFC 6455 section 5.3: unpredictable, from a strong
    source of entropy): 4 bytes at a time from a pool of the OS's random bytes, refilled when spent,
    so that a frame costs no system call (os.urandom per frame was one getrandom per frame).
    """

    POOL = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def __call__(self) -> bytes:
        at = self._at
        if at >= len(self._pool):
            self._pool = os.urandom(self.POOL)
            at = 0
        self._at = at + 4
        return self._pool[at : at + 4]


_masking_key = _MaskingKeys()

#: The refusal-reason header, lower-case as compared, and the shape of a reason (a short label).
_REFUSAL_HEADER = REFUSAL_HEADER.lower()
_REFUSAL_RE = re.compile(r"\A[a-z0-9-]{1,64}\Z")

_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_SEND_STATE_GROUND = WebSocketProtocol.SEND_STATE_GROUND

_log = Logger(namespace="tunnelkit.transport.websocket")

Buffer = Union[bytes, bytearray, memoryview]

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 1 << 20, trim_threshold: int = 8 << 20) -> bool:
    """
    Make glibc serve the data path's buffers from its heap.  By default it maps fresh pages for
    every allocation of 128 KiB or more (a socket read, or Twisted joining two queued 129 KB
    messages before a send), and each such allocation then costs ~70 us of page faults: a third of
    the relay's time per message.  Up to C{mmap_threshold} bytes now come from the heap, which
    keeps up to C{trim_threshold} free bytes for reuse.  Process-wide, idempotent; does nothing
    (returns False) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def _client_frame_header(size: int) -> bytes:
    """The header of a masked, final, binary WebSocket frame of C{size} bytes (before its mask)."""
    if size < 126:
        return bytes((0x82, 0x80 | size))
    if size < 65536:
        return struct.pack("!BBH", 0x82, 0xFE, size)
    return struct.pack("!BBQ", 0x82, 0xFF, size)


def tunnel_url(secure: bool, host: str, port: int, mode: str) -> str:
    """C{wss://HOST:PORT/tunnel?local-proxy-mode=MODE}."""
    scheme = "wss" if secure else "ws"
    authority = f"[{host}]" if ":" in host else host
    return f"{scheme}://{authority}:{port}/tunnel?local-proxy-mode={mode}"


def user_agent() -> str:
    """The User-Agent header: what we are, like localproxy's."""
    return (
        f"tunnelkit-localproxy/{tunnelkit.__version__} {platform.system().lower()} "
        f"autobahn/{autobahn.__version__} protobuf/{google.protobuf.__version__}"
    )


@dataclass(frozen=True)
class WebSocketEnded:
    """Why a WebSocket session ended (see the module docstring for C{kind})."""

    kind: str  # "rejected" | "closed" | "replaced" | "retry"
    message: str
    code: Optional[int] = None  # the close code, or the HTTP status for "rejected"/5xx
    reason: Optional[str] = None  # a refusal's machine-readable reason (tunnelkit's service only)


class ITunnelWebSocketHandler(Interface):
    """What L{TunnelWebSocketProtocol} reports to: the local proxy's session."""

    def websocket_opened(websocket: "TunnelWebSocketProtocol") -> None:
        """The 101 arrived with a subprotocol: the session may send."""

    def messages_received(messages: List[Message]) -> None:
        """Tunnel messages, in order, decoded from one WebSocket message."""

    def websocket_ended(websocket: "TunnelWebSocketProtocol", ended: WebSocketEnded) -> None:
        """The WebSocket is gone (or never opened); C{ended} says whether retrying makes sense."""


class TunnelWebSocketProtocol(FastWebSocket, WebSocketClientProtocol):  # type: ignore[misc]  # autobahn's two bases disagree on _transport_details and peer
    """One WebSocket session with the tunnel service.  Built by L{TunnelWebSocketFactory}."""

    # NB: autobahn's own (txaio, level-filtered) logger stays in C{self.log}: its debug lines hold the
    # upgrade request, tokens included.  Ours is L{_log}.
    factory: "TunnelWebSocketFactory"

    def __init__(self) -> None:
        super().__init__()
        self._decoder = FrameDecoder()
        self._pending: List[bytes] = []
        self._pending_size = 0
        self._ping_call: Any = None
        self._handshake_timer: Any = None
        self._rejected: Optional[WebSocketEnded] = None
        self._opened = False
        self._ended = False
        self.channel_id: Optional[str] = None
        self.extensions = ""  # the service's EXTENSIONS_HEADER: which extensions it passes on
        self.subprotocol: Optional[str] = None

    # --- connection and handshake ---

    def connectionMade(self) -> None:
        clock = self.factory.clock
        self._handshake_timer = clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_timed_out)
        super().connectionMade()

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        self._rejected = WebSocketEnded(
            "retry", f"no answer to the WebSocket upgrade within {HANDSHAKE_TIMEOUT:g} s"
        )
        self.dropConnection(abort=True)

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        factory = self.factory
        headers = {"access-token": factory.access_token}
        if factory.client_token:
            headers["client-token"] = factory.client_token
        return ConnectingRequest(
            host=factory.host,
            port=factory.port,
            resource=factory.resource,
            headers=headers,
            useragent=factory.useragent,
            origin=None,
            protocols=[SUBPROTOCOL],
        )

    def processHandshake(self) -> None:
        # A non-101 answer: wait for its body (Content-Length) so the user sees the service's reason.
        end = self.data.find(b"\r\n\r\n")
        if end >= 0 and self._rejected is None:
            head = self.data[:end].decode("latin-1")
            status_line, _, header_text = head.partition("\r\n")
            fields = status_line.split(None, 2)
            if len(fields) >= 2 and fields[1].isdigit() and fields[1] != "101":
                status = int(fields[1])
                length = 0
                refusal: Optional[str] = None
                for line in header_text.split("\r\n"):
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length" and value.strip().isdigit():
                        length = int(value.strip())
                    elif name == _REFUSAL_HEADER and _REFUSAL_RE.match(value.strip()):
                        refusal = value.strip()
                body = self.data[end + 4 : end + 4 + min(length, 4096)]
                if len(body) < min(length, 4096):
                    return  # the body is on its way
                text = body.decode("utf-8", "replace").strip()
                detail = f'Proxy server rejected web socket upgrade request: ({status_line.strip()}) "{text}"'
                kind = "rejected" if 400 <= status < 500 else "retry"
                self._rejected = WebSocketEnded(kind, detail, status, refusal)
        super().processHandshake()

    def onConnect(self, response: Any) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self.channel_id = response.headers.get("channel-id")
        self.extensions = response.headers.get(EXTENSIONS_HEADER.lower(), "")[:256]
        if not response.protocol:
            self._rejected = WebSocketEnded(
                "retry", "No websocket subprotocol returned from proxy server!"
            )
            raise ValueError(self._rejected.message)
        self.subprotocol = response.protocol

    def onOpen(self) -> None:
        self._opened = True
        # The local connections' reads pause only when the kernel stops taking what they send (not
        # at every turn that read more than Twisted's 64 KiB default): fewer pauses and resumes, and
        # reads of the service's messages in larger pieces.
        set_buffer_size(self.transport, WEBSOCKET_BUFFER)
        # The service's messages come from the TCP (or TLS) transport straight to this protocol, not
        # through the client endpoint's and ClientService's forwarding protocols (two calls per read).
        direct_reads(self)
        _log.info("Web socket session ID: {channel_id}", channel_id=self.channel_id or "-")
        _log.debug("Web socket subprotocol selected: {subprotocol}", subprotocol=self.subprotocol)
        self._send_ping()
        self.factory.handler.websocket_opened(self)

    # --- pings ---

    def _send_ping(self) -> None:
        self._ping_call = None
        if self.state != _STATE_OPEN:
            return
        now_ms = int(self.factory.clock.seconds() * 1000)
        self.sendPing(str(now_ms).encode("ascii"))
        self._ping_call = self.factory.clock.callLater(PING_PERIOD, self._send_ping)

    def onPong(self, payload: bytes) -> None:
        if payload.isdigit() and self.factory.verbose:
            latency = int(self.factory.clock.seconds() * 1000) - int(payload)
            _log.debug("Pong reply latency: {latency} ms", latency=latency)

    # --- data ---

    def onMessage(self, payload: Buffer, isBinary: bool) -> None:
        if not isBinary:
            _log.error("The tunnel service sent a text WebSocket message: closing (1003)")
            self._rejected = WebSocketEnded("retry", "the tunnel service sent a text message (binary only)")
            self.sendCloseFrame(code=1003, reasonUtf8=b"binary messages only", isReply=False)
            return
        try:
            messages = [parse_message(body) for body in self._decoder.feed(payload)]
        except FramingError as e:
            _log.error("Could not parse web socket binary frame into message: {error}", error=str(e))
            self._rejected = WebSocketEnded("retry", f"bad data from the tunnel service: {e}")
            self.dropConnection(abort=True)
            return
        if messages:
            self.factory.handler.messages_received(messages)
            self.flush()

    def send_frames(self, data: bytes, boundary: bool) -> None:
        """
        Queue already-framed tunnel frames; C{boundary} ends the WebSocket message right after them.
        Messages never exceed 131076 bytes.  Call L{flush} when the current event's frames are queued.
        """
        if self._pending_size + len(data) > MAX_WEBSOCKET_FRAME:
            self.flush()
        self._pending.append(data)
        self._pending_size += len(data)
        if boundary:
            self.flush()

    def flush(self) -> None:
        """Send the queued frames as one WebSocket message."""
        if not self._pending:
            return
        pending = self._pending
        size = self._pending_size
        self._pending = []
        self._pending_size = 0
        if self.state != _STATE_OPEN:
            return
        if self.send_queue or self.send_state != _SEND_STATE_GROUND:  # autobahn is mid-way: its path
            self.sendMessage(pending[0] if len(pending) == 1 else b"".join(pending), isBinary=True)
            return
        mask = _masking_key()
        self.transport.write(masked_frame(_client_frame_header(size) + mask, mask, pending))

    def fast_message(self, mask: Optional[bytes], parts: Sequence[Buffer], size: int) -> None:
        """A whole unmasked binary message from the service (the fast path's L{FastWebSocket})."""
        self.onMessage(parts[0] if len(parts) == 1 else b"".join(parts), True)

    # --- the end ---

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        self._pending = []
        self._pending_size = 0
        if self._ended:
            return
        self._ended = True
        self.factory.handler.websocket_ended(self, self._outcome(wasClean, code, reason))

    def _outcome(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> WebSocketEnded:
        if self._rejected is not None:
            return self._rejected
        remote = self.remoteCloseCode
        if remote is not None:
            text = f"Web socket close received. Code: {remote}; Reason: {self.remoteCloseReason or ''}"
            if remote == 1000:
                return WebSocketEnded("closed", text, remote)
            if remote == 1008:
                return WebSocketEnded("replaced", text, remote)
            return WebSocketEnded("retry", text, remote)
        why = self.wasNotCleanReason or reason or "connection lost"
        why = why.replace(" (in )", "")  # autobahn names OpenSSL's function, which OpenSSL 3 leaves empty
        if "certificate verify failed" in why or "hostname" in why.lower():
            why += (
                " (the service's certificate is not trusted for this host name: give its CA with "
                "-c/--capath, and use a host name or IP address the certificate names)"
            )
        if not self._opened:
            if "without previous WebSocket closing handshake" in why:
                why += (
                    " (is -e the tunnel service's address? if it listens without TLS, use ws://HOST:PORT)"
                    if self.factory.isSecure
                    else " (if the service listens with TLS, use wss://HOST:PORT or HOST:PORT in -e)"
                )
            return WebSocketEnded("retry", f"WebSocket upgrade failed: {why}", code)
        return WebSocketEnded("retry", f"WebSocket connection lost: {why}", code)


class TunnelWebSocketFactory(WebSocketClientFactory):
    """
    Builds L{TunnelWebSocketProtocol}s for one proxy session; reused on every reconnect (same tokens).

    @param url: C{ws(s)://HOST:PORT/tunnel?local-proxy-mode=MODE} (see L{tunnel_url}).
    @param handler: an L{ITunnelWebSocketHandler}.
    @param clock: pings and the handshake timeout run on it.
    """

    protocol = TunnelWebSocketProtocol  # type: ignore[assignment]  # autobahn's factory is not generic over its protocol (Twisted's Factory[P] default)
    noisy = False

    def __init__(
        self,
        url: str,
        access_token: str,
        client_token: Optional[str],
        handler: Any,
        clock: IReactorTime,
        reactor: Any = None,
    ) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL], useragent=user_agent(), reactor=reactor)
        self.access_token = access_token
        self.client_token = client_token
        self.handler = handler
        self.clock = clock
        self.verbose = False  # log each pong's latency (debug)
        self.setProtocolOptions(
            openHandshakeTimeout=0,  # ours runs on the injected clock
            maxFramePayloadSize=MAX_WEBSOCKET_FRAME,
            maxMessagePayloadSize=16 * MAX_WEBSOCKET_FRAME,
            autoFragmentSize=0,
            perMessageCompressionOffers=[],
            tcpNoDelay=True,
        )

    def __repr__(self) -> str:  # never the token
        return f"<TunnelWebSocketFactory {self.url}>"
