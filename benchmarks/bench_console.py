#!/usr/bin/env python3
"""
The web console's tunnels hub with many tunnels: how long the service takes to answer
C{GET /console/} (the whole page, every tunnel with its states) over keep-alive HTTPS, and how long
headless Chromium takes to load and render it, against C{twistd tunnelkit --mode service} in a
subprocess holding C{--tunnels} open tunnels.

Baseline, in the same run and the same service: listing the same tunnels through the API
(ListTunnels, pages of 100, botocore with SigV4), which is what a script would do; the ratio
separates the console's rendering from what reading the tunnels costs.

    python benchmarks/bench_console.py [--tunnels 1000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, List
from urllib.parse import urlencode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.bench_api import TWISTD, wait_for_line  # noqa: E402
from benchmarks.machine import busy_before, load_note  # noqa: E402

PASSWORD = "benchmark password"


def median_ms(run: Callable[[], Any], repeat: int) -> float:
    times: List[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    print(f"machine: {load_note()}; {busy_before()}")
    work = tempfile.mkdtemp(prefix="tunnelkit-bench-console-")
    state = os.path.join(work, "state")
    log_path = os.path.join(work, "service.log")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    with open(log_path, "wb") as log:
        service = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "tunnelkit", "--mode", "service", "--listen", "ssl:0:interface=127.0.0.1",
             "--state-dir", state, "--max-open-tunnels", str(max(1000, args.tunnels)), "--audit-log", ""],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
        )
    try:
        port = int(wait_for_line(log_path, r"API listening on https://127\.0\.0\.1:(\d+)/").group(1))
        subprocess.run([sys.executable, "-m", "tunnelkit.cli", "admin", "create-user", "default", "bench",
                        "--state-dir", state], input=PASSWORD + "\n", text=True, env=env, check=True,
                       capture_output=True)
        import botocore.session
        import configparser

        credentials = configparser.ConfigParser()
        credentials.read(os.path.join(state, "credentials"))
        api = botocore.session.Session().create_client(
            "iotsecuretunneling", region_name="us-east-1", endpoint_url=f"https://127.0.0.1:{port}",
            verify=os.path.join(state, "ca.pem"),
            aws_access_key_id=credentials["default"]["aws_access_key_id"],
            aws_secret_access_key=credentials["default"]["aws_secret_access_key"],
        )
        for i in range(args.tunnels):
            api.open_tunnel(description=f"bench tunnel {i}",
                            destinationConfig={"thingName": f"thing{i % 50}", "services": ["SSH"]})

        context = ssl.create_default_context(cafile=os.path.join(state, "ca.pem"))
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
        connection.request("GET", "/console/signin")
        response = connection.getresponse()
        response.read()
        signin = re.search(r"__Host-tunnelkit-signin=([^;]+)", response.headers["set-cookie"]).group(1)
        connection.request("POST", "/console/signin",
                           body=urlencode({"csrf": signin, "account": "default", "user": "bench", "password": PASSWORD}),
                           headers={"Cookie": f"__Host-tunnelkit-signin={signin}",
                                    "Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        response.read()
        session = re.search(r"__Host-tunnelkit-console=([^;]+)", response.headers["set-cookie"]).group(1)
        cookie = {"Cookie": f"__Host-tunnelkit-console={session}"}

        def hub() -> None:
            connection.request("GET", "/console/", headers=cookie)
            body = connection.getresponse().read()
            assert body.count(b'data-tunnel="') == args.tunnels, "the hub does not list every tunnel"

        def list_all() -> None:
            count, token = 0, None
            while True:
                page = api.list_tunnels(maxResults=100, **({"nextToken": token} if token else {}))
                count += len(page["tunnelSummaries"])
                token = page.get("nextToken")
                if not token:
                    break
            assert count == args.tunnels

        hub()
        list_all()
        hub_ms = median_ms(hub, args.repeat)
        api_ms = median_ms(list_all, args.repeat)
        print(f"{args.tunnels} tunnels, median of {args.repeat}:")
        print(f"  GET /console/ (whole hub page, HTTPS keep-alive): {hub_ms:.1f} ms")
        print(f"  baseline: ListTunnels of them all through the API (botocore, pages of 100): {api_ms:.1f} ms")
        print(f"  ratio hub / API listing: {hub_ms / api_ms:.2f}")

        browser_ms = browser_load(port, state, session, args.repeat)
        if browser_ms is not None:
            print(f"  headless Chromium, navigation to load event (page rendered, live-state stream opened): "
                  f"{browser_ms:.1f} ms; ratio to the server's answer time: {browser_ms / hub_ms:.2f}")
    finally:
        service.terminate()
        service.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def browser_load(port: int, state: str, session: str, repeat: int) -> Any:
    """Median load time of the hub in headless Chromium (None if chromium/selenium are missing)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        print("  (selenium missing: no browser figure)")
        return None
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("  (chromium or chromedriver missing: no browser figure)")
        return None
    profile = tempfile.mkdtemp(prefix="tunnelkit-bench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--ignore-certificate-errors", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"https://127.0.0.1:{port}/console/signin")
        driver.add_cookie({"name": "__Host-tunnelkit-console", "value": session, "path": "/", "secure": True})
        times = []
        for _ in range(repeat):
            driver.get(f"https://127.0.0.1:{port}/console/")
            timing = driver.execute_script(
                "var t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime;")
            times.append(float(timing))
        return statistics.median(times)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
