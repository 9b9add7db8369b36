"""
Experiment, end to end over wss://: what two TLS levers give a whole tunnel (source + service +
destination), without changing tunnelkit's code.

Variants, each a full tunnel of its own, measured in interleaved rounds in the same run:
  stock     today's code;
  aes128    TLS 1.3 AES-128-GCM preferred (the service picks its own order, which puts AES-256 first);
  batched   Twisted's TLS record loop batched: a write goes to pyOpenSSL as memoryview slices (no
            16 KiB copies) and leaves as one transport write; what arrives is decrypted record
            after record and handed up as one chunk per socket read (not one upcall per 16 KiB);
  both      aes128 + batched.

The levers are applied by a C{sitecustomize} module put first on the variant's processes' PYTHONPATH
(it patches C{twisted.protocols.tls.TLSMemoryBIOProtocol} and C{OpenSSL.SSL.Context} at start), so
the comparison runs the same checkout.  Printed per variant: 1-connection MB/s (and the ratio to
stock), CPU seconds per GB of each process and their sum, RTT p50/p99.

    python benchmarks/lever_tls_loop.py [--megabytes 256] [--repeat 3] [--variants stock,batched]

To run another benchmark with levers (e.g. the store's C{sqlite-normal}, for bench_tunnel's handshake
part): C{lever_tls_loop.py --sitecustomize DIR}, then run it with C{PYTHONPATH=DIR:...} and
C{TUNNELKIT_LEVERS=sqlite-normal,batched,aes128} (any of them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tunnel import (  # noqa: E402 - the script's own directory
    ROLES, SERVER_SCRIPT, Harness, _Cleanups, bulk, cpu_seconds, median_ratio, round_trips, tunnel_path,
)
from machine import busy_before, load_note  # noqa: E402
from tunnelkit.testing.process import unassigned_port  # noqa: E402

VARIANTS = {"stock": "", "aes128": "aes128", "batched": "batched", "both": "aes128,batched"}

SITECUSTOMIZE = r'''
"""Levers for lever_tls_loop.py, chosen by $TUNNELKIT_LEVERS (comma-separated)."""
import os

_levers = set(filter(None, os.environ.get("TUNNELKIT_LEVERS", "").split(",")))

if "aes128" in _levers:
    from OpenSSL import SSL

    _init = SSL.Context.__init__

    def _context_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256")

    SSL.Context.__init__ = _context_init

if "sqlite-normal" in _levers:  # the store's WAL with synchronous=NORMAL: no fsync per commit
    from tunnelkit.service import store_sqlite

    _store_init = store_sqlite.SQLiteStore.__init__

    def _store_init_normal(self, *args, **kwargs):
        _store_init(self, *args, **kwargs)
        self._db.execute("PRAGMA synchronous=NORMAL")

    store_sqlite.SQLiteStore.__init__ = _store_init_normal

if "batched" in _levers:
    from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
    from twisted.protocols import tls
    from twisted.protocols.policies import ProtocolWrapper
    from twisted.python.failure import Failure

    _RECORD = 16384

    def _flush_send(self, hint):
        chunks = []
        while True:
            try:
                chunks.append(self._tlsConnection.bio_read(hint))
            except WantReadError:
                break
        if len(chunks) == 1:
            self.transport.write(chunks[0])
        elif chunks:
            self.transport.write(b"".join(chunks))

    def _write(self, data):
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        size = len(view)
        sent = 0
        connection = self._tlsConnection
        try:
            while sent < size:
                sent += connection.send(view[sent : sent + _RECORD])
        except WantReadError:
            self._bufferedWrite(bytes(view[sent:]))
        except Error:
            _flush_send(self, size + 4096)
            self._tlsShutdownFinished(Failure())
            return
        _flush_send(self, size + (size // _RECORD + 1) * 64 + 1024)

    def _flushReceiveBIO(self):
        chunks = []
        connection = self._tlsConnection
        ending = None
        while not self._lostTLSConnection:
            try:
                chunks.append(connection.recv(65536))
            except WantReadError:
                break
            except ZeroReturnError:
                ending = (True, None)
                break
            except Error:
                ending = (False, Failure())
                break
        if chunks and not self._aborted:
            ProtocolWrapper.dataReceived(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ending is not None:
            if ending[0]:
                self._shutdownTLS()
            self._tlsShutdownFinished(ending[1])
        self._flushSendBIO()

    tls.TLSMemoryBIOProtocol._write = _write
    tls.TLSMemoryBIOProtocol._flushReceiveBIO = _flushReceiveBIO
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sitecustomize", metavar="DIR", help="only write the lever module into DIR")
    args = parser.parse_args()
    if args.sitecustomize:
        os.makedirs(args.sitecustomize, exist_ok=True)
        with open(os.path.join(args.sitecustomize, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        return
    variants = args.variants.split(",")
    cleanups = _Cleanups()
    h = Harness(cleanups)
    patches = tempfile.mkdtemp(prefix="tunnelkit-levers-")
    with open(os.path.join(patches, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    speeds: Dict[str, List[float]] = {v: [] for v in variants}
    cpu: Dict[str, Dict[str, float]] = {v: {role: 0.0 for role in ROLES} for v in variants}
    rtt: Dict[str, tuple] = {}
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "TUNNELKIT_LEVERS")}
    try:
        sink, echo = unassigned_port(), unassigned_port()
        h.spawn("servers", [sys.executable, "-c", SERVER_SCRIPT, str(sink), str(echo)]).wait_for_log("servers ready")
        print(f"lever_tls_loop: wss://, {args.megabytes} MiB per bulk run, 1 connection, {args.repeat} rounds")
        print(f"machine before: {load_note()}; {busy_before()}", flush=True)
        paths = {}
        for variant in variants:
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (patches, saved["PYTHONPATH"]) if p)
            os.environ["TUNNELKIT_LEVERS"] = VARIANTS[variant]
            vh = Harness(cleanups)
            paths[variant] = tunnel_path(vh, True, sink, echo)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        time.sleep(1.0)
        for number in range(args.repeat):
            for variant in variants:
                path = paths[variant]
                before = {role: cpu_seconds(path.processes[role]) for role in ROLES}
                speeds[variant].append(bulk(path.sink, args.megabytes, 1))
                for role in ROLES:
                    cpu[variant][role] += cpu_seconds(path.processes[role]) - before[role]
            print(f"  round {number + 1}: " + ", ".join(f"{v} {speeds[v][-1]:.0f}" for v in variants)
                  + f" MB/s ({load_note()})", flush=True)
        for variant in variants:
            rtt[variant] = round_trips(paths[variant].echo, args.round_trips)
        after = load_note()
    finally:
        cleanups.run()
    gigabytes = args.repeat * args.megabytes / 1024
    print(f"\n  {'variant':<9} {'MB/s':>6} {'/stock':>6}   CPU s/GB: {'source':>6} {'service':>7} {'dest':>6} {'sum':>6}"
          f"   RTT p50 {'p99 ms':>7}")
    for variant in variants:
        per = {role: cpu[variant][role] / gigabytes for role in ROLES}
        ratio = median_ratio(speeds[variant], speeds["stock"]) if "stock" in speeds else float("nan")
        print(f"  {variant:<9} {statistics.median(speeds[variant]):6.0f} {ratio:6.2f}   {'':>9} {per['source']:6.2f}"
              f" {per['service']:7.2f} {per['destination']:6.2f} {sum(per.values()):6.2f}"
              f"   {rtt[variant][0]:7.3f} {rtt[variant][1]:7.3f}")
    print(f"\nmachine after: {after}")


if __name__ == "__main__":
    main()
