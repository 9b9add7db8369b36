"""
System calls per 1-byte round trip and per MB of bulk in each tunnelkit process (source, service,
destination), counted with ``strace -c`` (Debian's strace): a figure the machine's load does not
change, unlike MB/s.  Each run starts a fresh tunnel twice, with write coalescing on
(tunnelkit.transport.coalesce, the default) and off (``TUNNELKIT_WRITE_COALESCING=0``, Twisted's own
write path), and prints both and their ratio.

    python benchmarks/bench_syscalls.py [--scheme wss|ws] [--round-trips 1000] [--megabytes 64]

strace slows the traced processes: only the counts mean something here, not the time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_tunnel as bt  # noqa: E402 - the script's own directory
from machine import load_note  # noqa: E402
from tunnelkit.testing.process import unassigned_port  # noqa: E402
from tunnelkit.transport.coalesce import ENVIRONMENT  # noqa: E402

Counts = Dict[str, Dict[str, int]]


def _read_counts(path: str) -> Dict[str, int]:
    calls: Dict[str, int] = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and fields[0][:1].isdigit() and fields[-1] != "total":
                try:
                    calls[fields[-1]] = int(fields[3])
                except ValueError:
                    pass
    return calls


def measure(scheme: str, coalescing: bool, round_trips: int, megabytes: int) -> Tuple[Counts, Counts]:
    """(per-process counts over the round trips, over the bulk run) for one fresh tunnel."""
    saved = os.environ.get(ENVIRONMENT)
    os.environ[ENVIRONMENT] = "1" if coalescing else "0"
    cleanups = bt._Cleanups()
    harness = bt.Harness(cleanups)
    directory = tempfile.mkdtemp(prefix="bench-syscalls-")
    try:
        sink, echo = unassigned_port(), unassigned_port()
        servers = harness.spawn("servers", [sys.executable, "-c", bt.SERVER_SCRIPT, str(sink), str(echo)])
        servers.wait_for_log("servers ready")
        path = bt.tunnel_path(harness, scheme == "wss", sink, echo)
        bt.round_trips(path.echo, 200)  # warm up both ways
        bt.bulk(path.sink, 8, 1)
        results = []
        for work in ("rtt", "bulk"):
            tracers = {}
            for role, pids in path.processes.items():
                out = os.path.join(directory, f"{work}-{role}.txt")
                tracers[role] = (out, subprocess.Popen(
                    ["strace", "-c", "-f", "-o", out, "-p", str(pids[0])], stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # strace attached
            if work == "rtt":
                bt.round_trips(path.echo, round_trips)
            else:
                bt.bulk(path.sink, megabytes, 1)
            time.sleep(0.3)
            for out, tracer in tracers.values():
                tracer.terminate()
                tracer.wait()
            results.append({role: _read_counts(out) for role, (out, _) in tracers.items()})
        return results[0], results[1]
    finally:
        cleanups.run()
        shutil.rmtree(directory, ignore_errors=True)
        if saved is None:
            os.environ.pop(ENVIRONMENT, None)
        else:
            os.environ[ENVIRONMENT] = saved


def _line(role: str, counts: Dict[str, int], per: float) -> str:
    top = sorted(counts.items(), key=lambda item: -item[1])[:5]
    return f"    {role:12s} {sum(counts.values()) / per:8.1f}   " + "  ".join(f"{name} {n / per:.1f}" for name, n in top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", choices=["ws", "wss"], default="wss")
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--megabytes", type=int, default=64)
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("bench_syscalls: strace is needed (apt-get install strace)")
    print(f"bench_syscalls: {args.scheme}://, {args.round_trips} round trips, {args.megabytes} MiB; {load_note()}")
    figures = {}
    for coalescing in (False, True):
        figures[coalescing] = measure(args.scheme, coalescing, args.round_trips, args.megabytes)
    for index, (what, per) in enumerate((("per 1-byte round trip", args.round_trips), ("per MB of bulk", args.megabytes))):
        print(f"\nsystem calls {what}:")
        for coalescing in (False, True):
            print(f"  write coalescing {'on' if coalescing else 'off (Twisted)'}:")
            for role, counts in figures[coalescing][index].items():
                print(_line(role, counts, per))
        print("  on / off:  " + "   ".join(
            f"{role} {sum(figures[True][index][role].values()) / max(1, sum(figures[False][index][role].values())):.2f}"
            for role in figures[True][index]))
    print(f"\n{load_note()}")


if __name__ == "__main__":
    main()
