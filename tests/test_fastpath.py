"""
Tests for L{tunnelkit.transport.fastpath}: the WebSocket fast path the relay and the local proxy
share, against autobahn's own parser on real protocols in memory, and its check at start.
"""

from __future__ import annotations

import os
import sys
from typing import List, Tuple

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from txaio.testutil import replace_loop
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit import internals
from tunnelkit.protocol.framing import MAX_WEBSOCKET_FRAME
from tunnelkit.transport import fastpath
from tunnelkit.transport.websocket import masked_frame


class _Server(fastpath.FastWebSocket, WebSocketServerProtocol):
    masked_in = True

    def __init__(self) -> None:
        super().__init__()
        self.fast: List[bytes] = []
        self.general: List[Tuple[bytes, bool]] = []

    def fast_message(self, mask, parts, size):
        payload = masked_frame(b"", mask, parts)
        assert len(payload) == size
        self.fast.append(payload)

    def onMessage(self, payload, isBinary):
        self.general.append((bytes(payload), isBinary))


class _Client(fastpath.FastWebSocket, WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.fast: List[bytes] = []
        self.general: List[Tuple[bytes, bool]] = []

    def fast_message(self, mask, parts, size):
        assert mask is None
        payload = b"".join(bytes(p) for p in parts)
        assert len(payload) == size
        self.fast.append(payload)

    def onMessage(self, payload, isBinary):
        self.general.append((bytes(payload), isBinary))


def open_pair(compact: bool = False) -> Tuple[_Client, _Server]:
    """
    A client and a server, open to each other in memory; with C{compact}, the server's class carries
    its factory's options and it released its handshake state at open (as the relay's peers do).
    """
    reactor = MemoryReactorClock()
    pair = []
    for factory_class, protocol_class in ((WebSocketClientFactory, _Client), (WebSocketServerFactory, _Server)):
        factory = factory_class("ws://127.0.0.1:1/", reactor=reactor)
        factory.setProtocolOptions(openHandshakeTimeout=0, autoPingInterval=0, autoFragmentSize=0)
        if compact and protocol_class is _Server:
            protocol_class = fastpath.with_factory_options(_Server, factory)
        protocol = protocol_class()
        protocol.factory = factory
        protocol.makeConnection(StringTransport())
        pair.append(protocol)
    client, server = pair
    server.dataReceived(client.transport.value())
    if compact:
        fastpath.release_handshake_state(server)
    client.dataReceived(server.transport.value())
    client.transport.clear()
    server.transport.clear()
    return client, server


def frames(sender, messages) -> bytes:
    """What C{sender} writes for C{messages} (bytes: binary; str: text; None: a ping), autobahn's framing."""
    sender.transport.clear()
    for message in messages:
        if message is None:
            sender.sendPing(b"p")
        elif isinstance(message, str):
            sender.sendMessage(message.encode(), isBinary=False)
        else:
            sender.sendMessage(message, isBinary=True)
    data = sender.transport.value()
    sender.transport.clear()
    return data


def feed(receiver, data: bytes, cuts: List[int]) -> None:
    last = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        if cut > last:
            receiver.dataReceived(data[last:cut])
            last = cut


MESSAGES = st.lists(
    st.one_of(st.binary(min_size=0, max_size=300), st.integers(1, 140000).map(lambda n: os.urandom(n)),
              st.sampled_from([MAX_WEBSOCKET_FRAME, MAX_WEBSOCKET_FRAME + 1]).map(lambda n: os.urandom(n)),
              st.text(max_size=20), st.none()),
    max_size=6,
)


class FastPathTests(SynchronousTestCase):
    def tearDown(self) -> None:
        fastpath.set_enabled(True)

    def test_installed_autobahn_has_every_name(self) -> None:
        self.assertEqual(fastpath.missing(), [])
        self.assertTrue(fastpath.ENABLED)

    def test_a_missing_name_is_reported_and_listed_in_internals(self) -> None:
        self.patch(fastpath, "AUTOBAHN_ATTRIBUTES", fastpath.AUTOBAHN_ATTRIBUTES + (("instance", "no_such_state"),))
        self.assertEqual(fastpath.missing(), ["autobahn.websocket.protocol.WebSocketProtocol.no_such_state"])
        warnings: List[str] = []
        internals.check_internals(internals.INTERNALS, warn=warnings.append)  # optional: no exception
        self.assertEqual(len(warnings), 1)
        self.assertIn("the WebSocket fast path of the relay and the local proxy", warnings[0])

    @settings(max_examples=60, deadline=None)
    @given(MESSAGES, st.lists(st.integers(0, 1 << 20), max_size=8), st.booleans(), st.booleans())
    def test_same_messages_as_autobahn_any_split(self, messages, cuts, enabled, compact) -> None:
        """
        Both directions, split anywhere: binary messages of at most MAX_WEBSOCKET_FRAME bytes by the
        fast path (when on), the rest (text, larger binary messages) by autobahn, in order; the same
        with a compact server (L{fastpath.release_handshake_state}).
        """
        fastpath.set_enabled(enabled)
        binary = [m for m in messages if isinstance(m, bytes) and len(m) <= MAX_WEBSOCKET_FRAME]
        texts = [(m.encode(), False) if isinstance(m, str) else (m, True) for m in messages
                 if isinstance(m, str) or (isinstance(m, bytes) and len(m) > MAX_WEBSOCKET_FRAME)]
        client, server = open_pair(compact)
        for sender, receiver in ((client, server), (server, client)):
            feed(receiver, frames(sender, messages), cuts)
            if enabled:
                self.assertEqual(receiver.fast, binary)
                self.assertEqual(receiver.general, texts)
            else:
                self.assertEqual(receiver.fast, [])
                self.assertEqual(receiver.general, [(m, True) if isinstance(m, bytes) else (m.encode(), False)
                                                    for m in messages if m is not None])
            self.assertEqual(receiver.state, receiver.STATE_OPEN)

    def test_fragmented_message_goes_through_autobahn(self) -> None:
        client, server = open_pair()
        client.beginMessage(isBinary=True)
        client.sendMessageFrame(b"first ")
        client.sendMessageFrame(b"second")
        client.endMessage()
        server.dataReceived(client.transport.value())
        self.assertEqual((server.fast, server.general), ([], [(b"first second", True)]))

    def test_handshake_state_names_are_autobahns(self) -> None:
        """Every name release_handshake_state drops is one an open autobahn server has (an upgrade shows here)."""
        _, server = open_pair()
        self.assertEqual([name for name in fastpath.AUTOBAHN_HANDSHAKE_STATE if name not in vars(server)], [])
        idle = {name: value for name, value in vars(server).items() if name in fastpath.AUTOBAHN_IDLE_DEFAULTS}
        self.assertEqual(idle, fastpath.AUTOBAHN_IDLE_DEFAULTS)

    def test_compact_server_is_smaller_and_keeps_its_options(self) -> None:
        _, plain = open_pair()
        _, compact = open_pair(compact=True)
        self.assertLess(sys.getsizeof(vars(compact)) + sys.getsizeof(compact.send_queue),
                        (sys.getsizeof(vars(plain)) + sys.getsizeof(plain.send_queue)) // 3)
        self.assertNotIn("http_headers", vars(compact))
        self.assertIsInstance(compact, _Server)
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            self.assertEqual(getattr(compact, name), getattr(compact.factory, name), name)

    def test_compact_server_sends_chopped(self) -> None:
        """autobahn's send queue (chopped sends) works on a compact server (closes: tests.test_relay)."""
        client, server = open_pair(compact=True)
        clock = Clock()
        with replace_loop(clock):
            server.sendData(b"abcdefghij", chopsize=4)  # autobahn's queue, one piece per reactor turn
            for _ in range(3):
                clock.advance(1)
        self.assertEqual(server.transport.value(), b"abcdefghij")
        self.assertEqual(len(server.send_queue), 0)

    def test_release_is_for_open_sessions_only(self) -> None:
        factory = WebSocketServerFactory("ws://127.0.0.1:1/", reactor=MemoryReactorClock())
        factory.setProtocolOptions(openHandshakeTimeout=0, autoPingInterval=0)
        server = fastpath.with_factory_options(_Server, factory)()
        server.factory = factory
        server.makeConnection(StringTransport())
        before = dict(vars(server))
        fastpath.release_handshake_state(server)  # still connecting: untouched
        self.assertEqual(vars(server), before)

    def test_plain_send_writes_through(self) -> None:
        client, server = open_pair()
        server.sendData(b"raw")
        self.assertEqual(server.transport.value(), b"raw")


class LazyHandshakeLoggingTests(SynchronousTestCase):
    """autobahn formats its configuration for a debug line on every connection: only when written now."""

    def test_installed_in_autobahn(self) -> None:
        import autobahn.websocket.protocol as protocol_module

        self.assertTrue(fastpath.lazy_handshake_logging())
        self.assertIs(protocol_module.pformat, fastpath._pformat_lazily_for_logs)

    def test_a_list_is_formatted_when_written(self) -> None:
        from pprint import pformat

        from twisted.logger import formatEvent

        value = [("autoPingInterval", 0, "WebSocketServerFactory")] * 30
        lazy = fastpath._pformat_lazily_for_logs(value)
        self.assertIsInstance(lazy, fastpath.LazyText)
        self.assertEqual(str(lazy), pformat(value))
        self.assertEqual(formatEvent({"log_format": "\n{attrs}", "attrs": lazy}), "\n" + pformat(value))
        self.assertEqual(fastpath._pformat_lazily_for_logs({"a": 1}), pformat({"a": 1}))  # others: at once, a str

    def test_autobahn_timings_still_print(self) -> None:
        from autobahn.websocket.protocol import Timings

        timings = Timings()
        timings.track("x")
        self.assertIsInstance(str(timings), str)
        self.assertIn("x", str(timings))


class _Recorder:
    """A protocol that records what it reads."""

    def __init__(self) -> None:
        self.got: List[bytes] = []
        self.lost: List[object] = []

    def makeConnection(self, transport) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class DirectReadsTests(SynchronousTestCase):
    """L{fastpath.direct_reads}: a transport's reads skip Twisted's forwarding protocols, nothing else does."""

    def _chain(self, tls: bool):
        from twisted.application._client_service import _ReconnectingProtocolProxy
        from twisted.internet.defer import Deferred
        from twisted.internet.endpoints import _WrappingProtocol
        from twisted.internet.protocol import Factory
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

        protocol = _Recorder()
        lost: List[object] = []
        proxy = _ReconnectingProtocolProxy(protocol, lost.append)
        tcp = StringTransport()
        if tls:  # TCP -> endpoint wrapper -> a ProtocolWrapper (as TLS is) -> ClientService's proxy -> protocol
            layer = ProtocolWrapper(WrappingFactory(Factory()), proxy)
            bottom = _WrappingProtocol(Deferred(), layer)
            tcp.protocol = bottom
            layer.transport = tcp
            protocol.transport = layer
        else:  # TCP -> endpoint wrapper -> ClientService's proxy -> protocol
            bottom = _WrappingProtocol(Deferred(), proxy)
            tcp.protocol = bottom
            protocol.transport = tcp
            layer = None
        return protocol, proxy, bottom, layer, lost

    def test_tcp_reads_reach_the_protocol_directly(self) -> None:
        protocol, proxy, bottom, _, lost = self._chain(tls=False)
        self.assertEqual(fastpath.direct_reads(protocol), 1)
        self.assertEqual(bottom.dataReceived, protocol.dataReceived)
        bottom.dataReceived(b"abc")
        self.assertEqual(protocol.got, [b"abc"])
        # the connection's end still goes through ClientService's proxy (its reconnection hook)
        bottom.connectionLost("gone")
        self.assertEqual((protocol.lost, lost), (["gone"], ["gone"]))

    def test_tls_layers_each_call_the_next_directly(self) -> None:
        protocol, proxy, bottom, layer, lost = self._chain(tls=True)
        self.assertEqual(fastpath.direct_reads(protocol), 2)
        self.assertEqual(bottom.dataReceived, layer.dataReceived)
        self.assertEqual(proxy.dataReceived, protocol.dataReceived)
        bottom.dataReceived(b"xyz")
        self.assertEqual(protocol.got, [b"xyz"])

    def test_nothing_to_skip(self) -> None:
        protocol = _Recorder()
        protocol.transport = StringTransport()
        protocol.transport.protocol = protocol
        self.assertEqual(fastpath.direct_reads(protocol), 0)
        self.assertNotIn("dataReceived", vars(protocol))
        self.assertEqual(fastpath.direct_reads(_Recorder()), 0)  # no transport at all

    def test_forwarders_are_installed_and_listed(self) -> None:
        self.assertEqual(fastpath.forwarders_missing(), [])
        self.patch(fastpath, "FORWARDERS", fastpath.FORWARDERS + (("twisted.internet.endpoints", "_NoSuch", "x"),))
        self.assertEqual(fastpath.forwarders_missing(), ["twisted.internet.endpoints._NoSuch"])
        warnings: List[str] = []
        internals.check_internals(internals.INTERNALS, warn=warnings.append)
        self.assertEqual(len(warnings), 1)
        self.assertIn("forwarding protocols", warnings[0])


class _Listener:
    """What the event dispatch tells (the write coalescer's part), recorded."""

    def __init__(self) -> None:
        self.heard: List[str] = []

    def events_begin(self) -> None:
        self.heard.append("begin")

    def events_end(self) -> None:
        self.heard.append("end")


class _PipeReader:
    """A selectable reading one end of a pipe; records the log context each read ran in."""

    def __init__(self, fd: int, prefix: str, fail: bool = False) -> None:
        self.fd = fd
        self.prefix = prefix
        self.fail = fail
        self.systems: List[str] = []
        self.lost: List[object] = []

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return self.prefix

    def doRead(self):
        from twisted.python import context, log

        os.read(self.fd, 100)
        self.systems.append(context.get(log.ILogContext)["system"])
        if self.fail:
            raise RuntimeError("a broken handler")
        return None

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class EventDispatchTests(SynchronousTestCase):
    """L{fastpath.install_event_dispatch}: the epoll reactor's events, with Twisted's log context."""

    def reactor(self, listener=None, handle=None):
        """A private epoll reactor with the dispatch installed (C{handle}: its C{_doReadOrWrite} instead)."""
        try:
            from twisted.internet.epollreactor import EPollReactor
        except ImportError:  # pragma: no cover - not Linux
            raise self.skipTest("no epoll here")
        reactor = EPollReactor()  # a private one: the global reactor is never touched
        self.addCleanup(reactor._poller.close)
        if handle is not None:
            reactor._doReadOrWrite = handle
        self.assertTrue(fastpath.install_event_dispatch(reactor, listener))
        return reactor

    def test_the_listener_hears_each_dispatch_begin_and_end(self) -> None:
        listener = _Listener()
        reactor = self.reactor(listener)
        one = self.pipe(reactor, "One,client")

        def read() -> None:
            listener.heard.append("read")
            _PipeReader.doRead(one)

        one.doRead = read  # type: ignore[method-assign]
        reactor.doIteration(0)
        self.assertEqual(listener.heard, ["begin", "read", "end"])
        reactor.doIteration(0)  # no events: no dispatch to tell of
        self.assertEqual(listener.heard, ["begin", "read", "end"])

    def test_the_listener_hears_the_end_when_a_handler_escapes(self) -> None:
        """Twisted's handler logs what a selectable raises; were anything to escape it, the end is still told."""

        def escaping(selectable, fd, event) -> None:
            raise KeyboardInterrupt()

        listener = _Listener()
        reactor = self.reactor(listener, handle=escaping)
        self.pipe(reactor, "One,client")
        self.assertRaises(KeyboardInterrupt, reactor.doIteration, 0)
        self.assertEqual(listener.heard, ["begin", "end"])

    def pipe(self, reactor, prefix: str, fail: bool = False) -> _PipeReader:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        self.addCleanup(os.close, read_end)
        reader = _PipeReader(read_end, prefix, fail)
        reactor.addReader(reader)
        self.addCleanup(lambda: reactor.removeReader(reader))
        os.write(write_end, b"x")
        return reader

    def test_each_event_runs_with_its_selectables_log_prefix(self) -> None:
        from twisted.python import context, log

        reactor = self.reactor()
        one, two = self.pipe(reactor, "One,client"), self.pipe(reactor, "Two,3,127.0.0.1")
        before = context.get(log.ILogContext)
        reactor.doIteration(0)
        self.assertEqual((one.systems, two.systems), (["One,client"], ["Two,3,127.0.0.1"]))
        self.assertEqual(context.get(log.ILogContext), before)  # popped again
        reactor.doIteration(0)  # nothing ready: nothing called
        self.assertEqual(len(one.systems) + len(two.systems), 2)

    def test_a_failing_handler_is_logged_and_disconnected_as_twisted_does(self) -> None:
        reactor = self.reactor()
        broken = self.pipe(reactor, "Broken,client", fail=True)
        events: List[dict] = []
        from twisted.python import log

        log.addObserver(events.append)
        self.addCleanup(log.removeObserver, events.append)
        reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(broken.lost), 1)
        self.assertIn("Broken,client", [e.get("system") for e in events if e.get("isError")])

    def test_only_an_epoll_reactor(self) -> None:
        reactor = MemoryReactorClock()
        self.assertFalse(fastpath.install_event_dispatch(reactor))
        self.assertNotIn("doIteration", vars(reactor))
        self.assertEqual(fastpath.reactor_missing(None), [])
