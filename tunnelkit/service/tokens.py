# -*- test-case-name: tests.test_tokens -*-
"""
Client access tokens (CATs): their format, generation, hashing, and the rules that decide whether a
data-plane handshake may use one (reference section 1.12).

Format
======
A token is two URL-safe parts joined by a dot::

    <routing>.<secret>
    e.g.  q5tFM0bT-3kLh3eW.yG0h0b1c2Y7a8wPZ3uO6gq0nXo3i1tS1mQ9Gk5q6j2E

- C{routing}: 16 characters, the first 96 bits of C{SHA-256("tunnelkit-route:" + tunnel id)} in
  unpadded base64url.  It is the same for the source and destination tokens of a tunnel and for every
  rotation of them, reveals nothing secret (not even the tunnel id), and lets a load balancer in front of
  several service nodes send both peers of one tunnel to the same node by hashing it (read the
  C{access-token} header or C{awsiot-tunnel-token} cookie, take what precedes the first dot) without
  any database look-up.
- C{secret}: 43 characters, 256 bits from the operating system's CSPRNG (L{secrets.token_bytes}), in
  unpadded base64url.

Both parts use only C{A-Z a-z 0-9 - _}, and the separator is C{.}, so a token is safe in a header, a
cookie, a URL and a shell argument.  The service stores only C{SHA-256(token)} (hex); 256 bits of entropy
make a slow password hash unnecessary.

Client tokens (the C{client-token} header a peer binds its access token to) are kept as
L{client_token_hash} only, a SHA-256 under a prefix of its own: a stolen database shows which tokens
were bound, never a client token that would let its holder reconnect.

Rules
=====
L{check_claim} is the one place that decides a handshake's fate from the token's stored state; the
store calls it inside its transaction and records what it returns.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Optional

from tunnelkit.protocol.tokens import (
    CLIENT_TOKEN_MISMATCH,
    CLIENT_TOKEN_RE,
    TOKEN_ROTATED,
    TOKEN_USED,
    UNKNOWN_TOKEN,
)
from tunnelkit.service.interfaces import DESTINATION, SOURCE, TokenRejected

ROUTING_LENGTH = 16
SECRET_BYTES = 32
SECRET_LENGTH = 43
TOKEN_LENGTH = ROUTING_LENGTH + 1 + SECRET_LENGTH

_TOKEN_RE = re.compile(r"\A[A-Za-z0-9_-]{%d}\.[A-Za-z0-9_-]{%d}\Z" % (ROUTING_LENGTH, SECRET_LENGTH))

#: The texts AWS documents for these two rejections (reference section 1.12).
TOKEN_USED_TEXT = (
    "Invalid access token: The access token was previously used and cannot be used again"
)
CLIENT_TOKEN_MISMATCH_TEXT = (
    "Invalid client token: The provided client token does not match the client token that was "
    "previously set."
)

#: Handshake statuses by rejection reason: 401 for a token that cannot (or can no longer) authenticate,
#: 403 for a valid token used in the wrong mode or with a client token taken by another tunnel,
#: 410 for a tunnel that is closed or whose lifetime ended.
STATUS_BY_REASON = {
    UNKNOWN_TOKEN: 401,
    TOKEN_ROTATED: 401,
    TOKEN_USED: 401,
    CLIENT_TOKEN_MISMATCH: 401,
    "mode-mismatch": 403,
    "client-token-in-use": 403,
    "tunnel-closed": 410,
    "tunnel-expired": 410,
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def routing_key_for_tunnel(tunnel_id: str) -> str:
    """The non-secret routing part shared by every token of C{tunnel_id}."""
    digest = hashlib.sha256(b"tunnelkit-route:" + tunnel_id.encode("utf-8")).digest()
    return _b64(digest[:12])


def new_access_token(tunnel_id: str) -> str:
    """A fresh access token for C{tunnel_id}: C{<routing>.<256-bit secret>}."""
    return routing_key_for_tunnel(tunnel_id) + "." + _b64(secrets.token_bytes(SECRET_BYTES))


def is_well_formed(token: str) -> bool:
    """Whether C{token} has the shape of a tunnelkit access token."""
    return bool(_TOKEN_RE.match(token))


def routing_key(token: str) -> Optional[str]:
    """The routing part of C{token}, or None when C{token} is not shaped like one."""
    if not is_well_formed(token):
        return None
    return token[:ROUTING_LENGTH]


def token_hash(token: str) -> str:
    """What the store keeps instead of C{token}: hex SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def client_token_hash(client_token: str) -> str:
    """What the store keeps instead of a client token: hex SHA-256 of a prefixed copy."""
    return hashlib.sha256(b"tunnelkit-client-token:" + client_token.encode("utf-8")).hexdigest()


def reject(reason: str, text: str) -> TokenRejected:
    """A L{TokenRejected} with the status this module assigns to C{reason}."""
    return TokenRejected(STATUS_BY_REASON[reason], reason, text)


@dataclass(frozen=True)
class TokenState:
    """What the store knows about one presented token (looked up by its hash)."""

    side: str
    revoked: bool
    used: bool
    bound_client_token_hash: Optional[str]  # L{client_token_hash} of the client token it is bound to
    tunnel_status: str  # OPEN | CLOSED
    expires_at: float


@dataclass(frozen=True)
class Claim:
    """
    An accepted handshake: C{bind} is the L{client_token_hash} to record (None when nothing
    changes).
    """

    first_use: bool
    bind: Optional[str]


def check_claim(
    state: Optional[TokenState],
    mode: str,
    client_token: Optional[str],
    now: float,
    client_token_taken: bool = False,
) -> Claim:
    """
    Decide whether a handshake in C{mode} presenting a token in C{state} may connect.

    @param state: None when no token has this hash (never issued, or its tunnel was purged).
    @param client_token_taken: whether another open tunnel of the same account has bound
        C{client_token} already.
    @raise TokenRejected: with status, reason and text.
    """
    if mode not in (SOURCE, DESTINATION):
        raise TokenRejected(400, "bad-mode", f"Invalid local-proxy-mode {mode!r}: use source or destination")
    if client_token is not None and not CLIENT_TOKEN_RE.match(client_token):
        raise TokenRejected(
            400, "bad-client-token", "Invalid client token: it must be 32 to 128 characters of a-z, A-Z, 0-9 and -"
        )
    if state is None:
        raise reject(UNKNOWN_TOKEN, "Invalid access token: the access token is not valid for any tunnel")
    if state.revoked:
        raise reject(
            TOKEN_ROTATED,
            "Invalid access token: the access token was revoked by RotateTunnelAccessToken; use the new token",
        )
    if state.tunnel_status != "OPEN":
        raise reject("tunnel-closed", "Tunnel is closed: its access tokens can no longer connect; open a new tunnel")
    if now >= state.expires_at:
        raise reject("tunnel-expired", "Tunnel is closed: its maximum lifetime has elapsed; open a new tunnel")
    if mode != state.side:
        raise reject(
            "mode-mismatch",
            f"Invalid access token: this is a {state.side} token but local-proxy-mode is {mode}; "
            f"use the {mode} token, or run the local proxy with --mode {state.side}",
        )
    if state.used:
        if state.bound_client_token_hash is None or client_token is None:
            raise reject(TOKEN_USED, TOKEN_USED_TEXT)
        if not secrets.compare_digest(state.bound_client_token_hash, client_token_hash(client_token)):
            raise reject(CLIENT_TOKEN_MISMATCH, CLIENT_TOKEN_MISMATCH_TEXT)
        return Claim(first_use=False, bind=None)
    if client_token is not None and client_token_taken:
        raise reject(
            "client-token-in-use",
            "Invalid client token: it is already in use by another open tunnel of this account",
        )
    return Claim(first_use=True, bind=client_token_hash(client_token) if client_token is not None else None)
