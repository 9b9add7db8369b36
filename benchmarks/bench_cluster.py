#!/usr/bin/env python
"""
Scale-out benchmark: 1, 2 and 3 tunnelkit service nodes on this machine behind a real HAProxy running the
shipped deploy/haproxy.cfg, with one real PostgreSQL (several nodes need a shared store).  Every figure
is printed as a ratio against the baseline measured in the same invocation: one node reached directly
(TLS to the node, no HAProxy).

  - API requests/s: DescribeTunnel from botocore clients (real SigV4), round-robin over the nodes;
  - tunnel handshakes/s: TLS + WebSocket upgrade + token claim (client-token reconnects, the token
    stays valid), answered 101, then dropped;
  - relayed MB/s: several tunnels at once, spread over the nodes by their routing part, 63 KiB DATA
    frames source -> destination;
  - the extra latency of a forwarded peer: 1-byte round trip with the source on node A and the
    destination on node B (both reached directly; the cluster forwards one to the other) against both
    on node A.

Each front end of deploy/haproxy.cfg is measured: C{tls} (TLS terminated in HAProxy, PROXY v2 to the
nodes), C{tls-reencrypt} (the variant the file describes: TLS again from HAProxy to the nodes) and C{passthrough} (TCP mode; the nodes forward peers that reached the wrong node).  Load is made
by worker processes (this script with C{--worker}), so the orchestrating process measures only.  Each
figure is the median of C{--repeat} runs; C{uptime} is printed before and after.

    python benchmarks/bench_cluster.py [--nodes 1,2,3] [--repeat 3] [--seconds 3] [--quick]

On 2 cores everything (nodes, HAProxy, PostgreSQL, the load workers) shares the same two CPUs: more
nodes cannot add capacity here, they show what the extra hop and the coordination cost.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's tunnelkit first

MB = 1024 * 1024
LIMITS_OFF = [
    "--handshakes-per-second", "0", "--max-websockets-per-account", "0", "--max-open-tunnels", "100000",
    "--max-pending-per-address", "0", "--failed-handshakes-per-address", "0", "--failed-handshakes-per-key", "0",
    "--audit-log", "", "--no-console",
]  # fmt: skip
CHUNK = 64512
PER_MESSAGE = 2


# --- workers (separate processes: python bench_cluster.py --worker KIND ...) --------------------------


def worker_api(url: str, ca: str, key_id: str, secret: str, tunnel_id: str, seconds: str, threads: str) -> None:
    """DescribeTunnel in a loop from C{threads} threads for C{seconds}; prints "ok N failed M"."""
    import botocore.session
    from botocore.config import Config

    counts = [0, 0]
    lock = threading.Lock()

    def loop() -> None:
        client = botocore.session.Session().create_client(
            "iotsecuretunneling", region_name="us-east-1", endpoint_url=url, verify=ca,
            aws_access_key_id=key_id, aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 1}, max_pool_connections=2),
        )  # fmt: skip
        client.describe_tunnel(tunnelId=tunnel_id)  # connection set up before the clock matters
        ok = failed = 0
        barrier.wait()  # every thread ready: the clock starts now
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            try:
                client.describe_tunnel(tunnelId=tunnel_id)
                ok += 1
            except Exception:
                failed += 1
        with lock:
            counts[0] += ok
            counts[1] += failed

    barrier = threading.Barrier(int(threads))
    workers = [threading.Thread(target=loop) for _ in range(int(threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"ok {counts[0]} failed {counts[1]}", flush=True)


def _handshake(port: int, context: ssl.SSLContext, mode: str, token: str, client_token: str) -> int:
    """One TLS connection + WebSocket upgrade to 127.0.0.1:C{port}; the answer's status (0: none)."""
    request = (
        f"GET /tunnel?local-proxy-mode={mode} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: aws.iot.securetunneling-3.0\r\naccess-token: {token}\r\n"
        f"client-token: {client_token}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def worker_handshake(port: str, ca: str, seconds: str, *peers: str) -> None:
    """One thread per C{mode:token:client_token}: handshakes in a loop for C{seconds}; prints "ok N failed M"."""
    context = ssl.create_default_context(cafile=ca)
    counts = [0, 0]
    lock = threading.Lock()
    barrier = threading.Barrier(len(peers))

    def loop(peer: str) -> None:
        mode, token, client_token = peer.split(":")
        ok = failed = 0
        barrier.wait()
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            try:
                if _handshake(int(port), context, mode, token, client_token) == 101:
                    ok += 1
                else:
                    failed += 1
            except OSError:
                failed += 1
        with lock:
            counts[0] += ok
            counts[1] += failed

    workers = [threading.Thread(target=loop, args=(p,)) for p in peers]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"ok {counts[0]} failed {counts[1]}", flush=True)


def _bulk_message() -> bytes:
    from tunnelkit.protocol.message_pb2 import Message
    from tunnelkit.testing import tunnel_frame

    frame = tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=1, payload=b"\xa5" * CHUNK)
    return frame * PER_MESSAGE


def worker_send(port: str, ca: str, count: str, *tokens: str) -> None:
    """Source peers on C{port} for each token, each sending C{count} bulk messages as fast as it may."""
    from twisted.internet import defer, task
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import implementer

    from tunnelkit.protocol.message_pb2 import Message
    from tunnelkit.testing import connect_client, tunnel_frame

    message = _bulk_message()
    with open(ca, "rb") as f:
        ca_pem = f.read()

    @implementer(IPushProducer)
    class Pump:
        def __init__(self, client: Any, left: int) -> None:
            self.client, self.left, self.paused = client, left, False
            self.done: defer.Deferred = defer.Deferred()

        def resumeProducing(self) -> None:
            self.paused = False
            while not self.paused and self.left:
                self.left -= 1
                self.client.sendMessage(message, isBinary=True)
            if not self.left and not self.done.called:
                self.client.unregisterProducer()
                self.done.callback(None)

        def pauseProducing(self) -> None:
            self.paused = True

        def stopProducing(self) -> None:
            self.paused = True

    @defer.inlineCallbacks
    def one(token: str) -> Any:
        source = yield connect_client(int(port), "source", token, ca_pem)
        source.send_frames(tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH1", connectionId=1))
        pump = Pump(source, int(count))
        source.registerProducer(pump, True)
        pump.resumeProducing()
        yield pump.done
        # Stay connected: closing now could cut what HAProxy or the node still buffer; the
        # orchestrator ends this process once the receiver has counted everything.
        yield defer.Deferred()

    task.react(lambda _r: defer.gatherResults([one(t) for t in tokens]))


def worker_receive(port: str, ca: str, count: str, *tokens: str) -> None:
    """Destination peers counting bulk bytes; prints "ready", then "moved BYTES in SECONDS"."""
    from twisted.internet import defer, task

    from tunnelkit.testing import connect_client

    expected = int(count) * len(_bulk_message())
    with open(ca, "rb") as f:
        ca_pem = f.read()
    marks: Dict[str, float] = {}

    @defer.inlineCallbacks
    def run(_reactor: Any) -> Any:
        clients = yield defer.gatherResults([connect_client(int(port), "destination", t, ca_pem) for t in tokens])
        done = []
        for client in clients:
            d: defer.Deferred = defer.Deferred()
            state = {"count": 0}

            client.bytes_counted = 0

            def on_message(payload: bytes, is_binary: bool, state: Dict[str, int] = state, d: defer.Deferred = d,
                           client: Any = client) -> None:
                if payload[2:4] != b"\x08\x01":  # not bulk DATA
                    return
                marks.setdefault("first", time.perf_counter())
                state["count"] += len(payload)
                client.bytes_counted = state["count"]
                if state["count"] >= expected and not d.called:
                    marks["last"] = time.perf_counter()
                    d.callback(None)

            client.onMessage = on_message
            done.append(d)
        print("ready", flush=True)
        everything = defer.gatherResults(done, consumeErrors=True)
        progress = {"seen": -1}

        def check() -> None:  # no byte for 15 s: the tunnel does not carry (peers that never met)
            total = sum(c.bytes_counted for c in clients)
            if total == progress["seen"] and not everything.called:
                print(f"stalled {total} of {expected * len(clients)}", flush=True)
                everything.cancel()
            progress["seen"] = total

        watch = task.LoopingCall(check)
        watch.start(15, now=False)
        try:
            yield everything
        except (defer.CancelledError, defer.FirstError):
            return
        finally:
            watch.stop()
        for client in clients:
            client.transport.loseConnection()
        print(f"moved {expected * len(clients) - len(_bulk_message())} in {marks['last'] - marks['first']:.6f}", flush=True)

    task.react(run)


def worker_rtt(source_port: str, destination_port: str, ca: str, count: str, source_token: str,
               destination_token: str) -> None:
    """The source on one port, the destination on another; prints "p50 MS p99 MS" or "error TEXT"."""
    from twisted.internet import defer, reactor, task

    from tunnelkit.protocol.message_pb2 import Message
    from tunnelkit.testing import connect_client, tunnel_frame

    with open(ca, "rb") as f:
        ca_pem = f.read()

    @defer.inlineCallbacks
    def run(_reactor: Any) -> Any:
        try:
            source = yield connect_client(int(source_port), "source", source_token, ca_pem)
            destination = yield connect_client(int(destination_port), "destination", destination_token, ca_pem)
        except Exception as e:
            print(f"error {e}", flush=True)
            return
        source.send_frames(tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH1", connectionId=1))
        reply = tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=1, payload=b"y")
        ping = tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH1", connectionId=1, payload=b"x")
        destination.on_data = lambda message: destination.send_frames(reply)
        times: List[float] = []
        for _ in range(int(count)):
            d: defer.Deferred = defer.Deferred()
            source.on_data = lambda message, d=d: d.callback(None) if not d.called else None
            timeout = reactor.callLater(5, lambda d=d: d.called or d.errback(TimeoutError("no answer in 5 s")))
            started = time.perf_counter()
            source.send_frames(ping)
            try:
                yield d
            except TimeoutError as e:
                print(f"error {e} (after {len(times)} round trips)", flush=True)
                return
            timeout.cancel()
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        print(f"p50 {statistics.median(times):.4f} p99 {times[int(len(times) * 0.99)]:.4f}", flush=True)
        source.transport.loseConnection()
        destination.transport.loseConnection()

    task.react(run)


WORKERS: Dict[str, Callable[..., None]] = {
    "api": worker_api, "handshake": worker_handshake, "send": worker_send, "receive": worker_receive,
    "rtt": worker_rtt,
}  # fmt: skip


# --- the orchestrator --------------------------------------------------------------------------------


def _worker(kind: str, *args: Any) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind, *map(str, args)],
                            stdout=subprocess.PIPE, text=True, env=env)


def _counts(processes: Sequence[subprocess.Popen]) -> Tuple[int, int]:
    ok = failed = 0
    for p in processes:
        out, _ = p.communicate(timeout=120)
        words = out.split()
        if len(words) < 4 or words[0] != "ok":
            raise SystemExit(f"a worker said {out!r}")
        ok += int(words[1])
        failed += int(words[3])
    return ok, failed


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process C{pid} (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


class Setup:
    """One deployment (N nodes + HAProxy) and what the measurements need of it."""

    def __init__(self, procs: Any, nodes: int, store: Optional[str]) -> None:
        from tunnelkit.testing.deployment import Deployment

        self.deployment = Deployment(procs, nodes=nodes, store=store, extra=LIMITS_OFF)
        assert self.deployment.haproxy is not None
        self.deployment.haproxy.wait_servers(timeout=60)
        from tunnelkit.testing.haproxy import HAProxy

        # The variant deploy/haproxy.cfg describes: TLS terminated, then re-encrypted to the nodes.
        self.reencrypt = HAProxy(procs, [node.backend for node in self.deployment.nodes], self.deployment.certificate,
                                 name="haproxy-reencrypt", reencrypt=True)
        self.reencrypt.wait_servers(timeout=60)
        import configparser

        credentials = configparser.ConfigParser()
        credentials.read(self.deployment.credentials_path)
        section = credentials[credentials.sections()[0]]
        self.key_id, self.secret = section["aws_access_key_id"], section["aws_secret_access_key"]
        self.api = self.deployment.api()
        #: front end -> [(the nodes' CPU seconds per GB relayed, HAProxy's)], one per relay run.
        self.cpu: Dict[str, List[Tuple[float, float]]] = {}

    def port(self, front: str) -> int:
        """The port clients use for C{front}: direct (node 1), tls or passthrough (HAProxy)."""
        haproxy = self.deployment.haproxy
        assert haproxy is not None
        return {"direct": self.deployment.nodes[0].tls_port, "tls": haproxy.tls_port,
                "tls-reencrypt": self.reencrypt.tls_port, "passthrough": haproxy.passthrough_port}[front]

    def tunnels(self, count: int) -> List[Any]:
        return [self.deployment.open_tunnel(["SSH1"], api=self.api) for _ in range(count)]

    def api_rate(self, front: str, seconds: float, processes: int, threads: int) -> float:
        tunnel = self.tunnels(1)[0]
        url = f"https://127.0.0.1:{self.port(front)}"
        workers = [_worker("api", url, self.deployment.ca_cert, self.key_id, self.secret, tunnel.tunnel_id,
                           seconds, threads) for _ in range(processes)]  # fmt: skip
        ok, failed = _counts(workers)
        if failed:
            print(f"    ({failed} API requests failed through {front})")
        return ok / seconds

    def handshake_rate(self, front: str, seconds: float, processes: int, tunnels_per_process: int) -> float:
        import uuid

        workers = []
        for _ in range(processes):
            peers = []
            for tunnel in self.tunnels(tunnels_per_process):
                for mode, token in (("source", tunnel.source_token), ("destination", tunnel.destination_token)):
                    peers.append(f"{mode}:{token}:{uuid.uuid4()}")
            workers.append(_worker("handshake", self.port(front), self.deployment.ca_cert, seconds, *peers))
        ok, failed = _counts(workers)
        if failed:
            print(f"    ({failed} handshakes failed through {front})")
        return ok / seconds

    def relayed(self, front: str, tunnels: int, megabytes: int) -> float:
        chosen = self.tunnels(tunnels)
        count = max(1, megabytes * MB // len(_bulk_message()) // tunnels)
        port = self.port(front)
        receiver = _worker("receive", port, self.deployment.ca_cert, count, *[t.destination_token for t in chosen])
        assert receiver.stdout is not None
        line = receiver.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"the receiving worker said {line!r}")
        haproxy = {"tls": self.deployment.haproxy, "passthrough": self.deployment.haproxy,
                   "tls-reencrypt": self.reencrypt}.get(front)
        pids = [node.child.pid for node in self.deployment.nodes]
        nodes_before = sum(cpu_seconds(pid) for pid in pids)
        haproxy_before = cpu_seconds(haproxy.process.pid) if haproxy else 0.0
        sender = _worker("send", port, self.deployment.ca_cert, count, *[t.source_token for t in chosen])
        try:
            out, _ = receiver.communicate(timeout=300)
            nodes_cpu = sum(cpu_seconds(pid) for pid in pids) - nodes_before
            haproxy_cpu = (cpu_seconds(haproxy.process.pid) - haproxy_before) if haproxy else 0.0
        finally:
            sender.terminate()
            sender.wait(10)
            if receiver.poll() is None:
                receiver.kill()
        words = out.split()
        if words[:1] == ["stalled"]:
            print(f"    (relaying through {front} stalled: {out.strip()})")
            return float("nan")
        if len(words) < 4 or words[0] != "moved":
            raise SystemExit(f"the receiving worker said {out!r}")
        gigabytes = int(words[1]) / 1e9
        self.cpu.setdefault(front, []).append((nodes_cpu / gigabytes, haproxy_cpu / gigabytes))
        return int(words[1]) / MB / float(words[3])

    def rtt(self, source_node: int, destination_node: int, count: int) -> Tuple[Optional[float], str]:
        tunnel = self.tunnels(1)[0]
        nodes = self.deployment.nodes
        worker = _worker("rtt", nodes[source_node].tls_port, nodes[destination_node].tls_port,
                         self.deployment.ca_cert, count, tunnel.source_token, tunnel.destination_token)
        out, _ = worker.communicate(timeout=120)
        words = out.split()
        if words[:1] == ["p50"]:
            return float(words[1]), out.strip()
        return None, out.strip()


def median_of(repeat: int, measure: Callable[[], float]) -> Tuple[float, List[float]]:
    values: List[float] = []
    for _ in range(repeat):
        values.append(measure())
        if values[-1] != values[-1]:  # NaN: not available here, no point in repeating
            return values[-1], values
    return statistics.median(values), values


def run(options: argparse.Namespace) -> None:
    from tunnelkit.testing.process import Processes

    print(f"bench_cluster: nodes {options.nodes}, {options.repeat} runs per figure (median), "
          f"{options.seconds:g} s per rate, {options.megabytes} MB per relay run over {options.tunnels} tunnels")
    print(f"uptime before: {uptime()}  ({os.cpu_count()} CPUs)")
    postgres = None
    store: Optional[str] = None
    if max(options.nodes) > 1 or options.postgres_always:
        from tunnelkit.testing.postgres import PostgresServer, skip_reason

        reason = skip_reason()
        if reason:
            raise SystemExit(f"several nodes need PostgreSQL: {reason}")
        postgres = PostgresServer().start()
    rows: List[Tuple[str, str, float, float, List[float]]] = []  # (figure, setup, value, ratio, runs)
    baselines: Dict[str, float] = {}
    try:
        for count in options.nodes:
            procs = Processes("tunnelkit-bench-cluster-")
            try:
                if postgres is not None:
                    store = postgres.create_database()
                setup = Setup(procs, count, store)
                fronts = (["direct"] if count == 1 else []) + ["tls", "tls-reencrypt", "passthrough"]
                for front in fronts:
                    label = f"{count} node{'s' if count > 1 else ''} {front}"
                    figures = [
                        ("API requests/s", lambda: setup.api_rate(front, options.seconds, 2, 4)),
                        ("handshakes/s", lambda: setup.handshake_rate(front, options.seconds, 2, 2)),
                        ("relayed MB/s", lambda: setup.relayed(front, options.tunnels, options.megabytes)),
                    ]
                    for figure, measure in figures:
                        value, runs = median_of(options.repeat, measure)
                        if front == "direct":
                            baselines[figure] = value
                        ratio = value / baselines[figure] if baselines.get(figure) else float("nan")
                        rows.append((figure, label, value, ratio, runs))
                        print(f"  {figure:<16} {label:<22} {value:9.1f}  ({ratio:.2f}x 1 node direct)  runs "
                              + " ".join(f"{v:.1f}" for v in runs), flush=True)
                        if figure == "relayed MB/s" and setup.cpu.get(front):
                            node_cpu = statistics.median(c[0] for c in setup.cpu[front])
                            haproxy_cpu = statistics.median(c[1] for c in setup.cpu[front])
                            print(f"  {'CPU s per GB':<16} {label:<22} nodes {node_cpu:5.1f}, HAProxy {haproxy_cpu:5.1f}")
                            rows.append(("nodes' CPU s/GB relayed", label, node_cpu, float("nan"), []))
                            rows.append(("HAProxy CPU s/GB relayed", label, haproxy_cpu, float("nan"), []))
                if count > 1:
                    same = statistics.median([v for v in (setup.rtt(0, 0, options.round_trips)[0] for _ in range(options.repeat)) if v is not None] or [float("nan")])
                    results = [setup.rtt(0, 1, options.round_trips) for _ in range(options.repeat)]
                    forwarded = [v for v, _ in results if v is not None]
                    if forwarded:
                        value = statistics.median(forwarded)
                        print(f"  1-byte RTT p50: both peers on node A {same:.3f} ms, source on A and destination on "
                              f"B {value:.3f} ms: a forwarded peer adds {value - same:.3f} ms")
                        rows.append(("forwarded peer extra RTT ms", label, value - same, value / same, forwarded))
                    else:
                        print(f"  forwarded peer: NOT AVAILABLE (a peer on another node than its tunnel's other peer): {results[0][1]}")
                        rows.append(("forwarded peer extra RTT ms", label, float("nan"), float("nan"), []))
            finally:
                procs.cleanup()
    finally:
        if postgres is not None:
            postgres.stop()
    print(f"\nsummary (medians; ratios against 1 node reached directly, same invocation)")
    for figure, label, value, ratio, _ in rows:
        print(f"  {figure:<28} {label:<22} {value:9.2f}   {ratio:5.2f}x")
    print(f"uptime after: {uptime()}")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        WORKERS[sys.argv[2]](*sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,3", help="node counts to measure, e.g. 1,3")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is reported)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per rate measurement")
    parser.add_argument("--megabytes", type=int, default=256, help="MB relayed per run, over all tunnels")
    parser.add_argument("--tunnels", type=int, default=3, help="tunnels relaying at once")
    parser.add_argument("--round-trips", type=int, default=500, help="1-byte round trips per latency run")
    parser.add_argument("--postgres-always", action="store_true", help="PostgreSQL for 1 node too")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s rates, 64 MB, 1 run")
    options = parser.parse_args()
    options.nodes = [int(n) for n in options.nodes.split(",")]
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # kill PID: the processes started are stopped too
    if options.quick:
        options.seconds, options.megabytes, options.repeat, options.round_trips = 1.0, 64, 1, 100
    run(options)


if __name__ == "__main__":
    main()
