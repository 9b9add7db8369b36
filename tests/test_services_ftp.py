"""
Tests for L{services.ftp}: the reply and command readers byte-exact under any split, the passive
reply round trip through both filters, tickets and the refusal of active mode.
"""

from __future__ import annotations

from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from services.ftp import (
    DATA_CONNECTION_BIT,
    HOLD_LIMIT,
    HOLD_TIME,
    FTPDataFilter,
    releases_data,
    REFUSE_ACTIVE,
    REFUSE_TLS,
    TICKET_LIFETIME,
    CommandReader,
    FTPAdapter,
    PassiveReply,
    ReplyReader,
    check_ftp_greeting,
    ftp_adapter_factory,
    local_passive_reply,
    parse_passive_address,
    parse_ticket_reply,
    ticket_reply,
)
from tunnelkit.adapters import (
    IActiveStreamFilter,
    IDestinationContext,
    IFilterOutput,
    IHoldingStreamFilter,
    IServiceAdapter,
    ISourceContext,
    IStreamFilter,
    ProbeFailed,
    StreamFilterError,
)
from tunnelkit.errors import ConfigError

SERVER_TRANSCRIPT = (
    b"220-Welcome\r\n"
    b"220-227 Entering Passive Mode (9,9,9,9,9,9) is only text here\r\n"
    b"220 ready\r\n"
    b"331 Username ok, send password.\r\n"
    b"230 Login successful.\r\n"
    b"227 Entering Passive Mode (192,168,1,20,195,80).\r\n"
    b"150 File status okay. About to open data connection.\r\n"
    b"226 Transfer complete.\r\n"
    b"229 Entering extended passive mode (|||50123|)\n"
    b"211-Features:\r\n EPSV\r\n PASV\r\n211 End\r\n"
    b"227-Passive\r\n (10,0,0,1,4,1)\r\n227 done\r\n"
    b"221 Goodbye.\r\n"
)


def split_at(data: bytes, cuts: List[int]) -> List[bytes]:
    points = [0] + sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


def feed_all(reader, pieces):
    events = []
    for piece in pieces:
        events.extend(reader.feed(piece))
    return events


def merge(events):
    """Join adjacent pass-through bytes, so event lists from different splits compare."""
    merged: list = []
    for event in events:
        if isinstance(event, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += event
        elif event != b"":
            merged.append(event)
    return merged


EXPECTED_EVENTS = [
    b"220-Welcome\r\n220-227 Entering Passive Mode (9,9,9,9,9,9) is only text here\r\n220 ready\r\n"
    b"331 Username ok, send password.\r\n230 Login successful.\r\n",
    PassiveReply(227, b"227 Entering Passive Mode (192,168,1,20,195,80).\r\n"),
    b"150 File status okay. About to open data connection.\r\n226 Transfer complete.\r\n",
    PassiveReply(229, b"229 Entering extended passive mode (|||50123|)\n"),
    b"211-Features:\r\n EPSV\r\n PASV\r\n211 End\r\n",
    PassiveReply(227, b"227-Passive\r\n (10,0,0,1,4,1)\r\n227 done\r\n"),
    b"221 Goodbye.\r\n",
]


class ReplyReaderTests(SynchronousTestCase):
    def test_whole(self) -> None:
        self.assertEqual(merge(ReplyReader().feed(SERVER_TRANSCRIPT)), EXPECTED_EVENTS)

    @given(st.lists(st.integers(min_value=0, max_value=len(SERVER_TRANSCRIPT))))
    @settings(max_examples=200, deadline=None)
    def test_any_split(self, cuts) -> None:
        events = feed_all(ReplyReader(), split_at(SERVER_TRANSCRIPT, cuts))
        self.assertEqual(merge(events), EXPECTED_EVENTS)

    def test_byte_at_a_time(self) -> None:
        pieces = [SERVER_TRANSCRIPT[i : i + 1] for i in range(len(SERVER_TRANSCRIPT))]
        self.assertEqual(merge(feed_all(ReplyReader(), pieces)), EXPECTED_EVENTS)

    def test_reply_codes(self) -> None:
        reader = ReplyReader(record_codes=True)
        feed_all(reader, split_at(SERVER_TRANSCRIPT, [5, 40, 41, 200]))
        self.assertEqual(reader.completed, [220, 331, 230, 227, 150, 226, 229, 211, 227, 221])
        quiet = ReplyReader()
        quiet.feed(SERVER_TRANSCRIPT)
        self.assertEqual(quiet.completed, [])

    def test_pass_through_is_not_copied(self) -> None:
        data = b"200 ok\r\n250 fine\r\n"
        self.assertIs(ReplyReader().feed(data)[0], data)

    def test_partial_line_is_held(self) -> None:
        reader = ReplyReader()
        self.assertEqual(reader.feed(b"200 o"), [])
        self.assertEqual(reader.feed(b"k\r\n"), [b"200 ok\r\n"])

    def test_overlong(self) -> None:
        with self.assertRaises(StreamFilterError):
            ReplyReader().feed(b"2" * 70000)
        reader = ReplyReader()
        reader.feed(b"227-x\r\n")
        with self.assertRaises(StreamFilterError):
            for _ in range(2000):
                reader.feed(b" " + b"y" * 60 + b"\r\n")


CLIENT_TRANSCRIPT = b"USER anonymous\r\nPASS x\r\nPORT 127,0,0,1,4,1\r\nEPSV\r\neprt |1|127.0.0.1|1025|\r\nAUTH TLS\r\nRETR f\n"
EXPECTED_COMMANDS = [
    (b"USER anonymous\r\nPASS x\r\n", None),
    (b"PORT 127,0,0,1,4,1\r\n", REFUSE_ACTIVE),
    (b"EPSV\r\n", None),
    (b"eprt |1|127.0.0.1|1025|\r\n", REFUSE_ACTIVE),
    (b"AUTH TLS\r\n", REFUSE_TLS),
    (b"RETR f\n", None),
]


def merge_commands(events):
    merged: list = []
    for chunk, reply in events:
        if reply is None and merged and merged[-1][1] is None:
            merged[-1] = (merged[-1][0] + chunk, None)
        else:
            merged.append((chunk, reply))
    return merged


class CommandReaderTests(SynchronousTestCase):
    def test_whole(self) -> None:
        self.assertEqual(CommandReader().feed(CLIENT_TRANSCRIPT), EXPECTED_COMMANDS)

    @given(st.lists(st.integers(min_value=0, max_value=len(CLIENT_TRANSCRIPT))))
    @settings(max_examples=100, deadline=None)
    def test_any_split(self, cuts) -> None:
        reader = CommandReader()
        events = []
        for piece in split_at(CLIENT_TRANSCRIPT, cuts):
            events.extend(reader.feed(piece))
        self.assertEqual(merge_commands(events), EXPECTED_COMMANDS)


class AddressTests(SynchronousTestCase):
    def test_pasv(self) -> None:
        reply = PassiveReply(227, b"227 Entering Passive Mode (192,168,1,20,195,80).\r\n")
        self.assertEqual(parse_passive_address(reply), ("192.168.1.20", 50000))
        reply = PassiveReply(227, b"227 =10,0,0,1,0,21\r\n")
        self.assertEqual(parse_passive_address(reply), ("10.0.0.1", 21))

    def test_epsv(self) -> None:
        reply = PassiveReply(229, b"229 Entering Extended Passive Mode (|||6446|)\r\n")
        self.assertEqual(parse_passive_address(reply), (None, 6446))
        reply = PassiveReply(229, b"229 ok (!!!21!)\r\n")
        self.assertEqual(parse_passive_address(reply), (None, 21))

    def test_bad(self) -> None:
        for raw in (b"227 no address\r\n", b"227 (1,2,3,4,5)\r\n", b"227 (300,2,3,4,5,6)\r\n"):
            self.assertRaises(ValueError, parse_passive_address, PassiveReply(227, raw))
        for raw in (b"229 (|||0|)\r\n", b"229 (||6446|)\r\n", b"229 (|||70000|)\r\n"):
            self.assertRaises(ValueError, parse_passive_address, PassiveReply(229, raw))

    def test_ticket_round_trip(self) -> None:
        for code in (227, 229):
            raw = ticket_reply(code, 12345)
            self.assertEqual(parse_ticket_reply(PassiveReply(code, raw)), 12345)
        self.assertIsNone(parse_ticket_reply(PassiveReply(227, b"227 Entering Passive Mode (1,2,3,4,5,6)\r\n")))

    def test_local_replies(self) -> None:
        self.assertEqual(
            local_passive_reply(227, "127.0.0.1", 50000),
            b"227 Entering Passive Mode (127,0,0,1,195,80).\r\n",
        )
        self.assertEqual(
            local_passive_reply(229, "127.0.0.1", 50000),
            b"229 Entering Extended Passive Mode (|||50000|)\r\n",
        )


@implementer(ISourceContext)
class SourceContext:
    """The source side's offer, as the local proxy makes it: listeners are recorded and answered."""

    def __init__(self, asynchronous: bool = False, bind_address: str = "127.0.0.1") -> None:
        self.service_id = "FTP1"
        self.reactor = Clock()
        self.bind_address = bind_address
        self.asynchronous = asynchronous
        self.listeners: List[int] = []
        self.pending: List[defer.Deferred] = []

    def open_data_listener(self, connection_id: int) -> defer.Deferred:
        self.listeners.append(connection_id)
        port = 40000 + len(self.listeners)
        if not self.asynchronous:
            return defer.succeed(port)
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        d.port = port  # type: ignore[attr-defined]
        return d


@implementer(IDestinationContext)
class DestinationContext:
    def __init__(self, target=("127.0.0.1", 2121)) -> None:
        self.service_id = "FTP1"
        self.reactor = Clock()
        self.default_target = target


@implementer(IFilterOutput)
class Output:
    def __init__(self) -> None:
        self.outbound: List[bytes] = []
        self.inbound: List[bytes] = []

    def send_outbound(self, data: bytes) -> None:
        self.outbound.append(data)

    def send_inbound(self, data: bytes) -> None:
        self.inbound.append(data)


class PassiveRoundTripTests(SynchronousTestCase):
    """Server bytes through the destination filter, then the source filter, as the tunnel does."""

    def setUp(self) -> None:
        self.src_adapter = ftp_adapter_factory.build("FTP1", {})
        self.dst_adapter = ftp_adapter_factory.build("FTP1", {})
        self.src_ctx = SourceContext()
        self.dst_ctx = DestinationContext()

    def filters(self, connection_id=1):
        src = self.src_adapter.source_filter(self.src_ctx, connection_id)
        dst = self.dst_adapter.destination_filter(self.dst_ctx, connection_id)
        out = Output()
        src.attach(out)
        return src, dst, out

    def test_interfaces(self) -> None:
        src, dst, _ = self.filters()
        verifyObject(IActiveStreamFilter, src)
        verifyObject(IStreamFilter, dst)
        verifyObject(IServiceAdapter, self.src_adapter)

    def test_pasv_rewritten_and_data_connection_routed(self) -> None:
        src, dst, out = self.filters()
        server = b"220 hi\r\n227 Entering Passive Mode (192,168,1,20,195,80).\r\n150 go\r\n"
        tunnel = dst.outbound(server)
        self.assertEqual(tunnel, b"220 hi\r\n227 Entering Passive Mode via tunnelkit ticket 1\r\n150 go\r\n")
        client = src.inbound(tunnel)
        self.assertEqual(client, b"220 hi\r\n227 Entering Passive Mode (127,0,0,1,156,65).\r\n150 go\r\n")
        self.assertEqual(self.src_ctx.listeners, [DATA_CONNECTION_BIT | 1])
        # The data connection: no filters, the target host with the server's passive port.
        data_id = DATA_CONNECTION_BIT | 1
        self.assertIsNone(self.src_adapter.source_filter(self.src_ctx, data_id))
        self.assertIsNone(self.dst_adapter.destination_filter(self.dst_ctx, data_id))
        self.assertEqual(self.dst_adapter.destination_target(self.dst_ctx, data_id), ("127.0.0.1", 50000))
        # Single use.
        with self.assertRaises(StreamFilterError) as caught:
            self.dst_adapter.destination_target(self.dst_ctx, data_id)
        self.assertIn("no passive ticket", str(caught.exception))
        self.assertEqual(self.dst_ctx.reactor.getDelayedCalls(), [])

    def test_epsv(self) -> None:
        src, dst, out = self.filters()
        client = src.inbound(dst.outbound(b"229 Entering Extended Passive Mode (|||6446|)\r\n"))
        self.assertEqual(client, b"229 Entering Extended Passive Mode (|||40001|)\r\n")
        target = self.dst_adapter.destination_target(self.dst_ctx, DATA_CONNECTION_BIT | 1)
        self.assertEqual(target, ("127.0.0.1", 6446))

    def test_passive_host_reply_option(self) -> None:
        self.dst_adapter = ftp_adapter_factory.build("FTP1", {"passive_host": "reply"})
        src, dst, out = self.filters()
        src.inbound(dst.outbound(b"227 Entering Passive Mode (10,1,2,3,0,21)\r\n"))
        target = self.dst_adapter.destination_target(self.dst_ctx, DATA_CONNECTION_BIT | 1)
        self.assertEqual(target, ("10.1.2.3", 21))

    def test_options_checked(self) -> None:
        with self.assertRaises(ConfigError):
            ftp_adapter_factory.build("FTP1", {"passive-host": "elsewhere"})
        with self.assertRaises(ConfigError):
            ftp_adapter_factory.build("FTP1", {"active": True})

    @given(st.lists(st.integers(min_value=0, max_value=len(SERVER_TRANSCRIPT))), st.lists(st.integers(min_value=0, max_value=400)))
    @settings(max_examples=100, deadline=None)
    def test_any_split_both_hops(self, cuts, tunnel_cuts) -> None:
        self.setUp()
        src, dst, out = self.filters()
        tunnel = b"".join(dst.outbound(p) for p in split_at(SERVER_TRANSCRIPT, cuts))
        client = b"".join(src.inbound(p) for p in split_at(tunnel, tunnel_cuts))
        expected = (
            SERVER_TRANSCRIPT.replace(
                b"227 Entering Passive Mode (192,168,1,20,195,80).\r\n",
                b"227 Entering Passive Mode (127,0,0,1,156,65).\r\n",
            )
            .replace(
                b"229 Entering extended passive mode (|||50123|)\n",
                b"229 Entering Extended Passive Mode (|||40002|)\r\n",
            )
            .replace(
                b"227-Passive\r\n (10,0,0,1,4,1)\r\n227 done\r\n",
                b"227 Entering Passive Mode (127,0,0,1,156,67).\r\n",
            )
        )
        self.assertEqual(client, expected)
        self.assertEqual(out.inbound, [])
        self.assertEqual(self.dst_adapter.open_tickets(), 3)

    def test_asynchronous_listener_holds_later_bytes(self) -> None:
        self.src_ctx = SourceContext(asynchronous=True)
        src, dst, out = self.filters()
        tunnel = dst.outbound(b"227 Entering Passive Mode (1,2,3,4,0,99)\r\n150 go\r\n")
        self.assertEqual(src.inbound(tunnel), b"")
        self.assertEqual(src.inbound(b"226 done\r\n"), b"")
        # A refused command answered while the reply is held comes after it.
        self.assertEqual(src.outbound(b"PORT 1,2,3,4,5,6\r\nNOOP\r\n"), b"NOOP\r\n")
        self.assertEqual(out.inbound, [])
        d = self.src_ctx.pending[0]
        d.callback(d.port)
        self.assertEqual(
            b"".join(out.inbound),
            b"227 Entering Passive Mode (127,0,0,1,156,65).\r\n150 go\r\n226 done\r\n" + REFUSE_ACTIVE,
        )
        self.assertEqual(src.inbound(b"200 ok\r\n"), b"200 ok\r\n")

    def test_listener_failure_answers_425(self) -> None:
        self.src_ctx = SourceContext(asynchronous=True)
        src, dst, out = self.filters()
        src.inbound(dst.outbound(b"227 Entering Passive Mode (1,2,3,4,0,99)\r\n"))
        self.src_ctx.pending[0].errback(OSError("no ports left"))
        self.assertEqual(out.inbound, [b"425 tunnelkit could not open a local data listener for passive mode\r\n"])
        self.flushLoggedErrors()

    def test_active_mode_refused_locally(self) -> None:
        src, dst, out = self.filters()
        self.assertEqual(src.outbound(b"TYPE I\r\nPORT 127,0,0,1,4,1\r\n"), b"TYPE I\r\n")
        self.assertEqual(out.inbound, [REFUSE_ACTIVE])
        self.assertEqual(src.outbound(b"EPRT |2|::1|1025|\r\nAUTH TLS\r\nLIST\r\n"), b"LIST\r\n")
        self.assertEqual(out.inbound, [REFUSE_ACTIVE, REFUSE_ACTIVE, REFUSE_TLS])

    def test_active_mode_without_output_passes(self) -> None:
        src = self.src_adapter.source_filter(self.src_ctx, 1)
        self.assertEqual(src.outbound(b"PORT 1,2,3,4,5,6\r\n"), b"PORT 1,2,3,4,5,6\r\n")

    def test_untagged_reply_passes_with_a_warning(self) -> None:
        src, dst, out = self.filters()
        reply = b"227 Entering Passive Mode (1,2,3,4,0,99)\r\n"
        self.assertEqual(src.inbound(reply), reply)
        self.assertEqual(self.src_ctx.listeners, [])

    def test_unreadable_passive_reply_passes(self) -> None:
        src, dst, out = self.filters()
        self.assertEqual(dst.outbound(b"227 what\r\n"), b"227 what\r\n")

    def test_tickets_expire(self) -> None:
        src, dst, out = self.filters()
        dst.outbound(b"227 Entering Passive Mode (1,2,3,4,0,99)\r\n")
        self.assertEqual(self.dst_adapter.open_tickets(), 1)
        self.dst_ctx.reactor.advance(TICKET_LIFETIME)
        self.assertEqual(self.dst_adapter.open_tickets(), 0)
        self.assertRaises(StreamFilterError, self.dst_adapter.destination_target, self.dst_ctx, DATA_CONNECTION_BIT | 1)

    def test_tickets_released_with_control_connection(self) -> None:
        src, dst, out = self.filters()
        dst.outbound(b"227 Entering Passive Mode (1,2,3,4,0,99)\r\n229 (|||7|)\r\n")
        self.assertEqual(self.dst_adapter.open_tickets(), 2)
        dst.connection_lost()
        self.assertEqual(self.dst_adapter.open_tickets(), 0)
        self.assertEqual(self.dst_ctx.reactor.getDelayedCalls(), [])

    def test_two_clients_never_mix(self) -> None:
        src_a, dst_a, _ = self.filters(1)
        src_b, dst_b, _ = self.filters(2)
        to_a = src_a.inbound(dst_a.outbound(b"227 Entering Passive Mode (1,2,3,4,0,100)\r\n"))
        to_b = src_b.inbound(dst_b.outbound(b"227 Entering Passive Mode (1,2,3,4,0,200)\r\n"))
        self.assertNotEqual(to_a, to_b)
        id_a, id_b = self.src_ctx.listeners
        self.assertNotEqual(id_a, id_b)
        self.assertEqual(self.dst_adapter.destination_target(self.dst_ctx, id_b), ("127.0.0.1", 200))
        self.assertEqual(self.dst_adapter.destination_target(self.dst_ctx, id_a), ("127.0.0.1", 100))

    def test_ticket_numbers_wrap_and_skip_used(self) -> None:
        adapter = FTPAdapter("FTP1")
        clock = Clock()
        adapter._next_ticket = 0x7FFFFFFF
        self.assertEqual(adapter.issue_ticket(clock, ("h", 1)), 0x7FFFFFFF)
        self.assertEqual(adapter.issue_ticket(clock, ("h", 2)), 1)
        adapter._next_ticket = 0x7FFFFFFF
        self.assertEqual(adapter.issue_ticket(clock, ("h", 3)), 2)

    def test_control_connection_goes_to_default_target(self) -> None:
        self.assertEqual(self.dst_adapter.destination_target(self.dst_ctx, 5), ("127.0.0.1", 2121))

    def test_ipv6_bind_address(self) -> None:
        self.src_ctx = SourceContext(bind_address="::1")
        src, dst, out = self.filters()
        client = src.inbound(dst.outbound(b"229 (|||7|)\r\n"))
        self.assertEqual(client, b"229 Entering Extended Passive Mode (|||40001|)\r\n")


class GreetingTests(SynchronousTestCase):
    def test_greetings(self) -> None:
        self.assertEqual(check_ftp_greeting(b"220 pyftpdlib ready.\r\n", False), "220 pyftpdlib ready.")
        self.assertEqual(check_ftp_greeting(b"220-a\r\n b\r\n220 c\r\n", False), "220 c")
        self.assertEqual(check_ftp_greeting(b"120 wait\r\n220 now\r\n", False), "220 now")
        self.assertIsNone(check_ftp_greeting(b"220-a\r\n", False))
        self.assertIsNone(check_ftp_greeting(b"22", False))

    def test_not_ftp(self) -> None:
        for wrong in (b"SSH-2.0-x\r\n", b"421 Too many connections\r\n"):
            self.assertRaises(ProbeFailed, check_ftp_greeting, wrong, False)


class DataOrderingTests(SynchronousTestCase):
    """
    The destination holds a data connection's bytes until the transfer's reply has gone into the
    tunnel, so the reply never waits behind data the client will not read before it.
    """

    def setUp(self) -> None:
        self.adapter = ftp_adapter_factory.build("FTP1", {})
        self.ctx = DestinationContext()
        self.clock = self.ctx.reactor
        self.control = self.adapter.destination_filter(self.ctx, 1)
        self.assertEqual(
            self.control.outbound(b"227 Entering Passive Mode (127,0,0,1,0,99)\r\n"),
            b"227 Entering Passive Mode via tunnelkit ticket 1\r\n",
        )
        data_id = DATA_CONNECTION_BIT | 1
        self.assertEqual(self.adapter.destination_target(self.ctx, data_id), ("127.0.0.1", 99))
        self.data = self.adapter.destination_filter(self.ctx, data_id)
        self.assertIsInstance(self.data, FTPDataFilter)
        verifyObject(IHoldingStreamFilter, self.data)
        self.output = Output()
        self.data.attach(self.output)

    def test_held_until_the_reply_has_passed(self) -> None:
        self.assertEqual(self.data.outbound(b"first "), b"")
        self.assertEqual(self.data.outbound(b"second"), b"")
        self.assertEqual(self.control.outbound(b"150 Opening data connection\r\n"), b"150 Opening data connection\r\n")
        self.assertEqual(self.output.outbound, [])  # not before the reply is in the tunnel
        self.clock.advance(0)
        self.assertEqual(self.output.outbound, [b"first second"])
        chunk = b"x" * 1000
        self.assertIs(self.data.outbound(chunk), chunk)
        self.assertEqual(self.data.inbound(b"up"), b"up")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_other_replies_do_not_release(self) -> None:
        self.data.outbound(b"data")
        self.control.outbound(b"350 Restarting at 0\r\n200 Type set\r\n")
        self.clock.advance(0)
        self.assertEqual(self.output.outbound, [])
        self.control.outbound(b"550 No such file\r\n")
        self.clock.advance(0)
        self.assertEqual(self.output.outbound, [b"data"])

    def test_limit(self) -> None:
        self.assertEqual(self.data.outbound(b"a" * (HOLD_LIMIT - 1)), b"")
        self.assertEqual(self.data.outbound(b"bc"), b"a" * (HOLD_LIMIT - 1) + b"bc")
        self.assertEqual(self.data.outbound(b"d"), b"d")

    def test_time(self) -> None:
        self.data.outbound(b"data")
        self.clock.advance(HOLD_TIME)
        self.assertEqual(self.output.outbound, [b"data"])
        self.assertEqual(self.data.outbound(b"more"), b"more")

    def test_end_of_data_connection_sends_what_is_held(self) -> None:
        self.data.outbound(b"listing\r\n")
        self.data.connection_lost()
        self.assertEqual(self.output.outbound, [b"listing\r\n"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_end_of_stream_is_held_behind_the_bytes(self) -> None:
        ends: List[str] = []
        self.data.outbound(b"listing\r\n")
        self.assertFalse(self.data.outbound_ended(lambda: ends.append(repr(self.output.outbound))))
        self.control.outbound(b"150 Here comes the directory listing\r\n")
        self.assertEqual(ends, [])
        self.clock.advance(0)
        self.assertEqual(ends, [repr([b"listing\r\n"])])  # the end, right after the held bytes
        self.assertTrue(self.data.outbound_ended(lambda: ends.append("again")))  # nothing held: at once
        self.assertEqual(len(ends), 1)

    def test_end_of_control_connection_releases(self) -> None:
        self.data.outbound(b"x")
        self.control.connection_lost()
        self.assertEqual(self.output.outbound, [b"x"])

    def test_without_output_never_holds(self) -> None:
        self.setUp()
        data = self.data
        data.output = None
        self.assertEqual(data.outbound(b"x"), b"x")

    def test_unredeemed_data_connection_is_the_fast_path(self) -> None:
        self.assertIsNone(self.adapter.destination_filter(self.ctx, DATA_CONNECTION_BIT | 77))

    def test_releasing_codes(self) -> None:
        self.assertEqual(
            [c for c in (125, 150, 200, 226, 227, 250, 350, 425, 450, 550) if releases_data(c)],
            [125, 150, 226, 250, 425, 450, 550],
        )
