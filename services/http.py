# -*- test-case-name: tests.test_services_http -*-
"""
The C{http} adapter (default for C{HTTP*}, but not C{HTTPS*}): rewrites the C{Host} header of each
request on the destination side, so that a web UI that checks C{Host} works when reached at
C{localhost:PORT} on the source side.

The destination filter (L{RequestRewriter}) reads requests incrementally: the request line and
headers are parsed and rewritten; bodies (C{Content-Length} or chunked) pass untouched and unparsed
except for the chunk framing; keep-alive and pipelined requests are each rewritten.  After a
C{CONNECT} or an C{Upgrade} request (WebSocket), and for anything that is not HTTP/1.x (TLS,
HTTP/2 prior knowledge), the rest of the connection passes untouched.  Responses pass untouched.

Options (tap.yml C{adapter-options: {HTTP1: {...}}}):
  - C{host}: the Host value to send (default: the service's target as C{HOST:PORT});
  - C{rewrite-host}: false to leave Host as the client sent it (default true);
  - C{forwarded}: true to add C{Forwarded: host="...";proto=http}, C{X-Forwarded-Host} and
    C{X-Forwarded-Proto} naming the Host the client used (default false).  The client's own address
    is only known to the source, so no C{for=}/C{X-Forwarded-For} is added.
"""

from __future__ import annotations

import re
from typing import Any, List, Mapping, Optional

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from tunnelkit.adapters import (
    IDestinationContext,
    IServiceAdapter,
    IServiceAdapterFactory,
    ISourceContext,
    IStreamFilter,
    ProbeFailed,
    StreamFilterError,
    Target,
    check_options,
    describe_target,
    option_bool,
    probe_target,
    text_preview,
)
from tunnelkit.errors import ConfigError

log = Logger()

#: The longest request head (request line and headers) the rewriter holds.
MAX_HEAD = 64 * 1024
#: The longest chunk-size or trailer line.
MAX_LINE = 8 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_STATUS_LINE = re.compile(rb"HTTP/\d\.\d \d{3}[^\r\n]*")

# Parser states.
HEAD = "head"
BODY = "body"
CHUNK_SIZE = "chunk-size"
CHUNK_DATA = "chunk-data"
CHUNK_END = "chunk-end"
TRAILER = "trailer"
PASSTHROUGH = "passthrough"


class RequestRewriter:
    """
    Sans-IO: feed the bytes of the client's side of an HTTP/1.x connection, get them back with each
    request's Host rewritten (and optional forwarding headers added).  Bytes outside request heads
    come back unchanged.

    @ivar requests: how many request heads were rewritten.
    """

    def __init__(self, host: Optional[bytes], forwarded: bool = False) -> None:
        """
        @param host: the Host value to set, or None to leave Host as it is.
        @param forwarded: add Forwarded/X-Forwarded-Host/X-Forwarded-Proto headers.
        """
        self.host = host
        self.forwarded = forwarded
        self.state = HEAD
        self.requests = 0
        self.passthrough_reason: Optional[str] = None
        self._buffer = b""
        self._remaining = 0
        self._after_body = HEAD  # where a finished body leads (HEAD, or PASSTHROUGH after Upgrade)

    def feed(self, data: bytes) -> bytes:
        """Rewrite what can be rewritten now; hold an incomplete request head or chunk line."""
        out: List[bytes] = []
        while data:
            state = self.state
            if state == PASSTHROUGH:
                out.append(data)
                break
            if state == BODY or state == CHUNK_DATA:
                if len(data) <= self._remaining:
                    out.append(data)
                    self._remaining -= len(data)
                    data = b""
                else:
                    out.append(data[: self._remaining])
                    data = data[self._remaining :]
                    self._remaining = 0
                if self._remaining == 0:
                    self.state = CHUNK_END if state == CHUNK_DATA else self._after_body
                continue
            if self._buffer:
                data = self._buffer + data
                self._buffer = b""
            if state == HEAD:
                data = self._read_head(data, out)
            else:
                data = self._read_chunk_line(data, out)
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    # --- heads ---

    def _read_head(self, data: bytes, out: List[bytes]) -> bytes:
        start = 0
        while data.startswith(b"\n", start) or data.startswith(b"\r\n", start):
            start += 1 if data[start] == 10 else 2
        if data[start:] == b"\r":
            self._buffer = data[start:]
            if start:
                out.append(data[:start])
            return b""
        if start:
            out.append(data[:start])
            data = data[start:]
        if not data:
            return b""
        token = _TOKEN.match(data)
        method = token.group() if token else b""
        after = data[len(method) : len(method) + 1]
        if len(method) > 32 or (after and (after != b" " or not method)) or data.startswith(
            b"PRI * HTTP/2"
        ):
            return self._pass_rest("not an HTTP/1.x request: " + text_preview(data), data, out)
        end = _end_of_head(data)
        if end < 0:
            if len(data) > MAX_HEAD:
                raise StreamFilterError(f"an HTTP request head is longer than {MAX_HEAD} bytes")
            self._buffer = data
            return b""
        out.append(self._rewrite_head(data[:end]))
        return data[end:]

    def _pass_rest(self, reason: str, data: bytes, out: List[bytes]) -> bytes:
        self.state = PASSTHROUGH
        self.passthrough_reason = reason
        out.append(data)
        return b""

    def _rewrite_head(self, head: bytes) -> bytes:
        lines = head.split(b"\n")
        request_line = lines[0]
        eol = b"\r\n" if request_line.endswith(b"\r") else b"\n"
        parts = request_line.rstrip(b"\r").split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.state = PASSTHROUGH
            self.passthrough_reason = "malformed request line: " + text_preview(request_line)
            return head
        method = parts[0].upper()
        header_lines = lines[1:-2]
        new_lines = [request_line + b"\n"]
        original_host: Optional[bytes] = None
        content_length: Optional[int] = None
        chunked = False
        transfer_encoding = False
        upgrade = False
        for line in header_lines:
            name, colon, value = line.partition(b":")
            lower = name.strip().lower()
            value = value.strip()
            if lower == b"host" and colon:
                if original_host is None:
                    original_host = value
                if self.host is not None:
                    line = name + b": " + self.host + (b"\r" if line.endswith(b"\r") else b"")
            elif lower == b"content-length":
                if not value.isdigit() or (content_length is not None and int(value) != content_length):
                    self.state = PASSTHROUGH
                    self.passthrough_reason = "unreadable Content-Length: " + text_preview(value)
                    return head
                content_length = int(value)
            elif lower == b"transfer-encoding":
                transfer_encoding = True
                chunked = value.lower().split(b",")[-1].strip() == b"chunked"
            elif lower == b"upgrade":
                upgrade = True
            new_lines.append(line + b"\n")
        if original_host is None and self.host is not None:
            new_lines.append(b"Host: " + self.host + eol)
        if self.forwarded:
            if original_host is not None:
                quoted = original_host.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
                new_lines.append(b'Forwarded: host="' + quoted + b'";proto=http' + eol)
                new_lines.append(b"X-Forwarded-Host: " + original_host + eol)
            else:
                new_lines.append(b"Forwarded: proto=http" + eol)
            new_lines.append(b"X-Forwarded-Proto: http" + eol)
        new_lines.append(lines[-2] + b"\n")
        self.requests += 1
        if method == b"CONNECT":
            self.state = PASSTHROUGH
            self.passthrough_reason = "CONNECT request"
        elif transfer_encoding and not chunked:
            self.state = PASSTHROUGH
            self.passthrough_reason = "a request body without chunked framing"
        else:
            self._after_body = PASSTHROUGH if upgrade else HEAD
            if upgrade:
                self.passthrough_reason = "Upgrade request"
            if chunked:
                self.state = CHUNK_SIZE
            elif content_length:
                self.state = BODY
                self._remaining = content_length
            else:
                self.state = self._after_body
        return b"".join(new_lines)

    # --- chunked bodies ---

    def _read_chunk_line(self, data: bytes, out: List[bytes]) -> bytes:
        end = data.find(b"\n")
        if end < 0:
            if len(data) > MAX_LINE:
                raise StreamFilterError(f"an HTTP chunk-size or trailer line is longer than {MAX_LINE} bytes")
            self._buffer = data
            return b""
        line = data[: end + 1]
        out.append(line)
        text = line.strip()
        if self.state == CHUNK_SIZE:
            size = text.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size):
                raise StreamFilterError(f"bad HTTP chunk size line {text_preview(line)}")
            self._remaining = int(size, 16)
            self.state = CHUNK_DATA if self._remaining else TRAILER
        elif self.state == CHUNK_END:
            if text:
                raise StreamFilterError(f"an HTTP chunk is not followed by CRLF: {text_preview(line)}")
            self.state = CHUNK_SIZE
        elif not text:  # TRAILER: an empty line ends the message
            self.state = self._after_body
        return data[end + 1 :]


def _end_of_head(data: bytes) -> int:
    """The index just past the empty line ending a request head, or -1."""
    crlf = data.find(b"\n\r\n")
    lf = data.find(b"\n\n")
    ends = [i + 3 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


@implementer(IStreamFilter)
class HTTPDestinationFilter:
    """Rewrites the requests of one connection the destination opened to the web server."""

    def __init__(self, service_id: str, connection_id: int, rewriter: RequestRewriter) -> None:
        self.service_id = service_id
        self.connection_id = connection_id
        self.rewriter = rewriter
        self._reported = False

    def outbound(self, data: bytes) -> bytes:
        return data

    def inbound(self, data: bytes) -> bytes:
        result = self.rewriter.feed(data)
        if self.rewriter.state == PASSTHROUGH and not self._reported:
            self._reported = True
            log.info(
                "Service {service_id}: connection {connection_id}: the rest passes untouched "
                "({reason})",
                service_id=self.service_id,
                connection_id=self.connection_id,
                reason=self.rewriter.passthrough_reason,
            )
        return result

    def connection_lost(self) -> None:
        pass


def host_header_for(target: Target) -> bytes:
    """C{HOST:PORT} of a target (C{[v6]:PORT}); C{localhost} for a unix socket."""
    if isinstance(target, str):
        return b"localhost"
    return describe_target(target).encode("idna" if not target[0].isascii() else "ascii")


def check_http_response(received: bytes, closed: bool) -> Optional[str]:
    """The status line once received, None for more, or ProbeFailed."""
    end = received.find(b"\n")
    if end < 0:
        if not (received.startswith(b"HTTP/") or b"HTTP/".startswith(received[:5])):
            raise ProbeFailed(f"it answered {text_preview(received)} instead of an HTTP status line")
        return None
    line = received[:end].rstrip(b"\r")
    if not _STATUS_LINE.fullmatch(line):
        raise ProbeFailed(f"it answered {text_preview(line)} instead of an HTTP status line")
    return line.decode("latin-1")


@implementer(IServiceAdapter)
class HTTPAdapter:
    """Host rewriting on the destination side; the source passes bytes as they are."""

    name = "http"

    def __init__(
        self, service_id: str, host: Optional[str] = None, rewrite_host: bool = True, forwarded: bool = False
    ) -> None:
        self.service_id = service_id
        self.host = host
        self.rewrite_host = rewrite_host
        self.forwarded = forwarded

    def __repr__(self) -> str:
        return f"<HTTPAdapter for {self.service_id}>"

    def host_header(self, context: IDestinationContext) -> Optional[bytes]:
        """The Host value requests get, or None when Host is left alone."""
        if not self.rewrite_host:
            return None
        if self.host:
            return self.host.encode("idna") if not self.host.isascii() else self.host.encode("ascii")
        return host_header_for(context.default_target)

    def source_filter(self, context: ISourceContext, connection_id: int) -> Optional[IStreamFilter]:
        return None

    def destination_target(self, context: IDestinationContext, connection_id: int) -> Target:
        return context.default_target

    def destination_filter(
        self, context: IDestinationContext, connection_id: int
    ) -> Optional[IStreamFilter]:
        host = self.host_header(context)
        if host is None and not self.forwarded:
            return None
        return HTTPDestinationFilter(
            self.service_id, connection_id, RequestRewriter(host, self.forwarded)
        )

    def probe(self, reactor: Any, target: Target, timeout: float) -> Any:
        request = (
            b"HEAD / HTTP/1.1\r\nHost: "
            + (self.host.encode("ascii", "replace") if self.host else host_header_for(target))
            + b"\r\nUser-Agent: tunnelkit-probe\r\nConnection: close\r\n\r\n"
        )
        return probe_target(reactor, target, timeout, check_http_response, request)


@implementer(IPlugin, IServiceAdapterFactory)
class HTTPAdapterFactory:
    """Builds L{HTTPAdapter}s; options C{host}, C{rewrite-host}, C{forwarded} (module docstring)."""

    name = "http"
    prefixes = ("HTTP",)

    def build(self, service_id: str, options: Mapping[str, Any]) -> IServiceAdapter:
        checked = check_options(self.name, service_id, options, ("host", "rewrite-host", "forwarded"))
        host = checked.get("host")
        if host is not None:
            host = str(host).strip()
            if not host or any(c in host for c in "\r\n\t /"):
                raise ConfigError(
                    f"adapter options of service {service_id}: host must be a host name with an "
                    f"optional :PORT (e.g. 'device.example:8080'), got {checked['host']!r}"
                )
        return HTTPAdapter(
            service_id,
            host=host,
            rewrite_host=option_bool(service_id, "rewrite-host", checked.get("rewrite-host", True)),
            forwarded=option_bool(service_id, "forwarded", checked.get("forwarded", False)),
        )


#: The plugin.
http_adapter_factory = HTTPAdapterFactory()
