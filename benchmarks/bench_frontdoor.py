"""
The service's front door under attack (issue 11), on 127.0.0.0/8 only, bounded in time.

  python3 benchmarks/bench_frontdoor.py [--before DIR] [--parts flood,idle] [--seconds 8]

Each part runs against this checkout's service and, with C{--before DIR} (a tree of an older
tunnelkit, e.g. C{git archive <commit> | tar -x -C DIR}), against that one too, in the same run:

  flood  A real client reconnects with its valid source token (and client token) as fast as the
         service lets it, from 127.0.0.1, while a flood of handshakes with wrong secrets for the
         same tunnel comes from 127.0.0.2 (one process, as fast as it can).  Prints the real client's
         accepted handshakes per second without and with the flood, and the flood's rate and statuses.
  idle   3,000 raw TCP connections that send nothing and 1,000 TLS connections that finish their
         handshake and send nothing (from 100 addresses 127.0.1.x, under the per-address cap), then
         prints the service's RSS before and its peak (sampled every 0.25 s), and how many the
         service still holds when the last is open and 15 s later (a TLS + request-head deadline
         resets them; without one they wait for the 120 s idle timeout).

Every service is started afresh with its own state directory; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import configparser
import multiprocessing
import os
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from benchmarks.machine import busy_before, load_note  # noqa: E402
from tunnelkit.testing import http_attempt, upgrade_request  # noqa: E402
from tunnelkit.testing.process import unassigned_port  # noqa: E402


class Service:
    """A service process of the tree C{top}, on a plain and a TLS loopback port."""

    def __init__(self, top: str, extra: List[str] = ()) -> None:  # type: ignore[assignment]
        self.state = tempfile.mkdtemp(prefix="tk-bench-frontdoor-")
        self.tcp_port, self.tls_port = unassigned_port(), unassigned_port()
        env = dict(os.environ, PYTHONPATH=top)
        self.log = open(os.path.join(self.state, "service.log"), "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "twisted", "tunnelkit", "--mode", "service", "--state-dir", self.state,
             "--listen", f"tcp:{self.tcp_port}:interface=127.0.0.1",
             "--listen", f"ssl:{self.tls_port}:interface=127.0.0.1", *extra],
            cwd=self.state, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service of {top} exited: see {self.log.name}")
            try:
                socket.create_connection(("127.0.0.1", self.tcp_port), 0.2).close()
                if os.path.exists(os.path.join(self.state, "credentials")):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not start in 60 s")
            time.sleep(0.05)

    def open_tunnel(self) -> Dict[str, str]:
        import boto3

        parser = configparser.ConfigParser()
        parser.read(os.path.join(self.state, "credentials"))
        section = parser[parser.sections()[0]]
        client = boto3.session.Session(
            aws_access_key_id=section["aws_access_key_id"],
            aws_secret_access_key=section["aws_secret_access_key"],
            region_name="us-east-1",
        ).client("iotsecuretunneling", endpoint_url=f"http://127.0.0.1:{self.tcp_port}")
        return client.open_tunnel(destinationConfig={"services": ["SSH"]})  # type: ignore[no-any-return]

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.state, True)


def upgrade(token: str, mode: str = "source", client_token: Optional[str] = None) -> bytes:
    """The reference local proxy's upgrade request (L{upgrade_request}), with C{client_token} if given."""
    return upgrade_request(mode, token, extra=[("client-token", client_token)] if client_token else [])


def handshake(port: int, request: bytes, source: str) -> int:
    """One upgrade attempt from C{source}: the status code (0 if the connection failed)."""
    return http_attempt(port, request, source, timeout=5.0)[0]


def _flood(port: int, token: str, seconds: float, out: "multiprocessing.Queue[Tuple[int, Dict[int, int]]]") -> None:
    wrong = token[:17] + ("A" if token[17] != "A" else "B") + token[18:]
    request = upgrade(wrong)
    counts: Dict[int, int] = {}
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:
        status = handshake(port, request, "127.0.0.2")
        counts[status] = counts.get(status, 0) + 1
        total += 1
    out.put((total, counts))


def real_client(port: int, token: str, seconds: float) -> Tuple[float, Dict[int, int]]:
    """Reconnect with the valid token as fast as allowed for C{seconds}: accepted/s and statuses."""
    request = upgrade(token, client_token="bench-client-token-0123456789abcdef")
    counts: Dict[int, int] = {}
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        status = handshake(port, request, "127.0.0.1")
        counts[status] = counts.get(status, 0) + 1
        time.sleep(0.02)
    return counts.get(101, 0) / seconds, counts


def part_flood(top: str, seconds: float) -> Dict[str, object]:
    service = Service(top)
    try:
        tunnel = service.open_tunnel()
        token = tunnel["sourceAccessToken"]
        quiet_rate, quiet = real_client(service.tcp_port, token, seconds)
        queue: "multiprocessing.Queue[Tuple[int, Dict[int, int]]]" = multiprocessing.Queue()
        flood = multiprocessing.Process(target=_flood, args=(service.tcp_port, token, seconds + 1, queue))
        flood.start()
        time.sleep(1.0)  # the flood is under way
        busy_rate, busy = real_client(service.tcp_port, token, seconds)
        total, flood_counts = queue.get(timeout=seconds + 30)
        flood.join(10)
        return {
            "quiet": quiet_rate, "quiet_statuses": quiet, "flood": busy_rate, "flood_statuses": busy,
            "flood_rate": total / (seconds + 1), "flood_answers": flood_counts,
        }  # fmt: skip
    finally:
        service.stop()


def _open_idle(port: int, tls_port: int, raw: int, tls: int, addresses: int) -> List[socket.socket]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    held: List[socket.socket] = []
    for n in range(raw + tls):
        s = socket.socket()
        s.bind((f"127.0.1.{1 + n % addresses}", 0))
        s.settimeout(10)
        try:
            if n < raw:
                s.connect(("127.0.0.1", port))
            else:
                s.connect(("127.0.0.1", tls_port))
                s = context.wrap_socket(s)
        except OSError:
            s.close()
            continue
        held.append(s)
    return held


def _still_open(sockets: List[socket.socket]) -> int:
    """
    How many of C{sockets} the service has not closed or reset.  A readable TLS socket may only hold
    TLS 1.3 session tickets: it is read (non-blocking) to tell those from the end of the connection.
    """
    poller = select.poll()
    for s in sockets:
        poller.register(s.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    readable = {fd for fd, _ in poller.poll(0)}
    count = 0
    for s in sockets:
        if s.fileno() not in readable:
            count += 1
        elif isinstance(s, ssl.SSLSocket):
            s.setblocking(False)
            try:
                count += 1 if s.recv(1) else 0
            except ssl.SSLWantReadError:
                count += 1
            except OSError:
                pass
    return count


def part_idle(top: str, raw: int, tls: int, hold: float) -> Dict[str, object]:
    import threading

    service = Service(top)
    try:
        time.sleep(1.0)
        before = service.rss_kib()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                peak[0] = max(peak[0], service.rss_kib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        held = _open_idle(service.tcp_port, service.tls_port, raw, tls, 100)
        opened = time.monotonic() - started
        at_end = _still_open(held)
        time.sleep(hold)
        left = _still_open(held)
        after = service.rss_kib()
        done.set()
        sampler.join()
        for s in held:
            s.close()
        return {"opened": len(held), "open_seconds": opened, "rss_before": before, "rss_peak": peak[0],
                "open_at_end": at_end, "still_open": left, "rss_after": after}  # fmt: skip
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="a tree of the tunnelkit to compare with (e.g. from git archive)")
    parser.add_argument("--parts", default="flood,idle")
    parser.add_argument("--seconds", type=float, default=8.0, help="each flood phase (default 8)")
    parser.add_argument("--raw", type=int, default=3000)
    parser.add_argument("--tls", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=15.0, help="seconds after connecting to count (default 15)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    print(load_note())
    print(busy_before())
    trees = [("this checkout", HERE)] + ([("before", os.path.abspath(args.before))] if args.before else [])
    parts = args.parts.split(",")
    results: Dict[str, Dict[str, Dict[str, object]]] = {}
    for name, top in trees:
        results[name] = {}
        if "flood" in parts:
            results[name]["flood"] = part_flood(top, args.seconds)
        if "idle" in parts:
            results[name]["idle"] = part_idle(top, args.raw, args.tls, args.hold)
    for name, by_part in results.items():
        print(f"\n== {name} ==")
        flood = by_part.get("flood")
        if flood:
            print(
                f"real client, valid token: {flood['quiet']:.1f} accepted handshakes/s alone "
                f"{flood['quiet_statuses']}, {flood['flood']:.1f}/s during the flood {flood['flood_statuses']}"
            )
            print(f"flood of wrong secrets: {flood['flood_rate']:.0f} attempts/s, answers {flood['flood_answers']}")
        idle = by_part.get("idle")
        if idle:
            print(
                f"{idle['opened']} idle connections opened in {idle['open_seconds']:.1f} s "
                f"({idle['open_at_end']} of them still held when the last was open): service RSS "
                f"{idle['rss_before'] / 1024:.0f} MB before, peak {idle['rss_peak'] / 1024:.0f} MB; "
                f"{idle['still_open']} still held {args.hold:g} s after the last opened "
                f"(RSS then {idle['rss_after'] / 1024:.0f} MB)"
            )
    if len(results) == 2 and "flood" in parts:
        now, then = results["this checkout"]["flood"], results["before"]["flood"]
        ratio = float(now["flood"]) / max(float(then["flood"]), 0.01)  # type: ignore[arg-type]
        print(f"\naccepted handshakes/s during the flood, this checkout / before: {ratio:.1f}x")
    print(load_note())


if __name__ == "__main__":
    main()
