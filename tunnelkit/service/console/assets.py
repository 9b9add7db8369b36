# -*- test-case-name: tests.test_console_users -*-
"""
The console's static files: its own (C{static/}: CSS and a little JavaScript) and the terminal's
third-party browser code, xterm.js and its fit add-on.

The third-party code is not in the repository: it is the npm packages C{@xterm/xterm} and
C{@xterm/addon-fit}, declared in C{vendor/package.json} (versions locked in C{package-lock.json}) and
installed by C{npm ci --prefix tunnelkit/service/console/vendor} (which C{tools/test.sh} and the README's
set-up command run).  When they are missing, the terminal page says so, with the command that
installs them, and the rest of the console works.

Only the files named here are served (no directory listing, no path from the request reaches the
file system).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from twisted.web.resource import Resource
from twisted.web.server import Request

from tunnelkit.service.console import web

VENDOR = os.path.join(web.HERE, "vendor")
DEFAULT_ASSETS = os.path.join(VENDOR, "node_modules")
INSTALL_COMMAND = "npm ci --prefix tunnelkit/service/console/vendor"

#: Served name -> (path under the node_modules directory, content type).
ASSET_FILES: Dict[str, Tuple[str, str]] = {
    "xterm.js": ("@xterm/xterm/lib/xterm.js", "text/javascript; charset=utf-8"),
    "xterm.css": ("@xterm/xterm/css/xterm.css", "text/css; charset=utf-8"),
    "addon-fit.js": ("@xterm/addon-fit/lib/addon-fit.js", "text/javascript; charset=utf-8"),
}

STATIC_FILES: Dict[str, str] = {
    "console.css": "text/css; charset=utf-8",
    "live.js": "text/javascript; charset=utf-8",
    "copy.js": "text/javascript; charset=utf-8",
    "terminal.js": "text/javascript; charset=utf-8",
}


@dataclass(frozen=True)
class Assets:
    """Where the terminal's npm packages are, and what is missing."""

    directory: str
    missing: Tuple[str, ...]

    @property
    def ready(self) -> bool:
        return not self.missing

    def problem(self) -> str:
        """What to tell the user when files are missing."""
        return (
            "The browser terminal's code is not installed: missing "
            + ", ".join(self.missing)
            + f" under {self.directory}. Install the npm packages @xterm/xterm and @xterm/addon-fit with "
            f"'{INSTALL_COMMAND}' (run from the tunnelkit checkout; 'bash tools/test.sh' does it too), or start "
            "the service with --console-assets DIR naming a node_modules directory that has them."
        )

    def path(self, name: str) -> Optional[str]:
        entry = ASSET_FILES.get(name)
        return os.path.join(self.directory, entry[0]) if entry else None


def find_assets(directory: Optional[str] = None) -> Assets:
    """The assets in C{directory} (default: the vendor directory's node_modules)."""
    directory = os.path.abspath(directory or DEFAULT_ASSETS)
    missing = tuple(
        relative for relative, _ in ASSET_FILES.values() if not os.path.isfile(os.path.join(directory, relative))
    )
    return Assets(directory, missing)


def _serve_file(request: Request, path: str, content_type: str) -> bytes:
    web.security_headers(request, cache=True)
    request.setHeader(b"content-type", content_type.encode())
    with open(path, "rb") as f:
        return f.read()


def _not_found(request: Request, text: str) -> bytes:
    web.security_headers(request)
    request.setResponseCode(404)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text.encode("utf-8") + b"\n"


def _leaf_name(request: Request) -> str:
    """The one path segment under the resource, or C{""} if there is not exactly one."""
    postpath = request.postpath or []
    return postpath[0].decode("utf-8", "replace") if len(postpath) == 1 else ""


class StaticResource(Resource):
    """C{/console/static/NAME}: the console's own CSS and scripts."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        name = _leaf_name(request)
        if name not in STATIC_FILES:
            return _not_found(request, "No such file")
        return _serve_file(request, os.path.join(web.STATIC, name), STATIC_FILES[name])


class AssetResource(Resource):
    """C{/console/assets/NAME}: xterm.js, its CSS and the fit add-on, from the npm packages."""

    isLeaf = True

    def __init__(self, assets: Assets) -> None:
        super().__init__()
        self._assets = assets

    def render_GET(self, request: Request) -> bytes:
        name = _leaf_name(request)
        path = self._assets.path(name)
        if path is None:
            return _not_found(request, "No such file")
        if not os.path.isfile(path):
            return _not_found(request, find_assets(self._assets.directory).problem())
        return _serve_file(request, path, ASSET_FILES[name][1])
