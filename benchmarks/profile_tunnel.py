"""
Where the CPU goes, per GB, in each tunnelkit process during a bulk transfer (py-spy, native frames).

Starts the path as bench_tunnel does (sink and echo servers, a service, a tunnel, a destination, a
source), samples the source, service and destination with ``py-spy record --native`` while
--megabytes MiB go through one connection, again and again for --seconds, and prints for each process:
its CPU seconds per GB (from /proc, unprofiled rounds), the share of its busy samples by layer
(OpenSSL C code, libc copies and system calls, Python's TLS glue in pyOpenSSL and Twisted, autobahn,
tunnelkit, Twisted's reactor, protobuf, other) as s/GB, and its top functions.

    python benchmarks/profile_tunnel.py [--scheme wss|ws] [--seconds 20] [--megabytes 256] [--keep DIR]

py-spy pauses a process for each sample: the profiled rounds are slower than the unprofiled ones,
whose CPU figures the s/GB columns use.  ``pip install py-spy`` first.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tunnel  # noqa: E402 - the script's own directory
from tunnelkit.testing.process import unassigned_port  # noqa: E402
from bench_tunnel import ROLES, SERVER_SCRIPT, Harness, _Cleanups, bulk, cpu_seconds, tunnel_path  # noqa: E402
from machine import busy_before, load_note  # noqa: E402

#: Native libraries by layer, tested on the deepest native frame ("function (library)").
NATIVE_LAYERS = (
    ("OpenSSL (C): crypto and records", re.compile(r"\((?:[^)]*/)?(?:libssl|libcrypto|_rust\.abi3)[^)]*\)")),
    ("protobuf (upb, C)", re.compile(r"_message\.abi3")),
    ("pyOpenSSL + cffi glue", re.compile(r"_cffi_backend")),
    ("stdlib ssl module (C glue)", re.compile(r"_ssl\.cpython|\(_ssl")),
)
#: libc functions that enter the kernel (their samples are the kernel's socket work, mostly copies).
SYSCALLS = re.compile(r"^(?:send|recv|sendmsg|recvmsg|writev|readv|write|read|epoll_ctl|__libc_\w+) \(")
#: Python files by layer, tested on the deepest Python frame.
PYTHON_LAYERS = (
    ("pyOpenSSL + cffi glue", re.compile(r"OpenSSL/|cffi")),
    ("Twisted TLS glue", re.compile(r"twisted/protocols/tls\.py|twisted/internet/_sslverify|twisted/protocols/policies")),
    ("tunnelkit TLS glue (stdtls)", re.compile(r"tunnelkit/transport/stdtls\.py|python3\.\d+/ssl\.py")),
    ("autobahn", re.compile(r"autobahn/|txaio/")),
    ("tunnelkit", re.compile(r"tunnelkit/")),
    ("protobuf (upb, C)", re.compile(r"google/protobuf")),
    ("Twisted reactor", re.compile(r"twisted/")),
)
COPIES = "libc memmove (copies; caller below)"


def classify(stack: List[str]) -> Tuple[str, str]:
    """
    (layer, function) for one sampled stack, root first.  A libc frame without a symbol is taken
    for memmove/memcpy (the stripped libc exports no name for its AVX variants; their callers are
    BIO reads and writes, joins, slices): it is reported with the frame that called it.
    """
    leaf = stack[-1]
    python = [frame for frame in stack if ".py:" in frame]
    deepest = python[-1] if python else leaf
    if "libc.so" in leaf and (leaf.startswith("0x") or re.match(r"_*mem(cpy|move)", leaf)):
        caller = next((frame for frame in reversed(stack[:-1]) if "libpython" not in frame), deepest)
        return COPIES, "memmove <- " + caller
    if SYSCALLS.match(leaf):
        return "kernel: socket send/recv", leaf
    for layer, test in NATIVE_LAYERS:
        if test.search(leaf):
            return layer, leaf
    for layer, test in PYTHON_LAYERS:
        if test.search(deepest):
            return layer, deepest
    return "other Python / interpreter", deepest


def summarise(raw_path: str) -> Tuple[collections.Counter, collections.Counter, collections.Counter, int]:
    """
    Busy samples of the reactor thread (stacks through the reactor's main loop, not waiting in
    epoll_wait) by layer, by function in its layer, by native leaf; and their total.
    """
    layers: collections.Counter = collections.Counter()
    functions: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack_text, _, count_text = line.rstrip("\n").rpartition(" ")
            stack = [frame for frame in stack_text.split(";") if frame]
            if not stack or not any("mainLoop" in frame for frame in stack) or stack[-1].startswith("epoll_wait"):
                continue
            count = int(count_text)
            layer, function = classify(stack)
            layers[layer] += count
            functions[(layer, _short(function))] += count
            if ".py:" not in stack[-1]:
                leaves[_short(stack[-1])] += count
            total += count
    return layers, functions, leaves, total


def _short(frame: str) -> str:
    return re.sub(r"\(/[^)]*/(site-packages|lib/python3\.\d+)/", "(", frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheme", choices=("ws", "wss"), default="wss")
    parser.add_argument("--seconds", type=int, default=20, help="how long py-spy samples")
    parser.add_argument("--megabytes", type=int, default=256, help="MiB per bulk run")
    parser.add_argument("--rounds", type=int, default=3, help="unprofiled bulk runs for the CPU figures")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--keep", help="directory to keep py-spy's raw and flamegraph files in")
    parser.add_argument("--summarise", metavar="DIR", help="only summarise the raw files of an earlier --keep DIR")
    args = parser.parse_args()
    if args.summarise:
        report(args.summarise, None, args.top)
        return
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if py_spy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    out = args.keep or tempfile.mkdtemp(prefix="tunnelkit-profile-")
    os.makedirs(out, exist_ok=True)
    cleanups = _Cleanups()
    h = Harness(cleanups)
    try:
        sink, echo = unassigned_port(), unassigned_port()
        h.spawn("servers", [sys.executable, "-c", SERVER_SCRIPT, str(sink), str(echo)]).wait_for_log("servers ready")
        print(f"profile_tunnel: {args.scheme}://, {args.megabytes} MiB per bulk run, 1 connection")
        print(f"machine before: {load_note()}; {busy_before()}", flush=True)
        path = tunnel_path(h, args.scheme == "wss", sink, echo)
        time.sleep(1.0)
        before = {role: cpu_seconds(path.processes[role]) for role in ROLES}
        speeds = [bulk(path.sink, args.megabytes, 1) for _ in range(args.rounds)]
        per_gb = {role: (cpu_seconds(path.processes[role]) - before[role]) / (args.rounds * args.megabytes / 1024)
                  for role in ROLES}
        print(f"unprofiled: {', '.join(f'{s:.0f}' for s in speeds)} MB/s; CPU s/GB "
              + ", ".join(f"{role} {per_gb[role]:.2f}" for role in ROLES) + f" (sum {sum(per_gb.values()):.2f})")
        recorders = {}
        for role in ROLES:
            pid = path.processes[role][0]
            for fmt, suffix in (("raw", "txt"),):
                recorders[role] = subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--native", "--rate", str(args.rate), "--duration",
                     str(args.seconds), "--format", fmt, "--output", os.path.join(out, f"{role}.{suffix}")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )
        stop = time.monotonic() + args.seconds
        moved = 0
        time.sleep(1.0)  # py-spy attaches
        while time.monotonic() < stop - 1:
            bulk(path.sink, args.megabytes, 1)
            moved += args.megabytes
        for role, recorder in recorders.items():
            _, err = recorder.communicate(timeout=args.seconds + 60)
            if recorder.returncode:
                raise SystemExit(f"py-spy failed on the {role}: {err.decode()[-500:]}")
        print(f"profiled: {moved} MiB moved while sampling; {load_note()}\n")
    finally:
        cleanups.run()
    report(out, per_gb, args.top)


def report(out: str, per_gb: Optional[Dict[str, float]], top: int) -> None:
    """Print each process's layers (as s/GB when C{per_gb} is known) and top functions."""
    for role in ROLES:
        layers, functions, leaves, total = summarise(os.path.join(out, f"{role}.txt"))
        if not total:
            print(f"{role}: no samples")
            continue
        print(f"{role}: {per_gb[role] if per_gb else float('nan'):.2f} CPU s/GB, {total} busy samples of the reactor thread")
        for layer, count in layers.most_common():
            print(f"   {count / total:6.1%}  {(per_gb[role] if per_gb else float('nan')) * count / total:5.2f} s/GB  {layer}")
        print("   top functions (deepest Python frame, or the native library function it ran):")
        for (layer, function), count in functions.most_common(top):
            print(f"   {count / total:6.1%}  {function[:110]}")
        print("   top native leaves:")
        for function, count in leaves.most_common(6):
            print(f"   {count / total:6.1%}  {function[:110]}")
        print()
    print(f"raw stacks in {out} (collapsed format: flamegraph.pl or speedscope.app read them)")


if __name__ == "__main__":
    main()
