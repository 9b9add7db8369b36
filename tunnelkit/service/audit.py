# -*- test-case-name: tests.test_audit -*-
"""
The service's audit trail: one JSON object per line, to C{--audit-log} (default
C{<state-dir>/audit.jsonl}, mode 0600; C{--audit-log ""} turns it off) and to the log
(C{tunnelkit.service.audit}).  Never a token.  Past C{--audit-log-size} bytes (64 MiB) the file is
rotated to C{FILE.1} ... C{FILE.4}, so the trail stays bounded over months.  C{tunnelkit audit --tunnel-id ID} reads it back.

Records (every one has C{time}, ISO 8601 UTC with milliseconds, and C{kind}):
  - C{api}: one per API call: C{account}, C{access_key_id}, C{operation}, C{tunnel_id} (when the
    call names or opens one), C{outcome} (C{ok} or the error type), C{status}, C{client};
  - C{peer-connect} / C{peer-disconnect}: C{tunnel_id}, C{side}, C{channel_id}, C{client}, and for
    a disconnect C{ended} (C{replaced}, C{closed by the service: CAUSE}, C{close code N},
    C{connection lost});
  - C{connection}: one per TCP connection carried through a tunnel, when it ends: C{tunnel_id},
    C{service}, C{stream_id}, C{connection_id}, C{bytes_source_to_destination},
    C{bytes_destination_to_source}, C{duration_s}, C{ended} (C{reset by source},
    C{reset by destination}, C{stream reset by ...}, C{replaced by a new stream},
    C{source disconnected}, C{refused: the destination is not connected}, ...).  C{closed} is a
    normal end: with tunnelkit's half-close extension both sides sent their EOF (type 1003) before
    the reset that ends the connection; a reset without them is the C{reset by ...} it is.

The relay tells each tunnel's L{TunnelLedger} (C{link.ledger}, set when a peer connects) about the
messages that start, carry, half-close and end connections, in the per-kind branch it runs anyway;
a DATA frame's bytes come from the frame's size (L{tunnelkit.protocol.rules.payload_size}), never
from reading its payload.  With the trail off there is no ledger, and no cost.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from tunnelkit.config import number as _number
from tunnelkit.protocol.framing import Message
from tunnelkit.protocol.rules import payload_size

if TYPE_CHECKING:  # the API loads botocore; the trail needs only its type
    from tunnelkit.service.api import ApiResource

__all__ = [
    "AuditOptions",
    "AuditTrail",
    "AuditedApi",
    "NO_AUDIT",
    "TunnelLedger",
    "build_audit_trail",
    "read_records",
    "trail_files",
]

log = Logger()

_STREAM_START = Message.STREAM_START
_KEY_ID_RE = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")
_TUNNEL_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_TARGET_PREFIX = "IoTSecuredTunneling."

#: What a value from a client may take in a record.
MAX_VALUE = 128
#: The trail's size before it is rotated, and how many rotated files are kept: at most ~320 MiB.
DEFAULT_ROTATE_SIZE = 64 * 1024 * 1024
KEEP_ROTATED = 4


#: A record as one JSON line: C{json.dumps(record, ensure_ascii=False, separators=(",", ":"))}
#: without the encoder json.dumps builds anew for every call with options.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _bounded(value: Any, limit: int = MAX_VALUE) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


class AuditOptions:
    """Mixin for the service's Options: where the audit trail goes."""

    optParameters = [
        ["audit-log", None, None,
         "The audit trail, JSON lines (default <state-dir>/audit.jsonl; \"\" turns it off)."],
        ["audit-log-size", None, DEFAULT_ROTATE_SIZE,
         f"Bytes after which the trail is rotated to FILE.1 ... FILE.{KEEP_ROTATED} (the oldest dropped; "
         "0: never rotated).",
         _number(0, whole=True)],
    ]


class _NoAudit:
    """The trail when it is off: every hook does nothing."""

    def record(self, kind: str, **fields: Any) -> None:
        pass

    def peer_connected(self, peer: Any) -> None:
        pass

    def peer_disconnected(self, peer: Any) -> None:
        pass


NO_AUDIT: Any = _NoAudit()


class AuditTrail:
    """
    Writes the records (see the module docstring).

    @param path: the JSON-lines file, appended to (made with mode 0600).
    """

    def __init__(self, path: str, clock: IReactorTime, rotate_size: int = DEFAULT_ROTATE_SIZE) -> None:
        self.path = path
        self._clock = clock
        self.rotate_size = rotate_size
        self._file = self._open()
        self._stamp: Tuple[int, str] = (-1, "")  # the current second, formatted
        #: tunnel id -> the ledger of that tunnel's open connections (while it has any, or a peer).
        self._ledgers: Dict[str, TunnelLedger] = {}

    def close(self) -> None:
        for ledger in list(self._ledgers.values()):
            ledger.end_all(lambda key: True, "the service stopped")
        self._ledgers.clear()
        self._file.close()

    def _open(self) -> Any:
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        #: Bytes in the file: counted as lines are written (a text file's tell() is slow and a syscall).
        self._size = os.fstat(descriptor).st_size
        return os.fdopen(descriptor, "a", encoding="utf-8", buffering=1)

    def _rotate(self) -> None:
        """FILE -> FILE.1 -> ... -> FILE.KEEP_ROTATED (dropped after that), and a new FILE."""
        self._file.close()
        for number in range(KEEP_ROTATED - 1, 0, -1):
            older = f"{self.path}.{number}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{number + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._file = self._open()

    def record(self, kind: str, **fields: Any) -> None:
        """Write one record (and log it)."""
        milliseconds = int(self._clock.seconds() * 1000)
        second = milliseconds // 1000
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        record = {"time": f"{self._stamp[1]}.{milliseconds % 1000:03d}Z", "kind": kind,
                  **{k: _bounded(v) for k, v in fields.items()}}
        line = _encode(record)
        if not self._file.closed:
            # One write per record, line-buffered: each is in the file (the OS's cache) once record returns.
            self._file.write(line + "\n")
            self._size += (len(line) if line.isascii() else len(line.encode("utf-8"))) + 1
            if self.rotate_size and self._size >= self.rotate_size:
                self._rotate()
        log.info("audit {record}", record=line)

    # --- peers (called by the relay) ---

    def peer_connected(self, peer: Any) -> None:
        link = peer.link
        self.record("peer-connect", tunnel_id=link.tunnel_id, side=peer.side, channel_id=peer.channel_id,
                    client=_client(peer))
        ledger = getattr(link, "ledger", None)
        if ledger is None:
            ledger = self._ledgers.get(link.tunnel_id) or TunnelLedger(self, link.tunnel_id)
            link.ledger = ledger
        self._ledgers[link.tunnel_id] = ledger

    def peer_disconnected(self, peer: Any) -> None:
        link = peer.link
        ended = _peer_ending(peer)
        self.record("peer-disconnect", tunnel_id=link.tunnel_id, side=peer.side, channel_id=peer.channel_id,
                    client=_client(peer), ended=ended)
        ledger = self._ledgers.get(link.tunnel_id)
        if ledger is not None and not peer.replaced:
            ledger.end_all(lambda key: True, f"{peer.side} disconnected")
            self._ledgers.pop(link.tunnel_id, None)


#: A connection's key in a ledger: (service id, stream id, connection id).
_Key = Tuple[str, int, int]

#: Bits of L{_Open.eofs}: which side sent its EOF.
_EOF_BIT = {"source": 1, "destination": 2}
_BOTH_EOFS = 3


class _Open:
    """One open connection's counts."""

    __slots__ = ("started", "to_destination", "to_source", "eofs")

    def __init__(self, started: float) -> None:
        self.started = started
        self.to_destination = 0
        self.to_source = 0
        self.eofs = 0


class TunnelLedger:
    """
    The open connections of one tunnel, for its C{connection} records.  The relay calls it from
    its per-message branch (only when the trail is on): L{started}, L{data}, L{eof}, L{reset},
    L{stream_reset}, L{refused}, each with the side that sent the message.
    """

    __slots__ = ("_trail", "tunnel_id", "_open")

    def __init__(self, trail: AuditTrail, tunnel_id: str) -> None:
        self._trail = trail
        self.tunnel_id = tunnel_id
        self._open: Dict[_Key, _Open] = {}

    def __len__(self) -> int:
        return len(self._open)

    def started(self, side: str, message: Message) -> None:
        """A STREAM_START (which ends the service's older stream) or a CONNECTION_START."""
        service = message.serviceId
        if message.type == _STREAM_START:
            self.end_all(lambda k: k[0] == service, "replaced by a new stream")
        self._open[(service, message.streamId, message.connectionId or 1)] = _Open(self._trail._clock.seconds())

    def data(self, side: str, message: Message, size: int) -> None:
        """A DATA frame of C{size} bytes (its protobuf body): its payload is counted without being read."""
        counts = self._open.get((message.serviceId, message.streamId, message.connectionId or 1))
        if counts is not None:
            if side == "source":
                counts.to_destination += payload_size(message, size)
            else:
                counts.to_source += payload_size(message, size)

    def eof(self, side: str, message: Message) -> None:
        """An EOF (half-close extension) that was forwarded: C{side} will send no more on it."""
        counts = self._open.get((message.serviceId, message.streamId, message.connectionId or 1))
        if counts is not None:
            counts.eofs |= _EOF_BIT[side]

    def reset(self, side: str, message: Message) -> None:
        """A CONNECTION_RESET from C{side}: C{closed} after both EOFs, else C{reset by side}."""
        key = (message.serviceId, message.streamId, message.connectionId or 1)
        counts = self._open.get(key)
        if counts is not None:
            self._end(key, "closed" if counts.eofs == _BOTH_EOFS else f"reset by {side}")

    def stream_reset(self, side: str, message: Message) -> None:
        """A STREAM_RESET from C{side}: ends each connection of that stream."""
        service, stream = message.serviceId, message.streamId
        for key in [k for k in self._open if k[0] == service and k[1] == stream]:
            self._end(key, "closed" if self._open[key].eofs == _BOTH_EOFS else f"stream reset by {side}")

    def refused(self, message: Message, why: str) -> None:
        """A start the relay answered with a reset itself (C{why}): recorded as a connection of no bytes."""
        self.started("source", message)
        self._end((message.serviceId, message.streamId, message.connectionId or 1), f"refused: {why}")

    def end_all(self, which: Any, ended: str) -> None:
        for key in [k for k in self._open if which(k)]:
            self._end(key, ended)

    def _end(self, key: _Key, ended: str) -> None:
        counts = self._open.pop(key, None)
        if counts is None:
            return
        trail = self._trail
        trail.record(
            "connection", tunnel_id=self.tunnel_id, service=key[0], stream_id=key[1], connection_id=key[2],
            bytes_source_to_destination=counts.to_destination, bytes_destination_to_source=counts.to_source,
            duration_s=round(trail._clock.seconds() - counts.started, 3), ended=ended,
        )


def _client(peer: Any) -> str:
    transport = getattr(peer, "transport", None)
    address = transport.getPeer() if transport is not None else None
    return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"


def _peer_ending(peer: Any) -> str:
    if peer.replaced:
        return "replaced"
    if getattr(peer, "localCloseCode", None) is not None:  # autobahn: the close frame we sent
        reason = peer.localCloseReason or b""
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        return f"closed by the service: {peer.localCloseCode} {reason}".rstrip()
    code = getattr(peer, "remoteCloseCode", None)
    if code is not None:
        return f"close code {code}"
    return "connection lost"


class AuditedApi(Resource):
    """The API resource, with one C{api} record per call."""

    isLeaf = True

    def __init__(self, api: ApiResource, trail: AuditTrail, store: Any) -> None:
        super().__init__()
        self._api = api
        self._trail = trail
        self._store = store

    def render_GET(self, request: server.Request) -> bytes:
        return self._api.render_GET(request)

    def render_POST(self, request: server.Request) -> Any:
        d = self._api.answer(request)
        d.addCallback(lambda answer: Deferred.fromCoroutine(self._record_answer(answer, request)))
        d.addCallback(self._api.write_answer, request)
        return server.NOT_DONE_YET

    async def _record_answer(self, answer: bytes, request: server.Request) -> bytes:
        try:
            await self._record(request, answer)
        except Exception:
            log.failure("Could not write the audit record of an API call")
        return answer

    async def _record(self, request: server.Request, answer: bytes) -> None:
        status = request.code
        target = (request.requestHeaders.getRawHeaders(b"x-amz-target") or [b""])[0].decode("latin-1")
        operation = target[len(_TARGET_PREFIX):] if target.startswith(_TARGET_PREFIX) else target or "?"
        authorization = (request.requestHeaders.getRawHeaders(b"authorization") or [b""])[0].decode("latin-1")
        match = _KEY_ID_RE.search(authorization[:1024])
        key_id = match.group(1) if match else None
        account = None
        if key_id is not None:
            key = await self._store.get_access_key(key_id)
            account = getattr(key, "account_id", None)
        outcome = "ok"
        if status != 200:
            outcome = (request.responseHeaders.getRawHeaders(b"x-amzn-errortype") or [b"error"])[0].decode("latin-1")
        address = request.getClientAddress()
        self._trail.record(
            "api", account=account, access_key_id=key_id, operation=operation,
            tunnel_id=_tunnel_of(request, answer if status == 200 else b""), outcome=outcome, status=status,
            client=f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}",
        )


def _tunnel_of(request: server.Request, answer: bytes) -> Optional[str]:
    """The tunnel a call names (C{tunnelId}, a tunnel ARN) or opened (its answer's C{tunnelId})."""
    documents: List[Any] = []
    content = request.content
    if content is not None:
        try:
            content.seek(0)
            documents.append(json.loads(content.read(64 * 1024) or b"{}"))
        except (ValueError, OSError):
            pass
    if answer:
        try:
            documents.append(json.loads(answer))
        except ValueError:
            pass
    for document in documents:
        if not isinstance(document, dict):
            continue
        value = document.get("tunnelId") or str(document.get("resourceArn") or "").rpartition("/")[2]
        if isinstance(value, str) and _TUNNEL_ID_RE.fullmatch(value):
            return value
    return None


def build_audit_trail(options: Mapping[str, Any], state_dir: str, clock: IReactorTime) -> Optional[AuditTrail]:
    """The trail C{--audit-log} asks for (None when it is off)."""
    path = options.get("audit-log")
    if path is None:
        path = os.path.join(state_dir, "audit.jsonl")
    if not path:
        return None
    return AuditTrail(path, clock, int(options.get("audit-log-size") or 0))


def trail_files(path: str) -> List[str]:
    """The trail's files, oldest first: the rotated ones (FILE.N ... FILE.1), then FILE."""
    rotated = [f"{path}.{n}" for n in range(KEEP_ROTATED, 0, -1) if os.path.exists(f"{path}.{n}")]
    return rotated + [path]


def read_records(lines: Iterable[str], tunnel_id: Optional[str] = None) -> Iterator[Dict[str, Any]]:
    """The records of a trail's lines (those of C{tunnel_id} only, if given); bad lines are skipped."""
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (tunnel_id is None or record.get("tunnel_id") == tunnel_id):
            yield record
