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
    C{source disconnected}, ...).

Connections are seen by wrapping each peer's protocol rules (L{AccountingRules}), which the relay
already applies to every message: no cost when the trail is off.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from tunnelkit.protocol.framing import Message

__all__ = ["AuditOptions", "AuditTrail", "AuditedApi", "NO_AUDIT", "build_audit_trail", "read_records", "trail_files"]

log = Logger()

_DATA = Message.DATA
_STREAM_START = Message.STREAM_START
_STREAM_RESET = Message.STREAM_RESET
_CONNECTION_START = Message.CONNECTION_START
_CONNECTION_RESET = Message.CONNECTION_RESET
_OTHER = {"source": "destination", "destination": "source"}
_KEY_ID_RE = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")
_TUNNEL_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_TARGET_PREFIX = "IoTSecuredTunneling."

#: What a value from a client may take in a record.
MAX_VALUE = 128
#: The trail's size before it is rotated, and how many rotated files are kept: at most ~320 MiB.
DEFAULT_ROTATE_SIZE = 64 * 1024 * 1024
KEEP_ROTATED = 4


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
         f"Bytes after which the trail is rotated to FILE.1 ... FILE.{KEEP_ROTATED} (the oldest dropped).",
         int],
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
        #: tunnel id -> (service, stream id, connection id) -> the open connection's counts.
        self._connections: Dict[str, Dict[Tuple[str, int, int], List[float]]] = {}

    def close(self) -> None:
        for tunnel_id in list(self._connections):
            self._end_all(tunnel_id, lambda key: True, "the service stopped")
        self._file.close()

    def _open(self) -> Any:
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
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
        now = self._clock.seconds()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        record = {"time": stamp, "kind": kind, **{k: _bounded(v) for k, v in fields.items()}}
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        if not self._file.closed:
            self._file.write(line + "\n")
            if self.rotate_size and self._file.tell() >= self.rotate_size:
                self._rotate()
        log.info("audit {record}", record=line)

    # --- peers (called by the relay) ---

    def peer_connected(self, peer: Any) -> None:
        link = peer.link
        self.record("peer-connect", tunnel_id=link.tunnel_id, side=peer.side, channel_id=peer.channel_id,
                    client=_client(peer))
        peer.rules = AccountingRules(peer.rules, self, link.tunnel_id, peer.side)

    def peer_disconnected(self, peer: Any) -> None:
        link = peer.link
        ended = _peer_ending(peer)
        self.record("peer-disconnect", tunnel_id=link.tunnel_id, side=peer.side, channel_id=peer.channel_id,
                    client=_client(peer), ended=ended)
        if not peer.replaced:
            self._end_all(link.tunnel_id, lambda key: True, f"{peer.side} disconnected")

    # --- connections (called by AccountingRules) ---

    def _started(self, tunnel_id: str, key: Tuple[str, int, int], replaces_stream: bool) -> None:
        if replaces_stream:
            service = key[0]
            self._end_all(tunnel_id, lambda k: k[0] == service, "replaced by a new stream")
        self._connections.setdefault(tunnel_id, {})[key] = [self._clock.seconds(), 0, 0]

    def _data(self, tunnel_id: str, key: Tuple[str, int, int], side: str, size: int) -> None:
        counts = self._connections.get(tunnel_id, {}).get(key)
        if counts is not None:
            counts[1 if side == "source" else 2] += size

    def _end(self, tunnel_id: str, key: Tuple[str, int, int], ended: str) -> None:
        counts = self._connections.get(tunnel_id, {}).pop(key, None)
        if counts is None:
            return
        self.record(
            "connection", tunnel_id=tunnel_id, service=key[0], stream_id=key[1], connection_id=key[2],
            bytes_source_to_destination=int(counts[1]), bytes_destination_to_source=int(counts[2]),
            duration_s=round(self._clock.seconds() - counts[0], 3), ended=ended,
        )

    def _end_all(self, tunnel_id: str, which: Any, ended: str) -> None:
        for key in [k for k in self._connections.get(tunnel_id, {}) if which(k)]:
            self._end(tunnel_id, key, ended)
        if not self._connections.get(tunnel_id):
            self._connections.pop(tunnel_id, None)


class AccountingRules:
    """
    A peer's protocol rules (L{tunnelkit.protocol.rules.PeerRules}) that also tell the trail about
    the connections its messages start, carry and end.  Everything else is the wrapped rules'.
    """

    def __init__(self, rules: Any, trail: AuditTrail, tunnel_id: str, side: str) -> None:
        object.__setattr__(self, "_rules", rules)
        object.__setattr__(self, "_trail", trail)
        object.__setattr__(self, "_tunnel_id", tunnel_id)
        object.__setattr__(self, "_side", side)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rules, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._rules, name, value)  # e.g. the relay updating the services after a rotation

    def check(self, message: Any, size: int) -> None:
        self._rules.check(message, size)
        kind = message.type
        trail, tunnel_id = self._trail, self._tunnel_id
        if kind == _DATA:
            trail._data(tunnel_id, (message.serviceId, message.streamId, message.connectionId or 1), self._side,
                        len(message.payload))
        elif kind == _CONNECTION_START or kind == _STREAM_START:
            trail._started(tunnel_id, (message.serviceId, message.streamId, message.connectionId or 1),
                           kind == _STREAM_START)
        elif kind == _CONNECTION_RESET:
            trail._end(tunnel_id, (message.serviceId, message.streamId, message.connectionId or 1),
                       f"reset by {self._side}")
        elif kind == _STREAM_RESET:
            service, stream = message.serviceId, message.streamId
            trail._end_all(tunnel_id, lambda k: k[0] == service and k[1] == stream, f"stream reset by {self._side}")


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

    def __init__(self, api: Resource, trail: AuditTrail, store: Any) -> None:
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
