"""
Tests for L{tunnelkit.service.relaycore}: the sans-IO relaying core, driven byte for byte with frames
built by L{tunnelkit.protocol.framing}, its actions carried out into per-peer transcripts.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Dict, List, Sequence, Tuple

from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.protocol.flowcontrol import (
    ANNOUNCE,
    EOF,
    WINDOW_UPDATE,
    WITHDRAWAL_FRAME,
    announcement_frame,
    eof_frame,
    window_update_frame,
)
from tunnelkit.protocol.framing import MAX_WEBSOCKET_FRAME, encode_frame, encode_message
from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.service.handshake import CLOSE_POLICY, REASON_REPLACED
from tunnelkit.service.interfaces import DESTINATION, SOURCE
from tunnelkit.service.metrics import DESTINATION_TO_SOURCE, SOURCE_TO_DESTINATION, RelayMetrics
from tunnelkit.service.relaycore import (
    AS_IS,
    AS_IS_END,
    Action,
    Close,
    Forward,
    ForwardMessage,
    PeerState,
    Send,
    TunnelCore,
)

DATA = Message.DATA
STREAM_START = Message.STREAM_START
STREAM_RESET = Message.STREAM_RESET
CONNECTION_START = Message.CONNECTION_START
CONNECTION_RESET = Message.CONNECTION_RESET


def frame(type: int, stream: int = 1, service: str = "SSH", **fields: Any) -> bytes:
    """One tunnel frame (length prefix and protobuf body)."""
    return encode_message(Message(type=type, streamId=stream, serviceId=service, **fields))


def start(stream: int = 1, service: str = "SSH") -> bytes:
    return frame(STREAM_START, stream, service)


def data(payload: bytes, stream: int = 1, service: str = "SSH") -> bytes:
    return frame(DATA, stream, service, payload=payload)


def reset(stream: int = 1, service: str = "SSH") -> bytes:
    return frame(STREAM_RESET, stream, service)


class Wire:
    """
    A tunnel core and its peers, the core's actions carried out as the relay carries them out:
    per peer, the WebSocket messages it was sent (forwarded frames merged up to a message end, or
    to the end of the sender's read) and how it was closed.
    """

    def __init__(self, services: Sequence[str] = ("SSH",)) -> None:
        self.metrics = RelayMetrics()
        self.core = TunnelCore(services, self.metrics)
        self.states: Dict[str, PeerState] = {}
        self.messages: Dict[str, List[bytes]] = {}
        self.closed: Dict[str, Tuple[int, str, str]] = {}
        self._outbox: Dict[str, List[bytes]] = {}

    def attach(self, name: str, side: str, version: int = 3) -> List[Action]:
        """Attach peer C{name} on C{side}; returns (and carries out) the core's actions."""
        self.messages[name] = []
        self._outbox[name] = []
        state, actions = self.core.attach(side, version, owner=name)
        self.states[name] = state
        self.perform(actions, b"", name)
        return actions

    def detach(self, name: str, reset_streams: bool = True) -> List[Action]:
        actions = self.core.detach(self.states[name], reset_streams)
        self.perform(actions, b"", name)
        return actions

    def send(self, name: str, payload: bytes) -> Sequence[Action]:
        """Peer C{name} sends one binary WebSocket message; the read ends after it."""
        actions = self.core.received(self.states[name], payload)
        self.perform(actions, payload, name)
        return actions

    def send_bytewise(self, name: str, wire: bytes) -> List[Action]:
        """Peer C{name} sends C{wire} one byte per WebSocket message."""
        actions: List[Action] = []
        for index in range(len(wire)):
            actions += self.send(name, wire[index : index + 1])
        return actions

    def perform(self, actions: Sequence[Action], payload: bytes, sender: str) -> None:
        for action in actions:
            if isinstance(action, ForwardMessage):
                partner = self.states[sender].partner
                assert partner is not None, "forwarded with no partner"
                self._queue(partner.owner, payload, action.end_message)
            elif isinstance(action, Forward):
                for piece, end in action.frames:
                    self._queue(action.to.owner, bytes(piece), end)
            elif isinstance(action, Send):
                self._flush(action.to.owner)
                self.messages[action.to.owner] += list(action.frames)
            elif isinstance(action, Close):
                self.closed[action.peer.owner] = (action.code, action.reason, action.cause)
            else:
                raise AssertionError(f"unknown action {action!r}")
        for name in self._outbox:
            self._flush(name)

    def _queue(self, name: str, piece: bytes, end: bool) -> None:
        outbox = self._outbox[name]
        if sum(map(len, outbox)) + len(piece) > MAX_WEBSOCKET_FRAME:
            self._flush(name)
        outbox.append(piece)
        if end:
            self._flush(name)

    def _flush(self, name: str) -> None:
        if self._outbox[name]:
            self.messages[name].append(b"".join(self._outbox[name]))
            self._outbox[name] = []

    def take(self, name: str) -> List[bytes]:
        """The messages C{name} was sent since the last take."""
        taken, self.messages[name] = self.messages[name], []
        return taken

    def dropped(self, reason: str) -> float:
        return self.metrics.value("tunnelkit_dropped_frames_total", reason=reason)


def paired(services: Sequence[str] = ("SSH",), version: int = 3) -> Wire:
    """A wire with a source C{"s"} and a destination C{"d"}, their SERVICE_IDS taken."""
    wire = Wire(services)
    wire.attach("s", SOURCE, version)
    wire.attach("d", DESTINATION, version)
    wire.take("s")
    wire.take("d")
    return wire


class AttachTests(SynchronousTestCase):
    def test_service_ids_first(self) -> None:
        wire = Wire(("SSH", "RDP"))
        actions = wire.attach("s", SOURCE)
        expected = encode_message(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH", "RDP"]))
        self.assertEqual(actions, [Send(wire.states["s"], (expected,))])
        self.assertEqual(wire.take("s"), [expected])

    def test_no_services(self) -> None:
        wire = Wire(())
        wire.attach("s", SOURCE)
        self.assertEqual(wire.take("s"), [b"\x00\x02\x08\x05"])

    def test_pairing(self) -> None:
        wire = paired()
        source, destination = wire.states["s"], wire.states["d"]
        self.assertIs(source.partner, destination)
        self.assertIs(destination.partner, source)
        self.assertEqual(wire.core.peers, {SOURCE: source, DESTINATION: destination})

    def test_set_services(self) -> None:
        wire = paired(("SSH",))
        wire.core.set_services(["SSH", "RDP"])
        wire.send("s", start(service="RDP"))
        self.assertEqual(wire.take("d"), [start(service="RDP")])
        self.assertEqual(
            wire.core.service_ids_frame,
            encode_message(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH", "RDP"])),
        )


class ForwardingTests(SynchronousTestCase):
    """Frames go on unchanged, in order, with a message end after each start."""

    def test_whole_messages_go_on_as_is(self) -> None:
        wire = paired()
        self.assertIs(wire.send("s", start()), AS_IS_END)
        self.assertIs(wire.send("s", data(b"one") + data(b"two")), AS_IS)
        self.assertIs(wire.send("d", data(b"back")), AS_IS)
        self.assertEqual(wire.take("d"), [start(), data(b"one") + data(b"two")])
        self.assertEqual(wire.take("s"), [data(b"back")])

    def test_byte_for_byte(self) -> None:
        wire = paired()
        stream = start() + data(b"hello") + data(b"x" * 300) + reset() + start(2) + data(b"2", 2)
        actions = wire.send_bytewise("s", stream)
        self.assertTrue(all(isinstance(a, Forward) for a in actions), actions)
        received = wire.take("d")
        self.assertEqual(b"".join(received), stream)
        # Each frame is forwarded once whole (never a piece of one); a start ends its message.
        self.assertEqual(
            received, [start(), data(b"hello"), data(b"x" * 300), reset(), start(2), data(b"2", 2)]
        )
        self.assertEqual(wire.core.active_streams, {"SSH": 2})

    def test_a_start_inside_a_message_ends_it(self) -> None:
        wire = paired()
        actions = wire.send("s", start() + data(b"a") + data(b"b"))
        destination = wire.states["d"]
        self.assertEqual(
            actions, [Forward(destination, ((start(), True), (data(b"a"), False), (data(b"b"), False)))]
        )
        self.assertEqual(wire.take("d"), [start(), data(b"a") + data(b"b")])

    def test_frame_split_across_messages(self) -> None:
        wire = paired()
        wire.send("s", start())
        wire.take("d")
        whole = data(b"y" * 1000)
        self.assertEqual(wire.send("s", whole[:3]), ())
        self.assertEqual(wire.send("s", whole[3:] + data(b"z")[:1]), [Forward(wire.states["d"], ((whole, False),))])
        self.assertEqual(wire.send("s", data(b"z")[1:]), [Forward(wire.states["d"], ((data(b"z"), False),))])
        self.assertEqual(wire.take("d"), [whole, data(b"z")])

    def test_counted(self) -> None:
        wire = paired()
        wire.send("s", start() + data(b"abc"))
        wire.send("d", data(b"de"))
        self.assertEqual(wire.metrics._relayed[SOURCE_TO_DESTINATION], [2, len(start() + data(b"abc"))])
        self.assertEqual(wire.metrics._relayed[DESTINATION_TO_SOURCE], [1, len(data(b"de"))])

    def test_connection_start_to_an_absent_destination_is_reset(self) -> None:
        wire = Wire()
        wire.attach("s", SOURCE)
        wire.take("s")
        connection_start = frame(CONNECTION_START, 3, connectionId=7)
        wire.send("s", connection_start + start(4) + data(b"lost", 4))
        self.assertEqual(
            wire.take("s"),
            [frame(CONNECTION_RESET, 3, connectionId=7), reset(4)],
        )
        self.assertEqual(wire.dropped("peer_absent"), 3)
        self.assertEqual(wire.core.active_streams, {})

    def test_active_streams(self) -> None:
        """A STREAM_START sets its service's stream; a CONNECTION_START only one that has none."""
        wire = paired(("SSH", "RDP"))
        wire.send("s", frame(CONNECTION_START, 4, "RDP", connectionId=2))
        wire.send("s", start(1, "SSH") + frame(CONNECTION_START, 9, "SSH", connectionId=3))
        self.assertEqual(wire.core.active_streams, {"RDP": 4, "SSH": 1})
        wire.take("d")
        wire.detach("s")
        self.assertEqual(wire.take("d"), [reset(4, "RDP"), reset(1, "SSH")])

    def test_stream_reset_forgets_the_stream(self) -> None:
        wire = paired()
        wire.send("s", start(1, "SSH"))
        wire.send("d", reset(1, "SSH"))
        self.assertEqual(wire.core.active_streams, {})
        wire.detach("s")
        self.assertEqual(wire.take("d"), [start()])  # nothing to reset


class RuleTests(SynchronousTestCase):
    """A frame that breaks a rule closes its sender; what came before it goes on; the partner stays."""

    def assertViolation(self, wire: Wire, name: str, rule: str) -> None:
        code, reason, cause = wire.closed[name]
        self.assertEqual((code, cause), (CLOSE_POLICY, "violation"))
        self.assertTrue(reason.startswith(f"Protocol violation ({rule}): "), reason)

    def test_empty_service_id_on_a_multi_service_v3_tunnel(self) -> None:
        wire = paired(("SSH", "RDP"))
        wire.send_bytewise("s", start(1, ""))
        self.assertViolation(wire, "s", "missing_service_id")
        self.assertEqual(wire.take("d"), [])
        self.assertNotIn("d", wire.closed)

    def test_empty_service_id_on_a_single_service_tunnel(self) -> None:
        wire = paired(("SSH",))
        self.assertIs(wire.send("s", start(1, "")), AS_IS_END)
        self.assertIs(wire.send("s", data(b"v1 format", 1, "")), AS_IS)
        self.assertEqual(wire.closed, {})

    def test_switching_to_an_empty_service_id(self) -> None:
        wire = paired(("SSH", "RDP"))
        wire.send("s", start(1, "SSH") + start(2, ""))
        self.assertViolation(wire, "s", "service_id_mixing")
        self.assertEqual(wire.take("d"), [start(1, "SSH")])

    def test_frames_before_the_violation_go_on(self) -> None:
        wire = paired(("SSH", "RDP"))
        actions = wire.send("s", start(1, "SSH") + data(b"ok") + data(b"no", 1, "FTP") + data(b"never"))
        destination, source = wire.states["d"], wire.states["s"]
        self.assertEqual(actions[0], Forward(destination, ((start(1, "SSH"), True), (data(b"ok"), False))))
        self.assertEqual(len(actions), 2)
        self.assertIsInstance(actions[1], Close)
        self.assertIs(actions[1].peer, source)  # type: ignore[union-attr]
        self.assertViolation(wire, "s", "unknown_service_id")
        self.assertIn("'FTP'", wire.closed["s"][1])
        self.assertEqual(wire.take("d"), [start(1, "SSH"), data(b"ok")])

    def test_data_before_stream_start(self) -> None:
        wire = paired()
        wire.send("s", data(b"early"))
        self.assertViolation(wire, "s", "data_before_stream_start")
        self.assertEqual(wire.take("d"), [])

    def test_destination_data_needs_the_sources_start(self) -> None:
        wire = paired()
        wire.send("d", data(b"early"))
        self.assertViolation(wire, "d", "data_before_stream_start")
        wire = paired()
        wire.send("s", start())
        self.assertIs(wire.send("d", data(b"answer")), AS_IS)

    def test_destination_may_not_start(self) -> None:
        wire = paired()
        wire.send("d", start())
        self.assertViolation(wire, "d", "source_only_type")

    def test_v1_with_a_service_id(self) -> None:
        wire = paired(("SSH",), version=1)
        wire.send("s", start(1, "SSH"))
        self.assertViolation(wire, "s", "field_not_in_version")

    def test_unparseable_frame(self) -> None:
        wire = paired()
        wire.send("s", encode_frame(b"\xff\xff\xff"))
        self.assertViolation(wire, "s", "unparseable_frame")

    def test_stale_ids_go_on(self) -> None:
        """The relay checks ids against the rules, not against what is open: stale ones go on (each end drops them)."""
        wire = paired()
        wire.send("s", start(1))
        wire.send("s", start(2))
        self.assertIs(wire.send("s", data(b"old", 1)), AS_IS)
        self.assertIs(wire.send("d", reset(1)), AS_IS)  # a stale reset: stream 2 stays active
        self.assertEqual(wire.core.active_streams, {"SSH": 2})
        self.assertEqual(wire.take("d"), [start(1), start(2), data(b"old", 1)])
        self.assertEqual(wire.take("s"), [reset(1)])
        wire.detach("d")
        self.assertEqual(wire.take("s"), [reset(2)])
        self.assertEqual(wire.closed, {})


class ExtensionTests(SynchronousTestCase):
    """Extension messages reach a peer only when both peers announced and were told."""

    ANNOUNCEMENT = announcement_frame()

    def test_not_announced_dropped(self) -> None:
        wire = paired()
        wire.send("s", start())
        wire.take("d")
        window = window_update_frame(1, "SSH", 1, 4096)
        actions = wire.send("s", window + data(b"kept") + eof_frame(1, "SSH", 1))
        self.assertEqual(actions, [Forward(wire.states["d"], ((data(b"kept"), False),))])
        self.assertEqual(wire.take("d"), [data(b"kept")])
        self.assertEqual(wire.dropped("extension_not_announced"), 2)

    def test_not_announced_dropped_before_a_violation_too(self) -> None:
        wire = paired(("SSH", "RDP"))
        wire.send("s", start())
        wire.take("d")
        window = window_update_frame(1, "SSH", 1, 4096)
        actions = wire.send("s", window + data(b"kept") + data(b"no", 1, "FTP"))
        self.assertEqual(actions[0], Forward(wire.states["d"], ((data(b"kept"), False),)))
        self.assertIsInstance(actions[1], Close)
        self.assertEqual(wire.take("d"), [data(b"kept")])
        # nothing but extension frames before the violation: nothing goes on
        wire = paired(("SSH", "RDP"))
        wire.send("s", start())
        wire.take("d")
        actions = wire.send("s", window + data(b"no", 1, "FTP"))
        self.assertEqual([type(a) for a in actions], [Close])
        self.assertEqual(wire.take("d"), [])

    def test_announcements_exchanged_once_both_announced(self) -> None:
        wire = paired()
        other = announcement_frame(65536)
        self.assertEqual(wire.send("s", self.ANNOUNCEMENT), [])
        self.assertEqual((wire.take("s"), wire.take("d")), ([], []))
        wire.send_bytewise("d", other)
        self.assertEqual(wire.take("d"), [self.ANNOUNCEMENT])
        self.assertEqual(wire.take("s"), [other])
        self.assertEqual(wire.dropped("extension_not_announced"), 0)
        wire.send("s", start())
        window = window_update_frame(1, "SSH", 1, 4096)
        self.assertIs(wire.send("s", window), AS_IS)
        self.assertIs(wire.send("d", eof_frame(1, "SSH", 1)), AS_IS)
        self.assertEqual(wire.take("d"), [start(), window])
        self.assertEqual(wire.take("s"), [eof_frame(1, "SSH", 1)])

    def test_never_to_a_peer_that_did_not_announce(self) -> None:
        wire = paired()
        wire.send("s", self.ANNOUNCEMENT + start())
        wire.send("s", window_update_frame(1, "SSH", 1, 10) + eof_frame(1, "SSH", 1))
        self.assertEqual(wire.take("d"), [start()])
        self.assertEqual(wire.dropped("extension_not_announced"), 2)

    def test_an_empty_announcement_is_not_one(self) -> None:
        wire = paired()
        wire.send("s", WITHDRAWAL_FRAME)
        wire.send("d", self.ANNOUNCEMENT)
        self.assertEqual((wire.take("s"), wire.take("d")), ([], []))
        self.assertIsNone(wire.states["s"].announcement)

    def test_withdrawn_when_the_partner_goes(self) -> None:
        wire = paired()
        wire.send("s", self.ANNOUNCEMENT)
        wire.send("d", self.ANNOUNCEMENT)
        wire.take("s")
        self.assertEqual(wire.detach("d"), [Send(wire.states["s"], (WITHDRAWAL_FRAME,))])
        self.assertEqual(wire.take("s"), [WITHDRAWAL_FRAME])
        self.assertFalse(wire.states["s"].told)
        # A new destination that announces gets the source's stored announcement, and the source its.
        wire.attach("d2", DESTINATION)
        other = announcement_frame(1 << 20)
        wire.send("d2", other)
        self.assertEqual(wire.take("d2")[1:], [self.ANNOUNCEMENT])
        self.assertEqual(wire.take("s"), [other])

    def test_a_stored_announcement_is_not_reread(self) -> None:
        wire = paired()
        wire.send("s", self.ANNOUNCEMENT)
        self.assertEqual(wire.dropped("extension_not_announced"), 0)  # kept, not dropped
        wire.send("s", announcement_frame(1))  # a second one: dropped, not stored
        self.assertEqual(wire.states["s"].announcement, self.ANNOUNCEMENT)
        self.assertEqual(wire.dropped("extension_not_announced"), 1)

    def test_types(self) -> None:
        self.assertEqual((ANNOUNCE, WINDOW_UPDATE, EOF), (1001, 1002, 1003))


class ReplacementTests(SynchronousTestCase):
    """A new peer on a side replaces the one there; the other side learns its streams are gone."""

    def test_replacing_the_source(self) -> None:
        wire = paired()
        wire.send("s", start(1) + data(b"a"))
        wire.take("d")
        old = wire.states["s"]
        actions = wire.attach("s2", SOURCE)
        new, destination = wire.states["s2"], wire.states["d"]
        self.assertEqual(
            actions,
            [
                Send(new, (wire.core.service_ids_frame,)),
                Close(old, CLOSE_POLICY, REASON_REPLACED, "replaced"),
                Send(destination, (reset(1),)),
            ],
        )
        self.assertEqual(wire.take("d"), [reset(1)])
        self.assertEqual(wire.closed, {"s": (CLOSE_POLICY, REASON_REPLACED, "replaced")})
        self.assertIsNone(old.partner)
        self.assertIs(destination.partner, new)
        self.assertEqual(wire.detach("s"), [])  # the replaced peer's end changes nothing
        self.assertIs(wire.core.peers[SOURCE], new)
        # The new source starts afresh; the destination's answers reach it.
        wire.send("s2", data(b"b"))
        self.assertIn("s2", wire.closed)  # DATA before its own STREAM_START
        wire = paired()
        wire.attach("s2", SOURCE)
        wire.send("s2", start(5) + data(b"c", 5))
        self.assertIs(wire.send("d", data(b"back", 5)), AS_IS)
        self.assertEqual(wire.take("s2")[1:], [data(b"back", 5)])

    def test_replacing_a_told_peers_partner_withdraws(self) -> None:
        wire = paired()
        wire.send("s", ExtensionTests.ANNOUNCEMENT)
        wire.send("d", ExtensionTests.ANNOUNCEMENT)
        wire.send("s", start(3))
        wire.take("d")
        wire.attach("s2", SOURCE)
        self.assertEqual(wire.take("d"), [reset(3), WITHDRAWAL_FRAME])
        # Until the new source announces, nothing of the extensions passes either way.
        wire.send("s2", start(4))
        self.assertEqual(wire.send("d", window_update_frame(4, "SSH", 1, 10)), ())
        self.assertEqual(wire.dropped("extension_not_announced"), 1)

    def test_replacing_the_destination_keeps_what_the_source_started(self) -> None:
        wire = paired(("SSH", "RDP"))
        wire.send("s", start(1, "SSH") + start(2, "RDP"))
        wire.take("d")
        wire.attach("d2", DESTINATION)
        self.assertEqual(wire.take("s"), [reset(1, "SSH"), reset(2, "RDP")])
        self.assertEqual(wire.closed["d"], (CLOSE_POLICY, REASON_REPLACED, "replaced"))
        # The new destination may answer the source's earlier streams without a new start.
        self.assertIs(wire.send("d2", data(b"hi", 1, "SSH")), AS_IS)
        self.assertEqual(wire.take("s"), [data(b"hi", 1, "SSH")])

    def test_detach_without_resets(self) -> None:
        wire = paired()
        wire.send("s", start())
        wire.take("d")
        self.assertEqual(wire.detach("s", reset_streams=False), [])
        self.assertEqual(wire.core.active_streams, {})
        self.assertEqual(wire.core.peers, {DESTINATION: wire.states["d"]})
        self.assertIsNone(wire.states["d"].partner)
        self.assertEqual(wire.send("d", data(b"late")), ())
        self.assertEqual(wire.dropped("peer_absent"), 1)


class RenumberingTests(SynchronousTestCase):
    def test_frames_left_and_their_message_ends(self) -> None:
        from tunnelkit.service.relaycore import _without

        self.assertEqual(_without(range(6), [1, 4], [0, 1, 3, 5]), ([0, 2, 3, 5], [0, 2, 3]))
        self.assertEqual(_without(range(3), [], [2]), ([0, 1, 2], [2]))
        self.assertEqual(_without(range(2), [0, 1], [0]), ([], []))
        # thousands of starts in one message (review 11: this was quadratic, 0.7 s for 6,000)
        kept, cuts = _without(range(20001), [20000], list(range(20000)))
        self.assertEqual((len(kept), cuts[-1]), (20000, 19999))


class ConstantsTests(SynchronousTestCase):
    def test_as_is_constants(self) -> None:
        self.assertEqual(AS_IS, (ForwardMessage(False),))
        self.assertEqual(AS_IS_END, (ForwardMessage(True),))

    def test_below_the_websocket_edge(self) -> None:
        """The core imports neither the protocol that performs its actions nor the transports."""
        from tests.test_layering import forbidden_path, import_graph, source_modules

        graph = import_graph(source_modules())
        for forbidden in ("tunnelkit.service.relay", "tunnelkit.service.pairing", "tunnelkit.transport"):
            self.assertIsNone(forbidden_path(graph, "tunnelkit.service.relaycore", forbidden), forbidden)

    def test_no_reactor(self) -> None:
        """Importing the core installs no reactor (it is plain Python)."""
        probe = "import sys, tunnelkit.service.relaycore; print('twisted.internet.reactor' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "False"), out.stderr)
