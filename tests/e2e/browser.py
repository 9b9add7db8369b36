"""
Headless Chromium for the console's end-to-end tests (selenium, Debian's chromium and chromedriver).

    browser = start_browser(testcase, ca_pem)     # trusts the service's CA (an NSS database of its own)
    browser.get(url); browser.shot("hub")         # a screenshot per page, kept in the test's temp dir

Each browser has a fresh profile (C{--user-data-dir}) and its own HOME (where Chromium reads the NSS
database holding the service's CA), both removed with the test.  The test is skipped, saying what to
install, when chromium, chromedriver or selenium are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any, List, Optional

from twisted.trial.unittest import SkipTest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CERTUTIL = shutil.which("certutil")

FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900",
]


class Browser:
    """A selenium Chrome driver plus the screenshots of one test."""

    def __init__(self, driver: Any, shots_dir: str) -> None:
        self.driver = driver
        self.shots_dir = shots_dir
        self.shots: List[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.driver, name)

    def shot(self, name: str) -> str:
        path = os.path.join(self.shots_dir, f"{len(self.shots) + 1:02d}-{name}.png")
        self.driver.save_screenshot(path)
        self.shots.append(path)
        return path

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> List[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def wait(self, condition: Any, timeout: float = 30.0, what: str = "") -> Any:
        """
        Wait until C{condition(driver)} is true, with selenium's own C{WebDriverWait} (an exception
        from the condition, such as an element not there yet or gone stale, counts as not yet);
        past C{timeout} fail with C{what}, the page's status line and a screenshot.
        """
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.wait import WebDriverWait

        last: List[BaseException] = []

        def check(driver: Any) -> Any:
            try:
                return condition(driver)
            except Exception as e:  # element not there yet, stale, ...
                last[:] = [e]
                return False

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(check)
        except TimeoutException:
            pass
        shot = self.shot("timed-out")
        status = self.driver.execute_script(
            "var s = document.querySelector('[role=status], [role=alert]'); return s ? s.textContent : '';")
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition} ({last[0] if last else None!r}); "
                             f"page {self.driver.current_url}, status {status!r}, screenshot {shot}")

    def text(self, selector: str) -> str:
        return str(self.css(selector).text)

    def csp_violations(self) -> List[str]:
        """The browser console's Content-Security-Policy complaints so far."""
        return [e["message"] for e in self.driver.get_log("browser") if "Content Security Policy" in e["message"]]


def start_browser(testcase: Any, ca_pem: Optional[str], shots_dir: str, width: int = 1280, height: int = 900) -> Browser:
    """A headless Chromium trusting C{ca_pem}; quit and removed when the test ends."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise SkipTest("selenium is not installed (pip install -e '.[test]')")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise SkipTest("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    home = tempfile.mkdtemp(prefix="tunnelkit-browser-")
    testcase.addCleanup(shutil.rmtree, home, True)
    flags = list(FLAGS) + [f"--user-data-dir={os.path.join(home, 'profile')}", f"--window-size={width},{height}"]
    if ca_pem is not None:
        if CERTUTIL:
            nssdb = os.path.join(home, ".pki", "nssdb")
            os.makedirs(nssdb)
            subprocess.run([CERTUTIL, "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True)
            subprocess.run([CERTUTIL, "-d", f"sql:{nssdb}", "-A", "-n", "tunnelkit-test-ca", "-t", "C,,", "-i", ca_pem],
                           check=True)
        else:
            flags.append("--ignore-certificate-errors")  # tests only: libnss3-tools is missing
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in flags:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    env = dict(os.environ, HOME=home)
    service = Service(CHROMEDRIVER, env=env, log_output=os.path.join(home, "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    testcase.addCleanup(driver.quit)
    driver.set_page_load_timeout(60)
    os.makedirs(shots_dir, exist_ok=True)
    return Browser(driver, shots_dir)
