"""
Head-of-line blocking (issue 10): one connection of a tunnel stalled (its reader reads nothing, or
1 KB/s) while 100 MB are pushed into it, and the other connections' figures against the same
connections unloaded, measured in the same run.

    python benchmarks/bench_hol.py [--stalled-mb 100] [--bulk-mb 32] [--repeat 3] [--peer tunnelkit]

Each round measures, on a second connection of the stalled connection's service (BULK) and on one
of another service (OTHER): the median round trip of 1,000-byte echoes and the MB/s of a push and a
sink, first unloaded, then with the stalled connection; and every process's RSS growth (peak while
stalled minus idle).  Targets: round trip within 2x, bulk within 0.8x, growth <= 16 MB.  A figure
that cannot be taken within --timeout seconds (the connection is blocked behind the stalled one)
prints as "blocked".  --peer cpp-source / cpp-destination puts AWS's C++ localproxy at that end
($TUNNELKIT_AWS_LOCALPROXY): it speaks no flow-control extension.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from machine import busy_before, load_note  # noqa: E402 - benchmarks/machine.py
from tunnelprocs import Child, Processes, rss_mb, source_port  # noqa: E402 - benchmarks/tunnelprocs.py
from tunnelkit.testapps import StalledReader, echo_round_trips, pattern_digest, push, sink  # noqa: E402

MB = 1 << 20


def build(procs: Processes, peer: str) -> Tuple[Dict[str, Child], int, int]:
    """Service, tunnel (BULK, OTHER), destination and source; (processes, BULK port, OTHER port)."""
    apps = procs.start_apps()
    service = procs.start_service_process(tls=peer != "tunnelkit")
    tokens = procs.tokens(["BULK", "OTHER"])
    if peer == "cpp-destination":
        destination = procs.start_cpp_proxy("dst", tokens["destination"], f"BULK=127.0.0.1:{apps},OTHER=127.0.0.1:{apps}")
    else:
        destination = procs.start_proxy("destination", tokens["destination"], f"BULK={apps},OTHER={apps}")
    if peer == "cpp-source":
        from tunnelkit.testing.process import unassigned_port

        ports = unassigned_port(), unassigned_port()
        source = procs.start_cpp_proxy("src", tokens["source"], f"BULK={ports[0]},OTHER={ports[1]}")
        for port in ports:
            source.wait_for_log(rf"Listening for new connection on port {port}")
    else:
        source = procs.start_proxy("source", tokens["source"], "BULK=0,OTHER=0")
        ports = source_port(source, "BULK"), source_port(source, "OTHER")
    return {"source": source, "service": service, "destination": destination}, ports[0], ports[1]


def figures(port: int, round_trips: int, megabytes: int, timeout: float, seed: int) -> Dict[str, Optional[float]]:
    """Median echo RTT (ms), push and sink MB/s on C{port}; None for what blocked or failed."""
    total = megabytes * MB
    result: Dict[str, Optional[float]] = {}

    def timed(name: str, run: Callable[[], object], expected: object, scale: Callable[[float], float]) -> None:
        start = time.perf_counter()
        try:
            value = run()
        except OSError:
            result[name] = None
            return
        elapsed = time.perf_counter() - start
        result[name] = scale(elapsed) if (expected is None or value == expected) else None

    try:
        samples = echo_round_trips(port, count=round_trips, size=1000, timeout=timeout)
        result["rtt"] = statistics.median(samples) * 1000
    except (OSError, AssertionError):
        result["rtt"] = None
    timed("push", lambda: push(port, total, seed, timeout), (total, pattern_digest(seed, total)), lambda t: megabytes / t)
    timed("sink", lambda: sink(port, total, seed + 1, half_close=False, timeout=timeout),
          (total, pattern_digest(seed + 1, total)), lambda t: megabytes / t)
    return result


class PeakRss:
    """Peak RSS of some processes, sampled every 50 ms in a thread."""

    def __init__(self, processes: Dict[str, Child]) -> None:
        self.processes = processes
        self.peak = {name: 0.0 for name in processes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, child in self.processes.items():
                self.peak[name] = max(self.peak[name], rss_mb(child.pid))
            time.sleep(0.05)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def show(value: Optional[float], unit: str) -> str:
    return "blocked" if value is None else f"{value:.2f} {unit}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stalled-mb", type=int, default=100, help="MB pushed into the stalled connection")
    parser.add_argument("--bulk-mb", type=int, default=32, help="MB per push and per sink of the others")
    parser.add_argument("--round-trips", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (medians over them)")
    parser.add_argument("--rate", type=int, default=None, help="stalled reader's bytes/s (default: reads nothing)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a figure counts as blocked")
    parser.add_argument("--peer", choices=["tunnelkit", "cpp-source", "cpp-destination"], default="tunnelkit")
    args = parser.parse_args()

    procs = Processes()
    rows: List[Dict[str, object]] = []
    try:
        processes, bulk_port, other_port = build(procs, args.peer)
        print(f"bench_hol: peer {args.peer}; stalled connection {args.stalled_mb} MB, reader "
              f"{'stopped' if args.rate is None else f'{args.rate} B/s'}; others {args.bulk_mb} MB push + sink, "
              f"{args.round_trips} echoes; {args.repeat} rounds; {load_note()}; {busy_before()}", flush=True)
        for number in range(args.repeat):
            seed = 100 * number
            unloaded = {name: figures(port, args.round_trips, args.bulk_mb, args.timeout, seed + i * 10)
                        for i, (name, port) in enumerate((("BULK", bulk_port), ("OTHER", other_port)))}
            idle = {name: rss_mb(child.pid) for name, child in processes.items()}
            with PeakRss(processes) as peak:
                stalled = StalledReader(bulk_port, args.stalled_mb * MB, seed=seed + 7, rate=args.rate,
                                        timeout=args.timeout * 10)
                time.sleep(3)  # the stalled connection's bytes fill every buffer they can
                loaded = {name: figures(port, args.round_trips, args.bulk_mb, args.timeout, seed + 50 + i * 10)
                          for i, (name, port) in enumerate((("BULK", bulk_port), ("OTHER", other_port)))}
                time.sleep(2)
                start = time.perf_counter()
                try:
                    received, exact = stalled.drain()
                    ended = "exact" if exact else "NOT the pattern"
                except OSError as e:  # the stalled connection was reset on the way
                    received, ended = stalled.received, f"then {type(e).__name__}"
                drained = time.perf_counter() - start
            growth = {name: peak.peak[name] - idle[name] for name in processes}
            alive = {name: child.running() for name, child in processes.items()}
            rows.append({"unloaded": unloaded, "loaded": loaded, "growth": growth})
            print(f"round {number + 1}:", flush=True)
            for name in ("BULK", "OTHER"):
                u, l = unloaded[name], loaded[name]
                print(f"  {name:<6} RTT {show(u['rtt'], 'ms')} -> {show(l['rtt'], 'ms')}   "
                      f"push {show(u['push'], 'MB/s')} -> {show(l['push'], 'MB/s')}   "
                      f"sink {show(u['sink'], 'MB/s')} -> {show(l['sink'], 'MB/s')}")
            print("  RSS growth (MB): " + "  ".join(f"{n} {g:+.1f}" for n, g in growth.items())
                  + f"   stalled connection: {received} bytes, {ended}, "
                  f"drained in {drained:.1f} s; alive: {alive}", flush=True)
            if not all(alive.values()):
                print("a process exited: stopping")
                break
    finally:
        procs.cleanup()

    def ratio(name: str, metric: str) -> Optional[float]:
        values = []
        for row in rows:
            u, l = row["unloaded"][name][metric], row["loaded"][name][metric]  # type: ignore[index]
            if u is None or l is None:
                return None
            values.append(l / u)
        return statistics.median(values) if values else None

    print(f"\nsummary (medians over rounds of loaded / unloaded, measured back to back) [{load_note()}]")
    verdicts = []
    for name in ("BULK", "OTHER"):
        rtt, push_ratio, sink_ratio = ratio(name, "rtt"), ratio(name, "push"), ratio(name, "sink")
        for label, value, target, ok in (
            ("RTT", rtt, "<= 2.00", rtt is not None and rtt <= 2.0),
            ("push", push_ratio, ">= 0.80", push_ratio is not None and push_ratio >= 0.8),
            ("sink", sink_ratio, ">= 0.80", sink_ratio is not None and sink_ratio >= 0.8),
        ):
            verdicts.append(ok)
            shown = "blocked" if value is None else f"{value:.2f}"
            print(f"  {name:<6} {label:<5} ratio {shown:>8}   target {target}   {'ok' if ok else 'MISSED'}")
    for process in ("source", "service", "destination"):
        worst = max(row["growth"][process] for row in rows) if rows else float("nan")  # type: ignore[index]
        ok = worst <= 16
        verdicts.append(ok)
        print(f"  RSS growth {process:<12} {worst:+7.1f} MB (worst round)   target <= 16   {'ok' if ok else 'MISSED'}")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
