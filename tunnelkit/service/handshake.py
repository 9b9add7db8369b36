# -*- test-case-name: tests.test_relay -*-
"""
The C{GET /tunnel} WebSocket upgrade (reference sections 1.2 and 1.3): the request checks, and the
statuses and close codes the service answers with.  Pure functions and tables: no I/O.

The tables are the reference: L{STATUS_BY_REASON} (the relay's own refusals; the store's are
L{tunnelkit.service.tokens.STATUS_BY_REASON}) and L{CLOSE_BY_CAUSE} (how the service closes an open
WebSocket).  4xx means the client must change something; only the service's own failures are 5xx
(the reference local proxy retries those every 2.5 s and gives up at once on a 4xx).

The checks, in the order of L{tunnelkit.service.relay.PeerProtocol.onConnect}: the client address's
failure budget (L{tunnelkit.service.pairing.HandshakeLimiter.check_address}; first, so that it blocks
only itself), L{check_handshake} (the request itself), then the token
(L{tunnelkit.service.pairing.Relay.admit}).  The first that fails answers the upgrade with its
status, a C{channel-id} header and a one-line C{text/plain} body (L{refusal_response}).  Malformed
WebSocket requests (no C{Upgrade}, bad key or version, not C{GET}) get autobahn's own 4xx answer,
with the same kind of body.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from http import HTTPStatus
from itertools import count
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from tunnelkit.protocol.tokens import CLIENT_TOKEN_RE, REFUSAL_HEADER
from tunnelkit.service.interfaces import DESTINATION, SOURCE, HandshakeRejected

__all__ = [
    "SUBPROTOCOLS",
    "MAX_REQUEST_SIZE",
    "STATUS_BY_REASON",
    "CLOSE_BY_CAUSE",
    "HandshakeRequest",
    "check_handshake",
    "refused",
    "violation_close",
    "refusal_response",
    "new_channel_id",
]

#: Subprotocols the service accepts, in order of preference, with the protocol version each means.
SUBPROTOCOLS: Dict[str, int] = {
    "aws.iot.securetunneling-3.0": 3,
    "aws.iot.securetunneling-2.0": 2,
    "aws.iot.securetunneling-1.0": 1,
    "aws.iot.securedtunneling-1.0": 1,  # the browser sample's spelling
}

#: The largest handshake request (request line and headers) the service reads.
MAX_REQUEST_SIZE = 4096

TOKEN_HEADER = "access-token"
TOKEN_COOKIE = "awsiot-tunnel-token"
CLIENT_TOKEN_HEADER = "client-token"

#: The HTTP status of each refusal the relay makes itself (the reasons of L{HandshakeRejected}).
STATUS_BY_REASON: Dict[str, int] = {
    # the request (check_handshake)
    "request-too-large": 431,
    "bad-path": 400,
    "bad-mode": 400,
    "missing-token": 401,
    "duplicate-token": 400,
    "bad-client-token": 400,
    "no-subprotocol": 400,
    # the limits (pairing): 429s, so that the client retries with the same token
    "too-many-failures": 429,  # the client address spent its failure budget
    "tunnel-failures-limited": 429,  # the token's routing key did: instead of the store's 4xx
    "rate-limited": 429,  # the tunnel's accepted handshakes per second
    "too-many-websockets": 429,  # the account's open WebSockets
    # the service itself
    "internal-error": 500,  # the store failed
}

#: Refusals that come in floods (a failure budget spent): counted, logged at debug only.
FLOOD_REASONS = frozenset({"too-many-failures", "tunnel-failures-limited"})

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008

REASON_CLOSED = "Tunnel closed"
REASON_EXPIRED = "Tunnel expired"
REASON_ROTATED = "Access token rotated"
REASON_REPLACED = "Connection replaced by a new peer"
REASON_SHUTDOWN = "Service shutting down"

#: How the service closes an open WebSocket: cause (the metrics label) -> (close code, reason).
#: A protocol violation is C{CLOSE_POLICY} with the rule in its reason (L{violation_close}); a
#: peer that went silent is dropped without a close frame (cause C{"timeout"}); autobahn itself
#: closes with 1009 a WebSocket frame or message over 131076 bytes.
CLOSE_BY_CAUSE: Dict[str, Tuple[int, str]] = {
    "tunnel-closed": (CLOSE_NORMAL, REASON_CLOSED),
    "tunnel-expired": (CLOSE_NORMAL, REASON_EXPIRED),
    "token-rotated": (CLOSE_POLICY, REASON_ROTATED),
    "replaced": (CLOSE_POLICY, REASON_REPLACED),
    "shutdown": (CLOSE_GOING_AWAY, REASON_SHUTDOWN),
}


def refused(reason: str, text: str) -> HandshakeRejected:
    """The refusal C{reason} (a key of L{STATUS_BY_REASON}) with its status and C{text}."""
    return HandshakeRejected(STATUS_BY_REASON[reason], reason, text)


def violation_close(rule: str, error: object) -> Tuple[int, str]:
    """The close code and reason for a peer that broke C{rule} (C{error} says how)."""
    return CLOSE_POLICY, f"Protocol violation ({rule}): {error}"


@dataclass(frozen=True)
class HandshakeRequest:
    """A handshake that passed the request checks (its token is not claimed yet)."""

    mode: str
    access_token: str
    client_token: Optional[str]
    subprotocol: str
    version: int


def _header_values(raw_request: bytes) -> Tuple[int, Dict[str, List[str]]]:
    """
    The size of C{raw_request}'s request line and headers, and every value of each header (names
    lower-cased, one entry per header line, in order).
    """
    end = raw_request.find(b"\r\n\r\n")
    head = raw_request if end < 0 else raw_request[:end]
    size = len(head) + 4
    values: Dict[str, List[str]] = {}
    for line in head.decode("iso-8859-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            values.setdefault(name.strip().lower(), []).append(value.strip())
    return size, values


def _split_list(values: Iterable[str]) -> List[str]:
    """Header values as a list, splitting comma-joined ones (a proxy may fold repeated headers)."""
    return [item.strip() for value in values for item in value.split(",")]


def _cookie_values(cookie_headers: Iterable[str], name: str) -> List[str]:
    found = []
    for header in cookie_headers:
        for pair in re.split(r"[;,]", header):
            key, sep, value = pair.partition("=")
            if sep and key.strip() == name:
                found.append(value.strip().strip('"'))
    return found


def check_handshake(
    raw_request: bytes,
    path: str,
    params: Mapping[str, Sequence[str]],
    offered_protocols: Sequence[str],
) -> HandshakeRequest:
    """
    Check a C{GET /tunnel} upgrade request (everything but the token's validity).

    @param raw_request: the request line and headers as received (autobahn's C{http_request_data}).
    @param path: the request path, without the query.
    @param params: the query parameters, each with all its values.
    @param offered_protocols: the C{Sec-WebSocket-Protocol} values, in the client's order.
    @raise HandshakeRejected: the first check that fails (L{STATUS_BY_REASON}).
    """
    size, headers = _header_values(raw_request)
    if size > MAX_REQUEST_SIZE:
        raise refused(
            "request-too-large",
            f"Request too large: the handshake request is {size} bytes, the limit is "
            f"{MAX_REQUEST_SIZE}",
        )
    if path != "/tunnel":
        raise refused("bad-path", "Invalid path: the tunnel endpoint is /tunnel")
    modes = params.get("local-proxy-mode", [])
    if len(modes) != 1 or modes[0] not in (SOURCE, DESTINATION):
        shown = ", ".join(repr(m) for m in modes) if modes else "missing"
        raise refused(
            "bad-mode",
            f"Invalid local-proxy-mode ({shown}): give exactly one of "
            "?local-proxy-mode=source or ?local-proxy-mode=destination",
        )
    tokens = [t for t in _split_list(headers.get(TOKEN_HEADER, []))]
    tokens += _cookie_values(headers.get("cookie", []), TOKEN_COOKIE)
    present = [t for t in tokens if t]
    if not present:
        raise refused(
            "missing-token",
            f"Missing access token: send it in an {TOKEN_HEADER} header or an "
            f"{TOKEN_COOKIE} cookie",
        )
    if len(tokens) > 1:
        raise refused(
            "duplicate-token",
            f"Invalid access token: give the token exactly once, in one {TOKEN_HEADER} header or "
            f"one {TOKEN_COOKIE} cookie",
        )
    client_tokens = _split_list(headers.get(CLIENT_TOKEN_HEADER, []))
    if len(client_tokens) > 1:
        raise refused("bad-client-token", "Invalid client token: give at most one client-token header")
    client_token = client_tokens[0] if client_tokens else None
    if client_token is not None and not CLIENT_TOKEN_RE.match(client_token):
        raise refused(
            "bad-client-token",
            "Invalid client token: it must be 32 to 128 characters of a-z, A-Z, 0-9 and -",
        )
    chosen = None
    for protocol in SUBPROTOCOLS:
        if protocol in offered_protocols:
            chosen = protocol
            break
    if chosen is None:
        raise refused(
            "no-subprotocol",
            "Unsupported subprotocol: offer aws.iot.securetunneling-3.0, -2.0 or -1.0 in "
            "Sec-WebSocket-Protocol",
        )
    return HandshakeRequest(modes[0], present[0], client_token, chosen, SUBPROTOCOLS[chosen])


def refusal_response(
    code: int, text: str, headers: Iterable[Tuple[str, str]] = (), channel_id: str = "", reason: str = ""
) -> bytes:
    """
    The whole HTTP answer refusing an upgrade: C{code}, C{headers}, the channel id, the refusal's
    C{reason} (L{REFUSAL_HEADER}: what a tunnelkit client acts on), C{text} as the body.
    """
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Error"
    body = (text + "\n").encode("utf-8")
    lines = [f"HTTP/1.1 {code} {phrase}"]
    for name, value in headers:
        lines.append(f"{name}: {value}")
    if channel_id:
        lines.append(f"channel-id: {channel_id}")
    if reason:
        lines.append(f"{REFUSAL_HEADER}: {reason}")
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8") + body


_MACHINE_ID = secrets.token_hex(8)
_CHANNEL_SEQUENCE = count(1)


def new_channel_id(now: float) -> str:
    """
    A unique id for one WebSocket session, shaped like AWS's (16-8-8-16-8 hex digits):
    machine, process, sequence, time in microseconds, random.
    """
    return "%s-%08x-%08x-%016x-%s" % (
        _MACHINE_ID,
        os.getpid() & 0xFFFFFFFF,
        next(_CHANNEL_SEQUENCE) & 0xFFFFFFFF,
        int(now * 1_000_000) & 0xFFFFFFFFFFFFFFFF,
        secrets.token_hex(4),
    )
