# -*- test-case-name: tests.test_console_users,tests.e2e.test_console_browser -*-
"""
The console's pages: sign-in, the tunnels hub, create (manual setup) and the one-time token page, the
tunnel page, quick setup and the terminal page.

L{ConsolePages} answers every request under the console's path that is not a static file or the
terminal's WebSocket.  Each action is one control-plane operation (L{ControlPlane.call}, exactly as
the AWS API runs it: same validation, same errors, same MQTT delivery of destination tokens); an
operation's L{ApiError} is shown on the page, with the form's values kept.  Reading the hub's list
goes to the store directly (the API's ListTunnels has no connection states).
"""

from __future__ import annotations

import inspect
import secrets
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tunnelkit.adapters import available_adapters, default_adapter_name
from tunnelkit.service.console import web
from tunnelkit.service.console.live import StateWatcher, all_tunnels
from tunnelkit.service.console.sessions import (
    COOKIE_NAME,
    PasswordChecks,
    PendingTokens,
    Session,
    SessionManager,
    SignInLimiter,
)
from tunnelkit.service.console.users import DUMMY_HASH, IConsoleUsers, host_key_name, password_matches
from tunnelkit.service.errors import ApiError
from tunnelkit.service.operations import ControlPlane, tunnel_arn
from tunnelkit.service.store import CLOSED, OPEN, Account, IControlStore, NoSuchAccount, Tunnel

log = Logger()

COLUMNS = (
    ("id", "Tunnel id"),
    ("description", "Description"),
    ("thing", "Thing"),
    ("services", "Services"),
    ("status", "Status"),
    ("source", "Source"),
    ("destination", "Destination"),
    ("created", "Created"),
    ("updated", "Updated"),
)

_SORT_KEYS: Dict[str, Callable[[Tunnel], Any]] = {
    "id": lambda t: t.tunnel_id,
    "description": lambda t: (t.description or "").lower(),
    "thing": lambda t: t.thing_name or "",
    "services": lambda t: ",".join(t.services or ()),
    "status": lambda t: t.status,
    "source": lambda t: t.source.status,
    "destination": lambda t: t.destination.status,
    "created": lambda t: t.created_at,
    "updated": lambda t: t.last_updated_at,
}


def is_ssh_service(service_id: str) -> bool:
    """Whether tunnelkit's adapters treat this service id as SSH (C{SSH*}, see L{tunnelkit.adapters})."""
    try:
        return default_adapter_name(service_id, available_adapters()) == "ssh"
    except Exception:
        return service_id.upper().startswith("SSH")


class Refused(Exception):
    """A request the console refuses before doing anything (no session, bad CSRF token, ...)."""

    def __init__(self, status: int, heading: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.heading = heading
        self.text = text


class ConsolePages(Resource):
    """
    Every page under the console's path (a leaf: it routes on the path itself).

    @param prefix: the console's path, e.g. C{/console/}.
    @param verify_password: C{(hash, password) -> Deferred[bool]} (default: Argon2 in a thread).
    @param terminal: the browser SSH part (L{tunnelkit.service.console.terminal.Terminals}), or None.
    """

    isLeaf = True

    def __init__(
        self,
        control: ControlPlane,
        store: IControlStore,
        users: IConsoleUsers,
        sessions: SessionManager,
        limiter: SignInLimiter,
        watcher: StateWatcher,
        prefix: str,
        service_endpoint: Callable[[Request], str],
        verify_password: Optional[Callable[[str, str], "defer.Deferred[bool]"]] = None,
        terminal: Any = None,
        ca_path: Optional[str] = None,
        audit: Any = None,
    ) -> None:
        super().__init__()
        self.control = control
        self.store = store
        self.users = users
        self.sessions = sessions
        self.limiter = limiter
        self.watcher = watcher
        self.prefix = prefix
        self.service_endpoint = service_endpoint
        self.terminal = terminal
        self.ca_path = ca_path
        self.audit = audit
        self._verify = verify_password or _verify_in_thread
        self._env = web.template_environment()
        self._checking: set = set()
        #: Password checks running (at most 2: 429 beyond).
        self.password_checks = PasswordChecks()

    # --- rendering ---

    def _page(self, request: Request, template: str, status: int = 200, session: Optional[Session] = None,
              style_nonce: Optional[str] = None, **values: Any) -> bytes:
        request.setResponseCode(status)
        web.security_headers(request, style_nonce)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        context = {
            "prefix": self.prefix,
            "session": session,
            "flash": session.take_flash() if session is not None else [],
            "style_nonce": style_nonce,
        }
        context.update(values)
        return self._env.get_template(template).render(**context).encode("utf-8")

    def _refused(self, request: Request, refused: Refused, session: Optional[Session]) -> bytes:
        return self._page(
            request, "message.html", refused.status, session, heading=refused.heading, text=refused.text,
            back=self.prefix if session else self.prefix + "signin",
            back_label="Back to the tunnels hub" if session else "Sign in",
        )

    async def _call(self, request: Request, session: Session, account: Account, operation: str,
              body: Dict[str, Any]) -> Dict[str, Any]:
        address = request.getClientAddress()
        client = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
        return await self.run_operation(client, session, account, operation, body)

    async def run_operation(self, client: Optional[str], session: Session, account: Account, operation: str,
                      body: Dict[str, Any]) -> Dict[str, Any]:
        """Run a control-plane operation as the API does, with an audit record naming the console user."""
        outcome, status = "ok", 200
        try:
            return await self.control.call(operation, account, body)
        except ApiError as e:
            outcome, status = e.error_type, e.status
            raise
        finally:
            if self.audit is not None:
                tunnel_id = body.get("tunnelId") or (body.get("resourceArn") or "").rpartition("/")[2] or None
                try:
                    self.audit.record(
                        "api", account=account.account_id, console_user=session.user_name, operation=operation,
                        tunnel_id=tunnel_id, outcome=outcome, status=status, client=client,
                    )
                except Exception:
                    log.failure("Console: could not write the audit record of {operation}", operation=operation)

    # --- dispatch ---

    def render(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._render(request))
        d.addCallbacks(self._rendered, self._render_failed, callbackArgs=(request,), errbackArgs=(request,))
        return NOT_DONE_YET

    @staticmethod
    def _rendered(body: Any, request: Request) -> None:
        if body is NOT_DONE_YET or request.finished or getattr(request, "_disconnected", False):
            return
        request.write(body)
        request.finish()

    def _render_failed(self, failure: Failure, request: Request) -> None:
        log.failure("Console: a page failed", failure)
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.write(b"The console failed to build this page; try again.\n")
        request.finish()

    async def _render(self, request: Request) -> Any:
        path = request.path.decode("utf-8", "replace")
        if not path.startswith(self.prefix):
            return web.redirect(request, self.prefix)
        parts = [p for p in path[len(self.prefix):].split("/")]
        if parts and parts[-1] == "" and len(parts) > 1:
            parts = parts[:-1]
        if parts == [""]:
            parts = []
        method = request.method.decode("ascii", "replace")
        session: Optional[Session] = None
        try:
            if parts == ["signin"]:
                if method == "POST":
                    return await self.post_signin(request)
                return self.get_signin(request)
            session = self.sessions.get(web.session_id(request))
            if session is not None and not await self.users.still_valid(session.account_id, session.user_name,
                                                                  session.created_at):
                self.sessions.end(session)  # the user was deleted, or its password reset, since sign-in
                session = None
            if session is None:
                if method == "GET" and parts != ["events"]:
                    return web.redirect(request, self.prefix + "signin")
                raise Refused(401, "Not signed in", "Your session has ended or is not valid: sign in again.")
            if method == "POST":
                if not web.same_origin(request):
                    raise Refused(403, "Refused", "The request came from another site.")
                if not session.csrf_ok(web.field(request, "csrf") or None):
                    raise Refused(
                        403, "Refused",
                        "The form is out of date (its CSRF token is missing or wrong): go back, reload the page and "
                        "try again.",
                    )
            elif method not in ("GET", "HEAD"):
                raise Refused(405, "Method not allowed", f"{method} is not used by the console.")
            handler, args = self._route(method, parts)
            if handler is None:
                raise Refused(404, "Not found", "There is no such page in the console.")
            account = await self.store.get_account(session.account_id)
            result = handler(request, session, account, *args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Refused as refused:
            return self._refused(request, refused, session)
        except NoSuchAccount:
            if session is not None:
                self.sessions.end(session)
            return self._refused(request, Refused(401, "Not signed in", "Your account no longer exists."), None)

    def _route(self, method: str, parts: List[str]) -> Tuple[Optional[Callable[..., Any]], Tuple[str, ...]]:
        n = len(parts)
        if method in ("GET", "HEAD"):
            if n == 0:
                return self.get_hub, ()
            simple = {"events": self.get_events, "create": self.get_create, "tokens": self.get_tokens,
                      "quick": self.get_quick, "ca.pem": self.get_ca}
            if n == 1 and parts[0] in simple:
                return simple[parts[0]], ()
            if parts[0] == "tunnel" and n == 2:
                return self.get_tunnel, (parts[1],)
            if parts[0] == "tunnel" and n == 3:
                sub = {"delete": self.get_delete, "duplicate": self.get_duplicate, "terminal": self.get_terminal,
                       "events": self.get_tunnel_events}
                if parts[2] in sub:
                    return sub[parts[2]], (parts[1],)
            return None, ()
        posts = {"signout": self.post_signout, "create": self.post_create, "bulk": self.post_bulk,
                 "quick": self.post_quick}
        if n == 1 and parts[0] in posts:
            return posts[parts[0]], ()
        if n == 2 and parts[0] == "tokens" and parts[1] in ("download", "done"):
            return (self.post_tokens_download if parts[1] == "download" else self.post_tokens_done), ()
        if n == 3 and parts[0] == "tunnel":
            sub = {"tags": self.post_tags, "untag": self.post_untag, "rotate": self.post_rotate,
                   "close": self.post_close, "delete": self.post_delete, "duplicate": self.post_duplicate,
                   "forget-host-key": self.post_forget_host_key}
            if parts[2] in sub:
                return sub[parts[2]], (parts[1],)
        return None, ()

    # --- sign-in ---

    def get_signin(self, request: Request, error: Optional[str] = None, status: int = 200, account: str = "",
                   user: str = "") -> bytes:
        token = web.cookie(request, web.SIGNIN_COOKIE) or web.new_signin_token()
        web.set_cookie(request, web.SIGNIN_COOKIE, token, 3600)
        flash = ["You have signed out."] if web.field(request, "signedout") and error is None else []
        return self._page(request, "signin.html", status, None, csrf=token, error=error, account=account, user=user,
                          flash=flash)

    async def post_signin(self, request: Request) -> Any:
        account_text = web.field(request, "account").strip()[:128]
        user = web.field(request, "user").strip()[:128]
        password = web.field(request, "password")[:1024]
        expected = web.cookie(request, web.SIGNIN_COOKIE)
        given = web.field(request, "csrf")
        if not web.same_origin(request) or not expected or not secrets.compare_digest(expected, given):
            return self.get_signin(
                request, "The sign-in form is out of date: sign in again (cookies must be enabled).", 403,
                account_text, user,
            )
        address = request.getClientAddress()
        client = getattr(address, "host", "?")
        key = f"{account_text.lower()}/{user}"
        wait = self.limiter.wait_time(key, client)
        if wait > 0 or key in self._checking:
            seconds = max(1, int(wait + 0.999))
            request.setHeader(b"retry-after", str(seconds).encode())
            log.info("Console: sign-in for {user} refused (too many failures)", user=key[:200])
            return self.get_signin(
                request, f"Too many failed sign-ins: wait {seconds} s and try again.", 429, account_text, user
            )
        try:
            account: Optional[Account] = (await self.store.get_account(account_text)) if account_text else None
        except NoSuchAccount:
            account = None
        digest = (await self.users.password_hash(account.account_id, user)) if account is not None else None
        started = self.password_checks.start(lambda: self._verify(digest or DUMMY_HASH, password))
        if started is None:
            request.setHeader(b"retry-after", b"1")
            log.info("Console: sign-in for {user} refused ({running} password checks running)", user=key[:200],
                     running=self.password_checks.running)
            return self.get_signin(
                request, "The console is busy checking other sign-ins: try again in a second.", 429, account_text, user
            )
        self._checking.add(key)
        d = started

        def checked(ok: bool) -> None:
            self._checking.discard(key)
            if request.finished or getattr(request, "_disconnected", False):
                return
            if ok and digest is not None and account is not None:
                self.limiter.succeeded(key, client)
                session = self.sessions.create(account.account_id, account.name, user)
                web.set_cookie(request, COOKIE_NAME, session.session_id, self.sessions.cookie_max_age(session))
                web.clear_cookie(request, web.SIGNIN_COOKIE)
                log.info("Console: {user} of account {account_id} signed in", user=user, account_id=account.account_id)
                body = web.redirect(request, self.prefix)
            else:
                self.limiter.failed(key, client)
                log.info("Console: failed sign-in for {user}", user=key[:200])
                body = self.get_signin(request, "Wrong account, user name or password.", 401, account_text, user)
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            self._checking.discard(key)
            log.failure("Console: checking a password failed", failure)
            if not request.finished:
                request.write(self.get_signin(request, "The console could not check the password; try again.", 500))
                request.finish()

        d.addCallbacks(checked, failed)
        return NOT_DONE_YET

    def post_signout(self, request: Request, session: Session, account: Account) -> bytes:
        self.sessions.end(session)
        web.clear_cookie(request, COOKIE_NAME)
        return web.redirect(request, self.prefix + "signin?signedout=1")

    # --- the hub ---

    async def get_hub(self, request: Request, session: Session, account: Account) -> bytes:
        status = web.field(request, "status").upper()
        thing = web.field(request, "thing").strip()
        sort = web.field(request, "sort") or "created"
        order = web.field(request, "order") or "desc"
        if sort not in _SORT_KEYS:
            sort = "created"
        if order not in ("asc", "desc"):
            order = "desc"
        tunnels = await all_tunnels(self.store, account.account_id)
        things = sorted({t.thing_name for t in tunnels if t.thing_name})
        if status in (OPEN, CLOSED):
            tunnels = [t for t in tunnels if t.status == status]
        else:
            status = ""
        if thing:
            tunnels = [t for t in tunnels if t.thing_name == thing]
        tunnels.sort(key=_SORT_KEYS[sort], reverse=order == "desc")
        sort_links = {}
        for key, _ in COLUMNS:
            flipped = "asc" if (key == sort and order == "desc") else "desc"
            sort_links[key] = self.prefix + "?" + web.query_string(
                {"status": status, "thing": thing, "sort": key, "order": flipped}
            )
        return self._page(
            request, "hub.html", session=session, nav="hub", tunnels=tunnels, things=things, filter_status=status,
            thing=thing, sort=sort, order=order, columns=COLUMNS, sort_links=sort_links,
        )

    def get_events(self, request: Request, session: Session, account: Account) -> Any:
        web.security_headers(request)
        self.watcher.subscribe(account.account_id, session.session_id, request)
        return NOT_DONE_YET

    def get_tunnel_events(self, request: Request, session: Session, account: Account, tunnel_id: str) -> Any:
        web.security_headers(request)
        self.watcher.subscribe(account.account_id, session.session_id, request, tunnel_id)
        return NOT_DONE_YET

    async def post_bulk(self, request: Request, session: Session, account: Account) -> bytes:
        action = web.field(request, "action")
        ids = web.fields(request, "tunnel")
        if not ids:
            session.flash.append("Select one or more tunnels first.")
            return web.redirect(request, self.prefix)
        if action == "delete" and web.field(request, "confirm") != "yes":
            return self._page(
                request, "confirm.html", session=session, heading=f"Delete {len(ids)} tunnel(s)?",
                warning="Deleting is permanent: the tunnels are closed (their peers disconnected) and removed from "
                "the hub at once. This cannot be undone.",
                tunnel_ids=ids, action=self.prefix + "bulk", button="Delete permanently", back=self.prefix,
            )
        if action not in ("close", "delete"):
            raise Refused(400, "Unknown action", "Choose Close selected or Delete selected.")
        done, errors = 0, []
        for tunnel_id in ids:
            try:
                await self._call(request, session, account, "CloseTunnel", {"tunnelId": tunnel_id, "delete": action == "delete"})
                done += 1
            except ApiError as e:
                errors.append(e.message)
        verb = "Deleted" if action == "delete" else "Closed"
        session.flash.append(f"{verb} {done} tunnel{'s' if done != 1 else ''}.")
        session.flash.extend(errors[:10])
        return web.redirect(request, self.prefix)

    # --- create (manual setup) and the token page ---

    def get_create(self, request: Request, session: Session, account: Account, error: Optional[str] = None,
                   status: int = 200, values: Optional[Dict[str, str]] = None) -> bytes:
        values = values or {"lifetime": "720"}
        return self._page(request, "create.html", status, session, nav="create", error=error, v=values)

    async def post_create(self, request: Request, session: Session, account: Account) -> bytes:
        values = {name: web.field(request, name) for name in ("description", "lifetime", "tags", "thing", "services")}
        try:
            body = self._tunnel_request(values)
            answer = await self._call(request, session, account, "OpenTunnel", body)
        except (ApiError, ValueError) as e:
            return self.get_create(request, session, account, _message(e), 400, values)
        return self._show_tokens(request, session, answer, body)

    def _tunnel_request(self, values: Dict[str, str]) -> Dict[str, Any]:
        """The OpenTunnel request of a create or duplicate form (ValueError: a field is not a number)."""
        body: Dict[str, Any] = {}
        if values.get("description", "").strip():
            body["description"] = values["description"].strip()
        lifetime = values.get("lifetime", "").strip()
        if lifetime:
            try:
                body["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": int(lifetime)}
            except ValueError:
                raise ValueError(f"Lifetime: give a whole number of minutes from 1 to 720, not {lifetime[:20]!r}") from None
        tags = web.parse_tags(values.get("tags", ""))
        if tags:
            body["tags"] = tags
        services = web.parse_services(values.get("services", ""))
        thing = values.get("thing", "").strip()
        if thing and not services:
            raise ValueError("Destination: a thing needs at least one service (e.g. SSH)")
        if services:
            config: Dict[str, Any] = {"services": services}
            if thing:
                config["thingName"] = thing
            body["destinationConfig"] = config
        return body

    def _show_tokens(self, request: Request, session: Session, answer: Dict[str, Any], body: Dict[str, Any],
                     tunnel_id: Optional[str] = None) -> bytes:
        tokens = {}
        if "sourceAccessToken" in answer:
            tokens["source"] = answer["sourceAccessToken"]
        if "destinationAccessToken" in answer:
            tokens["destination"] = answer["destinationAccessToken"]
        config = body.get("destinationConfig") or {}
        session.pending = PendingTokens(
            tunnel_id=tunnel_id or answer["tunnelId"],
            tokens=tokens,
            created_at=self.sessions.now(),
            thing_name=config.get("thingName"),
            services=tuple(config.get("services") or ()),
        )
        return web.redirect(request, self.prefix + "tokens")

    def get_tokens(self, request: Request, session: Session, account: Account) -> bytes:
        pending = session.pending
        if pending is None:
            return self._page(
                request, "message.html", 404, session, heading="No tokens to show",
                text="Access tokens are shown once, until Done. If they were lost, generate new access tokens from "
                "the tunnel's page.",
            )
        endpoint = self.service_endpoint(request)
        return self._page(
            request, "tokens.html", session=session, pending=pending, endpoint=endpoint,
            commands=commands_for(pending, endpoint, self.control.region),
        )

    def post_tokens_download(self, request: Request, session: Session, account: Account) -> bytes:
        pending = session.pending
        which = web.field(request, "which")
        if pending is None or which not in pending.tokens:
            raise Refused(404, "No tokens to download", "The tokens are gone (Done was pressed, or they expired).")
        web.security_headers(request)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        name = token_file_name(pending.tunnel_id, which)
        request.setHeader(b"content-disposition", f'attachment; filename="{name}"'.encode())
        return pending.tokens[which].encode() + b"\n"

    def post_tokens_done(self, request: Request, session: Session, account: Account) -> bytes:
        pending, session.pending = session.pending, None
        if pending is None:
            return web.redirect(request, self.prefix)
        return web.redirect(request, self.prefix + "tunnel/" + pending.tunnel_id)

    def get_ca(self, request: Request, session: Session, account: Account) -> bytes:
        web.security_headers(request)
        path = self.ca_path
        if not path:
            raise Refused(404, "No CA certificate", "This service does not use a generated CA.")
        request.setHeader(b"content-type", b"application/x-pem-file")
        request.setHeader(b"content-disposition", b'attachment; filename="ca.pem"')
        with open(path, "rb") as f:
            return f.read()

    # --- the tunnel page ---

    async def _describe(self, account: Account, tunnel_id: str) -> Dict[str, Any]:
        try:
            return (await self.control.call("DescribeTunnel", account, {"tunnelId": tunnel_id}))["tunnel"]
        except ApiError as e:
            raise Refused(e.status if e.status in (400, 404) else 400, "No such tunnel", e.message) from None

    async def get_tunnel(self, request: Request, session: Session, account: Account, tunnel_id: str,
                   error: Optional[str] = None, status: int = 200) -> bytes:
        tunnel = await self._describe(account, tunnel_id)
        config = tunnel.get("destinationConfig") or {}
        thing = config.get("thingName")
        ssh_services = [s for s in config.get("services", []) if is_ssh_service(s)]
        key_name = host_key_name(thing, tunnel_id)
        host_key = await self.users.get_host_key(account.account_id, key_name)
        return self._page(
            request, "tunnel.html", status, session, error=error, t=tunnel, thing=thing,
            services=config.get("services", []), ssh_services=ssh_services, host_key=host_key, key_name=key_name,
            terminal_available=self.terminal is not None,
        )

    def _arn(self, account: Account, tunnel_id: str) -> str:
        return tunnel_arn(self.control.region, account.account_id, tunnel_id)

    async def _tunnel_action(self, request: Request, session: Session, account: Account, tunnel_id: str,
                       operation: str, body: Dict[str, Any], done: str) -> bytes:
        try:
            await self._call(request, session, account, operation, body)
        except ApiError as e:
            return await self.get_tunnel(request, session, account, tunnel_id, e.message, 400)
        session.flash.append(done)
        return web.redirect(request, self.prefix + "tunnel/" + tunnel_id)

    async def post_tags(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        key = web.field(request, "key").strip()
        value = web.field(request, "value").strip()
        body = {"resourceArn": self._arn(account, tunnel_id), "tags": [{"key": key, "value": value}]}
        return await self._tunnel_action(request, session, account, tunnel_id, "TagResource", body, f"Tag {key} saved.")

    async def post_untag(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        key = web.field(request, "key")
        body = {"resourceArn": self._arn(account, tunnel_id), "tagKeys": [key]}
        return await self._tunnel_action(request, session, account, tunnel_id, "UntagResource", body, f"Tag {key} removed.")

    async def post_close(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        return await self._tunnel_action(
            request, session, account, tunnel_id, "CloseTunnel", {"tunnelId": tunnel_id},
            "Tunnel closed: its peers were disconnected. It cannot be reopened, but it can be duplicated.",
        )

    async def get_delete(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        await self._describe(account, tunnel_id)
        return self._page(
            request, "confirm.html", session=session, heading="Delete this tunnel?",
            warning="Deleting is permanent: the tunnel is closed (its peers disconnected) and removed at once. "
            "This cannot be undone.",
            tunnel_ids=[tunnel_id], action=self.prefix + f"tunnel/{tunnel_id}/delete", button="Delete permanently",
            back=self.prefix + f"tunnel/{tunnel_id}",
        )

    async def post_delete(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        if web.field(request, "confirm") != "yes":
            return await self.get_delete(request, session, account, tunnel_id)
        try:
            await self._call(request, session, account, "CloseTunnel", {"tunnelId": tunnel_id, "delete": True})
        except ApiError as e:
            return await self.get_tunnel(request, session, account, tunnel_id, e.message, 400)
        session.flash.append(f"Tunnel {tunnel_id} deleted.")
        return web.redirect(request, self.prefix)

    async def post_rotate(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        mode = web.field(request, "mode")
        if mode not in ("SOURCE", "DESTINATION", "ALL"):
            return await self.get_tunnel(request, session, account, tunnel_id, "Choose source, destination or both.", 400)
        tunnel = await self._describe(account, tunnel_id)
        body: Dict[str, Any] = {"tunnelId": tunnel_id, "clientMode": mode}
        config = tunnel.get("destinationConfig") or {}
        if mode != "SOURCE" and config.get("thingName"):
            body["destinationConfig"] = {"thingName": config["thingName"], "services": config["services"]}
        try:
            answer = await self._call(request, session, account, "RotateTunnelAccessToken", body)
        except ApiError as e:
            return await self.get_tunnel(request, session, account, tunnel_id, e.message, 400)
        if self.terminal is not None and mode != "DESTINATION":
            self.terminal.forget_source(tunnel_id)
        return self._show_tokens(request, session, answer, body, tunnel_id)

    async def get_duplicate(self, request: Request, session: Session, account: Account, tunnel_id: str,
                      error: Optional[str] = None, status: int = 200, values: Optional[Dict[str, str]] = None) -> bytes:
        tunnel = await self._describe(account, tunnel_id)
        if values is None:
            config = tunnel.get("destinationConfig") or {}
            values = {
                "description": tunnel.get("description", ""),
                "lifetime": str(tunnel["timeoutConfig"]["maxLifetimeTimeoutMinutes"]),
                "tags": "\n".join(f"{t['key']}={t['value']}" for t in tunnel.get("tags", [])),
                "thing": config.get("thingName", ""),
                "services": ", ".join(config.get("services", [])),
            }
        return self._page(request, "duplicate.html", status, session, error=error, t=tunnel, v=values)

    async def post_duplicate(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        values = {name: web.field(request, name) for name in ("description", "lifetime", "tags", "thing", "services")}
        try:
            body = self._tunnel_request(values)
            answer = await self._call(request, session, account, "OpenTunnel", body)
        except (ApiError, ValueError) as e:
            return await self.get_duplicate(request, session, account, tunnel_id, _message(e), 400, values)
        session.flash.append(f"Tunnel {answer['tunnelId']} opened as a copy of {tunnel_id}.")
        return self._show_tokens(request, session, answer, body)

    async def post_forget_host_key(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        thing = web.field(request, "thing")
        if await self.users.forget_host_key(account.account_id, thing):
            whom = "this tunnel" if thing == host_key_name(None, tunnel_id) else thing
            session.flash.append(f"The host key remembered for {whom} was forgotten: the next connection remembers "
                                 "the key it sees.")
        return web.redirect(request, self.prefix + "tunnel/" + tunnel_id)

    # --- quick setup and the terminal (see terminal.py) ---

    async def get_quick(self, request: Request, session: Session, account: Account, error: Optional[str] = None,
                  status: int = 200, values: Optional[Dict[str, str]] = None) -> bytes:
        things = sorted({t.thing_name for t in await all_tunnels(self.store, account.account_id) if t.thing_name})
        values = values or {"service": "SSH", "lifetime": "60"}
        return self._page(request, "quick.html", status, session, nav="quick", error=error, v=values, things=things,
                          terminal_available=self.terminal is not None)

    async def post_quick(self, request: Request, session: Session, account: Account) -> bytes:
        values = {name: web.field(request, name) for name in ("thing", "service", "lifetime")}
        if self.terminal is None:
            raise Refused(501, "Not available", "SSH in the browser is not available on this service.")
        thing = values["thing"].strip()
        service = values["service"].strip()
        if not thing:
            return await self.get_quick(request, session, account, "Thing name: choose the device's thing.", 400, values)
        body: Dict[str, Any] = {
            "description": f"Quick setup: SSH to {thing}"[:2048],
            "destinationConfig": {"thingName": thing, "services": [service]},
        }
        try:
            if values["lifetime"].strip():
                body["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": int(values["lifetime"])}
            answer = await self._call(request, session, account, "OpenTunnel", body)
        except ValueError:
            return await self.get_quick(request, session, account, "Lifetime: a whole number of minutes from 1 to 720.", 400,
                                  values)
        except ApiError as e:
            return await self.get_quick(request, session, account, e.message, 400, values)
        self.terminal.hold_source(account.account_id, answer["tunnelId"], answer["sourceAccessToken"])
        return web.redirect(request, self.prefix + f"tunnel/{answer['tunnelId']}/terminal")

    async def get_terminal(self, request: Request, session: Session, account: Account, tunnel_id: str) -> bytes:
        tunnel = await self._describe(account, tunnel_id)
        config = tunnel.get("destinationConfig") or {}
        ssh_services = [s for s in config.get("services", []) if is_ssh_service(s)]
        problem = None
        if self.terminal is None:
            problem = "SSH in the browser is not available on this service."
        elif not self.terminal.assets_ready():
            problem = self.terminal.assets_problem()
        elif tunnel["status"] != OPEN:
            problem = "This tunnel is closed: duplicate it to open a new one."
        elif not ssh_services:
            problem = "This tunnel has no SSH service (a service id starting with SSH)."
        nonce = secrets.token_urlsafe(16)
        return self._page(
            request, "terminal.html", 200 if problem is None else 409, session, style_nonce=nonce, t=tunnel,
            thing=config.get("thingName"), service=ssh_services[0] if ssh_services else "", problem=problem,
            held=self.terminal.holds_source(tunnel_id) if self.terminal is not None else False,
            host_key=await self.users.get_host_key(account.account_id, host_key_name(config.get("thingName"), tunnel_id)),
        )


def _message(error: Exception) -> str:
    return error.message if isinstance(error, ApiError) else str(error)


def token_file_name(tunnel_id: str, which: str) -> str:
    return f"{tunnel_id}-{which}-token.txt"


def commands_for(pending: PendingTokens, endpoint: str, region: str) -> Dict[str, List[str]]:
    """The local-proxy commands to show beside the tokens (they read the downloaded token files)."""
    services = list(pending.services)
    source_file = token_file_name(pending.tunnel_id, "source")
    destination_file = token_file_name(pending.tunnel_id, "destination")
    if services:
        source_map = ",".join(f"{s}={5555 + i}" for i, s in enumerate(services))
        destination_map = ",".join(f"{s}={'22' if is_ssh_service(s) else 'HOST:PORT'}" for s in services)
        aws_source = source_map if len(services) > 1 else "5555"
        aws_destination = destination_map if len(services) > 1 else destination_map.split("=", 1)[1]
    else:
        source_map, destination_map, aws_source, aws_destination = "5555", "22", "5555", "22"
    commands: Dict[str, List[str]] = {}
    if "source" in pending.tokens:
        commands["source"] = [
            f"AWSIOT_TUNNEL_ACCESS_TOKEN=$(cat {source_file}) twistd -n tunnelkit --mode source "
            f"-e {endpoint} -c ca.pem -s {source_map}",
            f"AWSIOT_TUNNEL_ACCESS_TOKEN=$(cat {source_file}) SSL_CERT_FILE=ca.pem localproxy -r {region} "
            f"-e {endpoint} -s {aws_source}",
        ]
    if "destination" in pending.tokens:
        commands["destination"] = [
            f"AWSIOT_TUNNEL_ACCESS_TOKEN=$(cat {destination_file}) twistd -n tunnelkit --mode destination "
            f"-e {endpoint} -c ca.pem -d {destination_map}",
            f"AWSIOT_TUNNEL_ACCESS_TOKEN=$(cat {destination_file}) SSL_CERT_FILE=ca.pem localproxy "
            f"-r {region} -e {endpoint} -d {aws_destination}",
        ]
    return commands


def _verify_in_thread(digest: str, password: str) -> "defer.Deferred[bool]":
    from twisted.internet.threads import deferToThread

    return deferToThread(password_matches, digest, password)
