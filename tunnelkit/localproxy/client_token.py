# -*- test-case-name: tests.test_localproxy_client_token -*-
"""
Where a local proxy keeps the client token it generated, so that the same command, started again,
reconnects with its single-use access token.

An access token connects once; later connections must send the client token of the first one
(reference section 1.3).  A proxy that generated its client token and then stopped (a local mistake
fixed, a reboot) could never use its access token again.  So a generated client token is written
to a file of its own, mode 0600:

  - C{--client-token-file FILE}: that file (made when missing, read when present);
  - otherwise C{$XDG_STATE_HOME/tunnelkit/client-tokens/<sha256 of the access token>} (default
    C{~/.local/state/...}): the same access token finds the same client token, another gets its own.
    Files there unused for L{KEEP_SECONDS} are removed (a tunnel lives 12 hours at most).

The access token itself is never written; its hash names the file.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Mapping, Optional

from tunnelkit.errors import ConfigError
from tunnelkit.protocol.tokens import CLIENT_TOKEN_RE

__all__ = ["KEEP_SECONDS", "KeptClientToken", "default_directory", "keep_client_token"]

#: Seconds a kept client token stays unused before it is removed (a week).
KEEP_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class KeptClientToken:
    """A client token and the file that keeps it; C{created} when it was generated just now."""

    token: str
    path: str
    created: bool


def default_directory(environ: Mapping[str, str]) -> str:
    """C{$XDG_STATE_HOME/tunnelkit/client-tokens} (C{~/.local/state/...} without it)."""
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "tunnelkit", "client-tokens")


def token_file_name(access_token: str) -> str:
    """The file name for C{access_token}'s client token: a one-way hash of it."""
    return hashlib.sha256(b"tunnelkit-client-token:" + access_token.encode("utf-8")).hexdigest()[:40]


def keep_client_token(
    access_token: str, path: Optional[str] = None, environ: Mapping[str, str] = os.environ,
    now: Optional[float] = None,
) -> KeptClientToken:
    """
    The client token kept for C{access_token}: read from its file, or generated and written there.

    @param path: C{--client-token-file}; None: the per-access-token file of L{default_directory}.
    @raise ConfigError: the file holds no client token, or cannot be read or written.
    """
    option = "--client-token-file" if path is not None else "the client token directory"
    if path is None:
        directory = default_directory(environ)
        _prune(directory, KEEP_SECONDS, time.time() if now is None else now)
        path = os.path.join(directory, token_file_name(access_token))
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        token = ""
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot read it: {e.strerror}") from None
    else:
        if not CLIENT_TOKEN_RE.match(token):
            raise ConfigError(
                f"{option} {path}: expected a client token of 32-128 characters a-z, A-Z, 0-9 and '-'"
            )
        try:
            os.utime(path)  # in use: not pruned
        except OSError:
            pass
        return KeptClientToken(token, path, False)
    token = str(uuid.uuid4())
    try:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile: use its token
        return keep_client_token(access_token, path, environ, now)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write it: {e.strerror}") from None
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return KeptClientToken(token, path, True)


def _prune(directory: str, keep: float, now: float) -> None:
    """Remove the kept tokens of C{directory} unused for C{keep} seconds."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime > keep:
                os.remove(path)
        except OSError:
            pass
