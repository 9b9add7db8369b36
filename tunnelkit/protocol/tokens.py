# -*- test-case-name: tests.test_tokens -*-
"""
The shape of the tokens a peer sends in its handshake, shared by the clients and the service.

Only syntax lives here (what a client may send, what a client token looks like): whether a token is
valid for a tunnel is the service's decision (L{tunnelkit.service.tokens}).
"""

from __future__ import annotations

import re

#: The longest access token a client sends (AWS's and tunnelkit's tokens are far shorter).
MAX_ACCESS_TOKEN_LENGTH = 4096
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

#: The client-token rule of the handshake (reference section 1.2).
CLIENT_TOKEN_RE = re.compile(r"\A[a-zA-Z0-9-]{32,128}\Z")


def sendable_access_token(token: str) -> bool:
    """
    Whether a client may send C{token} as its C{access-token} header: 1 to L{MAX_ACCESS_TOKEN_LENGTH}
    characters, no control characters.  Only the shape: the service decides whether it is valid.
    """
    return 0 < len(token) <= MAX_ACCESS_TOKEN_LENGTH and not _CONTROL_RE.search(token)


#: The header of tunnelkit's service's refusal of an upgrade naming why, machine-readably (one of
#: the refusal reasons below or another of the service's; AWS's service sends none, so a client
#: falls back to the answer's status and text).
REFUSAL_HEADER = "X-Tunnelkit-Refusal"
#: Refusal reasons a client acts on (the service's table: L{tunnelkit.service.tokens.STATUS_BY_REASON}).
UNKNOWN_TOKEN = "unknown-token"
TOKEN_ROTATED = "token-rotated"
TOKEN_USED = "token-used"
CLIENT_TOKEN_MISMATCH = "client-token-mismatch"
