"""
Before against after: the same tunnel measurements on two checkouts, interleaved round after round,
with the reverse-SSH relay measured alongside as the yardstick.  On a machine whose speed drifts
by 20-30 % within minutes, only figures taken this way compare (bench_tunnel.py's table, run at
different times, does not tell a 5 % change from the drift).

    python benchmarks/ab_tunnel.py --before HEAD~1                 # rtt, connect, bulk over ws and wss
    python benchmarks/ab_tunnel.py --before eef81bd --parts handshake --schemes wss --rounds 5
    python benchmarks/ab_tunnel.py --before-tree . --after-service-args="--relay-buffer 524288"

``--before REV`` checks the commit out into a temporary ``git worktree`` (removed at the end);
``--before-tree PATH`` uses an existing checkout instead (``.``: this one, to compare options).
The processes of each side run that side's code (its checkout first on their PYTHONPATH); this
script and its helpers are this checkout's.  Each round measures every path once, in turn, in the
opposite order from the round before, so the machine's drift hits both sides alike.  Printed for
each part: the median and every round's figure, the median of the per-round ratios to the relay,
the CPU the path's processes spent per unit (all of them, and the service alone), and after/before
as the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, TOP)
sys.path.insert(0, HERE)

import bench_tunnel as bench  # noqa: E402 - benchmarks/bench_tunnel.py: the paths and measurements
from machine import busy_before, load_note  # noqa: E402
from tunnelkit.testing.process import Harness, unassigned_port  # noqa: E402

PARTS = ("rtt", "connect", "bulk", "handshake")
#: What each part's figure is, its CPU unit, and the factor to print CPU seconds per unit in.
UNITS = {
    "rtt": ("1-byte round trip p50, ms (lower is better)", "CPU us per round trip", 1e6),
    "connect": ("new connections/s (higher is better)", "CPU us per connection", 1e6),
    "bulk": ("MB/s, one connection (higher is better)", "CPU s per GB", 1.0),
    "handshake": ("handshakes/s, one service process (higher is better)", "service CPU ms per handshake", 1e3),
}


@dataclass
class Side:
    """One measured path: the relay, or a scheme on one checkout."""

    name: str
    path: bench.Path
    harness: Optional[Harness] = None
    service: object = None
    figures: Dict[str, List[float]] = field(default_factory=dict)
    cpu: Dict[str, List[float]] = field(default_factory=dict)  # all its processes, per unit
    service_cpu: Dict[str, List[float]] = field(default_factory=dict)  # the service's, per unit

    def pids(self, role: Optional[str] = None) -> List[int]:
        roles = bench.ROLES if role is None else (role,)
        return [pid for r in roles for pid in self.path.processes.get(r, [])]


def worktree(revision: str) -> Tuple[str, Callable[[], None]]:
    """A temporary git worktree of C{revision} of this checkout, and what removes it."""
    directory = tempfile.mkdtemp(prefix="tunnelkit-ab-")
    os.rmdir(directory)
    result = subprocess.run(["git", "-C", TOP, "worktree", "add", "--detach", directory, revision],
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"ab_tunnel: cannot check out {revision!r}: {result.stderr.strip()}")

    def remove() -> None:
        subprocess.run(["git", "-C", TOP, "worktree", "remove", "--force", directory], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)

    return directory, remove


def measure(side: Side, part: str, args: argparse.Namespace) -> None:
    """One round of C{part} on C{side}: its figure and the CPU its processes spent per unit."""
    pids, service_pids = side.pids(), side.pids("service")
    if part == "handshake":
        rates, _, busy = bench.handshake_rates(side.harness, side.service, service_pids,  # type: ignore[arg-type]
                                               side.name.startswith("wss"), args.handshakes, 1)
        side.figures.setdefault(part, []).append(rates[0])
        side.service_cpu.setdefault(part, []).append(busy[0] / 1000)
        side.cpu.setdefault(part, []).append(busy[0] / 1000)
        return
    if part == "rtt":
        bench.round_trips(side.path.echo, 200)  # warm
    before, service_before = bench.cpu_seconds(pids), bench.cpu_seconds(service_pids)
    if part == "rtt":
        value, units = bench.round_trips(side.path.echo, args.round_trips)[0], args.round_trips
    elif part == "connect":
        value, units = bench.connection_rate(side.path.echo, args.connections)[0], args.connections
    else:
        value, units = bench.bulk(side.path.sink, args.megabytes, 1), args.megabytes / 1024
    side.figures.setdefault(part, []).append(value)
    side.cpu.setdefault(part, []).append((bench.cpu_seconds(pids) - before) / units)
    side.service_cpu.setdefault(part, []).append((bench.cpu_seconds(service_pids) - service_before) / units)


def ratios(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of the per-round ratios a/b (nan when no round has a b: too short to count CPU ticks)."""
    pairs = [x / y for x, y in zip(a, b) if y]
    return statistics.median(pairs) if pairs else float("nan")


def report(sides: List[Side], parts: Sequence[str], schemes: Sequence[str]) -> None:
    relay = next((s for s in sides if s.name == "relay"), None)
    for part in parts:
        what, cpu_unit, scale = UNITS[part]
        print(f"\n{part}: {what}; {cpu_unit}")
        for side in sides:
            values = side.figures.get(part)
            if not values:
                continue
            runs = " ".join(f"{v:.3f}" if part == "rtt" else f"{v:.0f}" for v in values)
            to_relay = ""
            if relay is not None and side is not relay and relay.figures.get(part):
                to_relay = f"  /relay {ratios(values, relay.figures[part]):.2f}"
            cpu = statistics.median(side.cpu[part]) * scale
            service = statistics.median(side.service_cpu[part]) * scale if side.service_cpu.get(part) else float("nan")
            print(f"  {side.name:12s} median {statistics.median(values):9.3f}{to_relay}  CPU {cpu:8.2f}"
                  f"  service {service:8.2f}   (rounds: {runs})")
        for scheme in schemes:
            before = next((s for s in sides if s.name == f"{scheme}-before"), None)
            after = next((s for s in sides if s.name == f"{scheme}-after"), None)
            if before is None or after is None or not before.figures.get(part):
                continue
            print(f"  {scheme}: after/before {ratios(after.figures[part], before.figures[part]):.3f}"
                  f"  CPU after/before {ratios(after.cpu[part], before.cpu[part]):.3f}"
                  f"  service CPU after/before {ratios(after.service_cpu[part], before.service_cpu[part]):.3f}")


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", metavar="REV", help="the commit to compare with (checked out into a git worktree)")
    which.add_argument("--before-tree", metavar="PATH", help="an existing checkout to compare with (. for this one)")
    parser.add_argument("--after-tree", metavar="PATH", default=TOP, help="the checkout measured as after (default: this one)")
    parser.add_argument("--schemes", default="ws,wss", help="comma-separated, of ws,wss")
    parser.add_argument("--parts", default="rtt,connect,bulk", help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--megabytes", type=int, default=256, help="MiB per bulk run")
    parser.add_argument("--round-trips", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=2000, help="new connections per connect run")
    parser.add_argument("--handshakes", type=int, default=1000, help="handshakes per handshake run")
    parser.add_argument("--before-service-args", default="", help="extra options of the before side's service")
    parser.add_argument("--after-service-args", default="", help="extra options of the after side's service")
    parser.add_argument("--no-relay", action="store_true", help="leave the reverse-SSH relay out")
    args = parser.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.parts = [p for p in args.parts.split(",") if p]
    for value, allowed, what in ((args.schemes, ("ws", "wss"), "--schemes"), (args.parts, PARTS, "--parts")):
        unknown = set(value) - set(allowed)
        if unknown or not value:
            parser.error(f"{what}: choose from {', '.join(allowed)} (got {', '.join(sorted(unknown)) or 'nothing'})")
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    for name in ("after_tree", "before_tree"):
        tree = getattr(args, name)
        if tree is not None:
            tree = os.path.abspath(tree)
            if not os.path.isfile(os.path.join(tree, "tunnelkit", "__init__.py")):
                parser.error(f"--{name.replace('_', '-')}: {tree} is not a tunnelkit checkout")
            setattr(args, name, tree)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_arguments(argv)
    cleanups = bench._Cleanups()
    remove_worktree: Optional[Callable[[], None]] = None
    try:
        if args.before is not None:
            args.before_tree, remove_worktree = worktree(args.before)
        trees = {"before": (args.before_tree, shlex.split(args.before_service_args)),
                 "after": (args.after_tree, shlex.split(args.after_service_args))}
        where = f"{args.before} (checked out in {args.before_tree})" if args.before else args.before_tree
        print(f"ab_tunnel: before {where}, after {args.after_tree}; parts "
              f"{','.join(args.parts)}; schemes {','.join(args.schemes)}; {args.rounds} rounds", flush=True)
        print(f"machine before: {load_note()}; {busy_before()}", flush=True)
        here = Harness(cleanups)
        sink, echo = unassigned_port(), unassigned_port()
        servers = here.spawn("servers", [sys.executable, "-c", bench.SERVER_SCRIPT, str(sink), str(echo)])
        servers.wait_for_log("servers ready")
        sides: List[Side] = []
        if not args.no_relay and set(args.parts) - {"handshake"}:
            sides.append(Side("relay", bench.reverse_ssh_relay_path(cleanups, sink, echo)))
        for scheme in args.schemes:
            for label, (tree, extra) in trees.items():
                name = f"{scheme}-{label}"
                h = Harness(cleanups, repository_top=tree)
                service = h.start_service(tls=scheme == "wss", name=f"service-{name}", extra=[*bench.LIMITS_OFF, *extra])
                path = bench._with_proxies(h, name, sink, echo, [], [service.process.pid], service)
                sides.append(Side(name, path, h, service))
        for number in range(args.rounds):
            order = sides if number % 2 == 0 else sides[::-1]
            for part in args.parts:
                for side in order:
                    if part == "handshake" and side.name == "relay":
                        continue
                    measure(side, part, args)
                figures = " ".join(f"{s.name} {s.figures[part][-1]:.3f}" for s in sides if s.figures.get(part))
                print(f"  round {number + 1} {part}: {figures}  ({load_note()})", flush=True)
        report(sides, args.parts, args.schemes)
        print(f"\n{load_note()}")
    finally:
        cleanups.run()
        if remove_worktree is not None:
            remove_worktree()


if __name__ == "__main__":
    main()
