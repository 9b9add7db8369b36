# -*- test-case-name: tests.test_console_users,tests.e2e.test_console_browser -*-
"""
The tunnels hub: a web console for operators, served by the service's own site under C{/console/}
(C{GET /} redirects there), beside the API and the data plane.

  - L{users}: console users per account (Argon2 hashes) and remembered SSH host keys, in tables of
    their own in the service's database;
  - L{sessions}: sign-in sessions, CSRF tokens and the sign-in rate limit (sans-IO, injected clock);
  - L{web}: security headers (strict CSP), templates (Jinja2, autoescaped), forms and cookies;
  - L{pages}: the pages; every action is a call of the control plane's operations
    (L{tunnelkit.service.operations.ControlPlane.call}), as the AWS API makes them;
  - L{live}: live tunnel states as server-sent events;
  - L{assets}: the terminal's third-party browser code (npm packages, not in the repository);
  - L{terminal}: SSH in the browser: the service is the tunnel's source and runs a Conch SSH client.

L{mount_console} puts it all on the service's root resource.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from tunnelkit.service.console import web
from tunnelkit.service.console.assets import AssetResource, StaticResource, find_assets
from tunnelkit.service.console.live import StateWatcher
from tunnelkit.service.console.pages import ConsolePages
from tunnelkit.service.console.sessions import SessionManager, SignInLimiter
from tunnelkit.service.console.users import IConsoleUsers
from tunnelkit.service.interfaces import ITunnelStateObserver
from tunnelkit.service.operations import ControlPlane
from tunnelkit.service.store import IControlStore

__all__ = ["PREFIX", "ConsoleOptions", "Console", "mount_console"]

PREFIX = "/console/"


class ConsoleOptions:
    """Mixin for the service's C{usage.Options}: the console's settings."""

    optFlags = [["no-console", None, "Do not serve the web console (/console/)."]]
    optParameters = [
        [
            "console-assets",
            None,
            None,
            "Directory holding the terminal's npm packages (@xterm/xterm, @xterm/addon-fit); default: "
            "tunnelkit/service/console/vendor/node_modules, as 'npm ci --prefix tunnelkit/service/console/vendor' "
            "installs them.",
        ],
    ]


class _ConsoleRoot(Resource):
    """C{/console/...}: static files, the terminal's assets and WebSocket, and the pages."""

    def __init__(self, pages: ConsolePages, static: Resource, assets: Resource, ssh: Optional[Resource]) -> None:
        super().__init__()
        self._pages = pages
        self.putChild(b"static", static)
        self.putChild(b"assets", assets)
        if ssh is not None:
            self.putChild(b"ssh", ssh)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._pages

    def render(self, request: Request) -> bytes:  # /console without the slash
        web.security_headers(request)
        return web.redirect(request, PREFIX)


class _Front(Resource):
    """C{/}: the API for POST (as before); a browser's GET goes to the console."""

    isLeaf = True

    def __init__(self, api: Resource) -> None:
        super().__init__()
        self._api = api

    def render(self, request: Request) -> Any:
        if request.method in (b"GET", b"HEAD"):
            web.security_headers(request)
            return web.redirect(request, PREFIX)
        return self._api.render(request)


@implementer(ITunnelStateObserver)
class Console:
    """
    The console's parts (tests and tools reach them as attributes).  Told of this node's tunnel state
    changes (L{tunnel_changed}) by the service.

    @param terminal_factory: builds the browser-SSH part from this console (None: no terminal).
    """

    def __init__(
        self,
        control: ControlPlane,
        store: IControlStore,
        users: IConsoleUsers,
        clock: IReactorTime,
        assets_dir: Optional[str] = None,
        ca_path: Optional[str] = None,
        verify_password: Any = None,
        terminal_factory: Optional[Callable[["Console"], Any]] = None,
        audit: Any = None,
    ) -> None:
        self.control = control
        self.store = store
        self.users = users
        self.clock = clock
        self.watcher = StateWatcher(store, clock)
        self.sessions = SessionManager(clock.seconds, on_end=self._session_ended)
        self.limiter = SignInLimiter(clock.seconds)
        self.assets = find_assets(assets_dir)
        self.terminal = terminal_factory(self) if terminal_factory is not None else None
        self.pages = ConsolePages(
            control, store, users, self.sessions, self.limiter, self.watcher, PREFIX, service_endpoint,
            verify_password=verify_password, terminal=self.terminal, ca_path=ca_path, audit=audit,
        )
        ssh = self.terminal.resource() if self.terminal is not None else None
        self.resource = _ConsoleRoot(self.pages, StaticResource(), AssetResource(self.assets), ssh)

    def _session_ended(self, session: Any) -> None:
        self.watcher.end_session(session.session_id)
        if self.terminal is not None:
            self.terminal.session_ended(session.session_id)

    def tunnel_changed(self, account_id: Optional[str], tunnel_id: str) -> None:
        """L{ITunnelStateObserver}: to the live pages and the terminals waiting for a destination."""
        self.watcher.tunnel_changed(account_id, tunnel_id)
        if self.terminal is not None:
            self.terminal.tunnel_changed(account_id, tunnel_id)

    def stop(self) -> None:
        self.watcher.stop()
        if self.terminal is not None:
            self.terminal.stop()


def service_endpoint(request: Request) -> str:
    """The service's address as the browser reached it (the C{-e} of the local proxies)."""
    host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
    if not host or any(c in host for c in " /\\\"'<>"):
        address = request.getHost()
        host = f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 443)}"
    return host


def mount_console(root: Resource, api: Resource, console: Console) -> None:
    """Serve C{console} under C{/console/} of C{root}; C{/} keeps C{api} for POST and redirects GET."""
    root.putChild(b"console", console.resource)
    root.putChild(b"", _Front(api))


def build_console(service: Any, options: Any, clock: IReactorTime, reactor: Any) -> Console:
    """
    The console of a L{tunnelkit.service.tap.TunnelService}: its tables in the service's database,
    the terminal (the service's own data plane is the tunnel it connects through), stopped with it.
    """
    from twisted.application.service import Service

    from tunnelkit.service.console.terminal import Terminals
    from twisted.internet.interfaces import IReactorThreads

    from tunnelkit.service.console.users import open_console_users

    threads = reactor if IReactorThreads.providedBy(reactor) else None
    users = open_console_users(service.store, service.state_dir, threads)

    def terminals(console: Console) -> Terminals:
        return Terminals(console, reactor, clock, service.data_plane_address)

    console = Console(
        service.control, service.store, users, clock, assets_dir=options.get("console-assets"),
        ca_path=service.certificates.ca_cert, terminal_factory=terminals, audit=getattr(service, "audit", None),
    )

    class _Stop(Service):
        def stopService(self) -> None:
            super().stopService()
            console.stop()
            users.close()

    _Stop().setServiceParent(service)
    service.state_changes.add(console)
    return console
