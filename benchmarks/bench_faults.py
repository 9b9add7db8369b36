"""
Fault injection (issue 10): concurrent checksummed transfers through a tunnel while the service,
the destination and the source are killed (kill -9) and started again in turn.

    python benchmarks/bench_faults.py [--transfers 1000] [--concurrency 8] [--every 6] [--short]

Each transfer asks the far application (tunnelkit.testapps) for a push of 64 KB to 4 MB of a seeded
pattern and reads to the end; the application's view of it is one of: byte-exact; reset (an error
from the socket, or the connection refused); short-then-clean-EOF (fewer bytes, then an ordinary end
of stream: a cut transfer that looks finished); corrupted (bytes that are not the pattern).  The
last two must be 0.  A killed process is started again with the same command line after --down
seconds (nothing else is done: the others must reconnect by themselves), and after the run a few
transfers must all be exact ("recovered").  The same workload without faults first gives the
baseline rate; the counts are also split by which process was killed while each transfer ran.
A kill -9 of the source itself lets the kernel close the application's sockets: the local proxies
keep SO_LINGER {1, 0} on them until they end honestly, so that close is a reset too (those outcomes
are shown on their own line).  Exits 1 if a target is missed.
--short: 60 transfers, 4 at a time, one kill of each (the CI run, tests/e2e/test_faults_short.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import threading
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from machine import busy_before, load_note  # noqa: E402 - benchmarks/machine.py
from tunnelprocs import Child, Processes  # noqa: E402 - benchmarks/tunnelprocs.py
from tunnelkit.testapps import Outcome, classify  # noqa: E402
from tunnelkit.testing.process import unassigned_port  # noqa: E402

KINDS = ("exact", "reset", "refused", "short-clean-eof", "corrupted")


def run_transfers(port: int, count: int, concurrency: int, first_seed: int, timeout: float,
                  until: Optional[threading.Event] = None) -> List[Tuple[float, float, Outcome]]:
    """
    C{count} classified pushes, C{concurrency} at a time (and more until C{until} is set, if
    given): (start, end, outcome) each.
    """
    results: List[Tuple[float, float, Outcome]] = []
    lock = threading.Lock()
    numbers = itertools.count(first_seed)

    def next_seed() -> Optional[int]:
        seed = next(numbers)
        if seed < first_seed + count or (until is not None and not until.is_set()):
            return seed
        return None

    def worker() -> None:
        rng = random.Random(first_seed + threading.get_ident())
        while True:
            with lock:
                seed = next_seed()
            if seed is None:
                return
            start = time.monotonic()
            outcome = classify(port, rng.randint(64 * 1024, 4 << 20), seed, timeout)
            with lock:
                results.append((start, time.monotonic(), outcome))
            if outcome.kind != "exact":
                time.sleep(0.25)  # an application would wait a little before it tries again

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class Faults:
    """Kills (kill -9) and restarts the given processes in turn, every C{every} seconds, in a thread."""

    def __init__(self, processes: Dict[str, Child], every: float, down: float, rounds: int) -> None:
        self.processes, self.every, self.down, self.rounds = processes, every, down, rounds
        self.kills: List[Tuple[float, float, str]] = []  # (killed at, back at, name)
        self.failures: List[str] = []
        self._stop = threading.Event()
        self.done = threading.Event()  # set when every planned kill and restart happened
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            self._kill_in_turn()
        finally:
            self.done.set()

    def _kill_in_turn(self) -> None:
        names = list(self.processes)
        for number in range(self.rounds * len(names)):
            if self._stop.wait(self.every):
                return
            name = names[number % len(names)]
            child = self.processes[name]
            killed = time.monotonic()
            child.kill()
            time.sleep(self.down)
            child.restart()
            try:
                if name == "service":
                    child.wait_for_log(r"API listening on", 60)
                else:
                    child.wait_for_log(r"Successfully established websocket connection", 60)
            except AssertionError as e:
                self.failures.append(f"{name} did not come back: {e}")
                return
            self.kills.append((killed, time.monotonic(), name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--every", type=float, default=6.0, help="seconds between kills")
    parser.add_argument("--down", type=float, default=1.0, help="seconds a killed process stays down")
    parser.add_argument("--timeout", type=float, default=30.0, help="socket timeout of one transfer")
    parser.add_argument("--short", action="store_true", help="60 transfers, 4 at a time, one kill of each")
    args = parser.parse_args()
    if args.short:
        args.transfers, args.concurrency, args.every = 60, 4, 2.0

    procs = Processes()
    try:
        apps = procs.start_apps()
        service = procs.start_service_process()
        tokens = procs.tokens(["BULK"])
        destination = procs.start_proxy("destination", tokens["destination"], f"BULK={apps}")
        port = unassigned_port()  # fixed, so a restarted source listens where the applications connect
        source = procs.start_proxy("source", tokens["source"], f"BULK={port}")
        source.wait_for_log(rf"Listening for new connection on port {port}")
        print(f"bench_faults: {args.transfers} transfers, {args.concurrency} at a time, a kill every {args.every:g} s "
              f"(down {args.down:g} s); {load_note()}; {busy_before()}", flush=True)

        baseline_count = max(20, args.transfers // 10)
        start = time.monotonic()
        baseline = run_transfers(port, baseline_count, args.concurrency, 1, args.timeout)
        baseline_rate = len(baseline) / (time.monotonic() - start)

        rounds = 1 if args.short else 1_000_000  # --short: one kill of each; else until the transfers end
        faults = Faults({"service": service, "destination": destination, "source": source}, args.every, args.down, rounds)
        start = time.monotonic()
        faults.start()
        # --short: transfers go on until each process was killed and restarted once
        results = run_transfers(port, args.transfers, args.concurrency, 10_000, args.timeout,
                                faults.done if args.short else None)
        faults.stop()
        elapsed = time.monotonic() - start
        # recovery: the processes reconnect by themselves (their retry back-off); wait up to 60 s
        stopped = time.monotonic()
        while True:
            after = run_transfers(port, 10, 2, 900_000 + int(1000 * (time.monotonic() - stopped)), args.timeout)
            if all(o.kind == "exact" for _, _, o in after) or time.monotonic() - stopped > 60:
                break
            time.sleep(1)
        recovery = time.monotonic() - stopped
        alive = {child.name: child.running() for child in (service, destination, source)}
    finally:
        procs.cleanup()

    # a kill's window: from the kill until the first byte-exact transfer begun after the restart
    windows = []
    for killed, back, name in faults.kills:
        ends = [end for begin, end, outcome in results if begin >= back and outcome.kind == "exact"]
        windows.append((killed, min(ends, default=float("inf")), name))

    def during(begin: float, end: float) -> str:
        names = sorted({name for killed, healed, name in windows if killed < end and healed > begin})
        return "+".join(names) or "no kill"

    totals = Counter(outcome.kind for _, _, outcome in results)
    by_fault: Dict[str, Counter] = {}
    for begin, end, outcome in results:
        by_fault.setdefault(during(begin, end), Counter())[outcome.kind] += 1
    baseline_kinds = Counter(outcome.kind for _, _, outcome in baseline)
    recovered = all(outcome.kind == "exact" for _, _, outcome in after)

    print(f"\nbaseline without faults: {len(baseline)} transfers, {baseline_rate:.1f}/s, "
          + ", ".join(f"{k} {baseline_kinds[k]}" for k in KINDS))
    print(f"with faults: {len(results)} transfers in {elapsed:.0f} s ({len(results) / elapsed:.1f}/s, "
          f"{len(results) / elapsed / baseline_rate:.2f} of the baseline rate), {len(faults.kills)} kills "
          f"({Counter(name for _, _, name in faults.kills)})")
    print("  (a kill's window lasts until the first byte-exact transfer after the restart)")
    print(f"  {'killed while it ran':<28}" + "".join(f"{k:>17}" for k in KINDS))
    for name, counts in sorted(by_fault.items()):
        print(f"  {name:<28}" + "".join(f"{counts[k]:>17}" for k in KINDS))
    print(f"  {'all':<28}" + "".join(f"{totals[k]:>17}" for k in KINDS))
    not_source = Counter()
    for name, counts in by_fault.items():
        if "source" not in name.split("+"):
            not_source.update(counts)
    examples = [o for _, _, o in results if o.kind in ("short-clean-eof", "corrupted")][:5]
    for outcome in examples:
        print(f"  e.g. {outcome.kind}: {outcome.received} bytes {outcome.detail}")
    for failure in faults.failures:
        print(f"  FAULT THREAD: {failure}")
    print(f"after the run: {Counter(o.kind for _, _, o in after)} {recovery:.1f} s after the last restart; "
          f"processes alive: {alive}; recovered without a manual step: {'yes' if recovered else 'NO'}")
    verdicts = {
        "short-then-clean-EOF = 0 (transfers during no kill of the source)": not_source["short-clean-eof"] == 0,
        "short-then-clean-EOF = 0 (all)": totals["short-clean-eof"] == 0,
        "corrupted = 0": totals["corrupted"] == 0,
        "recovered": recovered and not faults.failures,
        f">= 1000 transfers (not in --short)": args.short or len(results) >= 1000,
    }
    for text, ok in verdicts.items():
        print(f"  {text:<70} {'ok' if ok else 'MISSED'}")
    print(load_note())
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
