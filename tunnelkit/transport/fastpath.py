# -*- test-case-name: tests.test_fastpath -*-
"""
The WebSocket fast path of the relay and of the local proxy: one implementation, mixed into both
autobahn protocols (L{FastWebSocket}).

What it does, for the common case of whole, unfragmented binary frames (all the tunnel's data):
  - reads them straight from autobahn's input buffer, walking it by offset (cut once per read, not
    once per frame), and collects the rest of a frame that is still arriving as pieces joined once,
    instead of autobahn's general frame parser;
  - skips autobahn's per-call debug formatting in C{dataReceived}/C{sendData} (performance.md:
    +10 %) and the observable "message" event it fires per message (Deferreds nobody waits for).
Any other frame (control frames, fragments, text, anything malformed or too large) goes through
autobahn's general parser, which enforces the WebSocket rules on it.

It needs autobahn's private state (listed in L{AUTOBAHN_ATTRIBUTES}): L{missing} checks, once, on
fresh client and server protocols of the installed autobahn, that every name is there.  When one is
not, the fast path turns itself off (L{ENABLED} is False: the methods hand every call to autobahn's
own), and C{twistd tunnelkit} says so in one line at start (the entry of L{tunnelkit.internals}).
The versions setup.cfg allows (and CI tests) have them all; C{tests.test_fastpath} checks it.

Also here: the one place that reads Twisted's transport internals for the relay's buffer accounting
(L{transport_buffered}) and sizing (L{set_buffer_size}); both degrade to "nothing known" when the
names are gone.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union, cast

from tunnelkit.protocol.framing import MAX_WEBSOCKET_FRAME

__all__ = [
    "FRAME_INCOMPLETE",
    "FRAME_NOT_PLAIN",
    "binary_frame_header",
    "AUTOBAHN_ATTRIBUTES",
    "ENABLED",
    "FastWebSocket",
    "missing",
    "release_handshake_state",
    "with_factory_options",
    "AUTOBAHN_IDLE_DEFAULTS",
    "AUTOBAHN_HANDSHAKE_STATE",
    "set_enabled",
    "LazyText",
    "lazy_handshake_logging",
    "transport_buffered",
    "set_buffer_size",
    "direct_reads",
    "FORWARDERS",
    "REACTOR_ATTRIBUTES",
    "reactor_missing",
    "install_event_dispatch",
    "forwarders_missing",
    "masked_frame",
    "nvx_masker_present",
]

Buffer = Union[bytes, bytearray, memoryview]
_P = TypeVar("_P")

_unpack_u16 = struct.Struct("!H").unpack_from
_unpack_u64 = struct.Struct("!Q").unpack_from

#: L{binary_frame_header}: the bytes so far do not hold the whole header.
FRAME_INCOMPLETE = -1
#: L{binary_frame_header}: the frame is not a whole binary frame (autobahn's general parser takes it).
FRAME_NOT_PLAIN = -2


def binary_frame_header(data: Buffer, offset: int, masked: bool) -> Tuple[int, int]:
    """
    Read the header of the WebSocket frame at C{offset} of C{data}: a final binary frame (FIN +
    opcode 2) with a minimal length of at most L{MAX_WEBSOCKET_FRAME}, masked as C{masked} says
    (frames to a server are masked).

    @return: (where the payload starts, its length), or (L{FRAME_INCOMPLETE}, 0), or
        (L{FRAME_NOT_PLAIN}, 0) for anything else (control frames, fragments, text, odd lengths).
    """
    size = len(data)
    left = size - offset
    if left < 2:
        return FRAME_INCOMPLETE, 0
    length = data[offset + 1]
    if data[offset] != 0x82 or bool(length & 0x80) != masked:
        return FRAME_NOT_PLAIN, 0
    length &= 0x7F
    header = 6 if masked else 2
    if length == 126:
        if left < 4:
            return FRAME_INCOMPLETE, 0
        (length,) = _unpack_u16(data, offset + 2)
        if length < 126:  # not minimal: autobahn refuses it
            return FRAME_NOT_PLAIN, 0
        header += 2
    elif length == 127:
        if left < 10:
            return FRAME_INCOMPLETE, 0
        (length,) = _unpack_u64(data, offset + 2)
        if length < 65536 or length > MAX_WEBSOCKET_FRAME:  # autobahn refuses it
            return FRAME_NOT_PLAIN, 0
        header += 8
    start = offset + header
    if start > size:  # the mask is still on its way
        return FRAME_INCOMPLETE, 0
    return start, length

#: autobahn's private names the fast path reads or calls: (where, name).  "class" names are looked up
#: on WebSocketProtocol; "instance" names on freshly built client and server protocols.
AUTOBAHN_ATTRIBUTES: Tuple[Tuple[str, str], ...] = (
    ("class", "STATE_OPEN"),
    ("class", "STATE_CLOSED"),
    ("class", "SEND_STATE_GROUND"),
    ("class", "_dataReceived"),
    ("class", "processData"),
    ("class", "sendData"),
    ("class", "onMessageEnd"),
    ("class", "sendMessage"),
    ("instance", "current_frame"),
    ("instance", "inside_message"),
    ("instance", "send_queue"),
    ("instance", "send_state"),
    ("instance", "message_data"),
    ("instance", "message_is_binary"),
    ("instance", "failedByMe"),
    ("instance", "state"),
    ("instance", "data"),
    ("instance", "trafficStats"),
    ("instance", "logOctets"),
)


#: autobahn's state of a server's opening handshake (the request as received, its headers and
#: parameters, the 101 answer), which autobahn reads only until the session is open: dropped by
#: L{release_handshake_state}.
AUTOBAHN_HANDSHAKE_STATE: Tuple[str, ...] = (
    "http_headers",
    "http_request_data",
    "http_response_data",
    "http_request_params",
    "http_request_uri",
    "http_request_path",
    "http_request_host",
    "http_status_line",
    "_wskey",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
)


#: autobahn's per-connection flags, timers and close details, with their values in an open session
#: that nothing is happening on.  L{with_factory_options} makes them class-level defaults, and
#: L{release_handshake_state} drops an instance's copy that equals its default; autobahn sets them
#: again on the instance when they change (a close, a ping timer).
AUTOBAHN_IDLE_DEFAULTS: Dict[str, Any] = {
    "_perMessageCompress": None,
    "trackedTimings": None,
    "send_state": 0,  # SEND_STATE_GROUND
    "triggered": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasServerConnectionDropTimeout": False,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingCall": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
    "current_frame": None,
    "inside_message": False,
}


def _fresh_protocols() -> List[Any]:
    """A client and a server protocol of the installed autobahn, open to each other in memory."""
    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        WebSocketServerFactory,
        WebSocketServerProtocol,
    )
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    reactor = MemoryReactorClock()
    protocols: List[Any] = []  # as returned: autobahn's protocols, on StringTransports
    for factory_class, protocol_class, url in (
        (WebSocketClientFactory, WebSocketClientProtocol, "ws://127.0.0.1:1/"),
        (WebSocketServerFactory, WebSocketServerProtocol, "ws://127.0.0.1:1/"),
    ):
        factory = factory_class(url, reactor=reactor)
        factory.setProtocolOptions(openHandshakeTimeout=0, autoPingInterval=0)
        protocol = protocol_class()
        protocol.factory = factory
        protocol.makeConnection(StringTransport())
        protocols.append(protocol)
    client, server = protocols
    # The opening handshake, in memory: the state the fast path reads exists once a session is open.
    server.dataReceived(client.transport.value())
    client.dataReceived(server.transport.value())
    if client.state != client.STATE_OPEN or server.state != server.STATE_OPEN:
        raise RuntimeError("the opening handshake did not complete")
    for sender, receiver in ((client, server), (server, client)):  # a message each way, autobahn's parser
        sender.transport.clear()
        sender.sendMessage(b"check", isBinary=True)
        receiver.dataReceived(sender.transport.value())
    return protocols


def missing() -> List[str]:
    """The names of L{AUTOBAHN_ATTRIBUTES} the installed autobahn lacks (empty: the fast path can run)."""
    try:
        from autobahn.websocket.protocol import WebSocketProtocol

        protocols = _fresh_protocols()
    except Exception as e:  # an autobahn that cannot even build its protocols this way
        return [f"autobahn's protocols ({type(e).__name__}: {e})"]
    gone = []
    for where, name in AUTOBAHN_ATTRIBUTES:
        if where == "class":
            present = hasattr(WebSocketProtocol, name)
        else:
            present = all(name in vars(protocol) or hasattr(type(protocol), name) for protocol in protocols)
        if not present:
            gone.append(f"autobahn.websocket.protocol.WebSocketProtocol.{name}")
    for protocol in protocols:
        protocol.transport.loseConnection()
    return gone


#: Whether the fast path runs (set once at import; see L{set_enabled}).
ENABLED = True


def set_enabled(enabled: bool) -> None:
    """Turn the fast path on or off (for tests, and at import when autobahn lacks a name)."""
    global ENABLED
    ENABLED = enabled


class FastWebSocket:
    """
    Mixed into an autobahn Twisted WebSocket protocol, before it in the bases.  Subclasses set
    L{masked_in} (a server receives masked frames) and implement L{fast_message}.
    """

    #: Whether the frames this side receives are masked (True for a server: the relay).
    masked_in = False

    _pieces: Sequence[Buffer] = ()  # the start of a frame still arriving: a list while it does
    _awaiting = 0  # bytes still missing from a frame that is arriving
    _awaiting_size = 0
    _awaiting_mask: Optional[bytes] = None

    # what autobahn's WebSocketProtocol provides (for the type checker)
    data: bytes
    state: int
    current_frame: Any
    inside_message: bool
    send_queue: Any
    transport: Any
    failedByMe: bool
    message_data: Any
    message_is_binary: bool
    trafficStats: Any
    logOctets: bool

    def fast_message(self, mask: Optional[bytes], parts: Sequence[Buffer], size: int) -> None:
        """
        A whole binary message of C{size} bytes, in C{parts} (views into buffers that are not kept):
        masked with C{mask} when L{masked_in}, else C{mask} is None.
        """
        raise NotImplementedError

    def dataReceived(self, data: bytes) -> None:
        if not ENABLED:
            super().dataReceived(data)  # type: ignore[misc]
            return
        if self._awaiting:
            # The rest of a frame whose size is known: collect the pieces; once it is whole, hand
            # them over (one copy at most, by the receiver) and go on with what follows it.
            self._pieces.append(data)  # type: ignore[attr-defined]  # a list while the frame arrives
            self._awaiting -= len(data)
            if self._awaiting > 0:
                return
            extra = -self._awaiting
            self._awaiting = 0
            pieces: List[Buffer] = self._pieces  # type: ignore[assignment]  # a list (see processData)
            self._pieces = ()
            if extra:
                pieces[-1] = memoryview(data)[: len(data) - extra]
            self.fast_message(self._awaiting_mask, pieces, self._awaiting_size)
            data = data[len(data) - extra :] if extra else b""
        if not data:
            return
        if self.state == self.STATE_OPEN and not self.data and not self.logOctets:  # type: ignore[attr-defined]
            # What autobahn's _dataReceived and consumeData do in an open session with nothing
            # buffered, without their two calls and state tests per read.
            self.trafficStats.incomingOctetsWireLevel += len(data)
            self.data = data
            closed = self.STATE_CLOSED  # type: ignore[attr-defined]
            while self.processData() and self.state != closed:
                pass
        else:
            self._dataReceived(data)  # type: ignore[attr-defined]

    def processData(self) -> bool:
        """
        Take the frames in autobahn's input buffer: whole plain binary frames here, by offset; any
        other frame, and every frame while autobahn is inside a message, through autobahn's parser.
        """
        if not ENABLED or self.current_frame is not None or self.inside_message or self.state != self.STATE_OPEN:  # type: ignore[attr-defined]
            return bool(super().processData())  # type: ignore[misc]
        open_state = self.STATE_OPEN  # type: ignore[attr-defined]
        masked = self.masked_in
        data = self.data
        size = len(data)
        offset = 0
        view = memoryview(data)
        general = False  # the next frame is for autobahn's parser
        while self.state == open_state:
            start, length = binary_frame_header(data, offset, masked)
            if start < 0:
                general = start == FRAME_NOT_PLAIN
                break
            end = start + length
            mask = data[start - 4 : start] if masked else None
            if end > size:
                # Wait for the rest of this frame (at most 131090 bytes) without re-copying the
                # buffer on each read: see dataReceived.
                self._pieces = [view[start:]]
                self._awaiting = end - size
                self._awaiting_size = length
                self._awaiting_mask = mask
                self.data = b""
                return False
            offset = end
            self.fast_message(mask, (view[start:end],), length)
        if offset:
            self.data = data[offset:]
        if general and self.state == open_state:
            return bool(super().processData())  # type: ignore[misc]
        return offset < size and self.state != open_state

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        # autobahn's sendData formats a debug message on every call; only the plain case is here.
        if not ENABLED or sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        else:
            self.transport.write(data)

    def onMessageEnd(self) -> None:
        # autobahn's version also fires an observable "message" event (Deferreds per message);
        # nothing here observes it.
        if not ENABLED:
            super().onMessageEnd()  # type: ignore[misc]
            return
        if not self.failedByMe:
            parts = self.message_data
            self.onMessage(parts[0] if len(parts) == 1 else b"".join(parts), self.message_is_binary)  # type: ignore[attr-defined]
        self.message_data = None


def with_factory_options(protocol_class: Type[_P], factory: Any) -> Type[_P]:
    """
    A subclass of C{protocol_class} (an autobahn protocol) carrying C{factory}'s protocol options
    (autobahn's C{CONFIG_ATTRS}) and L{AUTOBAHN_IDLE_DEFAULTS} as class attributes.  autobahn copies
    into each connection only the options its class does not set (its way to configure one protocol
    class), so each connection's dict holds ~30 names fewer.  Make it after C{setProtocolOptions}.
    """
    attributes: Dict[str, Any] = {"__slots__": (), "__module__": protocol_class.__module__}
    attributes["__qualname__"] = protocol_class.__qualname__
    if ENABLED:
        for name in getattr(protocol_class, "CONFIG_ATTRS", ()):
            value = getattr(factory, name)
            # A function (perMessageCompressionAccept) must not become a method of the protocol.
            attributes[name] = staticmethod(value) if hasattr(value, "__get__") else value
        attributes.update(AUTOBAHN_IDLE_DEFAULTS)
    return cast(Type[_P], type(protocol_class.__name__, (protocol_class,), attributes))


class _UnusedSendQueue:
    """
    Stands in for autobahn's send queue (an empty deque: 760 bytes) while it is empty, as it stays
    unless autobahn sends in chopped or synchronous mode: its first C{append} puts a real deque in
    its place.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def __len__(self) -> int:
        return 0

    def append(self, item: Any) -> None:
        self._protocol.send_queue = deque((item,))

    def popleft(self) -> Any:
        raise IndexError("pop from an empty deque")


def release_handshake_state(protocol: Any) -> None:
    """
    Make an open server C{protocol} small: forget what it kept of its opening handshake
    (L{AUTOBAHN_HANDSHAKE_STATE}: ~2 KB), drop its copies of values its class holds already (see
    L{with_factory_options}), hold its empty send queue lazily, and give it a compact copy of its
    instance dict (Python never shrinks a dict, and autobahn's outgrew its first sizes).  Idle, an
    autobahn server then costs ~2.5 KB less than the 3.3 KB of its dict and 0.8 KB of handshake.
    A name this autobahn does not have is skipped.  Call it from C{onOpen}.
    """
    if not ENABLED or protocol.state != protocol.STATE_OPEN:
        return
    state = protocol.__dict__
    for name in AUTOBAHN_HANDSHAKE_STATE:
        state.pop(name, None)
    cls = type(protocol)
    for name in [name for name, value in state.items() if getattr(cls, name, _ABSENT) is value]:
        del state[name]
    queue = state.get("send_queue")
    if type(queue) is deque and not queue:
        state["send_queue"] = _UnusedSendQueue(protocol)
    protocol.__dict__ = dict(state)


_ABSENT = object()


# --- Twisted's transport internals (the relay's buffer accounting) ---


def transport_buffered(transport: Any) -> int:
    """
    Bytes waiting in a transport: the TLS layer's (if any: not yet encrypted, or aggregated) and
    the TCP transport's under it.  Reads Twisted's private buffers; a name that is gone counts 0.
    """
    from twisted.protocols.policies import ProtocolWrapper

    total = 0
    while isinstance(transport, ProtocolWrapper):
        held = getattr(type(transport), "buffered", None)  # tunnelkit.transport.stdtls's TLS: public
        if held is not None:
            total += held(transport)
            transport = transport.transport
            continue
        total += sum(len(b) for b in getattr(transport, "_appSendBuffer", ()) or ())
        pending = getattr(getattr(transport, "_aggregator", None), "_buffer", None)
        if pending:
            total += sum(len(b) for b in pending)
        transport = transport.transport
    buffer = getattr(transport, "dataBuffer", None)
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        total += len(buffer) + getattr(transport, "_tempDataLen", 0)
    return total


def set_buffer_size(transport: Any, size: int) -> None:
    """
    Make the TCP transport under C{transport} (TLS or not) pause its producer at C{size} bytes.
    (Twisted also reads at most that many bytes at once from the socket.)
    """
    for _ in range(3):
        inner = getattr(transport, "__dict__", {}).get("transport")
        if inner is None:
            break
        transport = inner
    if hasattr(type(transport), "bufferSize"):  # a class attribute (not dir(): a sorted list per call)
        transport.bufferSize = size


# --- Twisted's forwarding protocols (the local proxy's WebSocket reads) ---

#: Twisted's protocols that stand between a transport and the protocol it carries and only forward
#: its reads: (module, class, the attribute holding the protocol they forward to).  The local
#: proxy's WebSocket is built through a client endpoint (its _WrappingProtocol) and ClientService
#: (its _ReconnectingProtocolProxy, a __getattr__ per read), so each read of the service's messages
#: went through two calls more than needed.
FORWARDERS: Tuple[Tuple[str, str, str], ...] = (
    ("twisted.internet.endpoints", "_WrappingProtocol", "_wrappedProtocol"),
    ("twisted.application._client_service", "_ReconnectingProtocolProxy", "_protocol"),
)


def _forwarder_classes() -> Dict[type, str]:
    import importlib

    found: Dict[type, str] = {}
    for module, name, attribute in FORWARDERS:
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
        if isinstance(cls, type):
            found[cls] = attribute
    return found


def forwarders_missing() -> List[str]:
    """The L{FORWARDERS} this Twisted lacks (their reads then keep going through them: slower, same)."""
    present = _forwarder_classes()
    return [f"{module}.{name}" for module, name, _ in FORWARDERS
            if not any(cls.__module__ == module and cls.__name__ == name for cls in present)]


def direct_reads(protocol: Any) -> int:
    """
    Make every transport layer under C{protocol} (TLS, then TCP) hand its reads straight to the
    protocol it carries, past the L{FORWARDERS} between them: each forwarder gets, as its own
    C{dataReceived}, the bound C{dataReceived} of the protocol it forwards to in the end (what its
    own would have called).  Everything else (connectionLost, half-close, logPrefix) still goes
    through them.  @return: how many forwarders now pass reads on directly.
    """
    from twisted.protocols.policies import ProtocolWrapper

    classes = _forwarder_classes()
    if not classes:
        return 0
    bypassed = 0
    transport = getattr(protocol, "transport", None)
    for _ in range(4):  # TLS over TCP, maybe TLS over an HTTP proxy's TCP: a few layers at most
        if transport is None:
            break
        attribute = "wrappedProtocol" if isinstance(transport, ProtocolWrapper) else "protocol"
        upper = transport.__dict__.get(attribute) if hasattr(transport, "__dict__") else None
        target = upper
        while type(target) in classes:
            target = getattr(target, classes[type(target)], None)
        if upper is not None and target is not None and target is not upper:
            upper.dataReceived = target.dataReceived
            bypassed += 1
        transport = getattr(transport, "transport", None) if isinstance(transport, ProtocolWrapper) else None
    return bypassed


# --- the epoll reactor's event dispatch ---

#: The epoll reactor's private names L{install_event_dispatch} uses.
REACTOR_ATTRIBUTES: Tuple[str, ...] = ("_poller", "_selectables", "_doReadOrWrite")


def reactor_missing(reactor: Any) -> List[str]:
    """
    What L{install_event_dispatch} needs that C{reactor} (an epoll reactor, or not) lacks; with
    C{reactor} None, what Twisted lacks (the epoll reactor class, the log context).
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return ["twisted.internet.epollreactor"]
    from twisted.python import context, log

    if reactor is None:
        gone = [] if hasattr(EPollReactor, "_doReadOrWrite") else ["EPollReactor._doReadOrWrite"]
    elif not isinstance(reactor, EPollReactor):
        return [f"an epoll reactor (this is {type(reactor).__name__})"]
    else:
        gone = [f"EPollReactor.{name}" for name in REACTOR_ATTRIBUTES if not hasattr(reactor, name)]
    tracker = getattr(context, "theContextTracker", None)
    if not isinstance(tracker, context.ThreadedContextTracker) or not hasattr(context, "ContextTracker"):
        gone.append("twisted.python.context.ThreadedContextTracker")
    elif not isinstance(getattr(tracker.currentContext(), "contexts", None), list):
        gone.append("twisted.python.context.ContextTracker.contexts")
    if not hasattr(log, "ILogContext") or not hasattr(log, "err"):
        gone.append("twisted.python.log.ILogContext")
    return gone


def install_event_dispatch(reactor: Any, listener: Any = None) -> bool:
    """
    Make C{reactor} (twistd's epoll reactor) dispatch each I/O event as its own C{doPoll} does,
    with the same log context, for fewer Python calls.  C{listener}, if given (the write
    coalescer: L{tunnelkit.transport.coalesce.events_listener}), is told when the dispatch of a
    poll's events begins and ends (C{events_begin}, C{events_end}), even when a handler raises.

    Twisted's C{doPoll} calls every ready selectable through C{log.callWithLogger}, which pushes
    C{{"system": selectable.logPrefix()}} onto the log context for legacy C{log.msg} lines (their
    C{[system]} prefix) through six calls (callWithContext, the thread's context tracker, twice).
    Here the reactor thread's tracker is looked up once per poll and the same context is pushed
    and popped around the same C{_doReadOrWrite}; a selectable whose C{logPrefix} fails, and an
    exception out of the handler, are logged as C{callWithLogger} logs them.

    @return: whether it is installed (False, reactor untouched, when L{reactor_missing} names
        something).
    """
    if reactor_missing(reactor):
        return False
    import errno

    from twisted.python import context, log

    poll = reactor._poller.poll
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    log_context = log.ILogContext
    call_with_logger = log.callWithLogger
    error = log.err

    def doPoll(timeout: Optional[float]) -> None:
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        if not events:
            return
        if listener is None:
            dispatch(events)
            return
        listener.events_begin()
        try:
            dispatch(events)
        finally:
            listener.events_end()

    def dispatch(events: List[Tuple[int, int]]) -> None:
        tracker = context.theContextTracker
        if type(tracker) is not context.ThreadedContextTracker:  # someone installed another tracker
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is not None:
                    call_with_logger(selectable, handle, selectable, fd, event)
            return
        stack = tracker.currentContext().contexts
        outer = None  # the log context now (log.callWithContext's context.get(ILogContext))
        for layer in reversed(stack):
            if log_context in layer:
                outer = layer[log_context]
                break
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                prefix = selectable.logPrefix()
            except BaseException:
                prefix = None
            if prefix is None or type(outer) is not dict:  # Twisted's own handling of the odd cases
                call_with_logger(selectable, handle, selectable, fd, event)
                continue
            system = outer.copy()
            system["system"] = prefix
            stack.append({log_context: system})
            try:
                try:
                    handle(selectable, fd, event)
                finally:
                    stack.pop()
            except KeyboardInterrupt:
                raise
            except BaseException:
                error(system=prefix)

    reactor.doPoll = doPoll
    reactor.doIteration = doPoll
    return True


# --- autobahn's handshake logging ---


class LazyText:
    """What C{pformat(value)} would give, made only if a log line is really written."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        from pprint import pformat

        return pformat(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _pformat_lazily_for_logs(value: Any, *args: Any, **kwargs: Any) -> Any:
    """
    Stands in for C{pprint.pformat} in autobahn's protocol module, whose C{_connectionMade} formats
    its whole configuration (a list of tuples) for a debug line on every connection, even with
    debug off (~11 % of a handshake's CPU on the service).  A list, the argument of that log line
    only, is formatted when the line is written; anything else at once, as before.
    """
    if isinstance(value, list) and not args and not kwargs:
        return LazyText(value)
    from pprint import pformat

    return pformat(value, *args, **kwargs)


def lazy_handshake_logging() -> bool:
    """Install L{_pformat_lazily_for_logs} in autobahn (idempotent); False when autobahn has no C{pformat} there."""
    import autobahn.websocket.protocol as protocol_module

    if not hasattr(protocol_module, "pformat"):
        return False
    protocol_module.pformat = _pformat_lazily_for_logs  # type: ignore[assignment]  # a lazy stand-in, on purpose
    return True


_GONE = missing()
if _GONE:  # pragma: no cover - only with an autobahn setup.cfg does not allow
    set_enabled(False)
else:
    lazy_handshake_logging()


# --- masking ---

try:  # autobahn's NVX masker (its compiled _nvx_xormasker), called directly: in place, no copies
    import autobahn.websocket

    if not getattr(autobahn.websocket, "USES_NVX", False):
        raise ImportError("NVX is off")
    from _nvx_xormasker import ffi as _nvx_ffi, lib as _nvx_lib
except ImportError:  # pragma: no cover - only with --allow-slow-websocket
    _nvx_ffi = _nvx_lib = None


def masked_frame(prefix: bytes, mask: bytes, parts: Sequence[Buffer]) -> bytes:
    """
    C{prefix} followed by the concatenation of C{parts} XORed with the 4-byte WebSocket C{mask}
    (masking and unmasking are the same operation), as one new C{bytes} object.

    The bytes are copied once (a join) and XORed in place in that fresh object, before anything
    else can see it; autobahn's masker instead copies the payload four times.
    """
    frame = b"".join([prefix, *parts])
    start = len(prefix)
    size = len(frame) - start
    if not size:
        return frame
    if frame is prefix or (len(parts) == 1 and frame is parts[0]):  # join handed back an input: copy it
        frame = bytes(bytearray(frame))
    if _nvx_lib is not None and size > 64:
        masker = _nvx_lib.nvx_xormask_new(_nvx_ffi.from_buffer("uint8_t[]", mask))
        if not masker:  # pragma: no cover
            raise MemoryError("could not allocate a WebSocket masker")
        try:
            _nvx_lib.nvx_xormask_process(masker, _nvx_ffi.from_buffer("uint8_t[]", frame) + start, size)
        finally:
            _nvx_lib.nvx_xormask_free(masker)
        return frame
    key = (mask * ((size >> 2) + 1))[:size]
    body = int.from_bytes(memoryview(frame)[start:], "little") ^ int.from_bytes(key, "little")
    return prefix + body.to_bytes(size, "little")


def nvx_masker_present() -> bool:
    """Whether L{masked_frame} masks in autobahn's compiled NVX code (else in Python, slower)."""
    return _nvx_lib is not None
