"""
Tests for L{tunnelkit.protocol.flowcontrol} (the extension messages, byte for byte, the window and
half-close arithmetic, the pacer) and for the flow-controlled paths of the source and destination
state machines (L{tunnelkit.protocol.session}).
"""

from __future__ import annotations

from typing import List, Sequence

from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.protocol.flowcontrol import (
    ANNOUNCE,
    EOF,
    MAX_WINDOW,
    OFFERED,
    WINDOW_UPDATE,
    WITHDRAWAL_FRAME,
    ConnectionFlow,
    Pacer,
    announcement_frame,
    eof_frame,
    parse_announcement,
    window_increment,
    window_update_frame,
)
from tunnelkit.protocol.framing import FrameDecoder, Message, encode_message, parse_message
from tunnelkit.protocol.session import (
    Action,
    LogEvent,
    CloseLocal,
    ConnectTarget,
    DestinationSession,
    HalfCloseLocal,
    PauseLocal,
    ResumeLocal,
    SendFrames,
    SourceSession,
    WriteLocal,
)

DATA = Message.DATA
STREAM_START = Message.STREAM_START
CONNECTION_START = Message.CONNECTION_START
CONNECTION_RESET = Message.CONNECTION_RESET
STREAM_RESET = Message.STREAM_RESET


def sent(actions: Sequence[Action]) -> List[Message]:
    """The messages of the SendFrames among C{actions}."""
    decoder = FrameDecoder()
    return [parse_message(body) for a in actions if isinstance(a, SendFrames) for body in decoder.feed(a.data)]


def others(actions: Sequence[Action]) -> List[Action]:
    """The actions that are not SendFrames (nor log lines)."""
    return [a for a in actions if not isinstance(a, (SendFrames, LogEvent))]


class WireTests(SynchronousTestCase):
    """The extension messages, byte for byte (protobuf's own encoding, AWS's schema unchanged)."""

    def test_window_update(self) -> None:
        self.assertEqual(
            window_update_frame(1, "SSH", 2, 65536),
            bytes.fromhex("0014" "08ea07" "1001" "1801" "220400010000" "2a03535348" "3802"),
        )
        message = parse_message(window_update_frame(1, "SSH", 2, 65536)[2:])
        self.assertEqual((message.type, message.ignorable, window_increment(message.payload)), (WINDOW_UPDATE, True, 65536))

    def test_eof(self) -> None:
        self.assertEqual(eof_frame(3, "", 1), bytes.fromhex("0009" "08eb07" "1003" "1801" "3801"))
        self.assertEqual(parse_message(eof_frame(3, "", 1)[2:]).type, EOF)

    def test_announcement(self) -> None:
        frame = announcement_frame(1 << 20)
        message = parse_message(frame[2:])
        self.assertEqual((message.type, message.ignorable), (ANNOUNCE, True))
        self.assertEqual(message.payload, b"flow-control/1;window=1048576;blocked half-close/1")
        self.assertEqual(WITHDRAWAL_FRAME, bytes.fromhex("0005" "08e907" "1801"))

    def test_parse_announcement(self) -> None:
        extensions = parse_announcement(b"flow-control/1;window=1048576 half-close/1")
        assert extensions is not None
        self.assertTrue(extensions.usable)
        self.assertEqual(extensions.window, 1 << 20)
        self.assertIsNone(parse_announcement(b""))
        for payload in (
            b"flow-control/1;window=1048576",  # no half-close
            b"half-close/1 flow-control/1",  # no window
            b"flow-control/1;window=abc half-close/1",
            b"flow-control/1;window=0 half-close/1",
            b"\xff\xfe garbage",
        ):
            parsed = parse_announcement(payload)
            self.assertFalse(parsed is not None and parsed.usable, payload)
        huge = parse_announcement(b"flow-control/1;window=9999999999 half-close/1 future/7;x=1")
        assert huge is not None
        self.assertEqual(huge.window, MAX_WINDOW)
        self.assertIn("future/7", huge.features)

    def test_bad_window_payload_is_zero(self) -> None:
        self.assertEqual(window_increment(b"\x00\x01"), 0)
        self.assertEqual(window_increment(b""), 0)


class ConnectionFlowTests(SynchronousTestCase):
    def test_credit(self) -> None:
        flow = ConnectionFlow(credit=100, window=1000)
        self.assertEqual(flow.take(60), 60)
        self.assertEqual(flow.take(60), 40)
        self.assertEqual(flow.take(1), 0)
        self.assertTrue(flow.grant(10))
        self.assertEqual(flow.credit, 10)
        self.assertFalse(flow.grant(0))
        self.assertFalse(flow.grant(MAX_WINDOW))
        self.assertEqual(flow.credit, 10)

    def test_receive_window_and_grants(self) -> None:
        flow = ConnectionFlow(credit=0, window=1000)
        self.assertTrue(flow.received(1000))
        self.assertFalse(flow.received(1))  # over the window
        self.assertEqual(flow.delivered(200), 0)  # below a quarter of the window
        self.assertEqual(flow.delivered(100), 300)
        self.assertEqual(flow.allowed, 300)
        self.assertTrue(flow.received(300))
        self.assertFalse(flow.received(1))

    def test_blocked_peer_and_a_reader_that_keeps_up_grow_the_window(self) -> None:
        flow = ConnectionFlow(credit=0, window=1000, max_window=4000)
        self.assertTrue(flow.received(1000))
        self.assertEqual(flow.delivered(200), 0)  # below a quarter: waits
        self.assertEqual(flow.blocked(1 << 20), 200 + 1000)  # what waits, and the window doubled
        self.assertEqual((flow.window, flow.growth, flow.allowed), (2000, 1000, 1200))
        self.assertEqual(flow.delivered(800), 800)
        self.assertTrue(flow.received(2000))
        self.assertEqual(flow.delivered(2000), 2000)
        self.assertEqual(flow.blocked(1 << 20), 2000)  # up to max_window
        self.assertEqual(flow.blocked(1 << 20), 0)  # at max_window, nothing waiting
        self.assertEqual((flow.window, flow.allowed), (4000, 4000))

    def test_growth_is_bounded_by_the_room_given(self) -> None:
        flow = ConnectionFlow(credit=0, window=1000, max_window=8000)
        self.assertEqual(flow.blocked(300), 300)
        self.assertEqual(flow.blocked(0), 0)
        self.assertEqual((flow.window, flow.allowed), (1300, 1300))

    def test_no_growth_without_a_maximum_above_the_window(self) -> None:
        flow = ConnectionFlow(credit=0, window=1000)
        self.assertEqual(flow.blocked(1 << 20), 0)

    def test_no_growth_while_the_local_buffer_is_full(self) -> None:
        flow = ConnectionFlow(credit=0, window=1000, max_window=8000)
        self.assertTrue(flow.received(1000))
        flow.filled(5.0)
        self.assertEqual(flow.blocked(1 << 20), 0)  # the application is the bottleneck
        flow.drained(1000, 5.0)  # taken at once once it read
        self.assertEqual(flow.delivered(1000), 1000)
        self.assertEqual(flow.blocked(1 << 20), 1000)

    def test_a_slow_reader_shrinks_the_window_which_pays_the_difference_first(self) -> None:
        flow = ConnectionFlow(credit=0, window=1 << 20, max_window=8 << 20)
        for _ in range(3):  # grow to 8 MiB
            flow.blocked(64 << 20)
        self.assertEqual(flow.window, 8 << 20)
        # the peer sends all of it; the application takes 3 MiB at once, then 5 MiB in a second
        self.assertTrue(flow.received(8 << 20))
        self.assertEqual(flow.delivered(3 << 20), 3 << 20)
        flow.filled(10.0)
        flow.drained(5 << 20, 11.0)  # 5 MiB/s: slow, toward 4 MiB
        self.assertEqual(flow.delivered(3 << 20), 0)  # pays 3 of the 4 MiB
        self.assertEqual(flow.window, 5 << 20)
        self.assertEqual(flow.blocked(64 << 20), 0)  # no growth while shrinking (nothing waits)
        self.assertEqual(flow.delivered(2 << 20), 1 << 20)  # pays the last MiB, grants 1 MiB
        self.assertEqual((flow.window, flow.growth), (4 << 20, 3 << 20))
        self.assertEqual(flow.allowed, 4 << 20)  # every byte accounted: the window, none held
        # a fast drain changes nothing; twice more, not below the announced window
        self.assertTrue(flow.received(1 << 20))
        flow.filled(20.0)
        flow.drained(1 << 20, 20.001)
        self.assertEqual(flow.delivered(1 << 20), 1 << 20)
        self.assertEqual(flow.window, 4 << 20)
        flow.shrink()
        flow.shrink()
        self.assertTrue(flow.received(4 << 20))
        self.assertEqual(flow.delivered(4 << 20), 1 << 20)
        self.assertEqual((flow.window, flow.growth), (1 << 20, 0))
        flow.shrink()
        self.assertTrue(flow.received(1 << 20))
        self.assertEqual(flow.delivered(1 << 20), 1 << 20)
        self.assertEqual(flow.window, 1 << 20)

    def test_half_close(self) -> None:
        flow = ConnectionFlow(0, 10)
        self.assertFalse(flow.ended)
        flow.eof_sent = True
        self.assertFalse(flow.ended)
        flow.eof_received = True
        self.assertTrue(flow.ended)


class PacerTests(SynchronousTestCase):
    def test_rate_and_burst(self) -> None:
        pacer = Pacer(rate=1000, burst=500, now=0.0)
        self.assertEqual(pacer.delay_after(500, 0.0), 0.0)
        self.assertEqual(pacer.delay_after(250, 0.0), 0.25)
        self.assertEqual(pacer.delay_after(0, 0.25), 0.0)
        self.assertEqual(pacer.delay_after(0, 100.0), 0.0)  # refills up to the burst only
        self.assertEqual(pacer.delay_after(1000, 100.0), 0.5)

    def test_bad_parameters(self) -> None:
        self.assertRaises(ValueError, Pacer, 0, 10, 0.0)
        self.assertRaises(ValueError, Pacer, 10, 0, 0.0)


def service_ids(*ids: str) -> Message:
    return Message(type=Message.SERVICE_IDS, availableServiceIds=list(ids))


class SessionFlowTestCase(SynchronousTestCase):
    """A source and a destination that both announced, and the messages between them by hand."""

    WINDOW = 1000
    #: What windows may grow to (no growth unless a test case says otherwise), and the tunnel's budget.
    MAX_WINDOW = 1000
    BUDGET = 1 << 20

    def announced(self, session, extensions: str = OFFERED) -> List[Action]:
        session.websocket_opened(extensions)
        actions = session.receive(service_ids("SSH"))
        return actions

    def peers(self):
        source = SourceSession(["SSH"], window=self.WINDOW)
        destination = DestinationSession(["SSH"], window=self.WINDOW)
        for session in (source, destination):
            session.max_window = self.MAX_WINDOW
            session.growth_budget = self.BUDGET
            actions = self.announced(session)
            (announcement,) = sent(actions)
            self.assertEqual(announcement.type, ANNOUNCE)
        for session, other in ((source, destination), (destination, source)):
            session.receive(parse_message(announcement_frame(other.window)[2:]))
            self.assertIsNotNone(session.peer_extensions)
        return source, destination

    def start(self, source, destination):
        connection_id, actions = source.local_accepted("SSH")
        start, marker = sent(actions)
        self.assertEqual((start.type, marker.type, window_increment(marker.payload)), (STREAM_START, WINDOW_UPDATE, self.WINDOW))
        # one WebSocket message: the start and its marker, then the boundary
        self.assertEqual([a.boundary for a in actions if isinstance(a, SendFrames)], [True])
        self.assertEqual(destination.receive(start), [ConnectTarget("SSH", 1, "SSH")])
        self.assertEqual(destination.receive(marker), [])
        destination.local_connected("SSH", 1)
        self.assertTrue(source.flow_controlled("SSH", 1))
        self.assertTrue(destination.flow_controlled("SSH", 1))
        return connection_id


class NegotiationTests(SessionFlowTestCase):
    def test_no_announcement_without_the_services_header(self) -> None:
        for extensions in ("", "flow-control/1", "something-else/1"):
            source = SourceSession(["SSH"])
            self.assertEqual(sent(self.announced(source, extensions)), [], extensions)
            # and an announcement that still arrives is ignored
            source.receive(parse_message(announcement_frame()[2:]))
            self.assertIsNone(source.peer_extensions)
            _, actions = source.local_accepted("SSH")
            self.assertEqual([m.type for m in sent(actions)], [STREAM_START])

    def test_without_the_peers_announcement_no_extension(self) -> None:
        source = SourceSession(["SSH"])
        self.announced(source)
        _, actions = source.local_accepted("SSH")
        self.assertEqual([m.type for m in sent(actions)], [STREAM_START])
        self.assertFalse(source.flow_controlled("SSH", 1))
        destination = DestinationSession(["SSH"])
        self.announced(destination)
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1))
        self.assertFalse(destination.flow_controlled("SSH", 1))

    def test_withdrawal_and_new_websocket_forget_the_peer(self) -> None:
        source, destination = self.peers()
        source.receive(parse_message(WITHDRAWAL_FRAME[2:]))
        self.assertIsNone(source.peer_extensions)
        source, destination = self.peers()
        source.websocket_lost()
        self.assertIsNone(source.peer_extensions)


class CreditTests(SessionFlowTestCase):
    def test_sender_pauses_that_connection_only_and_resumes_on_grant(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        actions = source.local_data("SSH", 1, b"a" * 1500)
        data, blocked = sent(actions)
        self.assertEqual(len(data.payload), self.WINDOW)
        self.assertEqual((blocked.type, window_increment(blocked.payload)), (WINDOW_UPDATE, 0))
        self.assertEqual(others(actions), [PauseLocal("SSH", 1)])
        # the destination writes it; its socket takes it: a grant once a quarter window waits
        self.assertEqual(destination.receive(data), [WriteLocal("SSH", 1, data.payload)])
        self.assertEqual(destination.local_delivered("SSH", 1, 100), [])
        (grant,) = sent(destination.local_delivered("SSH", 1, 400))
        self.assertEqual((grant.type, window_increment(grant.payload), grant.connectionId), (WINDOW_UPDATE, 500, 1))
        actions = source.receive(grant)
        (rest,) = sent(actions)
        self.assertEqual(rest.payload, b"a" * 500)
        self.assertEqual(others(actions), [ResumeLocal("SSH", 1)])

    def test_partial_grant_keeps_the_rest(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        source.local_data("SSH", 1, bytes(range(256)) * 8)  # 2048: 1000 go, 1048 held
        actions = source.receive(parse_message(window_update_frame(1, "SSH", 1, 300)[2:]))
        self.assertEqual([(m.type, len(m.payload)) for m in sent(actions)], [(DATA, 300), (WINDOW_UPDATE, 4)])
        self.assertEqual(others(actions), [])
        actions = source.receive(parse_message(window_update_frame(1, "SSH", 1, 5000)[2:]))
        self.assertEqual(b"".join(m.payload for m in sent(actions)), (bytes(range(256)) * 8)[1300:])
        self.assertEqual(others(actions), [ResumeLocal("SSH", 1)])

    def test_peer_over_its_window_resets_that_connection(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        source.local_accepted("SSH")
        too_much = Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x" * (self.WINDOW + 1))
        actions = source.receive(too_much)
        self.assertEqual(others(actions), [CloseLocal("SSH", 1, "the peer broke flow control", True)])
        self.assertEqual([a.level for a in actions if isinstance(a, LogEvent)], ["error"])
        self.assertEqual([(m.type, m.connectionId) for m in sent(actions)], [(CONNECTION_RESET, 1)])
        self.assertEqual(source.connections("SSH"), (2,))

    def test_destination_counts_what_it_sent_before_the_marker(self) -> None:
        destination = DestinationSession(["SSH"], window=self.WINDOW)
        self.announced(destination)
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1))
        destination.local_connected("SSH", 1)
        destination.local_data("SSH", 1, b"banner" * 10)  # 60 bytes before the marker arrived
        destination.receive(parse_message(window_update_frame(1, "SSH", 1, 100)[2:]))
        actions = destination.local_data("SSH", 1, b"y" * 100)
        self.assertEqual([len(m.payload) for m in sent(actions)], [40])
        self.assertEqual(others(actions), [PauseLocal("SSH", 1)])


class WindowGrowthTests(SessionFlowTestCase):
    """Receive windows that grow when the sender is blocked and the reader keeps up, within a budget."""

    MAX_WINDOW = 4000
    BUDGET = 4500

    def push(self, source, destination, connection_id: int, size: int) -> List[int]:
        """
        The source's application writes C{size} bytes; the destination's socket takes all it gets
        at once; every frame goes across.  The increments the destination granted.
        """
        increments = []
        queue = sent(source.local_data("SSH", connection_id, b"d" * size))
        while queue:
            message = queue.pop(0)
            if message.type == DATA:
                self.assertEqual(destination.receive(message), [WriteLocal("SSH", connection_id, message.payload)])
                grants = sent(destination.local_delivered("SSH", connection_id, len(message.payload)))
            else:
                grants = sent(destination.receive(message))
            for grant in grants:
                increments.append(window_increment(grant.payload))
                queue += sent(source.receive(grant))
        return increments

    def test_blocked_announced_and_sent_once_per_grant(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        self.assertTrue(destination.peer_extensions.blocked)
        actions = source.local_data("SSH", 1, b"b" * 1500)
        self.assertEqual([(m.type, len(m.payload)) for m in sent(actions)], [(DATA, 1000), (WINDOW_UPDATE, 4)])
        self.assertEqual(window_increment(sent(actions)[1].payload), 0)
        self.assertEqual(sent(source.local_data("SSH", 1, b"more")), [])  # once per grant
        # still short of credit after a grant: blocked again
        actions = source.receive(parse_message(window_update_frame(1, "SSH", 1, 100)[2:]))
        self.assertEqual([(m.type, len(m.payload)) for m in sent(actions)], [(DATA, 100), (WINDOW_UPDATE, 4)])
        # a grant of all that waits: nothing more
        actions = source.receive(parse_message(window_update_frame(1, "SSH", 1, 10000)[2:]))
        self.assertEqual([(m.type, len(m.payload)) for m in sent(actions)], [(DATA, 404)])

    def test_no_blocked_to_a_peer_that_did_not_announce_it(self) -> None:
        source, destination = self.peers()
        source.receive(parse_message(encode_message(Message(
            type=ANNOUNCE, ignorable=True, payload=b"flow-control/1;window=1000 half-close/1"))[2:]))
        self.start(source, destination)
        self.assertEqual([m.type for m in sent(source.local_data("SSH", 1, b"b" * 1500))], [DATA])

    def test_growth_within_the_tunnels_budget(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        # a sender blocked while the reader keeps up: the window doubles, to MAX_WINDOW
        self.assertEqual(self.push(source, destination, 1, 20000).count(0), 0)
        self.assertEqual(destination._growth_room(), self.BUDGET - 3000)
        # a second connection may grow only by what the budget has left: 4500 - 3000
        connection_id, actions = source.local_accepted("SSH")
        for message in sent(actions):
            destination.receive(message)
        destination.local_connected("SSH", connection_id)
        self.push(source, destination, connection_id, 20000)
        self.assertEqual(destination._growth_room(), 0)
        flows = [destination._flow("SSH", c).window for c in (1, connection_id)]
        self.assertEqual(flows, [4000, 2500])
        # the first closes: its growth goes back to the budget, and the second may take it
        source.local_closed("SSH", 1)
        destination.receive(Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1))
        self.push(source, destination, connection_id, 20000)
        self.assertEqual(destination._flow("SSH", connection_id).window, 4000)

    def test_a_slow_reader_shrinks_the_window(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        self.push(source, destination, 1, 20000)
        self.assertEqual(destination._flow("SSH", 1).window, 4000)
        # 4000 bytes into a full buffer, taken in 10 s: slow; the window halves, 2000 of them pay for it
        (data,) = [m for m in sent(source.local_data("SSH", 1, b"s" * 4000)) if m.type == DATA]
        destination.local_buffer_full("SSH", 1, 50.0)
        destination.receive(data)
        (grant,) = sent(destination.local_buffer_drained("SSH", 1, 4000, 60.0))
        self.assertEqual(window_increment(grant.payload), 2000)
        self.assertEqual(destination._flow("SSH", 1).window, 2000)

    def test_a_stalled_reader_does_not_grow(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        destination.local_buffer_full("SSH", 1, 1.0)
        queue = sent(source.local_data("SSH", 1, b"s" * 5000))
        self.assertEqual([m.type for m in queue], [DATA, WINDOW_UPDATE])
        destination.receive(queue[0])
        self.assertEqual(destination.receive(queue[1]), [])  # blocked, but the reader does not read
        self.assertEqual(destination._growth_room(), self.BUDGET)


class LateAnnouncementTests(SessionFlowTestCase):
    def test_connection_accepted_before_the_announcement_switches(self) -> None:
        """A connection accepted in the round trip before the destination's announcement arrived."""
        source = SourceSession(["SSH"], window=self.WINDOW)
        destination = DestinationSession(["SSH"], window=self.WINDOW)
        self.announced(source)
        self.announced(destination)
        _, actions = source.local_accepted("SSH")
        (start,) = sent(actions)
        (early,) = sent(source.local_data("SSH", 1, b"e" * 5000))  # no credit limit yet
        destination.receive(parse_message(announcement_frame(self.WINDOW)[2:]))
        destination.receive(start)
        destination.local_connected("SSH", 1)
        destination.receive(early)
        (marker,) = sent(source.receive(parse_message(announcement_frame(self.WINDOW)[2:])))
        self.assertEqual((marker.type, window_increment(marker.payload)), (WINDOW_UPDATE, self.WINDOW))
        self.assertEqual(destination.receive(marker), [])
        self.assertTrue(destination.flow_controlled("SSH", 1))
        self.assertEqual(len(sent(source.local_data("SSH", 1, b"f" * 1500))[0].payload), self.WINDOW)
        self.assertEqual(sent(source.local_eof("SSH", 1)), [])  # after the held bytes
        self.assertEqual(destination.receive(parse_message(eof_frame(1, "SSH", 1)[2:])), [HalfCloseLocal("SSH", 1)])

    def test_connection_that_heard_from_the_destination_stays_without(self) -> None:
        source = SourceSession(["SSH"], window=self.WINDOW)
        self.announced(source)
        source.local_accepted("SSH")
        source.receive(Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"banner"))
        self.assertEqual(source.receive(parse_message(announcement_frame(self.WINDOW)[2:])), [])
        self.assertFalse(source.flow_controlled("SSH", 1))


class HalfCloseTests(SessionFlowTestCase):
    def test_both_directions_end_then_the_connection(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        (eof,) = sent(source.local_eof("SSH", 1))
        self.assertEqual((eof.type, eof.streamId, eof.serviceId, eof.connectionId), (EOF, 1, "SSH", 1))
        self.assertEqual(source.local_eof("SSH", 1), [])  # once
        self.assertEqual(destination.receive(eof), [HalfCloseLocal("SSH", 1)])
        # the destination still answers, then its application closes too
        (answer,) = sent(destination.local_data("SSH", 1, b"answer"))
        self.assertEqual(source.receive(answer), [WriteLocal("SSH", 1, b"answer")])
        actions = destination.local_eof("SSH", 1)
        self.assertEqual([m.type for m in sent(actions)], [EOF, CONNECTION_RESET])
        self.assertEqual(others(actions), [CloseLocal("SSH", 1, "both applications closed their side")])
        eof_back, reset = sent(actions)
        actions = source.receive(eof_back)
        self.assertEqual(others(actions), [CloseLocal("SSH", 1, "both applications closed their side")])
        self.assertEqual(source.receive(reset), [])  # already ended

    def test_eof_waits_for_held_bytes(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        source.local_data("SSH", 1, b"z" * 1200)
        self.assertEqual(source.local_eof("SSH", 1), [])
        actions = source.receive(parse_message(window_update_frame(1, "SSH", 1, 500)[2:]))
        self.assertEqual([m.type for m in sent(actions)], [DATA, EOF])

    def test_eof_before_the_target_is_connected(self) -> None:
        source, destination = self.peers()
        _, actions = source.local_accepted("SSH")
        start, marker = sent(actions)
        destination.receive(start)
        destination.receive(marker)
        (data,) = sent(source.local_data("SSH", 1, b"request"))
        (eof,) = sent(source.local_eof("SSH", 1))
        self.assertEqual(destination.receive(data), [])
        self.assertEqual(destination.receive(eof), [])
        self.assertEqual(
            destination.local_connected("SSH", 1), [WriteLocal("SSH", 1, b"request"), HalfCloseLocal("SSH", 1)]
        )

    def test_reset_without_eof_is_a_failure(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        reset = Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1)
        self.assertEqual(source.receive(reset), [CloseLocal("SSH", 1, "the destination reset the connection", True)])

    def test_reset_after_eof_is_the_far_applications_close(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        source.receive(parse_message(eof_frame(1, "SSH", 1)[2:]))
        reset = Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1)
        self.assertEqual(source.receive(reset), [CloseLocal("SSH", 1, "the destination closed the connection")])

    def test_without_the_extension_a_local_eof_ends_the_connection(self) -> None:
        source = SourceSession(["SSH"])
        self.announced(source, "")
        source.local_accepted("SSH")
        actions = source.local_eof("SSH", 1)
        self.assertEqual([(m.type, m.connectionId) for m in sent(actions)], [(CONNECTION_RESET, 1)])
        (close,) = others(actions)
        self.assertIsInstance(close, CloseLocal)
        self.assertTrue(close.abort)  # type: ignore[union-attr]  # the answer is cut off: a reset
        # and the peer's CONNECTION_RESET is the protocol's normal end: a FIN
        source.local_accepted("SSH")
        reset = Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=2)
        self.assertEqual(source.receive(reset), [CloseLocal("SSH", 2, "the destination closed the connection")])

    def test_stale_extension_messages_dropped(self) -> None:
        source, destination = self.peers()
        self.start(source, destination)
        for frame in (
            window_update_frame(2, "SSH", 1, 10),  # stream
            window_update_frame(1, "SSH", 9, 10),  # connection
            window_update_frame(1, "SSH", 0, 10),  # no connection id
            eof_frame(1, "OTHER", 1),  # service
        ):
            self.assertEqual(source.receive(parse_message(frame[2:])), [])
