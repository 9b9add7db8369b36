"""
Token-claim latency and throughput of the stores, as the service runs them (a ThreadedRunner, results on
the reactor): SQLite (WAL, synchronous=FULL, one thread) against PostgreSQL (four threads).

    python benchmarks/bench_store.py [--claims 2000] [--concurrency 1,16] [--dsn postgresql://...]

Without --dsn, PostgreSQL is a throw-away cluster of tunnelkit.testing.postgres (unix socket, fsync
off: it measures the round trips and the server's work, not a disk's fsync); SQLite's file is in a
temporary directory on this machine's disk (fsync on each claim, as in production).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor, task  # noqa: E402

from tunnelkit.service import tokens  # noqa: E402
from tunnelkit.service.dbrunner import Blocking  # noqa: E402
from tunnelkit.service.store import NewTunnel  # noqa: E402

ACCOUNT = "111111111111"


def prepare(store: Any, count: int) -> List[str]:
    """C{count} tunnels; their source tokens."""
    blocking = Blocking(store)
    blocking.create_account("default", ACCOUNT, 0)
    sources = []
    for i in range(count):
        source = tokens.new_access_token(f"t{i}")
        blocking.create_tunnel(
            NewTunnel(f"t{i}", ACCOUNT, None, None, ("SSH",), 720, (), tokens.token_hash(source),
                      tokens.token_hash(tokens.new_access_token(f"t{i}")), time.time()),
            None,
        )
        sources.append(source)
    return sources


@defer.inlineCallbacks
def measure(name: str, store: Any, sources: List[str], concurrency: int) -> Any:
    latencies: List[float] = []
    pending = iter(sources)

    @defer.inlineCallbacks
    def worker() -> Any:
        for source in pending:
            started = time.perf_counter()
            yield store.claim_peer(source, "source", None, time.time())
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    yield defer.gatherResults([worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    print(
        f"{name:10} concurrency {concurrency:3}: {n / elapsed:8.0f} claims/s, latency p50 "
        f"{latencies[n // 2] * 1000:6.2f} ms, p99 {latencies[int(n * 0.99)] * 1000:6.2f} ms"
    )


@defer.inlineCallbacks
def main(_reactor: Any) -> Any:
    parser = argparse.ArgumentParser()
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--dsn")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from tunnelkit.service.store_postgres import PostgresStore, open_postgres
    from tunnelkit.service.store_sqlite import SQLiteStore, open_sqlite

    directory = tempfile.mkdtemp(prefix="tunnelkit-bench-store-")
    server = None
    try:
        dsn = args.dsn
        if dsn is None:
            from tunnelkit.testing.postgres import PostgresServer

            server = PostgresServer().start()
            dsn = server.create_database("bench")
        for level in levels:
            path = os.path.join(directory, f"s{level}.sqlite3")
            sources = prepare(SQLiteStore(path), args.claims)
            store = open_sqlite(path, reactor)
            yield measure("sqlite", store, sources, level)
            store.close()
            setup = PostgresStore(dsn)
            Blocking(setup).purge_closed(float("inf"))
            setup._db.execute("TRUNCATE accounts, access_keys, tunnels, tags, tokens")
            sources = prepare(setup, args.claims)
            setup.close()
            store = open_postgres(dsn, reactor)
            yield measure("postgresql", store, sources, level)
            store.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    task.react(main)
