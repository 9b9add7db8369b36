# -*- test-case-name: tests.test_services_stream -*-
"""
The C{vnc} adapter (default for C{VNC*}): a byte stream; its probe reads the RFB server's
ProtocolVersion message (RFC 6143 section 7.1.1: the 12 bytes C{RFB 003.008\\n}).
"""

from __future__ import annotations

import re
from typing import Optional

from tunnelkit.adapters import ProbeFailed, text_preview
from services.tcp import StreamAdapter, StreamAdapterFactory

_RFB_VERSION = re.compile(rb"RFB \d{3}\.\d{3}\n")


def check_rfb_version(received: bytes, closed: bool) -> Optional[str]:
    """C{RFB 003.008} once the 12-byte version is received, None for more, or ProbeFailed."""
    if len(received) < 12:
        if not b"RFB ".startswith(received[:4]):
            raise ProbeFailed(f"it sent {text_preview(received)} instead of an RFB version")
        return None
    if not _RFB_VERSION.fullmatch(received[:12]):
        raise ProbeFailed(f"it sent {text_preview(received)} instead of an RFB version")
    return received[:11].decode("ascii")


class VNCAdapter(StreamAdapter):
    """Bytes pass untouched; the probe checks the RFB version."""

    name = "vnc"

    def check_greeting(self, received: bytes, closed: bool) -> Optional[str]:
        return check_rfb_version(received, closed)


#: The plugin.
vnc_adapter_factory = StreamAdapterFactory(VNCAdapter, ("VNC",))
