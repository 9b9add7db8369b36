# -*- test-case-name: tests.test_auth,tests.test_api_tap -*-
"""
Writing the state directory's files that hold secrets (the credentials file, TLS keys) and the
certificates beside them: never half-written, never readable by others even for a moment.
"""

from __future__ import annotations

import os

__all__ = ["write_atomically"]


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data}: a temporary file created with C{mode}, written and fsynced, then
    renamed over C{path}, so a reader sees the old file or the new one, and a crash leaves no torn file.
    """
    temporary = f"{path}.tmp{os.getpid()}"
    fd = os.open(temporary, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
