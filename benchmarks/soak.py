"""
A soak run: does anything grow while tunnelkit works for a long time?

    python benchmarks/soak.py --minutes 30          # the run the issue asks for (at least 30 minutes)
    python benchmarks/soak.py --minutes 3 --sample 20   # a smoke test

On 127.0.0.1 it starts a service (ws://, a fresh state directory with a short --closed-retention so
the purge runs during the soak), an echo server, and one long-lived tunnel whose source and
destination run for the whole soak.  Then, at a steady rate, until the time is up:
  - every --cycle seconds a new tunnel is opened, a destination and a source process are started
    for it, --short short connections go through it (connect, 4 KiB echoed, close), its source is
    killed with SIGKILL and started again with the same command (the kept client token reconnects),
    the tunnel is closed and both proxies exit;
  - all the time, --long connections through the long-lived tunnel echo 16 KiB every second, and
    every --cycle seconds one of them is dropped and replaced.
Every --sample seconds it records, for each long-lived process (service, long source, long
destination), its RSS and open file descriptors, and the state directory's database size (with its
WAL), the audit trail's size and each long-lived process's log size.  At the end it prints the samples and each quantity's
trend per hour: the least-squares slope over the samples after --warmup seconds.  Flat means the
slope is small next to the value (a leak shows as a steady climb).  The machine's load is printed
before and after.
"""

from __future__ import annotations

import argparse
import configparser
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOP)

sys.path.insert(0, os.path.join(TOP, "benchmarks"))
from bench_tunnel import rss_kib  # noqa: E402 - benchmarks/bench_tunnel.py
from machine import busy_before, load_note  # noqa: E402 - benchmarks/machine.py
from tunnelkit.testing.process import REPOSITORY_TOP, TWISTD, Process  # noqa: E402
from tunnelkit.testing.process import unassigned_port  # noqa: E402


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def echo_server() -> Tuple[int, threading.Event]:
    """A threaded echo server on 127.0.0.1 (in this process); its port and a stop flag."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def serve(connection: socket.socket) -> None:
        with connection:
            try:
                while True:
                    data = connection.recv(65536)
                    if not data:
                        return
                    connection.sendall(data)
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            threading.Thread(target=serve, args=(connection,), daemon=True).start()
        server.close()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1], stop


def echo(port: int, size: int, timeout: float = 30.0) -> None:
    """One short connection: send C{size} bytes through 127.0.0.1:C{port}, read them back, close."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        received = b""
        while len(received) < size:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection closed after {len(received)} of {size} bytes")
            received += chunk
    if received != payload:
        raise RuntimeError("the echo differs")


class LongConnection(threading.Thread):
    """A connection through the tunnel that echoes 16 KiB every second until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopped = threading.Event()
        self.errors: List[str] = []
        self.rounds = 0

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                while not self.stopped.is_set():
                    payload = os.urandom(16384)
                    s.sendall(payload)
                    received = b""
                    while len(received) < len(payload):
                        chunk = s.recv(65536)
                        if not chunk:
                            raise RuntimeError("closed")
                        received += chunk
                    if received != payload:
                        raise RuntimeError("the echo differs")
                    self.rounds += 1
                    self.stopped.wait(1.0)
        except Exception as e:  # noqa: BLE001 - reported at the end
            self.errors.append(str(e))


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = tempfile.mkdtemp(prefix="tunnelkit-soak-")
        self.state_dir = os.path.join(self.root, "state")
        self.processes: List[Process] = []
        self.count = 0
        self.errors: List[str] = []
        self.cycles = 0
        self.short_connections = 0

    def twistd(self, name: str, args: Sequence[str], env: Optional[Dict[str, str]] = None) -> Process:
        directory = os.path.join(self.root, name)
        os.makedirs(directory, exist_ok=True)
        environment = dict(os.environ, XDG_STATE_HOME=os.path.join(self.root, "state-home"),
                           PYTHONPATH=os.pathsep.join(p for p in (REPOSITORY_TOP, os.environ.get("PYTHONPATH")) if p))
        environment.update(env or {})
        process = Process(name, [*TWISTD, "-n", "--pidfile=", "tunnelkit", *args], directory, environment)
        self.processes.append(process)
        return process

    def api(self):  # type: ignore[no-untyped-def]
        import botocore.session

        credentials = configparser.ConfigParser()
        credentials.read(os.path.join(self.state_dir, "credentials"))
        return botocore.session.Session().create_client(
            "iotsecuretunneling", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{self.port}",
            aws_access_key_id=credentials["default"]["aws_access_key_id"],
            aws_secret_access_key=credentials["default"]["aws_secret_access_key"],
        )

    def proxy(self, mode: str, name: str, token: str, mapping: str) -> Process:
        flag = "-s" if mode == "source" else "-d"
        return self.twistd(name, ["--mode", mode, "-e", f"ws://127.0.0.1:{self.port}", "-b", "127.0.0.1", flag, mapping],
                           {"AWSIOT_TUNNEL_ACCESS_TOKEN": token})

    def start(self) -> None:
        self.service = self.twistd("service", [
            "--mode", "service", "--listen", "tcp:0:interface=127.0.0.1", "--state-dir", self.state_dir,
            "--closed-retention", f"{self.args.retention}s", "--handshakes-per-second", "0",
        ])
        self.port = int(self.service.wait_for_log(r"API listening on http://127\.0\.0\.1:(\d+)/").group(1))
        self.echo_port, self.echo_stop = echo_server()
        self.client = self.api()
        tunnel = self.client.open_tunnel(destinationConfig={"thingName": "soak", "services": ["ECHO"]},
                                         timeoutConfig={"maxLifetimeTimeoutMinutes": 720})
        self.long_destination = self.proxy("destination", "long-destination", tunnel["destinationAccessToken"],
                                           f"ECHO={self.echo_port}")
        self.long_source = self.proxy("source", "long-source", tunnel["sourceAccessToken"], "ECHO=0")
        match = self.long_source.wait_for_log(r"Listening for new connection on port (\d+)")
        self.long_port = int(match.group(1))
        self.long_source.wait_for_log("The tunnel is ready")
        self.long_destination.wait_for_log("The tunnel is ready")
        self.long_connections = [LongConnection(self.long_port) for _ in range(self.args.long)]
        for connection in self.long_connections:
            connection.start()

    def cycle(self) -> None:
        """One short-lived tunnel: proxies, short connections, a killed and restarted source, close."""
        n = self.cycles
        tunnel = self.client.open_tunnel(destinationConfig={"thingName": "soak", "services": ["ECHO"]})
        port = unassigned_port()
        destination = self.proxy("destination", f"destination-{n}", tunnel["destinationAccessToken"],
                                 f"ECHO={self.echo_port}")
        source = self.proxy("source", f"source-{n}", tunnel["sourceAccessToken"], f"ECHO={port}")
        source.wait_for_log("The tunnel is ready")
        destination.wait_for_log("The tunnel is ready")
        for _ in range(self.args.short // 2):
            echo(port, 4096)
            self.short_connections += 1
        source.kill()
        again = self.proxy("source", f"source-{n}-again", tunnel["sourceAccessToken"], f"ECHO={port}")
        again.wait_for_log("The tunnel is ready")
        for _ in range(self.args.short - self.args.short // 2):
            for attempt in range(50):  # the service may still be replacing the killed source's peer
                try:
                    echo(port, 4096)
                    break
                except (OSError, RuntimeError):
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
            self.short_connections += 1
        self.client.close_tunnel(tunnelId=tunnel["tunnelId"])
        for process in (again, destination):
            status = process.popen.wait(30)
            if status != 0:
                raise RuntimeError(f"{process.name} exited with {status}")
            process.terminate()
        for process in (source, again, destination):
            self.processes.remove(process)
            shutil.rmtree(os.path.dirname(process.log_path), ignore_errors=True)
        # one long connection dropped and replaced
        old = self.long_connections.pop(random.randrange(len(self.long_connections)))
        old.stopped.set()
        old.join(10)
        self.errors += old.errors
        replacement = LongConnection(self.long_port)
        replacement.start()
        self.long_connections.append(replacement)
        self.cycles += 1

    def sample(self, started: float) -> Dict[str, float]:
        values: Dict[str, float] = {"minute": (time.monotonic() - started) / 60}
        for name, process in (("service", self.service), ("long-source", self.long_source),
                              ("long-destination", self.long_destination)):
            pid = process.popen.pid
            values[f"{name} RSS MiB"] = rss_kib(pid) / 1024
            values[f"{name} fds"] = open_fds(pid)
            values[f"{name} log KiB"] = os.path.getsize(process.log_path) / 1024
        db = sum(os.path.getsize(os.path.join(self.state_dir, f)) for f in os.listdir(self.state_dir)
                 if ".sqlite" in f)  # the tunnel store and the notification queue, with their WAL files
        values["database KiB"] = db / 1024
        values["audit trail KiB"] = sum(os.path.getsize(os.path.join(self.state_dir, f))
                                        for f in os.listdir(self.state_dir) if f.startswith("audit.jsonl")) / 1024
        return values

    def stop(self) -> None:
        for connection in self.long_connections:
            connection.stopped.set()
        for connection in self.long_connections:
            connection.join(10)
            self.errors += connection.errors
        for process in reversed(self.processes):
            process.terminate()
        self.echo_stop.set()
        shutil.rmtree(self.root, ignore_errors=True)


def slope_per_hour(xs: List[float], ys: List[float]) -> float:
    """Least-squares slope of ys over xs (minutes), per hour."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sample", type=float, default=60.0, help="seconds between samples (default 60)")
    parser.add_argument("--warmup", type=float, default=720.0,
                        help="seconds left out of the trend (default 720: SQLite's WAL file fills to its "
                        "1000-page checkpoint, ~4 MiB, in the first ~11 minutes, then is reused)")
    parser.add_argument("--cycle", type=float, default=15.0, help="seconds between short-lived tunnels (default 15)")
    parser.add_argument("--short", type=int, default=20, help="short connections per short-lived tunnel")
    parser.add_argument("--long", type=int, default=8, help="long connections through the long-lived tunnel")
    parser.add_argument("--retention", type=int, default=60, help="the service's --closed-retention in seconds")
    args = parser.parse_args()

    print(f"before: {load_note()}; {busy_before()}", flush=True)
    soak = Soak(args)
    samples: List[Dict[str, float]] = []
    try:
        soak.start()
        started = time.monotonic()
        end = started + args.minutes * 60
        next_sample = started
        next_cycle = started
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(soak.sample(started))
                print("  ".join(f"{k} {v:.1f}" for k, v in samples[-1].items()), flush=True)
                next_sample += args.sample
            if now >= next_cycle:
                try:
                    soak.cycle()
                except Exception as e:  # noqa: BLE001 - counted and reported; the soak goes on
                    soak.errors.append(f"cycle {soak.cycles}: {e}")
                    soak.cycles += 1
                next_cycle += args.cycle
            time.sleep(0.2)
        samples.append(soak.sample(started))
    finally:
        soak.stop()
    print(f"after: {load_note()}")
    print(f"{soak.cycles} short-lived tunnels ({2 * soak.cycles} source starts, {soak.cycles} kill -9), "
          f"{soak.short_connections} short connections, {args.long} long connections replaced one per cycle; "
          f"errors: {len(soak.errors)}")
    for error in soak.errors[:10]:
        print(f"  error: {error}")
    steady = [s for s in samples if s["minute"] * 60 >= args.warmup] or samples
    print(f"trend per hour over {len(steady)} samples after {args.warmup:g} s of warm-up "
          f"(first -> last sample, slope):")
    xs = [s["minute"] for s in steady]
    for key in samples[0]:
        if key == "minute":
            continue
        ys = [s[key] for s in steady]
        print(f"  {key:28s} {ys[0]:10.1f} -> {ys[-1]:10.1f}   {slope_per_hour(xs, ys):+10.2f}/h")
    return 1 if soak.errors else 0


if __name__ == "__main__":
    sys.exit(main())
