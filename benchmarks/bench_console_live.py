#!/usr/bin/env python3
"""
The console's live tunnel states (C{GET /console/events}) with many tunnels: the service's CPU time
while C{--pages} hub pages hold their event streams open and nothing changes, and how long a state
change (a destination connecting) takes to reach the pages, against C{twistd tunnelkit --mode service}
in a subprocess holding C{--tunnels} open tunnels.

    python benchmarks/bench_console_live.py [--tunnels 1000] [--pages 5] [--seconds 30]
"""

from __future__ import annotations

import argparse
import configparser
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, List
from urllib.parse import urlencode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.bench_api import TWISTD, wait_for_line  # noqa: E402
from benchmarks.machine import busy_before, load_note  # noqa: E402

PASSWORD = "benchmark password"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process C{pid} so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stream(threading.Thread):
    """One hub page's event stream: keeps the time each C{tunnel} event line arrived."""

    def __init__(self, port: int, context: ssl.SSLContext, cookie: str) -> None:
        super().__init__(daemon=True)
        self.connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=600)
        self.connection.request("GET", "/console/events", headers={"Cookie": cookie, "Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.status
        self.lines: List[Any] = []
        self.initial = threading.Event()

    def run(self) -> None:
        try:
            for raw in self.response:
                line = raw.decode("utf-8", "replace")
                self.lines.append((time.monotonic(), line))
        except (OSError, ValueError):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--pages", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(f"machine: {load_note()}; {busy_before()}")
    work = tempfile.mkdtemp(prefix="tunnelkit-bench-live-")
    state = os.path.join(work, "state")
    log_path = os.path.join(work, "service.log")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    children: List[subprocess.Popen] = []
    with open(log_path, "wb") as log:
        service = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "tunnelkit", "--mode", "service", "--listen", "ssl:0:interface=127.0.0.1",
             "--state-dir", state, "--max-open-tunnels", str(max(1000, args.tunnels + 1)), "--audit-log", ""],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
        )
    children.append(service)
    try:
        port = int(wait_for_line(log_path, r"API listening on https://127\.0\.0\.1:(\d+)/").group(1))
        subprocess.run([sys.executable, "-m", "tunnelkit.cli", "admin", "create-user", "default", "bench",
                        "--state-dir", state], input=PASSWORD + "\n", text=True, env=env, check=True,
                       capture_output=True)
        import botocore.session

        credentials = configparser.ConfigParser()
        credentials.read(os.path.join(state, "credentials"))
        api = botocore.session.Session().create_client(
            "iotsecuretunneling", region_name="us-east-1", endpoint_url=f"https://127.0.0.1:{port}",
            verify=os.path.join(state, "ca.pem"),
            aws_access_key_id=credentials["default"]["aws_access_key_id"],
            aws_secret_access_key=credentials["default"]["aws_secret_access_key"],
        )
        started = time.monotonic()
        for i in range(args.tunnels - 1):
            api.open_tunnel(description=f"bench tunnel {i}", destinationConfig={"services": ["SSH"]})
        watched = api.open_tunnel(description="watched", destinationConfig={"services": ["SSH"]})
        print(f"opened {args.tunnels} tunnels in {time.monotonic() - started:.1f} s")

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
        cookie = f"__Host-tunnelkit-console={session}"

        streams = [Stream(port, context, cookie) for _ in range(args.pages)]
        for s in streams:
            s.start()
        deadline = time.monotonic() + 60
        while any(sum(1 for _, line in s.lines if line.startswith("event: tunnel")) < args.tunnels for s in streams):
            assert time.monotonic() < deadline, "the pages did not get every tunnel's state"
            time.sleep(0.1)
        time.sleep(2.0)  # the first readings settle
        before = cpu_seconds(service.pid)
        wall = time.monotonic()
        time.sleep(args.seconds)
        used = cpu_seconds(service.pid) - before
        elapsed = time.monotonic() - wall
        print(f"{args.tunnels} tunnels, {args.pages} hub pages streaming, nothing changing, {elapsed:.0f} s: "
              f"service CPU {used:.2f} s = {100 * used / elapsed:.1f} % of one core")

        # A state change: a destination connects to the watched tunnel; when do the pages see it?
        marks = [len(s.lines) for s in streams]
        connected_at = time.monotonic()
        destination = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "tunnelkit", "--mode", "destination", "-e", f"127.0.0.1:{port}",
             "-c", os.path.join(state, "ca.pem"), "-d", "SSH=127.0.0.1:9"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=work,
            env=dict(env, AWSIOT_TUNNEL_ACCESS_TOKEN=watched["destinationAccessToken"]),
        )
        children.append(destination)
        tid = watched["tunnelId"]
        seen: List[float] = []
        deadline = time.monotonic() + 60
        for s, mark in zip(streams, marks):
            while True:
                hit = [t for t, line in s.lines[mark:] if tid in line and '"destination": "CONNECTED"' in line]
                if hit:
                    seen.append(hit[0])
                    break
                assert time.monotonic() < deadline, "no page saw the destination connect"
                time.sleep(0.02)
        # The proxy's own start-up is part of it: time it from its log line too.
        print(f"destination proxy started -> CONNECTED on all {args.pages} pages: "
              f"{max(seen) - connected_at:.2f} s (first page {min(seen) - connected_at:.2f} s; "
              "includes the proxy's start-up)")
    finally:
        for child in reversed(children):
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
