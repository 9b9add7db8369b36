"""
Passive FTP through the tunnel's ftp adapter (issue 10): 2 and 8 ftplib clients at once, each doing
LIST, STOR of 10 MB and RETR of 10 MB, --runs times in a row; no run may stall.

    python benchmarks/bench_ftp.py [--runs 50] [--clients 2 8] [--stall-timeout 30]

A client whose socket sees nothing for --stall-timeout seconds counts its run as stalled.  The same
runs straight to the FTP server (no tunnel, --direct-runs of them) give the baseline: the summary
prints each setting's median seconds per run and its ratio to the direct one, and the counts of
runs that were byte-exact, stalled or failed otherwise.  Needs pyftpdlib (the test extra).
"""

from __future__ import annotations

import argparse
import ftplib
import io
import os
import statistics
import sys
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from machine import busy_before, load_note  # noqa: E402 - benchmarks/machine.py
from tunnelprocs import Processes, source_port  # noqa: E402 - benchmarks/tunnelprocs.py

MB = 1 << 20
USER, PASSWORD = "bench", "bench-secret"
FTP_SERVER = r"""
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
authorizer = DummyAuthorizer()
authorizer.add_user(sys.argv[2], sys.argv[3], sys.argv[1], perm="elradfmwMT")
FTPHandler.authorizer = authorizer
FTPServer.max_cons = 512
server = FTPServer(("127.0.0.1", 0), FTPHandler)
print(server.address[1], flush=True)
server.serve_forever()
"""


def one_client(port: int, home: str, name: str, payload: bytes, timeout: float) -> Optional[str]:
    """LIST, STOR and RETR through C{port}; None if all is byte-exact, else what went wrong."""
    try:
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", port, timeout=timeout)
        try:
            ftp.login(USER, PASSWORD)
            ftp.set_pasv(True)
            listing: List[str] = []
            ftp.retrlines("LIST", listing.append)
            ftp.storbinary(f"STOR {name}", io.BytesIO(payload), blocksize=1 << 16)
            received = io.BytesIO()
            ftp.retrbinary(f"RETR {name}", received.write, blocksize=1 << 16)
        finally:
            try:
                ftp.quit()
            except (OSError, EOFError, ftplib.Error):
                ftp.close()
    except TimeoutError:
        return "stalled"
    except (OSError, EOFError, ftplib.Error) as e:
        return f"error: {type(e).__name__}: {e}"
    if not any("existing.bin" in line for line in listing):
        return "error: LIST without existing.bin"
    with open(os.path.join(home, name), "rb") as f:
        stored = f.read()
    os.remove(os.path.join(home, name))
    if stored != payload or received.getvalue() != payload:
        return "error: bytes differ"
    return None


def one_run(port: int, home: str, clients: int, payloads: List[bytes], run: int, timeout: float) -> Dict[str, object]:
    """C{clients} clients at once: the run's seconds and each client's problem (None: exact)."""
    problems: List[Optional[str]] = [None] * clients
    start = time.perf_counter()

    def client(i: int) -> None:
        problems[i] = one_client(port, home, f"run{run}-client{i}.bin", payloads[i], timeout)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.perf_counter() - start, "problems": problems}


def series(label: str, port: int, home: str, clients: int, runs: int, timeout: float) -> Dict[str, object]:
    payloads = [os.urandom(10 * MB) for _ in range(clients)]
    counts = {"exact": 0, "stalled": 0, "failed": 0}
    seconds: List[float] = []
    first_problem = ""
    for run in range(runs):
        result = one_run(port, home, clients, payloads, run, timeout)
        problems = [p for p in result["problems"] if p]  # type: ignore[attr-defined]
        if not problems:
            counts["exact"] += 1
            seconds.append(result["seconds"])  # type: ignore[arg-type]
        elif any(p == "stalled" for p in problems):
            counts["stalled"] += 1
        else:
            counts["failed"] += 1
        if problems and not first_problem:
            first_problem = f"run {run}: {problems[0]}"
    median = statistics.median(seconds) if seconds else float("nan")
    print(f"  {label:<8} {clients} clients x {runs} runs: exact {counts['exact']}, stalled {counts['stalled']}, "
          f"failed {counts['failed']}; median {median:.2f} s per run {first_problem}", flush=True)
    return {"counts": counts, "median": median}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--direct-runs", type=int, default=5)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--stall-timeout", type=float, default=30.0)
    args = parser.parse_args()

    procs = Processes()
    try:
        home = os.path.join(procs.root, "ftp-home")
        os.makedirs(home)
        with open(os.path.join(home, "existing.bin"), "wb") as f:
            f.write(b"already here\n")
        server = procs.spawn("ftpd", [sys.executable, "-c", FTP_SERVER, home, USER, PASSWORD])
        ftp_port = int(server.wait_for_log(r"^(\d+)$").group(1))
        procs.start_service_process()
        tokens = procs.tokens(["FTP1"])
        procs.start_proxy("destination", tokens["destination"], f"FTP1={ftp_port}")
        source = procs.start_proxy("source", tokens["source"], "FTP1=0")
        tunnel_port = source_port(source, "FTP1")
        print(f"bench_ftp: LIST + STOR 10 MB + RETR 10 MB per client; {load_note()}; {busy_before()}", flush=True)
        results = {}
        for clients in args.clients:
            results[clients] = (series("direct", ftp_port, home, clients, args.direct_runs, args.stall_timeout),
                                series("tunnel", tunnel_port, home, clients, args.runs, args.stall_timeout))
    finally:
        procs.cleanup()

    print(f"\nsummary [{load_note()}]")
    ok = True
    for clients, (direct, tunnel) in results.items():
        counts = tunnel["counts"]
        fine = counts["stalled"] == 0 and counts["failed"] == 0  # type: ignore[index]
        ok = ok and fine
        print(f"  {clients} clients: {counts['exact']} of {args.runs} runs exact, {counts['stalled']} stalled, "  # type: ignore[index]
              f"{counts['failed']} failed; tunnel / direct seconds per run "  # type: ignore[index]
              f"{tunnel['median'] / direct['median']:.2f}   target: none stalls   {'ok' if fine else 'MISSED'}")  # type: ignore[operator]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
