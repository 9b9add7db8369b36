"""
Quick setup and SSH in the browser, end to end: mosquitto, the service (C{--mqtt}), the device agent
and a real sshd as processes; headless Chromium drives the console: quick setup opens a tunnel, the agent
receives the destination token over MQTT, the service connects as the source and runs its Conch SSH
client through the tunnel, and xterm.js shows the shell.  Screenshots are kept in the test's temp dir.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.browser import Browser, start_browser
from tests.e2e.harness import SSH_KEYGEN, SSHD
from tests.e2e.mosquitto import MOSQUITTO, HarnessMosquitto
from tests.e2e.test_console_browser import console_service, sign_in
from tunnelkit.testing.process import wait_until

THING = "dev1"


def screen(browser: Browser) -> str:
    """The terminal's text as xterm.js renders it (its DOM renderer's rows)."""
    return str(browser.execute_script(
        "var r = document.querySelector('.xterm-rows'); return r ? r.innerText : '';"))


def type_line(browser: Browser, text: str) -> None:
    browser.css(".xterm-helper-textarea").send_keys(text + "\n")


def wait_screen(browser: Browser, pattern: str, timeout: float = 30) -> "re.Match[str]":
    return browser.wait(lambda d: re.search(pattern, screen(browser)), timeout, f"{pattern!r} in the terminal:\n"
                        f"{screen(browser)}")


class QuickSetupTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        if MOSQUITTO is None or not os.path.exists(SSHD):
            raise SkipTest("mosquitto and sshd are needed")
        self.h, self.service = console_service(self)
        # The service again, with MQTT (console_service started one without).
        self.broker = HarnessMosquitto(self.h)
        self.broker.start()
        self.service.process.terminate()
        self.service = self.h.start_service(tls=True, name="service-mqtt", state_dir=self.service.state_dir,
                                            extra=["--mqtt", self.broker.endpoint])
        self.service.process.wait_for_log(r"Connected to the MQTT broker")
        self.sshd = self.h.start_sshd()
        self.agent = self.h.twistd("agent", [
            "--mode", "agent", "--thing-name", THING, "--mqtt", self.broker.endpoint,
            "-e", self.service.proxy_endpoint, "-c", self.service.ca_pem, "-d", f"SSH=127.0.0.1:{self.sshd.port}",
        ])
        self.agent.wait_for_log(rf"Subscribed to \$aws/things/{THING}/tunnels/notify")
        self.shots = os.path.abspath(self.mktemp())
        self.browser = start_browser(self, self.service.ca_pem, self.shots)
        sign_in(self.browser, self.service, "default", "alice")

    def host_fingerprint(self) -> str:
        out = subprocess.run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", os.path.join(self.sshd.dir, "host_ed25519.pub")],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[1]

    def quick_setup(self, browser: Browser) -> float:
        """Quick setup to THING; returns the monotonic time of the click."""
        browser.get(f"{self.service.api_url}/console/quick")
        browser.css("#thing").send_keys(THING)
        started = time.monotonic()
        browser.css("#quick-connect").click()
        browser.wait(lambda d: d.current_url.endswith("/terminal"), what="the terminal page")
        return started

    def log_in(self, browser: Browser) -> float:
        browser.css("#ssh-user").send_keys(self.sshd.user)
        browser.css("details summary").click()
        with open(self.sshd.key) as f:
            browser.css("#ssh-key").send_keys(f.read())
        clicked = time.monotonic()
        browser.css("#ssh-connect").click()
        return clicked

    def test_quick_setup_terminal(self) -> None:
        browser = self.browser
        started = self.quick_setup(browser)
        tunnel_id = browser.current_url.rsplit("/", 2)[1]
        browser.shot("terminal-login")
        connect = self.log_in(browser)
        try:
            wait_screen(browser, r"[$#] \s*$", 60)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- service:\n{self.service.process.tail(40)}\n--- agent:\n{self.agent.tail(20)}")
        prompt = time.monotonic()
        print(f"\nquick setup: click to prompt {prompt - started:.2f} s (Connect click to prompt {prompt - connect:.2f} s)")
        self.assertEqual(browser.css("#ssh-fingerprint").get_attribute("data-fingerprint"), self.host_fingerprint())
        self.assertIn("first connection: remembered", browser.text("#ssh-fingerprint"))

        type_line(browser, "echo hello-from-browser")
        wait_screen(browser, r"(?m)^hello-from-browser\s*$")
        # UTF-8 on the screen, from bytes the shell prints (the command itself is ASCII: chromedriver's
        # send_keys drops non-ASCII keys when the test runs without a UTF-8 locale, as CI may).
        type_line(browser, r"printf 'h\303\251llo-\303\274-\342\234\223\n'")
        wait_screen(browser, r"(?m)^héllo-ü-✓\s*$")
        type_line(browser, r"printf '\033[31mred-text\033[0m\n'")
        wait_screen(browser, r"(?m)^red-text\s*$")
        self.assertTrue(browser.execute_script(
            "return Array.from(document.querySelectorAll('.xterm-rows span')).some("
            "function (s) { return s.textContent.indexOf('red-text') >= 0 && /xterm-fg-1\\b/.test(s.className); });"))

        type_line(browser, "stty size | sed s/^/before=/")
        before = wait_screen(browser, r"(?m)^before=(\d+) (\d+)\s*$")
        rows_before = len(browser.all(".xterm-rows > div"))
        self.assertEqual(int(before.group(1)), rows_before)
        browser.shot("terminal")
        browser.set_window_size(800, 600)
        browser.wait(lambda d: len(browser.all(".xterm-rows > div")) != rows_before, what="the terminal resized")
        rows_after = len(browser.all(".xterm-rows > div"))
        type_line(browser, "stty size | sed s/^/after=/")
        after = wait_screen(browser, r"(?m)^after=(\d+) (\d+)\s*$")
        self.assertEqual(int(after.group(1)), rows_after)
        self.assertNotEqual((after.group(1), after.group(2)), (before.group(1), before.group(2)))
        browser.shot("terminal-resized")
        self.assertEqual(browser.csp_violations(), [])

        # Closing the tunnel ends the terminal with a message.
        self.h.api().close_tunnel(tunnelId=tunnel_id)
        browser.wait(lambda d: "tunnel was closed" in browser.text("#ssh-status"), what="the closed message")
        wait_screen(browser, r"tunnel was closed")
        browser.shot("terminal-tunnel-closed")

        # A second terminal in its own tab; closing the tab ends its SSH session and the source.
        browser.set_window_size(1280, 900)
        first = browser.current_window_handle
        browser.switch_to.new_window("tab")
        self.quick_setup(browser)
        second_id = browser.current_url.rsplit("/", 2)[1]
        self.log_in(browser)
        wait_screen(browser, r"[$#] \s*$", 60)
        self.assertIn("matches the remembered key", browser.text("#ssh-fingerprint"))
        self.assertEqual(self.h.api().describe_tunnel(tunnelId=second_id)["tunnel"]["sourceConnectionState"]["status"],
                         "CONNECTED")
        browser.close()
        browser.switch_to.window(first)
        wait_until(
            lambda: self.h.api().describe_tunnel(tunnelId=second_id)["tunnel"]["sourceConnectionState"]["status"]
            == "DISCONNECTED",
            30, "the source to disconnect after the tab closed", interval=0.2,
        )
        self.sshd.process.wait_for_log(r"Disconnected from user|Received disconnect")

        # A changed host key stops the connection with a clear warning.
        database = sqlite3.connect(os.path.join(self.service.state_dir, "tunnelkit.sqlite3"))
        database.execute("UPDATE console_host_keys SET fingerprint = 'SHA256:somebody-else' WHERE thing_name = ?",
                         (THING,))
        database.commit()
        database.close()
        browser.get(f"{self.service.api_url}/console/tunnel/{second_id}/terminal")
        self.log_in(browser)
        browser.wait(lambda d: "has changed" in browser.text("#ssh-status"), what="the host key warning")
        self.assertFalse(browser.css("#ssh-hostkey").get_attribute("hidden"))
        self.assertIn("SHA256:somebody-else", browser.text("#ssh-hostkey"))
        browser.shot("terminal-hostkey-changed")
        browser.get(f"{self.service.api_url}/console/tunnel/{second_id}")
        self.assertIn("SHA256:somebody-else", browser.text("main"))
        browser.shot("tunnel-hostkey")
        print("screenshots:", *browser.shots, sep="\n  ")

    def test_tunnel_without_thing(self) -> None:
        """A tunnel without a thing: its device's host key is remembered for that tunnel (review 13)."""
        browser = self.browser
        opened = self.h.api().open_tunnel(destinationConfig={"services": ["SSH"]})
        tunnel_id = opened["tunnelId"]
        self.h.start_destination(opened["destinationAccessToken"], f"SSH=127.0.0.1:{self.sshd.port}")
        terminal = f"{self.service.api_url}/console/tunnel/{tunnel_id}/terminal"
        browser.get(terminal)
        self.assertIn("remembered for this tunnel only", browser.text("main"))
        self.log_in(browser)
        wait_screen(browser, r"[$#] \s*$", 60)
        self.assertEqual(browser.css("#ssh-fingerprint").get_attribute("data-fingerprint"), self.host_fingerprint())
        self.assertIn("remembered for this tunnel only", browser.text("#ssh-fingerprint"))
        browser.shot("terminal-no-thing")
        browser.get(f"{self.service.api_url}/console/tunnel/{tunnel_id}")
        self.assertIn(self.host_fingerprint(), browser.text("main"))
        self.assertIn("remembered for this tunnel only", browser.text("main"))

        # The next connection checks it: a changed key is refused.
        database = sqlite3.connect(os.path.join(self.service.state_dir, "tunnelkit.sqlite3"))
        database.execute("UPDATE console_host_keys SET fingerprint = 'SHA256:somebody-else' WHERE thing_name = ?",
                         (f"tunnel/{tunnel_id}",))
        self.assertEqual(database.total_changes, 1)
        database.commit()
        database.close()
        browser.get(terminal)
        self.log_in(browser)
        browser.wait(lambda d: "has changed" in browser.text("#ssh-status"), what="the host key warning")
        self.assertIn("SHA256:somebody-else", browser.text("#ssh-hostkey"))
        browser.shot("terminal-no-thing-changed")
