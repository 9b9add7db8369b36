"""
Throughput and latency through source + service + destination, against direct TCP and `ssh -L` to
the same target, in one run on this machine (absolute numbers drift between runs; compare ratios).

    python benchmarks/bench_tunnel.py [--megabytes 512] [--repeat 3] [--round-trips 2000]

Measures, for each path (direct TCP, ssh -L, tunnel over ws://, tunnel over wss://):
  - bulk MB/s, 1 connection and 8 parallel connections (medians of --repeat runs);
  - 1-byte round trip p50/p99 (ms);
  - for the tunnels, each process's RSS idle and its peak under load (MB).
and prints the issue's targets next to the ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests.e2e.harness import SSH, Harness, Process, free_port, wait_until  # noqa: E402
from machine import busy_before, load_note  # noqa: E402 - benchmarks/machine.py (the script's own directory)

CHUNK = 1 << 20

SERVER_SCRIPT = r"""
import socket, struct, sys, threading
def sink(conn):
    # first 8 bytes: how many bytes follow; answer one byte once they all arrived
    head = b""
    while len(head) < 8:
        head += conn.recv(8 - len(head))
    (total,) = struct.unpack(">Q", head)
    buf = bytearray(1 << 20)
    got = 0
    while got < total:
        n = conn.recv_into(buf)
        if not n:
            return
        got += n
    conn.sendall(b"!")
    conn.close()
def echo(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)
def serve(port, handler):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()
threading.Thread(target=serve, args=(int(sys.argv[1]), sink), daemon=True).start()
threading.Thread(target=serve, args=(int(sys.argv[2]), echo), daemon=True).start()
print("servers ready", flush=True)
threading.Event().wait()
"""


class _Cleanups:
    """Stands in for a TestCase: runs the harness's cleanups at the end."""

    def __init__(self) -> None:
        self.calls: List[Callable[[], None]] = []

    def addCleanup(self, f: Callable[..., None], *args: object) -> None:
        self.calls.append(lambda: f(*args))

    def run(self) -> None:
        for call in reversed(self.calls):
            call()


def _send_bulk(port: int, total: int, ready: threading.Barrier) -> float:
    payload = os.urandom(CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as s:
        ready.wait()
        start = time.perf_counter()
        s.sendall(total.to_bytes(8, "big"))
        sent = 0
        view = memoryview(payload)
        while sent < total:
            n = min(CHUNK, total - sent)
            s.sendall(view[:n])
            sent += n
        if s.recv(1) != b"!":
            raise RuntimeError("the sink did not confirm")
        return time.perf_counter() - start


def bulk(port: int, megabytes: int, connections: int) -> float:
    """MB/s moving C{megabytes} in total over C{connections} parallel connections."""
    total = megabytes * (1 << 20)
    each = total // connections
    barrier = threading.Barrier(connections + 1)
    times: List[float] = []
    threads = [
        threading.Thread(target=lambda: times.append(_send_bulk(port, each, barrier))) for _ in range(connections)
    ]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if len(times) != connections:
        raise RuntimeError("a bulk connection failed")
    return (each * connections) / (1 << 20) / elapsed


def round_trips(port: int, count: int) -> Tuple[float, float]:
    """p50 and p99 (ms) of 1-byte round trips through an echo."""
    samples = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(50):  # warm up
            s.sendall(b"x")
            s.recv(1)
        for _ in range(count):
            start = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("bad echo")
            samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Samples the RSS of some processes every 20 ms while a load runs."""

    def __init__(self, processes: Dict[str, Process]) -> None:
        self.processes = processes
        self.peak = {name: 0.0 for name in processes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, process in self.processes.items():
                self.peak[name] = max(self.peak[name], rss_mb(process.pid))
            time.sleep(0.02)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_rounds(
    paths: Dict[str, Tuple[int, int]], args: argparse.Namespace
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Dict[str, List[float]]]]:
    """
    Interleaved rounds (every path once per round, in turn), so that load from anything else on
    the machine hits every path alike; medians over the rounds, and the raw samples (ratios are
    taken per round, between figures measured seconds apart).
    """
    samples: Dict[str, Dict[str, List[float]]] = {name: {"one": [], "eight": []} for name in paths}
    for round_number in range(args.repeat):
        for name, (sink_port, _) in paths.items():
            samples[name]["one"].append(bulk(sink_port, args.megabytes, 1))
            samples[name]["eight"].append(bulk(sink_port, args.megabytes, 8))
    results: Dict[str, Dict[str, float]] = {}
    for name, (_, echo_port) in paths.items():
        p50, p99 = round_trips(echo_port, args.round_trips)
        one, eight = statistics.median(samples[name]["one"]), statistics.median(samples[name]["eight"])
        results[name] = {"one": one, "eight": eight, "p50": p50, "p99": p99}
        spread = f"{min(samples[name]['one']):.0f}-{max(samples[name]['one']):.0f}"
        print(f"  {name:<14} 1 conn {one:8.1f} MB/s ({spread:>9})   8 conns {eight:8.1f} MB/s   "
              f"RTT p50 {p50:6.3f} ms  p99 {p99:6.3f} ms", flush=True)
    return results, samples


def ratio(samples: Dict[str, Dict[str, List[float]]], a: Tuple[str, str], b: Tuple[str, str]) -> float:
    """Median over the rounds of C{a / b}, each round's figures measured back to back."""
    return statistics.median(x / y for x, y in zip(samples[a[0]][a[1]], samples[b[0]][b[1]]))


def tunnel_paths(h: Harness, tls: bool, sink: int, echo: int) -> Tuple[int, int, Dict[str, Process]]:
    h.start_service(tls=tls, name=f"service-{'wss' if tls else 'ws'}")
    tunnel = h.open_tunnel(["SINK", "ECHO"])
    destination = h.start_destination(tunnel.destination_token, f"SINK={sink},ECHO={echo}")
    source = h.start_source(tunnel.source_token, "SINK=0,ECHO=0")
    ports = source.port_of("SINK"), source.port_of("ECHO")
    destination.wait_for_log("The tunnel is ready")
    return ports[0], ports[1], {"source": source, "service": h.service.process, "destination": destination}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=512, help="bytes moved per bulk run (MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="bulk runs per figure (median)")
    parser.add_argument("--round-trips", type=int, default=2000)
    args = parser.parse_args()

    cleanups = _Cleanups()
    h = Harness(cleanups)
    try:
        sink, echo = free_port(), free_port()
        servers = h.spawn("servers", [sys.executable, "-c", SERVER_SCRIPT, str(sink), str(echo)])
        servers.wait_for_log("servers ready")
        print(f"bench_tunnel: {args.megabytes} MiB per bulk run, median of {args.repeat} rounds; "
              f"{args.round_trips} round trips; {load_note()}; {busy_before()}", flush=True)
        paths: Dict[str, Tuple[int, int]] = {"direct TCP": (sink, echo)}
        sshd = h.start_sshd()
        forward_sink, forward_echo = free_port(), free_port()
        h.spawn("ssh-L", [SSH, *sshd.ssh_options(sshd.port), "-N", "-p", str(sshd.port),
                          "-o", "Ciphers=aes128-gcm@openssh.com",
                          "-L", f"127.0.0.1:{forward_sink}:127.0.0.1:{sink}",
                          "-L", f"127.0.0.1:{forward_echo}:127.0.0.1:{echo}", f"{sshd.user}@127.0.0.1"])

        def forwarding() -> bool:
            try:
                socket.create_connection(("127.0.0.1", forward_echo), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(forwarding, 30, "ssh -L to listen")
        paths["ssh -L"] = (forward_sink, forward_echo)
        all_processes: Dict[str, Dict[str, Process]] = {}
        for tls in (False, True):
            label = "tunnel wss://" if tls else "tunnel ws://"
            tunnel_sink, tunnel_echo, processes = tunnel_paths(h, tls, sink, echo)
            paths[label] = (tunnel_sink, tunnel_echo)
            all_processes[label] = processes
        time.sleep(1.0)
        idle = {label: {name: rss_mb(p.pid) for name, p in procs.items()} for label, procs in all_processes.items()}
        flat = {f"{label} {name}": p for label, procs in all_processes.items() for name, p in procs.items()}
        cpu_before = {name: cpu_seconds(p.pid) for name, p in flat.items()}
        with PeakRss(flat) as peak:
            results, samples = measure_rounds(paths, args)
        load_after = load_note()
        cpu_used = {name: cpu_seconds(p.pid) - cpu_before[name] for name, p in flat.items()}
        rss = {
            label: {name: (idle[label][name], peak.peak[f"{label} {name}"]) for name in procs}
            for label, procs in all_processes.items()
        }
    finally:
        cleanups.run()

    direct = results["direct TCP"]
    ws, wss = results["tunnel ws://"], results["tunnel wss://"]
    ssh_l, ws_, wss_ = "ssh -L", "tunnel ws://", "tunnel wss://"
    print(f"\nsummary (ratios: median over rounds of figures measured back to back)  "
          f"[after: {load_after}]")
    print(f"  {'metric':<44} {'value':>8}   {'target':<9} result")

    def row(text: str, value: float, target: str, ok: Optional[bool]) -> None:
        verdict = "-" if ok is None else ("ok" if ok else "MISSED")
        print(f"  {text:<44} {value:8.2f}   {target:<9} {verdict}")

    rows = [
        ("ws:// 1 conn / ssh -L 1 conn", ratio(samples, (ws_, "one"), (ssh_l, "one")), 0.60),
        ("wss:// 1 conn / ssh -L 1 conn", ratio(samples, (wss_, "one"), (ssh_l, "one")), 0.35),
        ("ws:// 8 conns / ws:// 1 conn", ratio(samples, (ws_, "eight"), (ws_, "one")), 0.90),
        ("wss:// 8 conns / wss:// 1 conn", ratio(samples, (wss_, "eight"), (wss_, "one")), 0.90),
    ]
    for text, value, target in rows:
        row(text, value, f">= {target:.2f}", value >= target)
    for label, figures in (("ws://", ws), ("wss://", wss)):
        extra = figures["p50"] - direct["p50"]
        row(f"{label} RTT p50 - direct TCP p50 (ms)", extra, "<= 1.00", extra <= 1.0)
    row("ssh -L 1 conn (MB/s, the reference)", results[ssh_l]["one"], "", None)
    row("ws:// 1 conn / direct TCP 1 conn", ratio(samples, (ws_, "one"), ("direct TCP", "one")), "", None)
    gigabytes = args.repeat * 2 * args.megabytes / 1024
    print(f"\nCPU seconds per GB moved (bulk runs, {gigabytes:.1f} GB per tunnel; the RTT runs add a little)")
    for label in rss:
        shares = "   ".join(f"{name} {cpu_used[f'{label} {name}'] / gigabytes:5.2f}" for name in rss[label])
        print(f"  {label:<14} {shares}")
    print("\nRSS (MB)            idle    peak under load   growth   target growth <= 16")
    for label, processes in rss.items():
        for name, (idle, peak) in processes.items():
            growth = peak - idle
            print(f"  {label:<14} {name:<12} {idle:6.1f}   {peak:6.1f}   {growth:+7.1f}   {'ok' if growth <= 16 else 'MISSED'}")
    print(f"\n{load_after}")


if __name__ == "__main__":
    main()
