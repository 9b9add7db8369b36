"""
L{tunnelkit.transport.coalesce}: a TCP transport's writes of one reactor turn go out together at its
end, without watching the socket when the kernel takes them; Twisted's path takes over otherwise.
Driven on a real socket pair with a memory reactor's clock (no waiting).
"""

from __future__ import annotations

import socket
from typing import Any, List

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.transport import coalesce


class _Port:
    _realPortNumber = 1


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.lost: List[Any] = []

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)


class _CountingSocket:
    """A real socket, recording what goes to C{send} (the data) and C{sendmsg} (how many pieces)."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.sent: List[bytes] = []
        self.gathered: List[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return self.real.send(data)

    def sendmsg(self, pieces: List[bytes]) -> int:
        self.gathered.append(len(pieces))
        return self.real.sendmsg(pieces)


class CoalesceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.addCleanup(coalesce.install(self.reactor, environ={}))
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.peer.setblocking(False)
        self.addCleanup(self.peer.close)
        self.protocol = _Recorder()
        self.transport = tcp.Server(ours, self.protocol, ("127.0.0.1", 2), _Port(), 1, self.reactor)
        self.protocol.makeConnection(self.transport)
        self.addCleanup(lambda: ours.close())

    def received(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_one_turns_writes_go_together_at_its_end(self) -> None:
        self.assertTrue(coalesce.installed())
        self.transport.write(b"one ")
        self.transport.writeSequence([b"two ", b"", b"three"])
        self.assertEqual(self.received(), b"")  # not before the turn ends
        self.assertEqual(self.reactor.getWriters(), [])
        self.reactor.advance(0)
        self.assertEqual(self.received(), b"one two three")
        self.assertEqual(self.reactor.getWriters(), [])  # never watched for writability

    def test_what_the_kernel_does_not_take_waits_for_writability(self) -> None:
        payload = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than a socket pair buffers
        self.transport.write(payload)
        self.reactor.advance(0)
        self.assertEqual(self.reactor.getWriters(), [self.transport])  # Twisted's path from here
        got = self.received()
        while len(got) < len(payload):
            self.transport.doWrite()
            got += self.received()
        self.assertEqual(got, payload)
        self.assertEqual(self.reactor.getWriters(), [])  # drained: Twisted stopped watching

    def test_a_write_while_watched_is_twisteds(self) -> None:
        self.transport.write(bytes(16 << 20))
        self.reactor.advance(0)
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        self.transport.write(b"more")
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # nothing queued: the reactor sends it

    def test_lose_connection_after_a_write_flushes_then_closes(self) -> None:
        self.transport.write(b"last words")
        self.transport.loseConnection()  # Twisted's path: watched until the buffer is empty
        self.reactor.advance(0)
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        result = self.transport.doWrite()
        self.assertEqual(self.received(), b"last words")
        self.assertIsNotNone(result)  # the reactor then ends the connection (ConnectionDone)

    def test_a_failed_send_goes_to_twisteds_path(self) -> None:
        self.peer.close()
        self.transport.write(b"x" * 100)
        self.reactor.advance(0)
        # the send failed (EPIPE): the transport is left to Twisted's path, whose next doWrite reports
        # the error to the reactor (which then ends the connection)
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        self.assertIsNotNone(self.transport.doWrite())

    def test_pieces_gathered_in_one_sendmsg(self) -> None:
        """Several pieces go out in one sendmsg, unjoined; the socket is never watched."""
        counting = self.transport.socket = _CountingSocket(self.transport.socket)  # type: ignore[assignment]
        self.transport.writeSequence([b"a" * 1000, b"b" * 2000])
        self.transport.write(b"c" * 3000)
        self.reactor.advance(0)
        self.assertEqual(counting.gathered, [3])
        self.assertEqual(self.received(), b"a" * 1000 + b"b" * 2000 + b"c" * 3000)
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual((self.transport._tempDataBuffer, self.transport.dataBuffer), ([], b""))

    def test_gathered_rest_waits_for_writability_in_order(self) -> None:
        """What the kernel does not take of gathered pieces goes to Twisted's path, in order."""
        pieces = [bytes([n]) * (256 * 1024 + n) for n in range(64)]  # ~16 MiB in 64 pieces
        self.transport.writeSequence(pieces)
        self.reactor.advance(0)
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        got = self.received()
        while self.reactor.getWriters():
            self.transport.doWrite()
            got += self.received()
        self.assertEqual(got, b"".join(pieces))

    def test_drained_gather_resumes_a_paused_producer(self) -> None:
        """A producer paused by a full buffer is resumed once a gathered send takes everything."""
        resumed: List[bool] = []

        class Producer:
            def pauseProducing(self) -> None:
                resumed.append(False)

            def resumeProducing(self) -> None:
                resumed.append(True)

            def stopProducing(self) -> None:
                pass

        self.transport.registerProducer(Producer(), True)
        self.transport.bufferSize = 1000
        self.transport.writeSequence([b"x" * 800, b"y" * 800])  # over bufferSize: paused
        self.assertEqual(resumed, [False])
        self.reactor.advance(0)
        self.assertEqual(resumed, [False, True])
        self.assertEqual(self.received(), b"x" * 800 + b"y" * 800)

    def test_a_failed_gathered_send_goes_to_twisteds_path(self) -> None:
        self.peer.close()
        self.transport.writeSequence([b"x" * 100, b"y" * 100])
        self.reactor.advance(0)
        self.assertEqual(self.reactor.getWriters(), [self.transport])
        self.assertIsNotNone(self.transport.doWrite())

    def test_one_piece_in_one_send(self) -> None:
        """A turn's single write goes out with one send of the piece as it is (no join, no doWrite)."""
        counting = self.transport.socket = _CountingSocket(self.transport.socket)  # type: ignore[assignment]
        self.transport.doWrite = lambda: self.fail("Twisted's doWrite called")  # type: ignore[method-assign]
        payload = b"p" * 5000
        self.transport.write(payload)
        self.reactor.advance(0)
        self.assertEqual(len(counting.sent), 1)
        self.assertIs(counting.sent[0], payload)
        self.assertEqual(self.received(), payload)
        self.assertEqual((self.transport._tempDataBuffer, self.transport.dataBuffer), ([], b""))

    def test_writes_during_an_event_dispatch_go_at_its_end(self) -> None:
        """Told that the reactor dispatches events, the coalescer sends at their end, with no timed call."""
        listener = coalesce.events_listener()
        assert listener is not None
        listener.events_begin()
        self.transport.write(b"in ")
        self.transport.writeSequence([b"the ", b"dispatch"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.received(), b"")
        listener.events_end()
        self.assertEqual(self.received(), b"in the dispatch")
        self.transport.write(b" and after")  # outside a dispatch (a timed call's write): a timed flush
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(0)
        self.assertEqual(self.received(), b" and after")

    def test_a_dispatch_ending_with_a_flush_already_timed(self) -> None:
        """A write from a timed call, then a dispatch: everything goes at the dispatch's end, once."""
        listener = coalesce.events_listener()
        assert listener is not None
        self.transport.write(b"timed ")
        listener.events_begin()
        self.transport.write(b"dispatched")
        listener.events_end()
        self.assertEqual(self.received(), b"timed dispatched")
        self.reactor.advance(0)  # the timed flush finds nothing left
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.reactor.getWriters(), [])

    def test_an_aborted_connections_writes_are_dropped(self) -> None:
        """Written, then aborted in the same turn: nothing goes out (Twisted drops it too), one piece or several."""
        self.transport.write(b"never ")
        self.transport.writeSequence([b"sent", b"!"])
        self.transport.abortConnection()
        self.reactor.advance(0)
        self.assertEqual(self.received(), b"")

    def test_not_bytes_refused(self) -> None:
        self.assertRaises(TypeError, self.transport.write, "text")
        self.assertRaises(TypeError, self.transport.writeSequence, ["text"])

    def test_off_by_environment_and_installed_once(self) -> None:
        self.assertTrue(coalesce.installed())
        self.assertIsNotNone(coalesce.install(self.reactor, environ={}))  # a second call: no change
        self.assertTrue(coalesce.installed())


class OffTests(SynchronousTestCase):
    def test_environment_turns_it_off(self) -> None:
        reactor = MemoryReactorClock()
        uninstall = coalesce.install(reactor, environ={coalesce.ENVIRONMENT: "0"})
        self.addCleanup(uninstall)
        self.assertFalse(coalesce.installed())

    def test_uninstall_restores_twisteds_write(self) -> None:
        before = tcp.Server.write
        uninstall = coalesce.install(MemoryReactorClock(), environ={})
        self.assertIsNot(tcp.Server.write, before)
        uninstall()
        self.assertIs(tcp.Server.write, before)
        self.assertFalse(coalesce.installed())

    def test_nothing_missing_here(self) -> None:
        self.assertEqual(coalesce.missing(MemoryReactorClock()), [])

    def test_no_listener_when_off(self) -> None:
        self.assertIsNone(coalesce.events_listener())
