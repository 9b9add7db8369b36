# -*- test-case-name: tests.test_services_stream -*-
"""
The C{ssh} adapter (default for C{SSH*}): a byte stream; its probe reads the server's
identification line (RFC 4253 section 4.2: C{SSH-2.0-softwareversion}, possibly after other lines).
"""

from __future__ import annotations

from typing import Optional

from tunnelkit.adapters import ProbeFailed, text_preview
from services.tcp import StreamAdapter, StreamAdapterFactory

#: RFC 4253 allows lines before the identification line; the identification line itself is at
#: most 255 bytes including CR LF.
MAX_IDENTIFICATION = 255


def check_ssh_banner(received: bytes, closed: bool) -> Optional[str]:
    """The identification line (without CR LF) once received, None for more, or ProbeFailed."""
    start = 0
    while True:
        end = received.find(b"\n", start)
        line = received[start:] if end < 0 else received[start:end]
        if line.startswith(b"SSH-") or (end < 0 and b"SSH-".startswith(line)):
            if end < 0:
                if len(line) > MAX_IDENTIFICATION:
                    raise ProbeFailed("its SSH identification line is longer than 255 bytes")
                return None
            if not (line.startswith(b"SSH-2.0-") or line.startswith(b"SSH-1.99-")):
                raise ProbeFailed(f"it speaks an SSH version tunnelkit does not expect: {text_preview(line)}")
            return line.rstrip(b"\r").decode("ascii", "replace")
        if start == 0 and not _looks_like_text_line(line):
            raise ProbeFailed(f"it sent {text_preview(received)} instead of an SSH banner")
        if end < 0:
            return None
        start = end + 1


def _looks_like_text_line(line: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 13) for b in line[:64]) and not line[:3].isdigit() and not (
        line.startswith(b"HTTP/") or line.startswith(b"RFB ")
    )


class SSHAdapter(StreamAdapter):
    """Bytes pass untouched; the probe checks the SSH banner."""

    name = "ssh"

    def check_greeting(self, received: bytes, closed: bool) -> Optional[str]:
        return check_ssh_banner(received, closed)


#: The plugin.
ssh_adapter_factory = StreamAdapterFactory(SSHAdapter, ("SSH",))
