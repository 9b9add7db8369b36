"""
The console's defences against a real service process, over HTTPS with a plain HTTP client: sign-in
required (no cookie, a forged one, a stale one), CSRF tokens on state changes, the sign-in rate limit,
cookie attributes, and the Content-Security-Policy header on every page.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import threading
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlencode

from twisted.trial.unittest import TestCase

from tests.e2e.test_console_browser import PASSWORD, console_service

Answer = Tuple[int, Dict[str, str], str]


class Client:
    """An HTTPS client keeping the cookies the console sets (only these two)."""

    def __init__(self, port: int, ca: str) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=ca)
        self.cookies: Dict[str, str] = {}
        self.set_cookie_headers: list = []

    def request(self, method: str, path: str, form: Optional[Dict[str, str]] = None,
                headers: Optional[Dict[str, str]] = None) -> Answer:
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=30)
        all_headers = {"Host": f"127.0.0.1:{self.port}"}
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form)
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        all_headers.update(headers or {})
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        for header in response.headers.get_all("Set-Cookie") or []:
            self.set_cookie_headers.append(header)
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        connection.close()
        return response.status, {k.lower(): v for k, v in response.headers.items()}, text

    def sign_in(self, account: str = "default", user: str = "alice", password: str = PASSWORD) -> Answer:
        self.request("GET", "/console/signin")
        token = self.cookies["__Host-tunnelkit-signin"]
        return self.request("POST", "/console/signin",
                            {"csrf": token, "account": account, "user": user, "password": password})

    def csrf(self) -> str:
        _, _, page = self.request("GET", "/console/")
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match, page[:500]
        return match.group(1)


class SecurityTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.h, self.service = console_service(self)

    def client(self) -> Client:
        return Client(self.service.port, self.service.ca_pem)

    def test_sign_in_required(self) -> None:
        anonymous = self.client()
        status, headers, _ = anonymous.request("GET", "/")
        self.assertEqual((status, headers["location"]), (303, "/console/"))
        for path in ("/console/", "/console/create", "/console/tunnel/x", "/console/quick"):
            status, headers, _ = anonymous.request("GET", path)
            self.assertEqual((status, headers.get("location")), (303, "/console/signin"), path)
        status, _, text = anonymous.request("GET", "/console/events")
        self.assertEqual(status, 401)
        status, _, _ = anonymous.request("POST", "/console/create", {"lifetime": "5"})
        self.assertEqual(status, 401)

        forged = self.client()
        forged.cookies["__Host-tunnelkit-console"] = "A" * 43
        self.assertEqual(forged.request("GET", "/console/")[0], 303)
        self.assertEqual(forged.request("POST", "/console/create", {"csrf": "x", "lifetime": "5"})[0], 401)

        user = self.client()
        status, headers, _ = user.sign_in()
        self.assertEqual((status, headers["location"]), (303, "/console/"))
        session = user.cookies["__Host-tunnelkit-console"]
        cookie = [c for c in user.set_cookie_headers if c.startswith("__Host-tunnelkit-console=")][0]
        for attribute in ("Secure", "HttpOnly", "SameSite=strict", "Path=/", "Max-Age="):
            self.assertIn(attribute.lower(), cookie.lower())
        self.assertEqual(user.request("GET", "/console/")[0], 200)
        csrf = user.csrf()
        self.assertEqual(user.request("POST", "/console/signout", {"csrf": csrf})[0], 303)
        self.assertNotIn("__Host-tunnelkit-console", user.cookies)  # the cookie was cleared
        stale = self.client()
        stale.cookies["__Host-tunnelkit-console"] = session  # the signed-out session's cookie, kept
        self.assertEqual(stale.request("GET", "/console/")[0], 303)
        self.assertEqual(stale.request("POST", "/console/bulk", {"csrf": csrf, "action": "close", "tunnel": "x"})[0], 401)

    def test_password_reset_signs_out(self) -> None:
        from tests.e2e.test_console_browser import tunnelkit_cli

        user = self.client()
        user.sign_in()
        self.assertEqual(user.request("GET", "/console/")[0], 200)
        tunnelkit_cli(self.service, "admin", "reset-password", "default", "alice", stdin="a new password\n")
        self.assertEqual(user.request("GET", "/console/")[0], 303)
        self.assertEqual(user.sign_in(password="a new password")[0], 303)
        self.assertEqual(user.request("GET", "/console/")[0], 200)
        tunnelkit_cli(self.service, "admin", "delete-user", "default", "alice")
        self.assertEqual(user.request("GET", "/console/")[0], 303)

    def test_csrf_token_required(self) -> None:
        user = self.client()
        user.sign_in()
        csrf = user.csrf()
        form = {"lifetime": "5", "description": "csrf test"}
        self.assertEqual(user.request("POST", "/console/create", form)[0], 403)
        self.assertEqual(user.request("POST", "/console/create", {**form, "csrf": csrf[:-2]})[0], 403)
        other = self.client()
        other.sign_in()
        self.assertEqual(user.request("POST", "/console/create", {**form, "csrf": other.csrf()})[0], 403)
        status, _, _ = user.request("POST", "/console/create", {**form, "csrf": csrf},
                                    {"Origin": "https://evil.example"})
        self.assertEqual(status, 403)
        self.assertNotIn("csrf test", user.request("GET", "/console/")[2])  # nothing was created
        status, headers, _ = user.request("POST", "/console/create", {**form, "csrf": csrf})
        self.assertEqual((status, headers["location"]), (303, "/console/tokens"))
        self.assertIn("csrf test", user.request("GET", "/console/")[2])
        # The token page's download: a POST (never a URL with the token), then gone after Done.
        page = user.request("GET", "/console/tokens")[2]
        token = re.search(r'id="token-source" data-token>([^<]+)<', page).group(1)
        self.assertEqual(user.request("POST", "/console/tokens/download", {"which": "source"})[0], 403)
        status, headers, body = user.request("POST", "/console/tokens/download", {"which": "source", "csrf": csrf})
        self.assertEqual((status, body.strip()), (200, token))
        self.assertIn("attachment", headers["content-disposition"])
        self.assertEqual(user.request("POST", "/console/tokens/done", {"csrf": csrf})[0], 303)
        self.assertEqual(user.request("POST", "/console/tokens/download", {"which": "source", "csrf": csrf})[0], 404)
        self.assertNotIn(token, user.request("GET", "/console/tokens")[2])
        self.assertNotIn(token, self.service.process.log())  # never logged
        # Sign-in itself needs its double-submit token.
        fresh = self.client()
        status, _, _ = fresh.request("POST", "/console/signin",
                                     {"account": "default", "user": "alice", "password": PASSWORD})
        self.assertEqual(status, 403)

    def test_password_guessing_is_slowed(self) -> None:
        guesser = self.client()
        for attempt in range(5):
            status, _, text = guesser.sign_in(password=f"wrong-{attempt}")
            self.assertEqual(status, 401, text[:300])
            self.assertIn("Wrong account, user name or password", text)
        status, headers, text = guesser.sign_in(password="wrong-again")
        self.assertEqual(status, 429)
        self.assertIn("Too many failed sign-ins", text)
        self.assertGreaterEqual(int(headers["retry-after"]), 1)
        status, _, _ = guesser.sign_in()  # even the right password waits
        self.assertEqual(status, 429)
        self.assertNotIn("__Host-tunnelkit-console", guesser.cookies)
        bob = self.client()
        self.assertEqual(bob.sign_in("other", "bob")[0], 429)  # same address: slowed as well
        self.assertIn("failed sign-in", self.service.process.log())
        self.assertNotIn("wrong-again", self.service.process.log())  # passwords never logged

    def test_password_checks_are_bounded(self) -> None:
        """
        A flood of sign-ins with varied user names: at most 2 Argon2 checks at once (review 13), the
        others are refused at once with 429 and Retry-After, not queued on the service's threads.
        """
        clients = [self.client() for _ in range(8)]
        tokens = []
        for c in clients:
            c.request("GET", "/console/signin")
            tokens.append(c.cookies["__Host-tunnelkit-signin"])
        barrier = threading.Barrier(len(clients))
        answers: List[Answer] = [None] * len(clients)  # type: ignore[list-item]

        def post(i: int) -> None:
            barrier.wait()
            answers[i] = clients[i].request("POST", "/console/signin", {
                "csrf": tokens[i], "account": "default", "user": f"flood-{i}", "password": "wrong password"})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        busy = [a for a in answers if a[0] == 429]
        self.assertTrue(busy, [a[0] for a in answers])
        for status, headers, text in busy:
            self.assertEqual(headers.get("retry-after"), "1")
            self.assertIn("busy checking other sign-ins", text)
        self.assertTrue(all(a[0] in (401, 429) for a in answers), [a[0] for a in answers])
        self.assertGreaterEqual(sum(1 for a in answers if a[0] == 401), 2)

    def test_missing_terminal_assets_are_named(self) -> None:
        empty = self.mktemp()
        os.makedirs(empty)
        self.service.process.terminate()
        self.service = self.h.start_service(tls=True, name="service-no-assets", state_dir=self.service.state_dir,
                                            extra=["--console-assets", empty])
        user = self.client()
        user.sign_in()
        user.request("POST", "/console/create", {"csrf": user.csrf(), "lifetime": "5", "services": "SSH1"})
        tunnel_id = re.search(r'data-tunnel="([^"]+)"', user.request("GET", "/console/")[2]).group(1)
        status, _, page = user.request("GET", f"/console/tunnel/{tunnel_id}/terminal")
        self.assertEqual(status, 409)
        self.assertIn("terminal&#39;s code is not installed", page)
        self.assertIn("npm ci --prefix tunnelkit/service/console/vendor", page)
        self.assertNotIn("assets/xterm.js", page)
        status, _, text = user.request("GET", "/console/assets/xterm.js")
        self.assertEqual(status, 404)
        self.assertIn("@xterm/xterm", text)

    def test_csp_on_every_page(self) -> None:
        user = self.client()
        status, headers, _ = user.request("GET", "/console/signin")
        pages = [("/console/signin", headers)]
        user.sign_in()
        csrf = user.csrf()
        user.request("POST", "/console/create", {"csrf": csrf, "lifetime": "5", "services": "SSH1"})
        _, _, hub = user.request("GET", "/console/")
        tunnel_id = re.search(r'data-tunnel="([^"]+)"', hub).group(1)
        for path in ("/", "/console", "/console/", "/console/create", "/console/tokens", "/console/quick",
                     f"/console/tunnel/{tunnel_id}", f"/console/tunnel/{tunnel_id}/duplicate",
                     f"/console/tunnel/{tunnel_id}/delete", f"/console/tunnel/{tunnel_id}/terminal",
                     "/console/tunnel/no-such-tunnel", "/console/nothing", "/console/static/console.css",
                     "/console/static/live.js", "/console/assets/xterm.js", "/console/assets/nothing"):
            pages.append((path, user.request("GET", path)[1]))
        for path, headers in pages:
            csp = headers.get("content-security-policy", "")
            self.assertIn("default-src 'none'", csp, path)
            self.assertIn("script-src 'self'", csp, path)
            self.assertNotIn("unsafe-inline", csp, path)
            self.assertIn("frame-ancestors 'none'", csp, path)
            self.assertEqual(headers.get("x-content-type-options"), "nosniff", path)
        _, headers, page = user.request("GET", "/console/tokens")
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertNotIn("<script>", page)
        self.assertNotIn(" style=", page)
