#!/usr/bin/env python
"""
What the cluster's coordination costs and how fast it reacts: real service nodes (real processes,
C{--cluster-listen}) on one real PostgreSQL on this machine, peers reached directly (no balancer).

  - the extra latency of a forwarded peer: 1-byte round trips through a tunnel (source -> destination
    -> source, DATA frames) with both peers on node a, then with the destination reaching node b
    (forwarded to a); medians, and the difference;
  - close propagation: CloseTunnel answered by node c (which holds nothing of the tunnel) until
    both peers on node a have their close frame;
  - node loss: kill -9 of the node holding a tunnel until (1) a survivor's DescribeTunnel shows both
    sides DISCONNECTED and (2) both peers are back (client tokens, retrying every 0.1 s, on two
    surviving nodes), with C{--cluster-node-timeout 2 --cluster-heartbeat 0.5}.

    python benchmarks/bench_cluster_nodes.py [--round-trips 2000] [--repeat 5] [--cluster-listen ssl|tcp]

C{uptime} is printed before and after (2 shared cores: the nodes, PostgreSQL and this process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from tunnelkit.protocol.message_pb2 import Message  # noqa: E402
from tunnelkit.testing import connect_client, tunnel_frame  # noqa: E402
from tunnelkit.testing.cluster import ClusterNodes, connect_retrying  # noqa: E402
from tunnelkit.testing.postgres import PostgresServer  # noqa: E402
from tunnelkit.testing.process import Processes  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@defer.inlineCallbacks
def round_trips(source: Any, destination: Any, count: int) -> Any:
    """Median and 90th percentile (ms) of C{count} 1-byte round trips source -> destination -> source."""
    source.send_frames(tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1))
    ping = tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x")
    samples: List[float] = []
    done: defer.Deferred = defer.Deferred()
    state = {"sent": 0.0}

    def echo(message: Any) -> None:
        destination.send_frames(ping)

    def back(message: Any) -> None:
        samples.append(time.perf_counter() - state["sent"])
        if len(samples) >= count:
            done.callback(None)
            return
        state["sent"] = time.perf_counter()
        source.send_frames(ping)

    destination.on_data = echo
    source.on_data = back
    state["sent"] = time.perf_counter()
    source.send_frames(ping)
    yield done
    samples = samples[count // 10 :]  # warm-up
    samples.sort()
    return statistics.median(samples) * 1000, samples[int(len(samples) * 0.9)] * 1000


@defer.inlineCallbacks
def measure(reactor: Any, options: argparse.Namespace) -> Any:
    server = PostgresServer().start()
    procs = Processes("tunnelkit-bench-cluster-")
    try:
        dsn = server.create_database()
        cluster = ClusterNodes(procs, dsn, ["a", "b", "c"], heartbeat=0.5, node_timeout=2.0,
                               cluster_tls=options.cluster_listen == "ssl")
        print(f"cluster listeners: {options.cluster_listen}:")
        a, b, c = (cluster.nodes[n] for n in "abc")
        print("before:", uptime())
        same, forwarded = [], []
        for _ in range(options.repeat):
            for where, results in ((a, same), (b, forwarded)):
                tunnel = cluster.open_tunnel("a")
                source = yield connect_client(a.port, "source", tunnel["sourceAccessToken"])
                destination = yield connect_client(where.port, "destination", tunnel["destinationAccessToken"])
                results.append((yield round_trips(source, destination, options.round_trips)))
                cluster.api("a").close_tunnel(tunnelId=tunnel["tunnelId"])
                yield defer.gatherResults([source.closed, destination.closed])
        median_same = statistics.median(m for m, _ in same)
        median_forwarded = statistics.median(m for m, _ in forwarded)
        print(f"1-byte round trip, both peers on node a: median {median_same:.3f} ms "
              f"(p90 {statistics.median(p for _, p in same):.3f}); destination via node b: median "
              f"{median_forwarded:.3f} ms (p90 {statistics.median(p for _, p in forwarded):.3f}); "
              f"a forwarded peer adds {median_forwarded - median_same:.3f} ms ({median_forwarded / median_same:.2f}x)")

        closes = []
        for _ in range(options.repeat):
            tunnel = cluster.open_tunnel("a")
            source = yield connect_client(a.port, "source", tunnel["sourceAccessToken"])
            destination = yield connect_client(b.port, "destination", tunnel["destinationAccessToken"])
            api = cluster.api("c")
            api.describe_tunnel(tunnelId=tunnel["tunnelId"])  # the client's connection is open
            started = time.monotonic()
            api.close_tunnel(tunnelId=tunnel["tunnelId"])
            answered = time.monotonic()
            yield defer.gatherResults([source.closed, destination.closed])
            last = max(source.close_frame_at, destination.close_frame_at)
            closes.append(((last - started) * 1000, (last - answered) * 1000))
        print(f"CloseTunnel on node c until both peers (on a, one through b) have the close frame: from the "
              f"request median {statistics.median(c for c, _ in closes):.1f} ms (max {max(c for c, _ in closes):.1f}), "
              f"from node c's answer median {statistics.median(a for _, a in closes):.1f} ms "
              f"(max {max(a for _, a in closes):.1f}) over {len(closes)}")

        noticed, back = [], []
        holder, survivors = a, (b, c)
        for _ in range(options.losses):
            tunnel = cluster.open_tunnel(survivors[0].name)
            tokens = [str(uuid.uuid4()), str(uuid.uuid4())]
            source = yield connect_client(holder.port, "source", tunnel["sourceAccessToken"], client_token=tokens[0])
            destination = yield connect_client(survivors[0].port, "destination", tunnel["destinationAccessToken"],
                                               client_token=tokens[1])
            killed = time.monotonic()
            holder.child.kill()
            while cluster.states(survivors[1].name, tunnel["tunnelId"]) != ("DISCONNECTED", "DISCONNECTED"):
                yield task.deferLater(reactor, 0.02, lambda: None)
            noticed.append(time.monotonic() - killed)
            source = yield connect_retrying(survivors[0].port, "source", tunnel["sourceAccessToken"], tokens[0], 20)
            destination = yield connect_retrying(survivors[1].port, "destination", tunnel["destinationAccessToken"],
                                                 tokens[1], 20)
            back.append(time.monotonic() - killed)
            cluster.api(survivors[0].name).close_tunnel(tunnelId=tunnel["tunnelId"])
            yield defer.gatherResults([source.closed, destination.closed])
            holder.restart()
        print(f"kill -9 of the holding node (node timeout 2 s, heartbeat 0.5 s): both sides DISCONNECTED after "
              f"median {statistics.median(noticed):.2f} s (max {max(noticed):.2f}); both peers back on survivors "
              f"after median {statistics.median(back):.2f} s (max {max(back):.2f}) over {len(back)}")
        print("after:", uptime())
    finally:
        procs.cleanup()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--losses", type=int, default=3)
    parser.add_argument("--cluster-listen", choices=("ssl", "tcp"), default="ssl",
                        help="the nodes' cluster listeners: TLS (recommended) or plain TCP")
    options = parser.parse_args()
    task.react(lambda reactor: measure(reactor, options))


if __name__ == "__main__":
    main()
