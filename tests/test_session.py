"""
Tests for L{tunnelkit.protocol.session}: the DATA encoder against protobuf, scripted source and
destination sessions for V1, V2 and V3, and whole conversations between a source and a destination
wired through an in-memory relay that enforces L{tunnelkit.protocol.rules}.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tunnelkit.errors import ConfigError, FramingError, TunnelkitError
from tunnelkit.protocol.framing import (
    MAX_PAYLOAD_SIZE,
    MAX_WEBSOCKET_FRAME,
    FrameDecoder,
    Message,
    encode_message,
    parse_message,
)
from tunnelkit.protocol.rules import PeerRules
from tunnelkit.protocol.session import (
    DESTINATION_RESET,
    LogEvent,
    INT32_MAX,
    UINT32_MAX,
    WRONG_CONFIGURATION,
    Action,
    CloseLocal,
    ConnectTarget,
    DataFrameEncoder,
    DestinationSession,
    Fatal,
    LocalConnectionRefused,
    SendFrames,
    SourceSession,
    StartListening,
    WriteLocal,
)

DATA = Message.DATA
STREAM_START = Message.STREAM_START
STREAM_RESET = Message.STREAM_RESET
SESSION_RESET = Message.SESSION_RESET
SERVICE_IDS = Message.SERVICE_IDS
CONNECTION_START = Message.CONNECTION_START
CONNECTION_RESET = Message.CONNECTION_RESET


def frame(**fields: object) -> bytes:
    return encode_message(Message(**fields))  # type: ignore[arg-type]


def service_ids(*ids: str) -> Message:
    return Message(type=SERVICE_IDS, availableServiceIds=list(ids))


def messages(actions: Sequence[Action]) -> List[Message]:
    """The messages of the SendFrames among C{actions}, checking each holds whole frames."""
    found = []
    for action in actions:
        if isinstance(action, SendFrames):
            decoder = FrameDecoder()
            found += [parse_message(body) for body in decoder.feed(action.data)]
            assert decoder.buffered == 0, "SendFrames must hold whole frames"
            assert len(action.data) <= MAX_WEBSOCKET_FRAME
    return found


def quiet(actions: Sequence[Action]) -> List[Action]:
    """C{actions} without their log lines."""
    return [a for a in actions if not isinstance(a, LogEvent)]


def only(actions: Sequence[Action]) -> Message:
    """The single message sent by C{actions}, which hold nothing else (but log lines)."""
    actions = quiet(actions)
    assert len(actions) == 1 and isinstance(actions[0], SendFrames), actions
    (message,) = messages(actions)
    return message


class SessionTestCase(SynchronousTestCase):
    def assertLogged(self, actions: Sequence[Action], level: str) -> None:
        """C{actions} are one log line at C{level} and nothing else (a message dropped, and said)."""
        self.assertEqual([type(a) for a in actions], [LogEvent], actions)
        self.assertEqual(actions[0].level, level, actions)  # type: ignore[union-attr]
        self.assertTrue(actions[0].format, actions)  # type: ignore[union-attr]


class DataFrameEncoderTests(SynchronousTestCase):
    """Hand-built DATA frames are exactly protobuf's."""

    def test_vector(self) -> None:
        """Reference section 1.5: DATA streamId=1 payload="hi" serviceId="SSH" connectionId=1."""
        self.assertEqual(
            DataFrameEncoder(1, "SSH", 1).encode(b"hi"),
            [bytes.fromhex("000f 0801 1001 22026869 2a03535348 3801")],
        )

    def test_empty(self) -> None:
        self.assertEqual(DataFrameEncoder(1).encode(b""), [])

    @settings(max_examples=150, deadline=None)
    @given(
        stream_id=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        service_id=st.text(max_size=128),
        connection_id=st.integers(min_value=0, max_value=2**32 - 1),
        size=st.one_of(
            st.integers(min_value=1, max_value=300),
            st.sampled_from(
                [MAX_PAYLOAD_SIZE - 1, MAX_PAYLOAD_SIZE, MAX_PAYLOAD_SIZE + 1, 2 * MAX_PAYLOAD_SIZE,
                 2 * MAX_PAYLOAD_SIZE + 1, 5 * MAX_PAYLOAD_SIZE + 7, 300_000]
            ),
        ),
        kind=st.sampled_from([bytes, bytearray, memoryview]),
    )
    def test_byte_exact(
        self, stream_id: int, service_id: str, connection_id: int, size: int, kind: type
    ) -> None:
        payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        batches = DataFrameEncoder(stream_id, service_id, connection_id).encode(kind(payload))
        expected = b"".join(
            encode_message(
                Message(
                    type=DATA,
                    streamId=stream_id,
                    payload=payload[start : start + MAX_PAYLOAD_SIZE],
                    serviceId=service_id,
                    connectionId=connection_id,
                )
            )
            for start in range(0, size, MAX_PAYLOAD_SIZE)
        )
        self.assertEqual(b"".join(batches), expected)
        for batch in batches:
            self.assertLessEqual(len(batch), MAX_WEBSOCKET_FRAME)
            decoder = FrameDecoder()
            decoder.feed(batch)
            self.assertEqual(decoder.buffered, 0)
        # Greedy batching: a batch ends only when the next frame would not fit in it.
        for batch, following in zip(batches, batches[1:]):
            next_frame = int.from_bytes(following[:2], "big") + 2
            self.assertGreater(len(batch) + next_frame, MAX_WEBSOCKET_FRAME)


class SourceTestCase(SessionTestCase):
    def ready_source(
        self, mapping: Optional[Sequence[str]] = ("SSH",), tunnel: Sequence[str] = ("SSH",), **kwargs: object
    ) -> SourceSession:
        source = SourceSession(mapping, **kwargs)  # type: ignore[arg-type]
        self.assertEqual(source.websocket_opened(), [])
        actions = source.receive(service_ids(*tunnel))
        self.assertTrue(all(isinstance(action, StartListening) for action in actions), actions)
        return source


class SourceConfigTests(SynchronousTestCase):
    def test_bad_client_type(self) -> None:
        error = self.assertRaises(ConfigError, SourceSession, ["SSH"], "V4")
        self.assertIn("V1, V2, V3", str(error))

    def test_v1_one_service(self) -> None:
        error = self.assertRaises(ConfigError, SourceSession, ["A", "B"], "V1")
        self.assertIn("one service only", str(error))

    def test_bad_mappings(self) -> None:
        self.assertRaises(ConfigError, SourceSession, [])
        self.assertRaises(ConfigError, SourceSession, ["A", "A"])
        self.assertRaises(ConfigError, SourceSession, ["", "A"])
        self.assertRaises(ConfigError, SourceSession, ["A"], "V3", 0)
        self.assertRaises(ConfigError, DestinationSession, [])


class SourceServiceIdsTests(SourceTestCase):
    def test_listen_after_service_ids(self) -> None:
        source = SourceSession(["SSH", "HTTP"])
        source.websocket_opened()
        self.assertEqual(source.services, {})
        self.assertFalse(source.ready)
        actions = source.receive(service_ids("HTTP", "SSH"))
        self.assertEqual(
            sorted(actions, key=repr),
            [StartListening("HTTP", "HTTP"), StartListening("SSH", "SSH")],
        )
        self.assertTrue(source.ready)
        self.assertEqual(source.services, {"SSH": "SSH", "HTTP": "HTTP"})

    def test_accept_before_service_ids(self) -> None:
        source = SourceSession(["SSH"])
        self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH")
        source.websocket_opened()
        self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH")

    def test_mismatch(self) -> None:
        for mapping, tunnel in [
            (["SSH"], ["SSH", "HTTP"]),
            (["SSH", "HTTP"], ["SSH"]),
            (["SSH"], ["FTP"]),
            (["SSH"], []),
            ([""], ["A", "B"]),
        ]:
            source = SourceSession(mapping)
            source.websocket_opened()
            (fatal,) = source.receive(service_ids(*tunnel))
            self.assertIsInstance(fatal, Fatal)
            self.assertTrue(fatal.message.startswith(WRONG_CONFIGURATION), fatal)  # type: ignore[union-attr]
            self.assertFalse(source.ready)

    def test_bare_port_renamed(self) -> None:
        """A bare port (V1 format) takes the name of the tunnel's only service."""
        source = SourceSession([""])
        source.websocket_opened()
        self.assertEqual(source.receive(service_ids("SSH")), [StartListening("SSH", "")])
        connection_id, actions = source.local_accepted("SSH")
        self.assertEqual(
            only(actions), Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
        )

    def test_bare_port_without_services(self) -> None:
        source = SourceSession([""])
        source.websocket_opened()
        self.assertEqual(source.receive(service_ids()), [StartListening("", "")])
        connection_id, actions = source.local_accepted("")
        self.assertEqual(only(actions), Message(type=STREAM_START, streamId=1, connectionId=1))

    def test_adopt_tunnel_services(self) -> None:
        """Without a mapping, listen for every service the tunnel has."""
        source = SourceSession(None)
        source.websocket_opened()
        self.assertEqual(
            source.receive(service_ids("A", "B")), [StartListening("A", "A"), StartListening("B", "B")]
        )

    def test_later_service_ids_ignored(self) -> None:
        source = self.ready_source()
        self.assertLogged(source.receive(service_ids("SSH")), "debug")
        self.assertLogged(source.receive(service_ids("OTHER")), "debug")

    def test_v1_multi_service_tunnel(self) -> None:
        source = SourceSession(None, "V1")
        source.websocket_opened()
        (fatal,) = source.receive(service_ids("A", "B"))
        self.assertIsInstance(fatal, Fatal)
        self.assertIn("V1", fatal.message)  # type: ignore[union-attr]


class SourceV3Tests(SourceTestCase):
    def test_conversation(self) -> None:
        """The script of reference section 1.10 and localproxy-observed.md."""
        source = self.ready_source()
        first, actions = source.local_accepted("SSH")
        self.assertEqual(first, 1)
        self.assertTrue(actions[0].boundary)  # type: ignore[union-attr]
        self.assertEqual(
            only(actions), Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
        )
        self.assertEqual(source.active_streams, {"SSH": 1})
        second, actions = source.local_accepted("SSH")
        self.assertEqual(second, 2)
        self.assertTrue(actions[0].boundary)  # type: ignore[union-attr]
        self.assertEqual(
            only(actions), Message(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=2)
        )
        self.assertEqual(source.connections("SSH"), (1, 2))

        data = source.local_data("SSH", 2, b"hello")
        self.assertFalse(data[0].boundary)  # type: ignore[union-attr]
        self.assertEqual(
            only(data),
            Message(type=DATA, streamId=1, serviceId="SSH", connectionId=2, payload=b"hello"),
        )
        reply = Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"back")
        self.assertEqual(source.receive(reply), [WriteLocal("SSH", 1, b"back")])

        self.assertEqual(
            only(source.local_closed("SSH", 1)),
            Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1),
        )
        # The destination's own CONNECTION_RESET for it crosses ours: a harmless duplicate.
        duplicate = Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1)
        self.assertEqual(source.receive(duplicate), [])
        self.assertEqual(source.local_closed("SSH", 1), [])
        # The stream stays up: the next accept is a CONNECTION_START with a new id.
        third, actions = source.local_accepted("SSH")
        self.assertEqual(third, 3)
        self.assertEqual(only(actions).type, CONNECTION_START)

        # The destination closes connection 2.
        reset = Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=2)
        self.assertEqual(
            source.receive(reset), [CloseLocal("SSH", 2, "the destination closed the connection")]
        )
        self.assertEqual(source.local_data("SSH", 2, b"late"), [])
        self.assertEqual(source.receive(reset), [])

        # STREAM_RESET closes every connection of the service; the next accept starts stream 2.
        actions = source.receive(Message(type=STREAM_RESET, streamId=1, serviceId="SSH"))
        self.assertEqual(actions, [CloseLocal("SSH", 3, DESTINATION_RESET, True)])
        self.assertIn("is a destination local proxy connected to the tunnel", DESTINATION_RESET)
        self.assertEqual(source.active_streams, {})
        fourth, actions = source.local_accepted("SSH")
        self.assertEqual(fourth, 4)
        self.assertEqual(
            only(actions), Message(type=STREAM_START, streamId=2, serviceId="SSH", connectionId=4)
        )

    def test_stale_messages_dropped(self) -> None:
        source = self.ready_source(["A", "B"], ["A", "B"])
        source.local_accepted("A")
        for message in [
            Message(type=DATA, streamId=2, serviceId="A", connectionId=1, payload=b"x"),  # stream
            Message(type=DATA, streamId=1, serviceId="A", connectionId=7, payload=b"x"),  # connection
            Message(type=DATA, streamId=1, serviceId="B", connectionId=1, payload=b"x"),  # no stream
            Message(type=DATA, streamId=1, serviceId="C", connectionId=1, payload=b"x"),  # service
            Message(type=DATA, streamId=1, connectionId=1, payload=b"x"),  # ambiguous: 2 services
            Message(type=STREAM_RESET, streamId=2, serviceId="A"),
            Message(type=STREAM_RESET, streamId=1, serviceId="B"),
            Message(type=CONNECTION_RESET, streamId=2, serviceId="A", connectionId=1),
            Message(type=CONNECTION_RESET, streamId=1, serviceId="A", connectionId=5),
        ]:
            self.assertEqual(quiet(source.receive(message)), [], message)
        self.assertEqual(source.connections("A"), (1,))

    def test_zero_connection_id_is_one(self) -> None:
        """Reference 1.7 rule 10: an omitted connection id means connection 1."""
        source = self.ready_source()
        source.local_accepted("SSH")
        message = Message(type=DATA, streamId=1, serviceId="SSH", payload=b"x")
        self.assertEqual(source.receive(message), [WriteLocal("SSH", 1, b"x")])

    def test_session_reset(self) -> None:
        source = self.ready_source(["A", "B"], ["A", "B"])
        source.local_accepted("A")
        source.local_accepted("A")
        source.local_accepted("B")
        actions = source.receive(Message(type=SESSION_RESET))
        self.assertEqual(
            actions,
            [
                CloseLocal("A", 1, "the tunnel service reset the session", True),
                CloseLocal("A", 2, "the tunnel service reset the session", True),
                CloseLocal("B", 1, "the tunnel service reset the session", True),
            ],
        )
        self.assertEqual(source.active_streams, {})
        _, actions = source.local_accepted("A")
        self.assertEqual(only(actions), Message(type=STREAM_START, streamId=2, serviceId="A", connectionId=3))

    def test_independent_stream_counters(self) -> None:
        """Stream ids count per service (V2 guide: SSH1 -> 1, SSH2 -> 1)."""
        source = self.ready_source(["A", "B"], ["A", "B"])
        _, a = source.local_accepted("A")
        _, b = source.local_accepted("B")
        self.assertEqual((only(a).streamId, only(b).streamId), (1, 1))
        self.assertEqual((only(a).connectionId, only(b).connectionId), (1, 1))

    def test_stream_id_wraps(self) -> None:
        source = self.ready_source()
        source._services["SSH"].last_stream_id = INT32_MAX - 1
        ids = []
        for _ in range(3):
            connection_id, actions = source.local_accepted("SSH")
            ids.append(only(actions).streamId)
            source.receive(Message(type=STREAM_RESET, streamId=ids[-1], serviceId="SSH"))
        self.assertEqual(ids, [INT32_MAX, 1, 2])

    def test_connection_id_wraps_skipping_open_ones(self) -> None:
        source = self.ready_source()
        first, _ = source.local_accepted("SSH")
        self.assertEqual(first, 1)
        source._services["SSH"].last_connection_id = UINT32_MAX - 1
        ids = [source.local_accepted("SSH")[0] for _ in range(3)]
        self.assertEqual(ids, [UINT32_MAX, 2, 3])

    def test_max_connections(self) -> None:
        source = self.ready_source(max_connections=2)
        source.local_accepted("SSH")
        source.local_accepted("SSH")
        error = self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH")
        self.assertIn("already has 2 connections", str(error))
        self.assertIsInstance(error, TunnelkitError)
        source.local_closed("SSH", 1)
        self.assertEqual(source.local_accepted("SSH")[0], 3)

    def test_chosen_connection_id(self) -> None:
        """An adapter may have a connection carried under an id it announced (FTP data)."""
        source = self.ready_source()
        data_id = 0x80000001
        connection_id, actions = source.local_accepted("SSH", data_id)
        self.assertEqual(connection_id, data_id)
        self.assertEqual(
            only(actions), Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=data_id)
        )
        # The counter goes on from 1, and the chosen id cannot be taken twice.
        self.assertEqual(source.local_accepted("SSH")[0], 1)
        error = self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH", data_id)
        self.assertIn("already in use", str(error))
        for bad in (0, -1, UINT32_MAX + 1):
            error = self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH", bad)
            self.assertIn("out of range", str(error))
        _, actions = source.local_accepted("SSH", 7)
        self.assertEqual(
            only(actions), Message(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=7)
        )
        self.assertEqual(
            source.receive(Message(type=DATA, streamId=1, serviceId="SSH", connectionId=data_id, payload=b"d")),
            [WriteLocal("SSH", data_id, b"d")],
        )

    def test_chosen_connection_id_needs_v3(self) -> None:
        source = self.ready_source(client_type="V2")
        error = self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH", 5)
        self.assertIn("V2 has no connection ids", str(error))

    def test_unknown_listener(self) -> None:
        source = self.ready_source()
        self.assertRaises(LocalConnectionRefused, source.local_accepted, "FTP")
        self.assertEqual(source.local_data("FTP", 1, b"x"), [])
        self.assertEqual(source.local_closed("FTP", 1), [])

    def test_large_data(self) -> None:
        """Local reads larger than a payload become several DATA frames, batched per WebSocket message."""
        source = self.ready_source()
        source.local_accepted("SSH")
        payload = bytes(range(256)) * 1000
        actions = source.local_data("SSH", 1, payload)
        self.assertEqual(len(actions), 2)
        found = messages(actions)
        self.assertEqual([len(m.payload) for m in found], [64512, 64512, 64512, 256000 - 3 * 64512])
        self.assertEqual(b"".join(m.payload for m in found), payload)

    def test_websocket_lost_and_reconnect(self) -> None:
        """Losing the WebSocket closes every connection; listeners stay; ids keep counting."""
        source = self.ready_source()
        source.local_accepted("SSH")
        source.local_accepted("SSH")
        self.assertEqual(
            source.websocket_lost(),
            [
                CloseLocal("SSH", 1, "the tunnel's WebSocket connection was lost", True),
                CloseLocal("SSH", 2, "the tunnel's WebSocket connection was lost", True),
            ],
        )
        self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH")
        self.assertEqual(source.websocket_opened(), [])
        self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH")
        self.assertEqual(source.receive(service_ids("SSH")), [])  # already listening
        connection_id, actions = source.local_accepted("SSH")
        self.assertEqual(
            only(actions), Message(type=STREAM_START, streamId=2, serviceId="SSH", connectionId=3)
        )

    def test_websocket_replaced(self) -> None:
        """A new WebSocket without websocket_lost first still closes the old connections."""
        source = self.ready_source()
        source.local_accepted("SSH")
        self.assertEqual(
            source.websocket_opened(), [CloseLocal("SSH", 1, "the tunnel's WebSocket was replaced", True)]
        )

    def test_reconnect_with_other_services(self) -> None:
        source = SourceSession(None)
        source.websocket_opened()
        source.receive(service_ids("A"))
        source.websocket_opened()
        (fatal,) = source.receive(service_ids("B"))
        self.assertIsInstance(fatal, Fatal)

    def test_start_messages_dropped(self) -> None:
        """A source receiving STREAM_START or CONNECTION_START drops it and keeps its streams."""
        source = self.ready_source()
        source.local_accepted("SSH")
        for message_type in (STREAM_START, CONNECTION_START):
            message = Message(type=message_type, streamId=1, serviceId="SSH", connectionId=1)
            self.assertLogged(source.receive(message), "error")
        self.assertEqual(source.connections("SSH"), (1,))

    def test_unknown_types(self) -> None:
        """Unknown types are dropped, ignorable or not: nothing a peer sends stops the proxy."""
        source = self.ready_source()
        source.local_accepted("SSH")
        self.assertLogged(source.receive(Message(type=12, ignorable=True)), "debug")
        self.assertLogged(source.receive(Message(type=12)), "error")
        self.assertLogged(source.receive(Message(type=0)), "error")
        self.assertEqual(source.connections("SSH"), (1,))

    def test_feed(self) -> None:
        """feed takes WebSocket bytes in any split."""
        source = SourceSession(["SSH"])
        source.websocket_opened()
        stream = frame(type=SERVICE_IDS, availableServiceIds=["SSH"])
        self.assertEqual(source.feed(stream[:3]), [])
        self.assertEqual(source.feed(stream[3:]), [StartListening("SSH", "SSH")])
        source.local_accepted("SSH")
        data = frame(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"ab")
        self.assertEqual(
            source.feed(data + data), [WriteLocal("SSH", 1, b"ab"), WriteLocal("SSH", 1, b"ab")]
        )
        self.assertRaises(FramingError, source.feed, b"\x00\x01\xff")


class SourceV1V2Tests(SourceTestCase):
    def test_v1(self) -> None:
        """-y V1: no service id, no connection id, one connection at a time, STREAM_RESET on close."""
        source = self.ready_source(client_type="V1")
        first, actions = source.local_accepted("SSH")
        self.assertEqual(only(actions), Message(type=STREAM_START, streamId=1))
        self.assertTrue(actions[0].boundary)  # type: ignore[union-attr]
        error = self.assertRaises(LocalConnectionRefused, source.local_accepted, "SSH")
        self.assertIn("one connection at a time", str(error))
        self.assertEqual(
            only(source.local_data("SSH", first, b"hi")),
            Message(type=DATA, streamId=1, payload=b"hi"),
        )
        self.assertEqual(
            source.receive(Message(type=DATA, streamId=1, payload=b"yo")), [WriteLocal("SSH", first, b"yo")]
        )
        self.assertEqual(only(source.local_closed("SSH", first)), Message(type=STREAM_RESET, streamId=1))
        self.assertEqual(source.active_streams, {})
        # Late DATA of the closed stream is stale.
        self.assertLogged(source.receive(Message(type=DATA, streamId=1, payload=b"late")), "debug")
        second, actions = source.local_accepted("SSH")
        self.assertEqual(only(actions), Message(type=STREAM_START, streamId=2))
        self.assertEqual(
            source.receive(Message(type=STREAM_RESET, streamId=2)),
            [CloseLocal("SSH", second, DESTINATION_RESET)],
        )
        self.assertEqual(only(source.local_accepted("SSH")[1]), Message(type=STREAM_START, streamId=3))

    def test_v1_tunnel_without_services(self) -> None:
        source = self.ready_source([""], [], client_type="V1")
        _, actions = source.local_accepted("")
        self.assertEqual(only(actions), Message(type=STREAM_START, streamId=1))

    def test_v2(self) -> None:
        """-y V2: service ids, no connection id, one connection per stream."""
        source = self.ready_source(["A", "B"], ["A", "B"], client_type="V2")
        a, actions = source.local_accepted("A")
        self.assertEqual(only(actions), Message(type=STREAM_START, streamId=1, serviceId="A"))
        b, actions = source.local_accepted("B")
        self.assertEqual(only(actions), Message(type=STREAM_START, streamId=1, serviceId="B"))
        self.assertRaises(LocalConnectionRefused, source.local_accepted, "B")
        self.assertEqual(
            only(source.local_data("B", b, b"x")), Message(type=DATA, streamId=1, serviceId="B", payload=b"x")
        )
        self.assertEqual(
            source.receive(Message(type=DATA, streamId=1, serviceId="A", payload=b"y")),
            [WriteLocal("A", a, b"y")],
        )
        # The V2 guide's example: B is reset, restarts as stream 2; DATA for B stream 1 is ignored.
        self.assertEqual(only(source.local_closed("B", b)), Message(type=STREAM_RESET, streamId=1, serviceId="B"))
        b2, actions = source.local_accepted("B")
        self.assertEqual(only(actions), Message(type=STREAM_START, streamId=2, serviceId="B"))
        self.assertLogged(source.receive(Message(type=DATA, streamId=1, serviceId="B", payload=b"z")), "debug")
        self.assertEqual(
            source.receive(Message(type=DATA, streamId=2, serviceId="B", payload=b"z")),
            [WriteLocal("B", b2, b"z")],
        )

    def test_v2_connection_reset_ends_stream(self) -> None:
        source = self.ready_source(client_type="V2")
        connection_id, _ = source.local_accepted("SSH")
        actions = source.receive(Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH"))
        self.assertEqual(actions, [CloseLocal("SSH", connection_id, "the destination closed the connection")])
        self.assertEqual(only(source.local_accepted("SSH")[1]).streamId, 2)


class DestinationTestCase(SessionTestCase):
    def ready_destination(
        self, mapping: Sequence[str] = ("SSH",), tunnel: Sequence[str] = ("SSH",)
    ) -> DestinationSession:
        destination = DestinationSession(mapping)
        self.assertEqual(destination.websocket_opened(), [])
        self.assertEqual(destination.receive(service_ids(*tunnel)), [])
        self.assertTrue(destination.ready)
        return destination


class DestinationV3Tests(DestinationTestCase):
    def test_conversation(self) -> None:
        destination = self.ready_destination()
        start = Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
        self.assertEqual(destination.receive(start), [ConnectTarget("SSH", 1, "SSH")])
        self.assertEqual(destination.active_streams, {"SSH": 1})
        # DATA right behind the STREAM_START waits for the target connection.
        early = Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"early")
        self.assertEqual(destination.receive(early), [])
        self.assertEqual(destination.buffered_bytes, 5)
        self.assertEqual(destination.local_connected("SSH", 1), [WriteLocal("SSH", 1, b"early")])
        self.assertEqual(destination.buffered_bytes, 0)
        self.assertEqual(destination.receive(early), [WriteLocal("SSH", 1, b"early")])
        self.assertEqual(
            only(destination.local_data("SSH", 1, b"banner")),
            Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"banner"),
        )
        second = Message(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=2)
        self.assertEqual(destination.receive(second), [ConnectTarget("SSH", 2, "SSH")])
        destination.local_connected("SSH", 2)
        self.assertEqual(destination.connections("SSH"), (1, 2))
        # The target closes connection 1; the source's reset for it crosses ours.
        self.assertEqual(
            only(destination.local_closed("SSH", 1)),
            Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1),
        )
        reset = Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1)
        self.assertEqual(destination.receive(reset), [])
        self.assertEqual(destination.local_closed("SSH", 1), [])
        # The source closes connection 2.
        reset = Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=2)
        self.assertEqual(destination.receive(reset), [CloseLocal("SSH", 2, "the source closed the connection")])
        self.assertEqual(destination.receive(reset), [])
        self.assertEqual(destination.active_streams, {"SSH": 1})  # the stream stays up

    def test_stream_reset(self) -> None:
        destination = self.ready_destination()
        destination.receive(Message(type=STREAM_START, streamId=4, serviceId="SSH", connectionId=1))
        destination.receive(Message(type=CONNECTION_START, streamId=4, serviceId="SSH", connectionId=2))
        destination.receive(Message(type=DATA, streamId=4, serviceId="SSH", connectionId=2, payload=b"xyz"))
        self.assertEqual(destination.buffered_bytes, 3)
        self.assertEqual(destination.receive(Message(type=STREAM_RESET, streamId=3, serviceId="SSH")), [])
        self.assertEqual(
            destination.receive(Message(type=STREAM_RESET, streamId=4, serviceId="SSH")),
            [
                CloseLocal("SSH", 1, "the source reset the stream", True),
                CloseLocal("SSH", 2, "the source reset the stream", True),
            ],
        )
        self.assertEqual(destination.buffered_bytes, 0)
        self.assertEqual(destination.active_streams, {})
        # A target connection that completes after the reset is closed at once.
        self.assertEqual(
            destination.local_connected("SSH", 1),
            [CloseLocal("SSH", 1, "the stream was reset while connecting", True)],
        )
        self.assertEqual(destination.local_connect_failed("SSH", 2), [])

    def test_new_stream_replaces_active(self) -> None:
        destination = self.ready_destination()
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1))
        destination.local_connected("SSH", 1)
        actions = destination.receive(
            Message(type=STREAM_START, streamId=2, serviceId="SSH", connectionId=2)
        )
        self.assertEqual(
            actions,
            [CloseLocal("SSH", 1, "the source started a new stream", True), ConnectTarget("SSH", 2, "SSH")],
        )
        self.assertEqual(destination.active_streams, {"SSH": 2})
        stale = Message(type=DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x")
        self.assertLogged(destination.receive(stale), "debug")

    def test_connection_start_first(self) -> None:
        """localproxy >= 3.2 accepts a CONNECTION_START in place of the first STREAM_START."""
        destination = self.ready_destination()
        actions = destination.receive(
            Message(type=CONNECTION_START, streamId=3, serviceId="SSH", connectionId=5)
        )
        self.assertEqual(actions, [ConnectTarget("SSH", 5, "SSH")])
        self.assertEqual(destination.active_streams, {"SSH": 3})

    def test_connection_start_stale_stream(self) -> None:
        destination = self.ready_destination()
        destination.receive(Message(type=STREAM_START, streamId=3, serviceId="SSH", connectionId=1))
        stale = Message(type=CONNECTION_START, streamId=2, serviceId="SSH", connectionId=2)
        self.assertEqual(destination.receive(stale), [])

    def test_duplicate_connection_start(self) -> None:
        """An already open connection id: reset it on both sides (as aws-c-iot does)."""
        destination = self.ready_destination()
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1))
        actions = destination.receive(
            Message(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=1)
        )
        self.assertEqual(actions[0], CloseLocal("SSH", 1, "the source started it a second time", True))
        self.assertEqual(
            only(actions[1:]), Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=1)
        )
        self.assertEqual(destination.connections("SSH"), ())

    def test_connect_failed(self) -> None:
        destination = self.ready_destination()
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1))
        destination.receive(Message(type=CONNECTION_START, streamId=1, serviceId="SSH", connectionId=2))
        destination.local_connected("SSH", 1)
        self.assertEqual(
            only(destination.local_connect_failed("SSH", 2)),
            Message(type=CONNECTION_RESET, streamId=1, serviceId="SSH", connectionId=2),
        )
        self.assertEqual(destination.connections("SSH"), (1,))

    def test_stale_messages_dropped(self) -> None:
        destination = self.ready_destination(["A", "B"], ["A", "B"])
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="A", connectionId=1))
        destination.local_connected("A", 1)
        for message in [
            Message(type=DATA, streamId=2, serviceId="A", connectionId=1, payload=b"x"),
            Message(type=DATA, streamId=1, serviceId="A", connectionId=2, payload=b"x"),
            Message(type=DATA, streamId=1, serviceId="B", connectionId=1, payload=b"x"),
            Message(type=DATA, streamId=1, serviceId="Z", connectionId=1, payload=b"x"),
            Message(type=DATA, streamId=1, connectionId=1, payload=b"x"),
            Message(type=STREAM_RESET, streamId=2, serviceId="A"),
            Message(type=CONNECTION_RESET, streamId=1, serviceId="A", connectionId=3),
            Message(type=CONNECTION_RESET, streamId=1, serviceId="B", connectionId=1),
        ]:
            self.assertEqual(quiet(destination.receive(message)), [], message)
        self.assertEqual(destination.local_data("B", 1, b"x"), [])
        self.assertEqual(destination.local_data("Z", 1, b"x"), [])

    def test_unknown_service_in_stream_start(self) -> None:
        """
        A start for a service this destination does not serve (an unknown id, or none on a tunnel of
        two services) is answered with a reset of that stream or connection; the others go on.
        """
        destination = self.ready_destination(["A", "B"], ["A", "B"])
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="A", connectionId=1))
        for start, reset in [
            (
                Message(type=STREAM_START, streamId=1, serviceId="Z", connectionId=1),
                Message(type=STREAM_RESET, streamId=1, serviceId="Z"),
            ),
            (Message(type=STREAM_START, streamId=5, connectionId=1), Message(type=STREAM_RESET, streamId=5)),
            (Message(type=STREAM_START, streamId=5), Message(type=STREAM_RESET, streamId=5)),
            (
                Message(type=CONNECTION_START, streamId=2, serviceId="Z", connectionId=3),
                Message(type=CONNECTION_RESET, streamId=2, serviceId="Z", connectionId=3),
            ),
            (
                Message(type=CONNECTION_START, streamId=2, connectionId=3),
                Message(type=CONNECTION_RESET, streamId=2, connectionId=3),
            ),
        ]:
            self.assertEqual(only(destination.receive(start)), reset, start)
        self.assertLogged(destination.receive(Message(type=STREAM_START, streamId=0, serviceId="Z")), "error")
        self.assertEqual(destination.connections("A"), (1,))
        self.assertEqual(destination.active_streams, {"A": 1})

    def test_before_service_ids(self) -> None:
        """Like localproxy, nothing happens before the tunnel's service ids arrive."""
        destination = DestinationSession(["SSH"])
        destination.websocket_opened()
        start = Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
        self.assertLogged(destination.receive(start), "warn")
        destination.receive(service_ids("SSH"))
        self.assertEqual(destination.receive(start), [ConnectTarget("SSH", 1, "SSH")])

    def test_mismatch(self) -> None:
        destination = DestinationSession(["SSH"])
        destination.websocket_opened()
        (fatal,) = destination.receive(service_ids("SSH", "HTTP"))
        self.assertTrue(fatal.message.startswith(WRONG_CONFIGURATION))  # type: ignore[union-attr]
        self.assertIn("['HTTP', 'SSH']", fatal.message)  # type: ignore[union-attr]

    def test_later_service_ids_ignored(self) -> None:
        destination = self.ready_destination()
        self.assertLogged(destination.receive(service_ids("X")), "debug")

    def test_session_reset(self) -> None:
        destination = self.ready_destination(["A", "B"], ["A", "B"])
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="A", connectionId=1))
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="B", connectionId=1))
        destination.receive(Message(type=DATA, streamId=1, serviceId="B", connectionId=1, payload=b"x"))
        self.assertEqual(
            destination.receive(Message(type=SESSION_RESET)),
            [
                CloseLocal("A", 1, "the tunnel service reset the session", True),
                CloseLocal("B", 1, "the tunnel service reset the session", True),
            ],
        )
        self.assertEqual(destination.buffered_bytes, 0)
        self.assertEqual(destination.active_streams, {})

    def test_websocket_lost(self) -> None:
        destination = self.ready_destination()
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1))
        self.assertEqual(
            destination.websocket_lost(), [CloseLocal("SSH", 1, "the tunnel's WebSocket connection was lost", True)]
        )
        destination.websocket_opened()
        self.assertFalse(destination.ready)
        self.assertEqual(destination.receive(service_ids("SSH")), [])
        self.assertEqual(
            destination.receive(Message(type=STREAM_START, streamId=1, serviceId="SSH", connectionId=1)),
            [ConnectTarget("SSH", 1, "SSH")],
        )

    def test_unknown_types(self) -> None:
        destination = self.ready_destination()
        self.assertLogged(destination.receive(Message(type=99, ignorable=True)), "debug")
        self.assertLogged(destination.receive(Message(type=99)), "error")


class DestinationDetectionTests(DestinationTestCase):
    """The destination answers in the format of the stream's start (V1, V2 or V3)."""

    def test_v1(self) -> None:
        destination = self.ready_destination()
        self.assertEqual(
            destination.receive(Message(type=STREAM_START, streamId=7)), [ConnectTarget("SSH", 1, "SSH")]
        )
        destination.local_connected("SSH", 1)
        self.assertEqual(
            destination.receive(Message(type=DATA, streamId=7, payload=b"in")), [WriteLocal("SSH", 1, b"in")]
        )
        self.assertEqual(only(destination.local_data("SSH", 1, b"out")), Message(type=DATA, streamId=7, payload=b"out"))
        self.assertEqual(only(destination.local_closed("SSH", 1)), Message(type=STREAM_RESET, streamId=7))
        self.assertEqual(destination.active_streams, {})
        self.assertLogged(destination.receive(Message(type=DATA, streamId=7, payload=b"late")), "debug")

    def test_v1_bare_target(self) -> None:
        """A bare target (-d 22) with a tunnel of one service is renamed to it."""
        destination = self.ready_destination([""], ["SSH"])
        self.assertEqual(destination.services, {"SSH": ""})
        self.assertEqual(
            destination.receive(Message(type=STREAM_START, streamId=1)), [ConnectTarget("SSH", 1, "")]
        )
        self.assertEqual(
            destination.receive(Message(type=STREAM_START, streamId=2, serviceId="SSH", connectionId=1)),
            [CloseLocal("SSH", 1, "the source started a new stream", True), ConnectTarget("SSH", 1, "")],
        )

    def test_v1_tunnel_without_services(self) -> None:
        destination = self.ready_destination([""], [])
        self.assertEqual(
            destination.receive(Message(type=STREAM_START, streamId=1)), [ConnectTarget("", 1, "")]
        )
        destination.local_connected("", 1)
        self.assertEqual(only(destination.local_data("", 1, b"x")), Message(type=DATA, streamId=1, payload=b"x"))

    def test_v1_connect_failed(self) -> None:
        destination = self.ready_destination()
        destination.receive(Message(type=STREAM_START, streamId=3))
        self.assertEqual(only(destination.local_connect_failed("SSH", 1)), Message(type=STREAM_RESET, streamId=3))
        self.assertEqual(destination.active_streams, {})

    def test_v2(self) -> None:
        destination = self.ready_destination(["A", "B"], ["A", "B"])
        self.assertEqual(
            destination.receive(Message(type=STREAM_START, streamId=1, serviceId="B")),
            [ConnectTarget("B", 1, "B")],
        )
        destination.local_connected("B", 1)
        self.assertEqual(
            only(destination.local_data("B", 1, b"x")), Message(type=DATA, streamId=1, serviceId="B", payload=b"x")
        )
        self.assertEqual(
            only(destination.local_closed("B", 1)), Message(type=STREAM_RESET, streamId=1, serviceId="B")
        )

    def test_v2_stream_reset(self) -> None:
        destination = self.ready_destination(["A", "B"], ["A", "B"])
        destination.receive(Message(type=STREAM_START, streamId=1, serviceId="A"))
        self.assertEqual(
            destination.receive(Message(type=STREAM_RESET, streamId=1, serviceId="A")),
            [CloseLocal("A", 1, "the source reset the stream")],
        )


# --- a source and a destination wired through an in-memory relay ---------------------------------


class Relay:
    """
    A source and a destination session joined by a relay that checks every frame with PeerRules,
    with in-memory local connections.  Actions are run breadth-first from a queue.
    """

    def __init__(
        self,
        tunnel: Sequence[str],
        source_mapping: Optional[Sequence[str]],
        destination_mapping: Sequence[str],
        client_type: str = "V3",
        auto_connect: bool = True,
    ) -> None:
        self.source = SourceSession(source_mapping, client_type)
        self.destination = DestinationSession(destination_mapping)
        self.source_rules = PeerRules("source", tunnel)
        self.destination_rules = PeerRules("destination", tunnel)
        self.auto_connect = auto_connect
        self.listening: Dict[str, str] = {}
        self.pending_connects: List[Tuple[str, int]] = []
        self.connect_targets: List[Tuple[str, int]] = []
        # What each local connection received, and which are open, per side.
        self.received: Dict[Tuple[str, str, int], bytearray] = {}
        self.open: Dict[str, set] = {"source": set(), "destination": set()}
        self.closed: List[Tuple[str, str, int, str]] = []
        self.fatal: List[str] = []
        self.boundaries = 0
        self.queue: Deque[Tuple[str, Action]] = deque()
        sessions = {"source": self.source, "destination": self.destination}
        hello = encode_message(service_ids(*tunnel))
        for side, session in sessions.items():
            self.run(side, session.websocket_opened())
            self.run(side, session.feed(hello))

    def run(self, side: str, actions: Sequence[Action]) -> None:
        self.queue.extend((side, action) for action in actions)
        while self.queue:
            self._perform(*self.queue.popleft())

    def _perform(self, side: str, action: Action) -> None:
        if isinstance(action, SendFrames):
            assert len(action.data) <= MAX_WEBSOCKET_FRAME
            self.boundaries += action.boundary
            if side == "source":
                self._relay(action.data, self.source_rules, self.destination, "destination")
            else:
                self._relay(action.data, self.destination_rules, self.source, "source")
        elif isinstance(action, StartListening):
            self.listening[action.service_id] = action.mapping_key
        elif isinstance(action, ConnectTarget):
            key = (action.service_id, action.connection_id)
            self.connect_targets.append(key)
            if self.auto_connect:
                self.open["destination"].add(key)
                self.queue.extend(
                    ("destination", a) for a in self.destination.local_connected(*key)
                )
            else:
                self.pending_connects.append(key)
        elif isinstance(action, WriteLocal):
            key = (action.service_id, action.connection_id)
            assert key in self.open[side], (side, key)
            self.received.setdefault((side,) + key, bytearray()).extend(action.data)
        elif isinstance(action, CloseLocal):
            self.open[side].discard((action.service_id, action.connection_id))
            self.closed.append((side, action.service_id, action.connection_id, action.reason))
        elif isinstance(action, Fatal):
            self.fatal.append(action.message)
        else:
            raise AssertionError(f"unknown action {action!r}")

    def _relay(self, data: bytes, rules: PeerRules, to: object, to_side: str) -> None:
        decoder = FrameDecoder()
        for body in decoder.feed(data):
            message = parse_message(body)
            rules.check(message, len(body))
            if rules is self.source_rules and message.type in (STREAM_START, CONNECTION_START):
                self.destination_rules.note_stream_started(message.serviceId)
            self.queue.extend((to_side, a) for a in to.receive(message))  # type: ignore[attr-defined]
        assert decoder.buffered == 0

    # local events

    def accept(self, service_id: str) -> int:
        connection_id, actions = self.source.local_accepted(service_id)
        self.open["source"].add((service_id, connection_id))
        self.run("source", actions)
        return connection_id

    def connect(self, service_id: str, connection_id: int, ok: bool = True) -> None:
        self.pending_connects.remove((service_id, connection_id))
        if ok:
            self.open["destination"].add((service_id, connection_id))
            self.run("destination", self.destination.local_connected(service_id, connection_id))
        else:
            self.run("destination", self.destination.local_connect_failed(service_id, connection_id))

    def send(self, side: str, service_id: str, connection_id: int, data: bytes) -> None:
        session = self.source if side == "source" else self.destination
        self.run(side, session.local_data(service_id, connection_id, data))

    def close(self, side: str, service_id: str, connection_id: int) -> None:
        session = self.source if side == "source" else self.destination
        self.open[side].discard((service_id, connection_id))
        self.run(side, session.local_closed(service_id, connection_id))

    def got(self, side: str, service_id: str, connection_id: int) -> bytes:
        return bytes(self.received.get((side, service_id, connection_id), b""))


class ConversationTests(SynchronousTestCase):
    def test_v3_multiplexed(self) -> None:
        relay = Relay(["SSH", "HTTP"], ["SSH", "HTTP"], ["HTTP", "SSH"])
        self.assertEqual(relay.listening, {"SSH": "SSH", "HTTP": "HTTP"})
        ssh1 = relay.accept("SSH")
        ssh2 = relay.accept("SSH")
        http1 = relay.accept("HTTP")
        big = bytes(range(256)) * 700
        relay.send("source", "SSH", ssh1, b"one")
        relay.send("source", "SSH", ssh2, big)
        relay.send("source", "HTTP", http1, b"GET /")
        relay.send("destination", "SSH", ssh2, b"reply" * 30_000)
        self.assertEqual(relay.got("destination", "SSH", ssh1), b"one")
        self.assertEqual(relay.got("destination", "SSH", ssh2), big)
        self.assertEqual(relay.got("destination", "HTTP", http1), b"GET /")
        self.assertEqual(relay.got("source", "SSH", ssh2), b"reply" * 30_000)
        self.assertEqual(relay.boundaries, 3)
        # Both ends close connection 1 at once: the crossing CONNECTION_RESETs are harmless.
        relay.open["source"].discard(("SSH", ssh1))
        relay.open["destination"].discard(("SSH", ssh1))
        from_source = relay.source.local_closed("SSH", ssh1)
        from_destination = relay.destination.local_closed("SSH", ssh1)
        relay.run("source", from_source)
        relay.run("destination", from_destination)
        self.assertEqual(relay.closed, [])
        # The destination's target for HTTP goes away.
        relay.close("destination", "HTTP", http1)
        self.assertEqual(relay.closed, [("source", "HTTP", http1, "the destination closed the connection")])
        self.assertEqual(relay.open["source"], {("SSH", ssh2)})
        self.assertEqual(relay.fatal, [])

    def test_v3_data_before_connected(self) -> None:
        """DATA that follows STREAM_START before the target is up is delivered once it is."""
        relay = Relay(["SSH"], ["SSH"], ["SSH"], auto_connect=False)
        connection = relay.accept("SSH")
        relay.send("source", "SSH", connection, b"SSH-2.0-client\r\n")
        self.assertEqual(relay.destination.buffered_bytes, 16)
        relay.connect("SSH", connection)
        self.assertEqual(relay.got("destination", "SSH", connection), b"SSH-2.0-client\r\n")

    def test_v3_connect_fails(self) -> None:
        relay = Relay(["SSH"], ["SSH"], ["SSH"], auto_connect=False)
        first = relay.accept("SSH")
        relay.connect("SSH", first, ok=False)
        self.assertEqual(relay.closed, [("source", "SSH", first, "the destination closed the connection")])
        second = relay.accept("SSH")
        relay.connect("SSH", second)
        relay.send("source", "SSH", second, b"x")
        self.assertEqual(relay.got("destination", "SSH", second), b"x")

    def test_v1_source_to_bare_destination(self) -> None:
        """localproxy -y V1 with -s PORT against a Device-Client-like destination -d PORT."""
        relay = Relay(["SSH"], [""], [""], client_type="V1")
        self.assertEqual(relay.listening, {"SSH": ""})
        first = relay.accept("SSH")
        relay.send("source", "SSH", first, b"ping")
        relay.send("destination", "SSH", 1, b"pong")
        self.assertEqual(relay.got("destination", "SSH", 1), b"ping")
        self.assertEqual(relay.got("source", "SSH", first), b"pong")
        self.assertRaises(LocalConnectionRefused, relay.source.local_accepted, "SSH")
        relay.close("source", "SSH", first)
        self.assertEqual(relay.closed, [("destination", "SSH", 1, "the source reset the stream")])
        second = relay.accept("SSH")
        relay.send("source", "SSH", second, b"again")
        self.assertEqual(relay.got("destination", "SSH", 1), b"pingagain")
        relay.close("destination", "SSH", 1)
        self.assertEqual(relay.closed[-1], ("source", "SSH", second, DESTINATION_RESET))

    def test_v2_multiplexed(self) -> None:
        relay = Relay(["A", "B"], ["A", "B"], ["A", "B"], client_type="V2")
        a = relay.accept("A")
        b = relay.accept("B")
        relay.send("source", "A", a, b"to a")
        relay.send("destination", "B", 1, b"from b")
        self.assertEqual(relay.got("destination", "A", 1), b"to a")
        self.assertEqual(relay.got("source", "B", b), b"from b")
        relay.close("source", "B", b)
        b2 = relay.accept("B")
        relay.send("source", "B", b2, b"b again")
        self.assertEqual(relay.got("destination", "B", 1), b"b again")
        self.assertEqual(relay.source.active_streams, {"A": 1, "B": 2})
        self.assertEqual(relay.destination.active_streams, {"A": 1, "B": 2})

    def test_adopting_source(self) -> None:
        """A source without a mapping (--mode source) listens for the tunnel's services."""
        relay = Relay(["X"], None, ["X"])
        self.assertEqual(relay.listening, {"X": "X"})
        connection = relay.accept("X")
        relay.send("source", "X", connection, b"x")
        self.assertEqual(relay.got("destination", "X", connection), b"x")

    @settings(max_examples=100, deadline=None)
    @given(
        client_type=st.sampled_from(["V1", "V2", "V3"]),
        steps=st.lists(
            st.tuples(
                st.sampled_from(
                    ["accept", "accept", "send", "reply", "reply", "close", "target_close", "stream_reset"]
                ),
                st.integers(min_value=0, max_value=7),
                st.one_of(st.integers(min_value=0, max_value=100), st.integers(max_value=140_000, min_value=0)),
            ),
            min_size=5,
            max_size=40,
        ),
    )
    def test_random_conversation(self, client_type: str, steps: list) -> None:
        """
        Any sequence of accepts, data, closes and resets: every frame passes the relay's rules, and
        each open connection receives exactly what its peer sent while both ends were open.
        """
        tunnel = ["SSH"] if client_type == "V1" else ["SSH", "WEB"]
        relay = Relay(tunnel, tunnel, tunnel, client_type=client_type)
        sent: Dict[Tuple[str, str, int], bytearray] = {}
        # source connection -> destination connection (ids differ in V1/V2).
        pairs: Dict[Tuple[str, int], Tuple[str, int]] = {}
        for action, pick, size in steps:
            service = tunnel[pick % len(tunnel)]
            source_open = sorted(k for k in relay.open["source"] if k[0] == service)
            if action == "accept":
                try:
                    connection = relay.accept(service)
                except LocalConnectionRefused:
                    self.assertNotEqual(client_type, "V3")
                    continue
                pairs[(service, connection)] = relay.connect_targets[-1]
                self.assertIn(relay.connect_targets[-1], relay.open["destination"])
                continue
            if not source_open:
                continue
            key = source_open[pick % len(source_open)]
            peer = pairs[key]
            both_open = peer in relay.open["destination"]
            payload = bytes([pick]) * size
            if action == "send" and size:
                relay.send("source", *key, payload)
                if both_open:
                    sent.setdefault(("destination",) + peer, bytearray()).extend(payload)
            elif action == "reply" and size and both_open:
                relay.send("destination", *peer, payload)
                sent.setdefault(("source",) + key, bytearray()).extend(payload)
            elif action == "close":
                relay.close("source", *key)
                self.assertNotIn(peer, relay.open["destination"])
            elif action == "target_close" and both_open:
                relay.close("destination", *peer)
                self.assertNotIn(key, relay.open["source"])
            elif action == "stream_reset":
                stream_id = relay.source.active_streams.get(service)
                if stream_id:
                    wire_service = "" if client_type == "V1" else service
                    reset = Message(type=STREAM_RESET, streamId=stream_id, serviceId=wire_service)
                    relay.run("source", relay.source.receive(reset))
                    self.assertEqual([k for k in relay.open["source"] if k[0] == service], [])
        self.assertEqual(relay.fatal, [])
        for (side, service, connection), data in sent.items():
            self.assertEqual(relay.got(side, service, connection), bytes(data))
