#!/usr/bin/env python3
"""
Control-plane API throughput: OpenTunnel and DescribeTunnel requests per second over keep-alive HTTPS,
from botocore clients (real SigV4 signing), against C{twistd tunnelkit --mode service} in a subprocess.

Baseline, in the same run: the same botocore clients against an empty twisted.web resource (answers
C{{}} to every POST) served over the same TLS certificate by a subprocess, so the figures separate
what the service costs from what HTTPS, Twisted and botocore cost.  Also reported: the server
process's CPU time per request (from /proc), which does not depend on the client.

    python benchmarks/bench_api.py [--requests 400] [--threads 1,4]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

import botocore.session
from botocore.config import Config

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]

BASELINE_SERVER = r"""
import sys
from twisted.internet import reactor, endpoints
from twisted.web import server, resource

class Empty(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        request.setHeader(b"content-type", b"application/x-amz-json-1.1")
        return b"{}"

key, cert = sys.argv[1], sys.argv[2]
endpoint = endpoints.serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
def listening(port):
    print(f"listening on {port.getHost().port}", flush=True)
endpoint.listen(server.Site(Empty())).addCallback(listening)
reactor.run()
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process C{pid}."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def wait_for_line(path: str, pattern: str, timeout: float = 30.0) -> "re.Match[str]":
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            match = re.search(pattern, f.read())
        if match:
            return match
        time.sleep(0.05)
    with open(path) as f:
        raise SystemExit(f"timed out waiting for {pattern!r} in {path}:\n{f.read()[-2000:]}")


def client(url: str, ca: str, key_id: str, secret: str) -> Any:
    session = botocore.session.get_session()
    return session.create_client(
        "iotsecuretunneling",
        region_name="us-east-1",
        endpoint_url=url,
        verify=ca,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, max_pool_connections=16),
    )


def measure(
    make_call: Callable[[Any], Callable[[], Any]], clients: List[Any], requests: int, pid: int
) -> Tuple[float, float]:
    """Requests per second and server CPU milliseconds per request, C{len(clients)} threads."""
    per_thread = requests // len(clients)
    calls = [make_call(c) for c in clients]
    for call in calls:  # warm up each connection
        call()
    barrier = threading.Barrier(len(calls) + 1)
    errors: List[BaseException] = []

    def worker(call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            for _ in range(per_thread):
                call()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    cpu_before = cpu_seconds(pid)
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    if errors:
        raise SystemExit(f"a request failed: {errors[0]!r}")
    total = per_thread * len(calls)
    return total / elapsed, 1000.0 * cpu / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement (default 400)")
    parser.add_argument("--threads", default="1,4", help="client thread counts to try (default 1,4)")
    args = parser.parse_args()
    thread_counts = [int(n) for n in args.threads.split(",")]

    workdir = tempfile.mkdtemp(prefix="tunnelkit-bench-api-")
    processes: List[subprocess.Popen] = []
    try:
        state = os.path.join(workdir, "state")
        service_log = os.path.join(workdir, "service.log")
        with open(service_log, "wb") as log:
            processes.append(subprocess.Popen(
                TWISTD + ["-n", "--pidfile=", "tunnelkit", "--mode", "service", "--state-dir", state,
                          "--listen", "ssl:0:interface=127.0.0.1", "--max-open-tunnels", "100000000"],
                cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
            ))
        port = int(wait_for_line(service_log, r"API listening on https://127\.0\.0\.1:(\d+)/").group(1))
        service_pid = processes[-1].pid
        credentials: Dict[str, str] = {}
        with open(os.path.join(state, "credentials")) as f:
            for line in f:
                if "=" in line:
                    name, _, value = line.partition("=")
                    credentials[name.strip()] = value.strip()
        ca = os.path.join(state, "ca.pem")

        baseline_log = os.path.join(workdir, "baseline.log")
        with open(baseline_log, "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-c", BASELINE_SERVER, os.path.join(state, "server.key"), os.path.join(state, "server.pem")],
                cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
            ))
        baseline_port = int(wait_for_line(baseline_log, r"listening on (\d+)").group(1))
        baseline_pid = processes[-1].pid

        def clients(url: str, n: int) -> List[Any]:
            return [client(url, ca, credentials["aws_access_key_id"], credentials["aws_secret_access_key"]) for _ in range(n)]

        seed = clients(f"https://127.0.0.1:{port}", 1)[0]
        tunnel_id = seed.open_tunnel(destinationConfig={"thingName": "bench", "services": ["SSH"]})["tunnelId"]

        def open_call(c: Any) -> Callable[[], Any]:
            return lambda: c.open_tunnel(description="bench")

        def describe_call(c: Any) -> Callable[[], Any]:
            return lambda: c.describe_tunnel(tunnelId=tunnel_id)

        print(f"tunnelkit control-plane API, {args.requests} requests per figure, botocore clients over "
              f"keep-alive HTTPS (generated EC P-256 certificate), service and baseline in their own processes")
        print(f"{'threads':>7}  {'what':<34} {'req/s':>8} {'server CPU ms/req':>18} {'vs baseline':>12}")
        for n in thread_counts:
            base_rate, base_cpu = measure(describe_call, clients(f"https://127.0.0.1:{baseline_port}", n),
                                          args.requests, baseline_pid)
            print(f"{n:>7}  {'baseline: empty twisted.web resource':<34} {base_rate:>8.0f} {base_cpu:>18.3f} {'1.00':>12}")
            for name, call in (("DescribeTunnel", describe_call), ("OpenTunnel", open_call)):
                rate, cpu = measure(call, clients(f"https://127.0.0.1:{port}", n), args.requests, service_pid)
                print(f"{n:>7}  {name:<34} {rate:>8.0f} {cpu:>18.3f} {rate / base_rate:>12.2f}")
    finally:
        for process in processes:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
