# -*- test-case-name: tests.test_services_ftp -*-
"""
The C{ftp} adapter (default for C{FTP*}): passive-mode FTP through the tunnel.

An FTP client opens a control connection, and for each listing or transfer asks the server for a
passive data address (C{PASV} -> C{227 ... (h1,h2,h3,h4,p1,p2)}, C{EPSV} -> C{229 ... (|||port|)}).
Through a tunnel that address is useless to the client, so both ends of the control connection
rewrite the reply:

  1. Destination (server side): L{FTPDestinationFilter} reads the server's 227/229 reply, keeps the
     real data address under a fresh I{ticket} (a number, single use, forgotten after 60 s or when
     the control connection ends), and sends C{227 Entering Passive Mode via tunnelkit ticket N}
     through the tunnel instead.
  2. Source (client side): L{FTPSourceFilter} sees the ticket, asks the local proxy for a data
     listener carried with connection id C{0x80000000 | N}
     (L{tunnelkit.adapters.ISourceContext.open_data_listener}), and gives the client
     C{227 Entering Passive Mode (127,0,0,1,p1,p2).} (or C{229 ... (|||port|)}) for that listener.
  3. The client connects there; the source sends CONNECTION_START with that connection id; the
     destination's L{FTPAdapter.destination_target} redeems the ticket and connects to the server's
     real data port.  Connection ids with the high bit set are never used for control connections
     (the source counts those up from 1), so data connections of several clients never mix.

Ordering: the destination holds what the server sends on a data connection until the control
connection has passed the transfer's reply (C{150} ...) into the tunnel (L{FTPDataFilter}).  A
client reads its data connection only after that reply; were the data to overtake it, the client's
socket would fill, the source would stop reading the tunnel, and the reply would never arrive.

By default the destination connects data connections to the host of the service's own target
(the address in a 227 reply is often a public or wildcard address); option C{passive-host: reply}
uses the address from the reply instead.

Active mode (C{PORT}/C{EPRT}) is refused: the server would have to connect back to the client,
which the tunnel cannot carry.  The source answers the client itself with
C{502 Active mode (PORT/EPRT) is not supported through tunnelkit; use passive mode (PASV/EPSV)} and
logs it.  FTP over TLS (C{AUTH TLS}) is refused the same way (C{534}): the adapter must read the
control connection.  The tunnel itself is encrypted.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from tunnelkit.adapters import (
    IActiveStreamFilter,
    IDestinationContext,
    IFilterOutput,
    IHoldingStreamFilter,
    IServiceAdapter,
    IServiceAdapterFactory,
    ISourceContext,
    IStreamFilter,
    ProbeFailed,
    StreamFilterError,
    Target,
    check_options,
    describe_target,
    probe_target,
    text_preview,
)
from tunnelkit.errors import ConfigError

log = Logger()

#: Connection ids of passive data connections: this bit set, the ticket in the low 31 bits.
DATA_CONNECTION_BIT = 0x80000000
TICKET_MASK = 0x7FFFFFFF
#: How long a ticket waits for its data connection.
TICKET_LIFETIME = 60.0
#: The longest reply (all lines) or command line the filters hold.
MAX_HELD = 64 * 1024
#: What a data connection may hold while its transfer's reply has not passed (L{FTPDataFilter}).
HOLD_LIMIT = 4 * 1024 * 1024
HOLD_TIME = 2.0

PASSIVE_CODES = (b"227", b"229")
REFUSE_ACTIVE = (
    b"502 Active mode (PORT/EPRT) is not supported through tunnelkit; use passive mode (PASV/EPSV)\r\n"
)
REFUSE_TLS = (
    b"534 FTP over TLS cannot pass the tunnelkit ftp adapter (it must read the control connection);"
    b" the tunnel is already encrypted: use plain FTP\r\n"
)

_TICKET_REPLY = re.compile(rb"^(227|229) Entering Passive Mode via tunnelkit ticket (\d+)\s*$")
_PASV_ADDRESS = re.compile(rb"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")
_EPSV_ADDRESS = re.compile(rb"\(([\x21-\x7e])\1\1(\d{1,5})\1\)")


def is_data_connection(connection_id: int) -> bool:
    """Whether C{connection_id} is a passive data connection (see the module docstring)."""
    return bool(connection_id & DATA_CONNECTION_BIT)


def data_connection_id(ticket: int) -> int:
    """The connection id that carries the data connection of C{ticket}."""
    return DATA_CONNECTION_BIT | (ticket & TICKET_MASK)


# --- sans-IO parsing ---


class PassiveReply:
    """A complete 227 or 229 reply (all its lines), held back by L{ReplyReader} for rewriting."""

    def __init__(self, code: int, raw: bytes) -> None:
        self.code = code
        self.raw = raw

    def __repr__(self) -> str:
        return f"PassiveReply({self.code}, {self.raw!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PassiveReply) and (self.code, self.raw) == (other.code, other.raw)


ReplyEvent = Union[bytes, PassiveReply]


class ReplyReader:
    """
    Splits the server's side of a control connection into pass-through bytes and the 227/229
    replies to rewrite.  Other replies, single or multi-line (C{ddd-...} up to C{ddd ...}), pass
    as soon as each line is complete; lines may end in CR LF or a bare LF.
    """

    def __init__(self, record_codes: bool = False) -> None:
        #: With C{record_codes}: the codes of the replies completed since the caller last cleared it.
        self.completed: List[int] = []
        self._record = record_codes
        self._partial = b""
        self._multiline: Optional[bytes] = None  # the code of the multi-line reply being read
        self._held: Optional[List[bytes]] = None  # lines of a multi-line passive reply
        self._held_size = 0

    def feed(self, data: bytes) -> List[ReplyEvent]:
        """Feed bytes; returns pass-through bytes and L{PassiveReply} objects, in order."""
        events: List[ReplyEvent] = []
        if self._partial:
            data = self._partial + data
            self._partial = b""
        start = 0
        passing_from = 0  # start of the run of pass-through bytes not yet emitted
        length = len(data)
        while start < length:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start : end + 1]
            action = self._line(line)
            if action is not None:
                if passing_from < start:
                    events.append(data[passing_from:start])
                if isinstance(action, PassiveReply):
                    events.append(action)
                passing_from = end + 1
            start = end + 1
        if passing_from < start:
            events.append(data[passing_from:start])
        rest = data[start:]
        if rest:
            if len(rest) + self._held_size > MAX_HELD:
                raise StreamFilterError(
                    f"the FTP server sent a line or reply longer than {MAX_HELD} bytes"
                )
            self._partial = rest
        return events

    def _line(self, line: bytes) -> Optional[ReplyEvent]:
        """None: the line passes; b"": the line is held; a PassiveReply: the held reply is done."""
        code = line[:3]
        marker = line[3:4]
        if self._multiline is None:
            if not code.isdigit():
                return None
            if marker == b"-":
                self._multiline = code
                if code in PASSIVE_CODES:
                    self._held = [line]
                    self._held_size = len(line)
                    return b""
                return None
            if self._record:
                self.completed.append(int(code))
            if code in PASSIVE_CODES:
                return PassiveReply(int(code), line)
            return None
        if self._held is not None:
            self._held.append(line)
            self._held_size += len(line)
            if self._held_size > MAX_HELD:
                raise StreamFilterError(f"the FTP server sent a reply longer than {MAX_HELD} bytes")
        if code == self._multiline and marker != b"-" and marker in (b" ", b"\r", b"\n"):
            self._multiline = None
            if self._record:
                self.completed.append(int(code))
            if self._held is not None:
                reply = PassiveReply(int(code), b"".join(self._held))
                self._held = None
                self._held_size = 0
                return reply
            return None
        return b"" if self._held is not None else None


class CommandReader:
    """
    Splits the client's side of a control connection into pass-through bytes and the commands the
    adapter answers itself (C{PORT}, C{EPRT}, C{AUTH}).  Lines pass as soon as they are complete.
    """

    REFUSED = {b"PORT": REFUSE_ACTIVE, b"EPRT": REFUSE_ACTIVE, b"AUTH": REFUSE_TLS}

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> List[Tuple[bytes, Optional[bytes]]]:
        """
        Feed bytes; returns C{(bytes, None)} to pass and C{(command line, reply)} for a refused
        command (to drop, answering C{reply} to the client), in order.
        """
        if self._partial:
            data = self._partial + data
            self._partial = b""
        events: List[Tuple[bytes, Optional[bytes]]] = []
        start = passing_from = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            verb = data[start : start + 5].split(b" ", 1)[0].strip().upper()
            reply = self.REFUSED.get(verb)
            if reply is not None:
                if passing_from < start:
                    events.append((data[passing_from:start], None))
                events.append((data[start : end + 1], reply))
                passing_from = end + 1
            start = end + 1
        if passing_from < start:
            events.append((data[passing_from:start], None))
        rest = data[start:]
        if len(rest) > MAX_HELD:
            raise StreamFilterError(f"the FTP client sent a command line longer than {MAX_HELD} bytes")
        self._partial = rest
        return events


def parse_passive_address(reply: PassiveReply) -> Tuple[Optional[str], int]:
    """
    The data address in a server's reply: C{(host, port)} for 227, C{(None, port)} for 229 (same
    host as the control connection).

    @raise ValueError: if the reply holds no valid address.
    """
    if reply.code == 227:
        match = _PASV_ADDRESS.search(reply.raw[4:])
        if match is None:
            raise ValueError(f"no h1,h2,h3,h4,p1,p2 address in {text_preview(reply.raw, 80)}")
        numbers = [int(n) for n in match.groups()]
        if any(n > 255 for n in numbers):
            raise ValueError(f"a number above 255 in the address of {text_preview(reply.raw, 80)}")
        host = ".".join(str(n) for n in numbers[:4])
        return host, numbers[4] * 256 + numbers[5]
    match = _EPSV_ADDRESS.search(reply.raw)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"no (|||port|) address in {text_preview(reply.raw, 80)}")
    return None, int(match.group(2))


def ticket_reply(code: int, ticket: int) -> bytes:
    """The reply the destination sends through the tunnel in place of the server's."""
    return b"%d Entering Passive Mode via tunnelkit ticket %d\r\n" % (code, ticket)


def parse_ticket_reply(reply: PassiveReply) -> Optional[int]:
    """The ticket of a reply made by L{ticket_reply}, or None for any other reply."""
    match = _TICKET_REPLY.match(reply.raw)
    return int(match.group(2)) if match else None


def local_passive_reply(code: int, host: str, port: int) -> bytes:
    """The reply the source gives its client: the local data listener's address."""
    if code == 229:
        return b"229 Entering Extended Passive Mode (|||%d|)\r\n" % port
    numbers = host.split(".")
    return b"227 Entering Passive Mode (%s,%d,%d).\r\n" % (
        ",".join(numbers).encode("ascii"),
        port // 256,
        port % 256,
    )


def ipv4_for_replies(bind_address: str) -> str:
    """The IPv4 address a 227 reply can name for listeners on C{bind_address}."""
    parts = bind_address.split(".")
    if len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts) and bind_address != "0.0.0.0":
        return bind_address
    return "127.0.0.1"


# --- filters ---


@implementer(IActiveStreamFilter)
class FTPSourceFilter:
    """The source side of one FTP control connection (see the module docstring)."""

    def __init__(self, adapter: "FTPAdapter", context: ISourceContext, connection_id: int) -> None:
        self.adapter = adapter
        self.context = context
        self.connection_id = connection_id
        self.replies = ReplyReader()
        self.commands = CommandReader()
        self.output: Optional[IFilterOutput] = None
        self._waiting: Optional[defer.Deferred] = None  # a data listener being opened
        self._backlog: List[ReplyEvent] = []  # inbound events behind the pending listener
        self._closed = False
        self._warned_untagged = False

    def attach(self, output: IFilterOutput) -> None:
        self.output = output

    # client -> tunnel
    def outbound(self, data: bytes) -> bytes:
        pieces = []
        for chunk, reply in self.commands.feed(data):
            if reply is None:
                pieces.append(chunk)
            elif self.output is None:
                log.warn(
                    "Service {service_id}: cannot refuse {command} (the local proxy gave the ftp "
                    "filter no output); passing it on",
                    service_id=self.context.service_id,
                    command=chunk.split(b" ", 1)[0].strip().decode("ascii", "replace"),
                )
                pieces.append(chunk)
            else:
                log.info(
                    "Service {service_id}: connection {connection_id}: refused {command}: {reply}",
                    service_id=self.context.service_id,
                    connection_id=self.connection_id,
                    command=chunk.split(b" ", 1)[0].strip().decode("ascii", "replace"),
                    reply=reply.strip().decode("ascii"),
                )
                self._emit_inbound([reply])
        return _join(pieces, data)

    # tunnel -> client
    def inbound(self, data: bytes) -> bytes:
        events = self.replies.feed(data)
        if self._waiting is not None:
            self._backlog.extend(events)
            return b""
        return self._process(events)

    def _process(self, events: List[ReplyEvent]) -> bytes:
        """Turn events into bytes, stopping (and keeping the rest) at a listener not yet open."""
        pieces: List[bytes] = []
        for index, event in enumerate(events):
            if isinstance(event, bytes):
                pieces.append(event)
                continue
            ticket = parse_ticket_reply(event)
            if ticket is None:
                if not self._warned_untagged:
                    self._warned_untagged = True
                    log.warn(
                        "Service {service_id}: the FTP server's passive reply reached the source "
                        "unchanged ({reply}); the destination must use the ftp adapter for this "
                        "service too",
                        service_id=self.context.service_id,
                        reply=text_preview(event.raw, 80),
                    )
                pieces.append(event.raw)
                continue
            result: List[Any] = []
            d = defer.maybeDeferred(self.context.open_data_listener, data_connection_id(ticket))
            d.addBoth(result.append)
            if result:
                pieces.append(self._local_reply(event, result[0]))
                continue
            if self.output is None:
                raise StreamFilterError(
                    "the local proxy opened the FTP data listener asynchronously but gave the "
                    "filter no output to send the reply later (see IActiveStreamFilter)"
                )
            self._waiting = d
            self._backlog = list(events[index + 1 :])
            d.addCallback(lambda _: self._listener_ready(event, result[0]))
            break
        return b"".join(pieces)

    def _listener_ready(self, reply: PassiveReply, port_or_failure: Any) -> None:
        self._waiting = None
        if self._closed:
            return
        backlog, self._backlog = self._backlog, []
        first = self._local_reply(reply, port_or_failure)
        rest = self._process(backlog)  # may hold again, at a later passive reply
        assert self.output is not None
        self.output.send_inbound(first + rest)

    def _local_reply(self, reply: PassiveReply, port_or_failure: Any) -> bytes:
        if not isinstance(port_or_failure, int):
            log.error(
                "Service {service_id}: cannot open a local FTP data listener: {error}",
                service_id=self.context.service_id,
                error=getattr(port_or_failure, "getErrorMessage", lambda: port_or_failure)(),
            )
            return b"425 tunnelkit could not open a local data listener for passive mode\r\n"
        host = ipv4_for_replies(str(self.context.bind_address))
        if reply.code == 227 and host == "127.0.0.1" and ":" in str(self.context.bind_address):
            log.warn(
                "Service {service_id}: a PASV reply cannot name the IPv6 bind address "
                "{address}; the client should use EPSV",
                service_id=self.context.service_id,
                address=self.context.bind_address,
            )
        return local_passive_reply(reply.code, host, port_or_failure)

    def _emit_inbound(self, pieces: List[bytes]) -> None:
        data = b"".join(pieces)
        if not data:
            return
        if self._waiting is not None:
            self._backlog.append(data)  # behind the held reply, keeping order
        else:
            assert self.output is not None
            self.output.send_inbound(data)

    def connection_lost(self) -> None:
        self._closed = True
        self._backlog = []
        if self._waiting is not None:
            self._waiting = None


@implementer(IStreamFilter)
class FTPDestinationFilter:
    """The destination side of one FTP control connection (see the module docstring)."""

    def __init__(self, adapter: "FTPAdapter", context: IDestinationContext, connection_id: int) -> None:
        self.adapter = adapter
        self.context = context
        self.connection_id = connection_id
        self.replies = ReplyReader(record_codes=True)
        self.tickets: List[int] = []
        self.waiting_data: List["FTPDataFilter"] = []  # data connections held until a reply passes

    # server -> tunnel
    def outbound(self, data: bytes) -> bytes:
        events = self.replies.feed(data)
        if self.replies.completed:
            codes, self.replies.completed = self.replies.completed, []
            if self.waiting_data and any(releases_data(code) for code in codes):
                waiting, self.waiting_data = self.waiting_data, []
                for data_filter in waiting:
                    # After the bytes returned now (the reply) are in the tunnel.
                    self.context.reactor.callLater(0, data_filter.release)
        if len(events) == 1 and events[0] is data:
            return data
        pieces = []
        for event in events:
            if isinstance(event, bytes):
                pieces.append(event)
                continue
            try:
                host, port = parse_passive_address(event)
            except ValueError as e:
                log.warn(
                    "Service {service_id}: passing an unreadable passive reply on: {error}",
                    service_id=self.context.service_id,
                    error=str(e),
                )
                pieces.append(event.raw)
                continue
            target = self.adapter.data_target(self.context, host, port)
            ticket = self.adapter.issue_ticket(self.context.reactor, target, self)
            self.tickets.append(ticket)
            pieces.append(ticket_reply(event.code, ticket))
        return b"".join(pieces)

    # tunnel -> server
    def inbound(self, data: bytes) -> bytes:
        return data

    def connection_lost(self) -> None:
        for ticket in self.tickets:
            self.adapter.forget_ticket(ticket)
        self.tickets = []
        waiting, self.waiting_data = self.waiting_data, []
        for data_filter in waiting:
            data_filter.release()


def releases_data(code: int) -> bool:
    """Whether a reply on the control connection lets a held data connection go (see L{FTPDataFilter})."""
    return code < 200 or code >= 400 or code in (226, 250)


@implementer(IHoldingStreamFilter)
class FTPDataFilter:
    """
    The destination side of a passive data connection: holds what the server sends on it until the
    control connection has passed the transfer's reply (C{150}, C{125}, an error, or C{226}) into the
    tunnel, then passes everything untouched.  The server's end of the data connection (a short
    listing is often all sent and closed before the reply passes) is held with it and goes right
    after the held bytes: were it to go first, the client would see an empty listing.

    Why: the client reads the data connection only after it has seen that reply.  Were data to
    overtake the reply in the tunnel, the client's data socket would fill up, the source would stop
    reading the tunnel, and the reply behind the data would never arrive.  What is held is bounded
    (L{HOLD_LIMIT} bytes, L{HOLD_TIME} seconds); past either, or when the connection ends, it goes.
    """

    def __init__(self, control: FTPDestinationFilter, connection_id: int) -> None:
        self.control = control
        self.connection_id = connection_id
        self.output: Optional[IFilterOutput] = None
        self.holding = True
        self._held: List[bytes] = []
        self._held_size = 0
        self._send_end: Any = None  # the local end of stream, held behind the held bytes
        self._timer = control.context.reactor.callLater(HOLD_TIME, self.release)

    def attach(self, output: IFilterOutput) -> None:
        self.output = output

    def outbound(self, data: bytes) -> bytes:
        if not self.holding:
            return data
        if self.output is None:  # cannot send later: never hold
            self.release()
            return data
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size >= HOLD_LIMIT:
            held = self._take()
            return held
        return b""

    def inbound(self, data: bytes) -> bytes:
        return data

    def outbound_ended(self, send_end: Any) -> bool:
        if not self.holding:
            return True
        self._send_end = send_end
        return False

    def release(self) -> None:
        """Stop holding; send what is held, then the end of stream if it came meanwhile."""
        if not self.holding:
            return
        held = self._take()
        if held and self.output is not None:
            self.output.send_outbound(held)
        send_end, self._send_end = self._send_end, None
        if send_end is not None:
            send_end()

    def _take(self) -> bytes:
        self.holding = False
        if self._timer.active():
            self._timer.cancel()
        if self in self.control.waiting_data:
            self.control.waiting_data.remove(self)
        held, self._held, self._held_size = b"".join(self._held), [], 0
        return held

    def connection_lost(self) -> None:
        self.release()


def _join(pieces: List[bytes], original: bytes) -> bytes:
    if len(pieces) == 1 and pieces[0] is original:
        return original
    return b"".join(pieces)


# --- the adapter ---


@implementer(IServiceAdapter)
class FTPAdapter:
    """Passive FTP through the tunnel; one per service ID and local proxy session."""

    name = "ftp"

    def __init__(self, service_id: str, passive_host: str = "target") -> None:
        self.service_id = service_id
        self.passive_host = passive_host
        # ticket -> (target, expiry call, the control connection's filter)
        self._tickets: Dict[int, Tuple[Target, Any, Optional[FTPDestinationFilter]]] = {}
        self._redeemed: Dict[int, FTPDestinationFilter] = {}  # data connection id -> control filter
        self._next_ticket = 1

    def __repr__(self) -> str:
        return f"<FTPAdapter for {self.service_id}>"

    def source_filter(self, context: ISourceContext, connection_id: int) -> Optional[IStreamFilter]:
        if is_data_connection(connection_id):
            return None
        return FTPSourceFilter(self, context, connection_id)

    def destination_filter(
        self, context: IDestinationContext, connection_id: int
    ) -> Optional[IStreamFilter]:
        if is_data_connection(connection_id):
            control = self._redeemed.pop(connection_id, None)
            if control is None:
                return None
            data_filter = FTPDataFilter(control, connection_id)
            control.waiting_data.append(data_filter)
            return data_filter
        return FTPDestinationFilter(self, context, connection_id)

    def destination_target(self, context: IDestinationContext, connection_id: int) -> Target:
        if not is_data_connection(connection_id):
            return context.default_target
        ticket = connection_id & TICKET_MASK
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            raise StreamFilterError(
                f"service {self.service_id}: data connection {connection_id:#x} has no passive "
                f"ticket {ticket} (unknown, already used, or older than {TICKET_LIFETIME:g} s)"
            )
        target, expiry, control = entry
        if expiry.active():
            expiry.cancel()
        if control is not None:
            self._redeemed[connection_id] = control
        log.info(
            "Service {service_id}: data connection {connection_id} goes to {target}",
            service_id=self.service_id,
            connection_id=connection_id,
            target=describe_target(target),
        )
        return target

    def data_target(self, context: IDestinationContext, host: Optional[str], port: int) -> Target:
        """Where a data connection for a passive reply naming C{host} (or none), C{port} goes."""
        default = context.default_target
        if self.passive_host == "reply" and host is not None:
            return (host, port)
        if isinstance(default, str):  # a unix socket target: only the reply can name the host
            return (host or "127.0.0.1", port)
        return (default[0], port)

    def issue_ticket(
        self, reactor: Any, target: Target, control: Optional[FTPDestinationFilter] = None
    ) -> int:
        """Keep C{target} (and the control connection's filter) under a new ticket for
        L{TICKET_LIFETIME} seconds."""
        ticket = self._next_ticket
        while ticket in self._tickets:
            ticket = ticket % TICKET_MASK + 1
        self._next_ticket = ticket % TICKET_MASK + 1
        expiry = reactor.callLater(TICKET_LIFETIME, self._tickets.pop, ticket, None)
        self._tickets[ticket] = (target, expiry, control)
        return ticket

    def forget_ticket(self, ticket: int) -> None:
        """Drop an unused ticket (its control connection ended)."""
        entry = self._tickets.pop(ticket, None)
        if entry is not None and entry[1].active():
            entry[1].cancel()

    def open_tickets(self) -> int:
        """How many tickets wait for their data connection."""
        return len(self._tickets)

    def probe(self, reactor: Any, target: Target, timeout: float) -> Any:
        return probe_target(reactor, target, timeout, check_ftp_greeting)


def check_ftp_greeting(received: bytes, closed: bool) -> Optional[str]:
    """The server's 220 greeting line (last line of a multi-line one), None for more, ProbeFailed."""
    if received[:1] and not received[:1].isdigit():
        raise ProbeFailed(f"it sent {text_preview(received)} instead of an FTP greeting")
    for line in received.split(b"\n")[:-1]:
        code, marker = line[:3], line[3:4]
        if not code.isdigit() or marker == b"-" or code == b"120":
            continue  # inside a multi-line reply, or "ready in a few minutes"
        if code == b"220":
            return line.rstrip(b"\r").decode("latin-1")
        raise ProbeFailed(f"its greeting is {text_preview(line)}, not 220")
    return None


@implementer(IPlugin, IServiceAdapterFactory)
class FTPAdapterFactory:
    """Builds L{FTPAdapter}s.  Option C{passive-host}: C{target} (default) or C{reply}."""

    name = "ftp"
    prefixes = ("FTP",)

    def build(self, service_id: str, options: Mapping[str, Any]) -> IServiceAdapter:
        checked = check_options(self.name, service_id, options, ("passive-host",))
        passive_host = str(checked.get("passive-host", "target")).lower()
        if passive_host not in ("target", "reply"):
            raise ConfigError(
                f"adapter options of service {service_id}: passive-host must be 'target' (connect "
                f"data connections to the service's target host) or 'reply' (to the address in "
                f"the server's 227 reply), got {checked['passive-host']!r}"
            )
        return FTPAdapter(service_id, passive_host)


#: The plugin.
ftp_adapter_factory = FTPAdapterFactory()
