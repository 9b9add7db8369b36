"""
The web console in a real browser (headless Chromium via selenium) against a real service process, real
local proxies and a real sshd: sign-in, the hub's live states, manual setup and its one-time token page,
rotation, close, duplicate, delete, and account isolation.  Screenshots of each page are kept under
the test's temp directory (their paths are printed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Tuple

from twisted.trial.unittest import TestCase

from tests.e2e.browser import Browser, start_browser
from tests.e2e.harness import REPOSITORY_TOP, Harness, Service

PASSWORD = "correct horse battery"


def tunnelkit_cli(service: Service, *args: str, stdin: str = "") -> str:
    env = dict(os.environ, PYTHONPATH=REPOSITORY_TOP)
    result = subprocess.run(
        [sys.executable, "-m", "tunnelkit.cli", *args, "--state-dir", service.state_dir],
        input=stdin, capture_output=True, text=True, env=env, timeout=60,
    )
    if result.returncode != 0:
        raise AssertionError(f"tunnelkit {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def console_service(testcase: TestCase) -> Tuple[Harness, Service]:
    """A TLS service with user alice in account default and bob in account other."""
    h = Harness(testcase)
    service = h.start_service(tls=True)
    tunnelkit_cli(service, "admin", "create-user", "default", "alice", stdin=PASSWORD + "\n")
    tunnelkit_cli(service, "admin", "create-account", "other")
    tunnelkit_cli(service, "admin", "create-user", "other", "bob", stdin=PASSWORD + "\n")
    return h, service


def sign_in(browser: Browser, service: Service, account: str, user: str, shot: bool = False) -> None:
    browser.get(f"{service.api_url}/")
    browser.wait(lambda d: d.current_url.endswith("/console/signin"), what="the sign-in page")
    if shot:
        browser.shot("signin")
    browser.css("#account").send_keys(account)
    browser.css("#user").send_keys(user)
    browser.css("#password").send_keys(PASSWORD)
    browser.css("form.stack button[type=submit]").click()
    browser.wait(lambda d: d.current_url.endswith("/console/"), what="the hub after sign-in")


def cell(browser: Browser, tunnel_id: str, field: str) -> str:
    return str(browser.css(f'[data-tunnel="{tunnel_id}"] [data-field="{field}"]').text)


class ManualSetupTests(TestCase):
    timeout = 240

    def shots_dir(self) -> str:
        return os.path.abspath(self.mktemp())

    def test_manual_setup_journey(self) -> None:
        h, service = console_service(self)
        shots = self.shots_dir()
        browser = start_browser(self, service.ca_pem, shots)
        sign_in(browser, service, "default", "alice", shot=True)
        self.assertIn("No tunnels", browser.text("table.tunnels"))
        browser.shot("hub-empty")

        # Create tunnel, manual setup -> the one-time token page.
        browser.css('header nav a[href="/console/create"]').click()
        browser.css("#description").send_keys("lab router <b>&")
        lifetime = browser.css("#lifetime")
        lifetime.clear()
        lifetime.send_keys("30")
        browser.css("#tags").send_keys("team=ops")
        browser.css("#services").send_keys("SSH1")
        browser.shot("create")
        browser.css("form.stack button[type=submit]").click()
        browser.wait(lambda d: d.current_url.endswith("/console/tokens"), what="the token page")
        source_token = browser.text("#token-source")
        destination_token = browser.text("#token-destination")
        self.assertRegex(source_token, r"^[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]{43}$")
        self.assertNotEqual(source_token, destination_token)
        self.assertIn("twistd -n tunnelkit --mode source", browser.text("#cmd-source-tunnelkit"))
        self.assertIn("localproxy -r us-east-1", browser.text("#cmd-destination-aws"))
        self.assertNotIn(source_token, browser.text("#cmd-source-tunnelkit"))
        browser.shot("tokens")
        browser.css("#done").click()
        browser.wait(lambda d: "/console/tunnel/" in d.current_url, what="the tunnel page after Done")
        tunnel_id = browser.current_url.rsplit("/", 1)[1]
        self.assertIn("lab router <b>&", browser.text("dl.config"))
        self.assertEqual(browser.all("dl.config b"), [])  # escaped: shown as text, not markup
        browser.get(f"{service.api_url}/console/tokens")
        self.assertIn("No tokens to show", browser.text("main"))  # gone after Done
        self.assertNotIn(source_token, browser.page_source)

        # The hub, loaded before the proxies connect, turns both sides CONNECTED without a reload.
        browser.get(f"{service.api_url}/console/")
        self.assertEqual(cell(browser, tunnel_id, "source"), "DISCONNECTED")
        marker = browser.execute_script("window.tunnelkitNoReload = 1; return window.tunnelkitNoReload;")
        self.assertEqual(marker, 1)
        sshd = h.start_sshd()
        h.start_destination(destination_token, f"SSH1={sshd.port}")
        source = h.start_source(source_token, "SSH1=0")
        port = source.port_of("SSH1")
        browser.wait(lambda d: cell(browser, tunnel_id, "source") == "CONNECTED"
                     and cell(browser, tunnel_id, "destination") == "CONNECTED", what="CONNECTED in the hub")
        out = sshd.run("echo through-the-console-tunnel", port=port)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), b"through-the-console-tunnel")
        self.assertEqual(browser.execute_script("return window.tunnelkitNoReload;"), 1)  # no reload happened
        browser.shot("hub-connected")
        browser.set_window_size(390, 844)  # a phone
        browser.shot("hub-phone")
        browser.set_window_size(1280, 900)

        # Rotate from the tunnel page: new tokens shown, the old source refused.
        browser.css(f'a[href="/console/tunnel/{tunnel_id}"]').click()
        browser.wait(lambda d: d.current_url.endswith(tunnel_id), what="the tunnel page")
        browser.shot("tunnel")
        browser.css('input[name=mode][value=SOURCE]').click()
        browser.css("#rotate").click()
        browser.wait(lambda d: d.current_url.endswith("/console/tokens"), what="the token page after rotation")
        new_source = browser.text("#token-source")
        self.assertNotEqual(new_source, source_token)
        self.assertEqual(browser.all("#token-destination"), [])
        browser.shot("tokens-rotated")
        source.wait_for_log(r"revoked|rotated")
        self.assertNotEqual(source.wait_exit(30), None)
        browser.css("#done").click()

        # Close, duplicate (a new tunnel with the same configuration and a new lifetime), delete.
        browser.wait(lambda d: d.current_url.endswith(tunnel_id), what="the tunnel page")
        browser.css("#close").click()
        browser.wait(lambda d: "CLOSED" in cell(browser, tunnel_id, "status"), what="CLOSED")
        browser.shot("tunnel-closed")
        browser.css("#duplicate").click()
        lifetime = browser.css("#lifetime")
        self.assertEqual(lifetime.get_attribute("value"), "30")
        self.assertEqual(browser.css("#services").get_attribute("value"), "SSH1")
        lifetime.clear()
        lifetime.send_keys("5")
        browser.shot("duplicate")
        browser.css("form.stack button[type=submit]").click()
        browser.wait(lambda d: d.current_url.endswith("/console/tokens"), what="the copy's token page")
        browser.css("#done").click()
        browser.wait(lambda d: "/console/tunnel/" in d.current_url, what="the copy's page")
        copy_id = browser.current_url.rsplit("/", 1)[1]
        self.assertNotEqual(copy_id, tunnel_id)
        self.assertIn("5 minutes", browser.text("dl.config"))
        self.assertIn("team", browser.text("main"))
        browser.css("#delete").click()
        browser.wait(lambda d: "permanent" in d.find_element("css selector", "main").text, what="the confirmation")
        browser.shot("delete-confirm")
        browser.css("button.danger").click()
        browser.wait(lambda d: d.current_url.endswith("/console/"), what="the hub after delete")
        self.assertEqual(browser.all(f'[data-tunnel="{copy_id}"]'), [])

        # Select several in the hub: delete asks first.
        browser.css(f'input[name=tunnel][value="{tunnel_id}"]').click()
        browser.css('button[value=delete]').click()
        browser.wait(lambda d: "permanent" in d.find_element("css selector", "main").text, what="the confirmation")
        browser.css("button.danger").click()
        browser.wait(lambda d: d.current_url.endswith("/console/"), what="the hub")
        self.assertIn("No tunnels", browser.text("table.tunnels"))
        self.assertEqual(browser.csp_violations(), [])
        log = service.process.log()
        for token in (source_token, destination_token, new_source):
            self.assertNotIn(token, log)  # never logged

        # Another account's user sees none of it.
        other = start_browser(self, service.ca_pem, os.path.join(shots, "other"))
        h.open_tunnel(["SSH1"])  # account default, through the API
        sign_in(other, service, "other", "bob")
        self.assertIn("No tunnels", other.text("table.tunnels"))
        other.get(f"{service.api_url}/console/tunnel/{tunnel_id}")
        self.assertIn("does not exist", other.text("main"))
        other.shot("other-account")
        print("\nscreenshots:", *browser.shots, *other.shots, sep="\n  ")
