# -*- test-case-name: tests.test_relay -*-
"""
In-memory pieces for tests of every layer.

L{MemoryTunnelStore} is the service's own SQLite store on a database in memory (the same SQL, so the
same token rules), with just enough control-plane helpers (open, close, rotate) to drive a relay
without the API.  L{ServiceHarness} mounts the data plane on a
C{twisted.web} site with it.  L{RawPeer} is a WebSocket client written out by hand over a
L{StringTransport}: it sends exactly the bytes a real client would (the upgrade request, masked
frames) and parses what the service answers, so relay tests are deterministic and byte-exact.

For end-to-end tests and benchmarks on the real reactor: L{TunnelTestClient} (an autobahn client that
hashes the DATA it receives per connection and sends flow-controlled DATA streams), L{connect_client}
(C{ws://} or C{wss://} with a CA).  Real processes (L{ServiceProcess}, the end-to-end
L{Harness<tunnelkit.testing.process.Harness>}) are in L{tunnelkit.testing.process}.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from tunnelkit.protocol.framing import FrameDecoder, encode_message, parse_message
from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.service.dbrunner import Blocking
from tunnelkit.service.interfaces import SOURCE, ITunnelStore, PeerGrant
from tunnelkit.service.metrics import ITunnelCounts
from tunnelkit.service.store import CONNECTED, NewTunnel, StoreError
from tunnelkit.service.store_sqlite import MEMORY, SQLiteStore
from tunnelkit.service.tokens import new_access_token, token_hash
from tunnelkit.testing.process import ServiceProcess

__all__ = [
    "MemoryTunnelStore",
    "OpenedTunnel",
    "ServiceHarness",
    "RawPeer",
    "upgrade_request",
    "client_frame",
    "tunnel_frame",
    "TunnelTestClient",
    "connect_client",
    "ServiceProcess",
]

V3 = "aws.iot.securetunneling-3.0"


@dataclass(frozen=True)
class OpenedTunnel:
    """What L{MemoryTunnelStore.open_tunnel} returns (like OpenTunnel's response)."""

    tunnel_id: str
    source_token: str
    destination_token: str


@implementer(ITunnelStore, ITunnelCounts)
class MemoryTunnelStore:
    """
    The service's own store (L{SQLiteStore} on a private in-memory database, on a
    L{SynchronousRunner<tunnelkit.service.dbrunner.SynchronousRunner>}) with control-plane helpers
    (open, close, rotate) that go through its L{IControlStore} methods, as the API's operations do.
    Every Deferred it returns has fired on return.

    @param clock: the time of the helpers called without C{now} (default: a L{Clock} at 0).
    @ivar control: the L{SQLiteStore} (an L{IControlStore}: C{get_tunnel}, C{list_tunnels}, ...).
    @ivar state_changes: every L{set_connection_state} call, in order, as
        C{(tunnel_id, side, connected, now)}.
    """

    def __init__(self, clock: Optional[IReactorTime] = None) -> None:
        self.clock: IReactorTime = clock if clock is not None else Clock()
        self.control = SQLiteStore(MEMORY)
        weakref.finalize(self, self.control.close)
        self._blocking: Any = Blocking(self.control)
        self._accounts: Set[str] = set()  # the ids of the accounts made here
        self._account_of: Dict[str, str] = {}  # tunnel id -> account id, of the tunnels opened here
        self.state_changes: List[Tuple[str, str, bool, float]] = []

    def close(self) -> None:
        """Release the database (later calls fail; the store is also released once unreferenced)."""
        self.control.close()

    def _now(self, now: Optional[float]) -> float:
        return self.clock.seconds() if now is None else now

    # --- the control plane's part ---

    def open_tunnel(
        self,
        services: Sequence[str] = (),
        now: Optional[float] = None,
        lifetime_minutes: int = 720,
        account_id: str = "123456789012",
    ) -> OpenedTunnel:
        """Create an OPEN tunnel with fresh tokens (and its account, the first time)."""
        now = self._now(now)
        if account_id not in self._accounts:
            self._blocking.create_account(f"account-{account_id}", account_id, now)
            self._accounts.add(account_id)
        tunnel_id = str(uuid.uuid4())
        source_token, destination_token = new_access_token(tunnel_id), new_access_token(tunnel_id)
        self._blocking.create_tunnel(
            NewTunnel(
                tunnel_id=tunnel_id,
                account_id=account_id,
                description=None,
                thing_name=None,
                services=tuple(services),
                max_lifetime_minutes=lifetime_minutes,
                tags=(),
                source_token_hash=token_hash(source_token),
                destination_token_hash=token_hash(destination_token),
                created_at=now,
            ),
            None,
        )
        self._account_of[tunnel_id] = account_id
        return OpenedTunnel(tunnel_id, source_token, destination_token)

    def _account(self, tunnel_id: str) -> str:
        try:
            return self._account_of[tunnel_id]
        except KeyError:
            raise StoreError(f"no tunnel {tunnel_id} was opened by this store (open it with open_tunnel)") from None

    def close_tunnel(self, tunnel_id: str, now: Optional[float] = None) -> None:
        """Mark the tunnel CLOSED (its tokens stop working), as CloseTunnel does."""
        self._blocking.close_tunnel(self._account(tunnel_id), tunnel_id, self._now(now))

    def rotate(
        self, tunnel_id: str, side: str, services: Optional[Sequence[str]] = None, now: Optional[float] = None
    ) -> str:
        """Revoke C{side}'s token and return a new one (with C{services}: the tunnel's new ones)."""
        token = new_access_token(tunnel_id)
        destination = (None, tuple(services)) if services is not None else None
        rotated = self._blocking.rotate_tokens(
            self._account(tunnel_id), tunnel_id, [(side, token_hash(token))], destination, self._now(now)
        )
        if rotated is None:
            raise StoreError(f"tunnel {tunnel_id} is CLOSED: its tokens cannot be rotated")
        return token

    def connection_state(self, tunnel_id: str, side: str) -> Tuple[bool, float]:
        """(connected, lastUpdatedAt) of a side, as DescribeTunnel shows it."""
        tunnel = self._blocking.get_tunnel(self._account(tunnel_id), tunnel_id)
        state = tunnel.source if side == SOURCE else tunnel.destination
        return state.status == CONNECTED, state.last_updated_at

    def count_tunnels_by_status(self) -> "Deferred[Dict[str, int]]":
        """The number of tunnels per status (C{OPEN}, C{CLOSED}), as the metrics read it."""
        return self.control.count_tunnels_by_status()

    # --- ITunnelStore ---

    def claim_peer(
        self,
        access_token: str,
        mode: str,
        client_token: Optional[str],
        now: float,
        admit: Optional[Callable[[PeerGrant], None]] = None,
    ) -> "Deferred[PeerGrant]":
        """See L{ITunnelStore.claim_peer}."""
        return self.control.claim_peer(access_token, mode, client_token, now, admit)

    def set_connection_state(self, tunnel_id: str, side: str, connected: bool, now: float) -> "Deferred[None]":
        """See L{ITunnelStore.set_connection_state}; recorded in L{state_changes}."""
        self.state_changes.append((tunnel_id, side, connected, now))
        return self.control.set_connection_state(tunnel_id, side, connected, now)


class ServiceHarness:
    """
    The data plane on a C{twisted.web} site, backed by a L{MemoryTunnelStore}.

    @ivar store: the store.
    @ivar events: the relay (L{tunnelkit.service.interfaces.ITunnelEvents}).
    @ivar site: serve it on any endpoint (C{GET /tunnel}).
    @ivar metrics_site: C{GET /metrics}, as C{--metrics-listen} serves it.
    """

    def __init__(self, clock: IReactorTime, options: Optional[Mapping[str, Any]] = None) -> None:
        from tunnelkit.service.dataplane import metrics_site, mount_data_plane

        self.clock = clock
        self.store = MemoryTunnelStore(clock)
        self.root = Resource()
        self.events = mount_data_plane(self.root, self.store, clock, dict(options or {}))
        self.site = Site(self.root, reactor=clock)
        self.metrics_site = metrics_site(self.events, reactor=clock)  # type: ignore[arg-type]

    def open_tunnel(self, services: Sequence[str] = (), lifetime_minutes: int = 720) -> OpenedTunnel:
        """Open a tunnel now (by the harness's clock)."""
        return self.store.open_tunnel(services, self.clock.seconds(), lifetime_minutes)

def upgrade_request(
    mode: Optional[str] = "source",
    token: Optional[str] = None,
    protocols: Sequence[str] = (V3,),
    path: str = "/tunnel",
    extra: Sequence[Tuple[str, str]] = (),
    query: Optional[str] = None,
) -> bytes:
    """The bytes of a WebSocket upgrade request like the reference local proxy's."""
    target = path
    if query is not None:
        target += "?" + query
    elif mode is not None:
        target += f"?local-proxy-mode={mode}"
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: upgrade",
        "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    if token is not None:
        lines.append(f"access-token: {token}")
    for name, value in extra:
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def client_frame(payload: bytes, opcode: int = 2, fin: bool = True) -> bytes:
    """One masked client-to-server WebSocket frame."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    if n:
        stream = (key * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    else:
        masked = b""
    return head + key + masked


def tunnel_frame(**fields: object) -> bytes:
    """A length-prefixed tunnel frame."""
    return encode_message(Message(**fields))  # type: ignore[arg-type]


class RawPeer:
    """One raw WebSocket connection to a site."""

    def __init__(self, site: object, request: bytes, port: int = 40000, host: str = "127.0.0.1") -> None:
        # Any: autobahn sets (and this sets) C{protocol} on it, as on a real transport
        self.transport: Any = cast(Any, StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
            peerAddress=IPv4Address("TCP", host, port),
        ))
        self.channel = site.buildProtocol(self.transport.getPeer())  # type: ignore[attr-defined]
        self.transport.protocol = self.channel  # as a real transport has; autobahn replaces it
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(request)
        self._read = 0
        self.status: Optional[int] = None
        self.headers: Dict[str, str] = {}
        self.body = b""
        self._buffer = b""
        self.messages: List[bytes] = []  # binary WebSocket message payloads
        self.controls: List[Tuple[int, bytes]] = []  # (opcode, payload) of control frames
        self._decoder = FrameDecoder()
        self._parse_head()

    @property
    def protocol(self) -> object:
        """The service's protocol for this connection (autobahn's, once upgraded)."""
        return self.transport.protocol

    def _parse_head(self) -> None:
        value = self.transport.value()
        end = value.find(b"\r\n\r\n")
        if end < 0:
            return
        head = value[:end].decode("latin-1").split("\r\n")
        self.status = int(head[0].split()[1])
        for line in head[1:]:
            name, _, v = line.partition(":")
            self.headers[name.strip().lower()] = v.strip()
        rest = value[end + 4 :]
        if self.status == 101:
            self._read = end + 4
        else:
            length = int(self.headers.get("content-length", len(rest)))
            self.body = rest[:length]
            self._read = len(value)

    def lose(self) -> None:
        """The connection drops (as when the client dies: no close frame)."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.transport.loseConnection()
        self.protocol.connectionLost(Failure(ConnectionLost()))  # type: ignore[attr-defined]

    def send(self, payload: bytes, opcode: int = 2) -> None:
        """Send one masked client frame (binary unless C{opcode} says otherwise)."""
        self.protocol.dataReceived(client_frame(payload, opcode))  # type: ignore[attr-defined]

    def send_raw(self, data: bytes) -> None:
        """Feed C{data} to the service as it is (already framed, or deliberately not)."""
        self.protocol.dataReceived(data)  # type: ignore[attr-defined]

    def poll(self) -> None:
        """Parse what the service wrote since the last poll."""
        value = self.transport.value()
        self._buffer += value[self._read :]
        self._read = len(value)
        buf = self._buffer
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            assert not b1 & 0x80, "server frames must not be masked"
            n = b1 & 0x7F
            offset = 2
            if n == 126:
                if len(buf) < 4:
                    break
                (n,) = struct.unpack("!H", buf[2:4])
                offset = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                (n,) = struct.unpack("!Q", buf[2:10])
                offset = 10
            if len(buf) < offset + n:
                break
            payload = buf[offset : offset + n]
            buf = buf[offset + n :]
            opcode = b0 & 0x0F
            assert b0 & 0x80, "the relay sends unfragmented messages"
            if opcode == 2:
                self.messages.append(payload)
            else:
                self.controls.append((opcode, payload))
        self._buffer = buf

    def take_messages(self) -> List[bytes]:
        """The binary messages the service sent since the last call."""
        self.poll()
        messages, self.messages = self.messages, []
        return messages

    def take_frames(self) -> List[Message]:
        """Every tunnel message received since the last call."""
        return [parse_message(body) for m in self.take_messages() for body in self._decoder.feed(m)]

    def close_frame(self) -> Optional[Tuple[int, str]]:
        """The (code, reason) of the close frame the service sent, if any."""
        self.poll()
        for opcode, payload in self.controls:
            if opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 0
                return code, payload[2:].decode("utf-8")
        return None


class TunnelTestClient(WebSocketClientProtocol):
    """
    A tunnel client for end-to-end tests and benchmarks (autobahn, over TCP or TLS): it records
    what arrives (DATA hashed per connection, other messages kept) and sends DATA streams with
    real flow control (a producer on its transport).

    @ivar opened: fires with this protocol once the WebSocket is open.
    @ivar closed: fires with C{(wasClean, code, reason)}.
    @ivar messages: every non-DATA tunnel message received, in order.
    @ivar received: C{connection id -> bytes of DATA received}; C{digests}: their running SHA-256.
    """

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.messages: List[Message] = []
        self.received: Dict[int, int] = {}
        self.digests: Dict[int, Any] = {}
        self.channel_id = ""
        self.close_frame_at: Optional[float] = None  # time.monotonic() when the close frame came
        self._decoder = FrameDecoder()
        self._waiting: List[Tuple[Dict[int, int], Any]] = []
        self.on_data: Optional[Any] = None  # called with each DATA message when set

    def onConnect(self, response: Any) -> None:
        self.channel_id = response.headers.get("channel-id", "")

    def onCloseFrame(self, code: Optional[int], reasonRaw: Optional[bytes]) -> Any:
        import time

        self.close_frame_at = time.monotonic()
        return super().onCloseFrame(code, reasonRaw)  # type: ignore[arg-type]  # None: a close without a code

    def onOpen(self) -> None:
        self.opened.callback(self)
        connected = getattr(self.factory, "connected", None)
        if connected is not None and not connected.called:
            connected.callback(self)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if not self.opened.called:
            error = ConnectionError(f"WebSocket not opened: {code} {reason}")
            self.opened.errback(error)
            self.opened.addErrback(lambda _: None)
            connected = getattr(self.factory, "connected", None)
            if connected is not None and not connected.called:
                connected.errback(error)
        self.closed.callback((wasClean, code, reason))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        import hashlib

        for body in self._decoder.feed(payload):
            message = parse_message(body)
            if message.type == Message.DATA:
                connection = message.connectionId
                self.received[connection] = self.received.get(connection, 0) + len(message.payload)
                digest = self.digests.get(connection)
                if digest is None:
                    digest = self.digests[connection] = hashlib.sha256()
                digest.update(message.payload)
                if self.on_data is not None:
                    self.on_data(message)
            else:
                self.messages.append(message)
        if self._waiting:
            self._check_waiting()

    def _check_waiting(self) -> None:
        still = []
        for wanted, d in self._waiting:
            if all(self.received.get(c, 0) >= n for c, n in wanted.items()):
                d.callback(dict(self.received))
            else:
                still.append((wanted, d))
        self._waiting = still

    def expect(self, wanted: Mapping[int, int]) -> Any:
        """A Deferred that fires once C{wanted[c]} DATA bytes arrived on each connection C{c}."""
        d: Deferred = Deferred()
        self._waiting.append((dict(wanted), d))
        self._check_waiting()
        return d

    def send_frames(self, *frames: bytes) -> None:
        """Send whole tunnel frames as one WebSocket message."""
        self.sendMessage(b"".join(frames), isBinary=True)

    def stream(
        self,
        connections: Sequence[int],
        size: int,
        service_id: str = "SSH",
        stream_id: int = 1,
        chunk: int = 64512,
        frames_per_message: int = 2,
        seed: int = 0,
    ) -> Any:
        """
        Send C{size} bytes of seeded random DATA on each of C{connections}, round-robin, pausing
        whenever the transport is full.  Fires with C{{connection: sha256 hex}} when all is written.
        """
        sender = _StreamSender(
            self, list(connections), size, service_id, stream_id, chunk, frames_per_message, seed
        )
        self.registerProducer(sender, True)
        sender.resumeProducing()
        return sender.done


@implementer(IPushProducer)
class _StreamSender:
    def __init__(
        self,
        client: TunnelTestClient,
        connections: List[int],
        size: int,
        service_id: str,
        stream_id: int,
        chunk: int,
        frames_per_message: int,
        seed: int,
    ) -> None:
        import hashlib
        import random

        self.client = client
        self.left = {c: size for c in connections}
        self.digests = {c: hashlib.sha256() for c in connections}
        self.service_id = service_id
        self.stream_id = stream_id
        self.chunk = chunk
        self.frames_per_message = frames_per_message
        self.random = random.Random(seed)
        self.paused = False
        self.order = list(connections)
        self.turn = 0
        self.done: Deferred = Deferred()

    def _next_frame(self) -> Optional[bytes]:
        while self.order:
            connection = self.order[self.turn % len(self.order)]
            left = self.left[connection]
            if left == 0:
                self.order.remove(connection)
                continue
            self.turn += 1
            n = min(self.chunk, left)
            payload = self.random.randbytes(n)
            self.left[connection] = left - n
            self.digests[connection].update(payload)
            return encode_message(
                Message(
                    type=Message.DATA,
                    streamId=self.stream_id,
                    serviceId=self.service_id,
                    connectionId=connection,
                    payload=payload,
                )
            )
        return None

    def resumeProducing(self) -> None:
        self.paused = False
        client = self.client
        while not self.paused and not self.done.called:
            frames = []
            for _ in range(self.frames_per_message):
                frame = self._next_frame()
                if frame is None:
                    break
                frames.append(frame)
            if frames:
                client.sendMessage(b"".join(frames), isBinary=True)
            if not self.order:
                client.unregisterProducer()
                self.done.callback({c: d.hexdigest() for c, d in self.digests.items()})

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


class _ClientFactory(WebSocketClientFactory):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connected: Deferred = Deferred()

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.connected.called:
            self.connected.errback(reason)


def connect_client(
    port: int,
    mode: str,
    token: str,
    ca_pem: Optional[bytes] = None,
    client_token: Optional[str] = None,
    protocols: Sequence[str] = (V3,),
    host: str = "127.0.0.1",
) -> Deferred:
    """
    Connect a L{TunnelTestClient} to C{wss://host:port/tunnel} (C{ws://} without C{ca_pem}).

    @return: a Deferred firing with the client once its WebSocket is open, or failing with the
        refusal (C{ConnectionError} naming the status) or the connection error.
    """
    from autobahn.twisted.websocket import connectWS
    from twisted.internet import ssl

    scheme = "wss" if ca_pem is not None else "ws"
    headers = {"access-token": token}
    if client_token is not None:
        headers["client-token"] = client_token
    factory = _ClientFactory(
        f"{scheme}://{host}:{port}/tunnel?local-proxy-mode={mode}",
        protocols=list(protocols),
        headers=headers,
    )
    factory.setProtocolOptions(autoFragmentSize=0, maxFramePayloadSize=0, maxMessagePayloadSize=0)
    factory.protocol = TunnelTestClient
    context = None
    if ca_pem is not None:
        context = ssl.optionsForClientTLS(host, trustRoot=ssl.Certificate.loadPEM(ca_pem))
    connectWS(factory, context)
    return factory.connected


def http_attempt(
    port: int, request: bytes, source: str = "127.0.0.1", keep: bool = False, timeout: float = 10.0
) -> Tuple[int, bytes, Optional[socket.socket]]:
    """
    Send C{request} to 127.0.0.1:C{port} from the loopback address C{source} and read the answer's
    head: its status (0 if none came), the head, and the socket if C{keep} (else it is closed).
    """
    s = socket.socket()
    try:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(65536)
            if not chunk:
                break
            head += chunk
    except OSError:
        s.close()
        return 0, b"", None
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") and head.count(b" ") >= 2 else 0
    if keep:
        return status, head, s
    s.close()
    return status, head, None
