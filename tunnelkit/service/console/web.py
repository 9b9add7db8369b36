# -*- test-case-name: tests.test_console_users -*-
"""
The console's HTTP plumbing: security headers, templates, forms, cookies, CSRF and sign-in checks.

Every answer under the console carries L{security_headers}: a strict Content-Security-Policy (scripts,
styles, images and connections from the service itself only; no inline script or style, no framing),
C{nosniff}, C{Referrer-Policy: same-origin} (C{no-referrer} would make browsers send C{Origin: null} with forms), and C{no-store} on pages.  Templates are Jinja2 with autoescaping on, so
every value is HTML-escaped.

State-changing requests are POSTs carrying the session's CSRF token in the C{csrf} field (compared in
constant time); a POST whose C{Origin} header names another origin is refused as well.  The sign-in
form, made before there is a session, uses a double-submit token: a random value in a C{__Host-} cookie
that must equal the form's C{csrf} field.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Dict, List, Mapping, Optional

import jinja2
from twisted.web.server import Request

from tunnelkit.service.console.sessions import COOKIE_NAME

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
STATIC = os.path.join(HERE, "static")
SIGNIN_COOKIE = "__Host-tunnelkit-signin"

#: The most bytes of one form field kept (a private key is the largest thing a form sends).
MAX_FIELD = 16384


def content_security_policy(style_nonce: Optional[str] = None) -> str:
    """The console's CSP; C{style_nonce} lets the terminal's library insert its own style elements."""
    style = "'self'" + (f" 'nonce-{style_nonce}'" if style_nonce else "")
    return (
        "default-src 'none'; script-src 'self'; "
        f"style-src {style}; img-src 'self' data:; font-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def security_headers(request: Request, style_nonce: Optional[str] = None, cache: bool = False) -> None:
    """Set the headers every console answer carries."""
    request.setHeader(b"content-security-policy", content_security_policy(style_nonce).encode())
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"same-origin")  # "no-referrer" would make Origin "null"
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"cross-origin-opener-policy", b"same-origin")
    request.setHeader(b"cache-control", b"private, max-age=3600" if cache else b"no-store")


def show_time(t: Optional[float]) -> str:
    """C{2026-12-02 08:40:12 UTC} (what the pages show)."""
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def iso_time(t: Optional[float]) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def template_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["showtime"] = show_time
    env.filters["isotime"] = iso_time
    return env


def _args(request: Request) -> Dict[bytes, List[bytes]]:
    """The request's query and form fields (none before the request is parsed)."""
    return request.args or {}


def field(request: Request, name: str, default: str = "") -> str:
    """The form or query field C{name} (the first value), decoded, bounded in size."""
    values = _args(request).get(name.encode())
    if not values:
        return default
    return values[0][:MAX_FIELD].decode("utf-8", "replace")


def fields(request: Request, name: str, limit: int = 1000) -> List[str]:
    """Every value of the field C{name}."""
    return [v[:MAX_FIELD].decode("utf-8", "replace") for v in _args(request).get(name.encode(), [])[:limit]]


def cookie(request: Request, name: str) -> Optional[str]:
    value = request.getCookie(name.encode())
    return value.decode("ascii", "replace") if value else None


def set_cookie(request: Request, name: str, value: str, max_age: int) -> None:
    """A C{__Host-} cookie: Secure, HttpOnly, SameSite=Strict, Path=/."""
    request.addCookie(
        name.encode(), value.encode(), path=b"/", max_age=str(max_age).encode(), secure=True, httpOnly=True,
        sameSite="strict",
    )


def clear_cookie(request: Request, name: str) -> None:
    request.addCookie(
        name.encode(), b"", path=b"/", max_age=b"0", expires=b"Thu, 01 Jan 1970 00:00:00 GMT", secure=True,
        httpOnly=True, sameSite="strict",
    )


def session_id(request: Request) -> Optional[str]:
    return cookie(request, COOKIE_NAME)


def same_origin(request: Request) -> bool:
    """False when the request's Origin header names another origin than the service (absent: True)."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host") or b""
    scheme = b"https" if request.isSecure() else b"http"
    return origin == scheme + b"://" + host


def new_signin_token() -> str:
    return secrets.token_urlsafe(24)


def redirect(request: Request, location: str) -> bytes:
    """303 See Other to C{location} (a path of this service)."""
    request.setResponseCode(303)
    request.setHeader(b"location", location.encode("utf-8"))
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return f"See {location}\n".encode()


def parse_tags(text: str) -> List[Dict[str, str]]:
    """
    The tags of a form's text area, one C{key=value} per line (blank lines ignored).
    @raise ValueError: naming the line that is wrong.
    """
    tags = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"Tags, line {number}: write key=value (got {line[:60]!r})")
        tags.append({"key": key.strip(), "value": value.strip()})
    return tags


def parse_services(text: str) -> List[str]:
    """Services from a form field: separated by commas or spaces."""
    return [s for s in text.replace(",", " ").split() if s]


def query_string(values: Mapping[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode([(k, v) for k, v in values.items() if v])
