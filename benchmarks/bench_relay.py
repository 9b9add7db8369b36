#!/usr/bin/env python
"""
Benchmark of the tunnel service's relay, compared with direct TCP measured in the same run.

The relay runs as a real service process (C{twistd -n tunnelkit --mode service}, SQLite store,
generated CA) listening on loopback with TLS (wss://) and without (ws://); tunnels are opened with
boto3 through its API.  The source and destination clients run in this process (autobahn), so on a
2-core machine the relay has one core and the clients the other.  Reported:

  - throughput (MB/s) source -> destination with 63 KiB DATA payloads (two frames per WebSocket
    message, as tunnelkit's local proxy sends) and 4 KiB payloads (one frame per message, as AWS's
    localproxy sends small reads);
  - 1-byte round trip (source -> destination -> source) p50 / p99;
  - the relay's CPU seconds per GB relayed (utime + stime of the service process, from /proc);
  - the relay's RSS while a fast source sends 1 GB to a destination that reads in short bursts;
  - the relay's RSS growth with N idle tunnels (2N WebSockets), per WebSocket;
  - the same throughput and round trip over one direct TCP connection to a sink/echo process.

Usage: python benchmarks/bench_relay.py [--quick] [--idle-tunnels N] [--size-mb N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, List, Optional, Tuple

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.testing import ServiceProcess, TunnelTestClient, connect_client, tunnel_frame
from tunnelkit.testing.process import unassigned_port
from machine import busy_before, load_note  # benchmarks/machine.py (the script's own directory)

MB = 1024 * 1024
LIMITS_OFF = ["--handshakes-per-second", "0", "--max-websockets-per-account", "0", "--max-open-tunnels", "100000"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SINK = r"""
import sys
from twisted.internet import protocol, reactor
class Sink(protocol.Protocol):
    def dataReceived(self, data):
        if len(data) <= 16 and data.startswith(b"p"):
            self.transport.write(data)      # a round-trip probe: echo it
            return
        self.factory.count += len(data)
        if self.factory.count >= self.factory.expect:
            self.transport.write(b"done")
            self.factory.count = 0
class F(protocol.Factory):
    protocol = Sink
    count = 0
    expect = int(sys.argv[2])
reactor.listenTCP(int(sys.argv[1]), F(), interface="127.0.0.1")
reactor.run()
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def percentile(values: List[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100.0 * (len(ordered) - 1))))]


@defer.inlineCallbacks
def tunnel_pair(service: ServiceProcess, tls: bool) -> Any:
    tunnel = service.open_tunnel()
    port = service.tls_port if tls else service.tcp_port
    ca = service.ca if tls else None
    source = yield connect_client(port, "source", tunnel["sourceAccessToken"], ca)
    destination = yield connect_client(port, "destination", tunnel["destinationAccessToken"], ca)
    source.send_frames(
        tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
    )
    return source, destination


@implementer(IPushProducer)
class _MessagePump:
    """Sends one prebuilt WebSocket message C{count} times, as fast as the transport takes it."""

    def __init__(self, client: TunnelTestClient, message: bytes, count: int) -> None:
        self.client = client
        self.message = message
        self.left = count
        self.paused = False
        self.done: defer.Deferred = defer.Deferred()

    def resumeProducing(self) -> None:
        self.paused = False
        send = self.client.sendMessage
        while not self.paused and self.left:
            self.left -= 1
            send(self.message, isBinary=True)
        if not self.left and not self.done.called:
            self.client.unregisterProducer()
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


class _Counter:
    """Replaces a client's message handler: counts payload bytes (no per-frame work)."""

    def __init__(self, client: TunnelTestClient, expected: int) -> None:
        self.count = 0
        self.expected = expected
        self.first_at: Optional[float] = None
        self.last_at: Optional[float] = None
        self.done: defer.Deferred = defer.Deferred()
        client.onMessage = self.on_message  # type: ignore[method-assign]

    def on_message(self, payload: bytes, is_binary: bool) -> None:
        if payload[2:4] != b"\x08\x01":  # SERVICE_IDS, STREAM_START: not bulk DATA
            return
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.count += len(payload)
        if self.count >= self.expected and not self.done.called:
            self.last_at = time.perf_counter()
            self.done.callback(None)


@defer.inlineCallbacks
def relay_throughput(service: ServiceProcess, tls: bool, size: int, chunk: int, per_message: int) -> Any:
    """
    Bulk transfer source -> destination, the source in its own process (see L{sender}) so that the
    relay, not one client process doing both ends' TLS, is what limits it.  The clients do as little
    as they can (a prebuilt message, a byte counter); byte-exactness is the e2e tests' job.
    """
    tunnel = service.open_tunnel()
    port = service.tls_port if tls else service.tcp_port
    destination = yield connect_client(
        port, "destination", tunnel["destinationAccessToken"], service.ca if tls else None
    )
    message_size = len(_bulk_message(chunk, per_message))
    count = max(1, size // message_size)
    counter = _Counter(destination, count * message_size)
    cpu = cpu_seconds(service.pid)
    args = [
        sys.executable, os.path.abspath(__file__), "--sender", str(port), tunnel["sourceAccessToken"],
        service.ca_path if tls else "-", str(count), str(chunk), str(per_message),
    ]  # fmt: skip
    process = subprocess.Popen(args)
    try:
        yield counter.done
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait()
    elapsed = counter.last_at - counter.first_at  # type: ignore[operator]
    cpu = cpu_seconds(service.pid) - cpu
    moved = count * message_size
    destination.transport.loseConnection()
    return (moved - message_size) / MB / elapsed, cpu / (moved / 1e9)


def _bulk_message(chunk: int, per_message: int) -> bytes:
    frame = tunnel_frame(
        type=Message.DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"\xa5" * chunk
    )
    return frame * per_message


def sender(argv: List[str]) -> None:
    """The source side of L{relay_throughput}, in its own process."""
    port, token, ca_path, count, chunk, per_message = argv
    ca = None if ca_path == "-" else open(ca_path, "rb").read()
    message = _bulk_message(int(chunk), int(per_message))

    @defer.inlineCallbacks
    def send(_reactor: Any) -> Any:
        source = yield connect_client(int(port), "source", token, ca)
        source.send_frames(
            tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
        )
        pump = _MessagePump(source, message, int(count))
        source.registerProducer(pump, True)
        pump.resumeProducing()
        yield pump.done
        source.transport.loseConnection()
        yield source.closed

    task.react(send)


@defer.inlineCallbacks
def slow_reader(service: ServiceProcess, size: int) -> Any:
    """
    A fast source sends C{size} bytes to a destination that reads in short bursts; the relay's RSS
    is sampled throughout.  Returns (MB/s achieved, RSS before in KiB, highest RSS in KiB).
    """
    source, destination = yield tunnel_pair(service, True)
    yield task.deferLater(reactor, 0.1)
    message = tunnel_frame(
        type=Message.DATA, streamId=1, serviceId="SSH", connectionId=1, payload=os.urandom(64512)
    ) * 2
    count = max(1, size // len(message))
    counter = _Counter(destination, count * len(message))
    pump = _MessagePump(source, message, count)
    before = rss_kib(service.pid)
    samples = [before]
    sampler = task.LoopingCall(lambda: samples.append(rss_kib(service.pid)))
    sampler.start(0.05)
    reader = destination.transport

    def read_a_little() -> None:
        reader.resumeProducing()
        reactor.callLater(0.002, reader.pauseProducing)

    reader.pauseProducing()
    slow = task.LoopingCall(read_a_little)
    slow.start(0.01)
    started = time.perf_counter()
    source.registerProducer(pump, True)
    pump.resumeProducing()
    try:
        yield pump.done
        yield counter.done
    finally:
        slow.stop()
        sampler.stop()
        reader.resumeProducing()
    elapsed = time.perf_counter() - started
    source.transport.loseConnection()
    destination.transport.loseConnection()
    return count * len(message) / MB / elapsed, before, max(samples)


@defer.inlineCallbacks
def relay_round_trip(service: ServiceProcess, tls: bool, count: int) -> Any:
    source, destination = yield tunnel_pair(service, tls)
    yield task.deferLater(reactor, 0.1)
    reply = tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"y")
    ping = tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x")
    destination.on_data = lambda message: destination.send_frames(reply)
    times: List[float] = []
    for _ in range(count):
        d: defer.Deferred = defer.Deferred()
        source.on_data = lambda message, d=d: d.callback(None)
        started = time.perf_counter()
        source.send_frames(ping)
        yield d
        times.append((time.perf_counter() - started) * 1000)
    source.transport.loseConnection()
    destination.transport.loseConnection()
    return statistics.median(times), percentile(times, 99)


@implementer(IPushProducer)
class _Writer(protocol.Protocol):
    def __init__(self, size: int, chunk: bytes) -> None:
        self.left = size
        self.chunk = chunk
        self.paused = False
        self.done: defer.Deferred = defer.Deferred()
        self.replies: List[defer.Deferred] = []

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def pump(self) -> None:
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            piece = self.chunk if self.left >= len(self.chunk) else self.chunk[: self.left]
            self.left -= len(piece)
            self.transport.write(piece)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def dataReceived(self, data: bytes) -> None:
        if data.endswith(b"done"):
            self.done.callback(None)
        elif self.replies:
            self.replies.pop(0).callback(None)


@defer.inlineCallbacks
def direct_tcp(size: int, count: int) -> Any:
    port = unassigned_port()  # told to the server script
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port), str(size)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        writer = _Writer(size, os.urandom(64 * 1024))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), writer)
        writer.transport.setTcpNoDelay(True)
        started = time.perf_counter()
        writer.pump()
        yield writer.done
        throughput = size / MB / (time.perf_counter() - started)
        times = []
        for _ in range(count):
            d: defer.Deferred = defer.Deferred()
            writer.replies.append(d)
            t0 = time.perf_counter()
            writer.transport.write(b"p")
            yield d
            times.append((time.perf_counter() - t0) * 1000)
        writer.transport.loseConnection()
        return throughput, statistics.median(times), percentile(times, 99)
    finally:
        sink.terminate()
        sink.wait()


@defer.inlineCallbacks
def idle_rss(service: ServiceProcess, tunnels: int, tls: bool) -> Any:
    tokens = [service.open_tunnel() for _ in range(tunnels)]
    yield task.deferLater(reactor, 0.5)
    before = rss_kib(service.pid)
    port = service.tls_port if tls else service.tcp_port
    ca = service.ca if tls else None
    clients: List[TunnelTestClient] = []
    batch: List[defer.Deferred] = []
    for tunnel in tokens:
        batch.append(connect_client(port, "source", tunnel["sourceAccessToken"], ca))
        batch.append(connect_client(port, "destination", tunnel["destinationAccessToken"], ca))
        if len(batch) >= 100:
            clients += (yield defer.gatherResults(batch))
            batch = []
    if batch:
        clients += (yield defer.gatherResults(batch))
    yield task.deferLater(reactor, 1.0)
    after = rss_kib(service.pid)
    for client in clients:
        client.transport.loseConnection()
    yield task.deferLater(reactor, 1.0)
    return before, after, len(clients)


@defer.inlineCallbacks
def run(options: argparse.Namespace) -> Any:
    size = options.size_mb * MB
    rtts = 300 if options.quick else 2000
    print(f"bench_relay: {options.size_mb} MB per throughput run, {rtts} round trips, "
          f"{options.idle_tunnels} idle tunnels; autobahn NVX on: ", end="")
    import autobahn.websocket

    print(autobahn.websocket.USES_NVX)
    print(f"machine: {load_note()}; {busy_before()}")
    summary: List[Tuple[str, float, str, Optional[bool]]] = []
    if options.idle_only:
        base_mbs, base_p50, base_p99 = 1.0, 1.0, 1.0
    else:
        base_mbs, base_p50, base_p99 = yield direct_tcp(size, rtts)
    print(f"direct TCP (1 hop, no TLS)        {base_mbs:8.0f} MB/s   rtt p50 {base_p50:.3f} ms  p99 {base_p99:.3f} ms")
    service = ServiceProcess(LIMITS_OFF)
    try:
        for tls in (True, False) if not options.idle_only else ():
            scheme = "wss" if tls else "ws "
            for label, chunk, per_message in (("63 KiB", 64512, 2), ("4 KiB ", 4096, 1)):
                run_size = size if chunk > 4096 else size // 4
                mbs, cpu_per_gb = yield relay_throughput(service, tls, run_size, chunk, per_message)
                print(
                    f"relay {scheme} {label} payloads       {mbs:8.0f} MB/s   "
                    f"({mbs / base_mbs:.2f}x direct TCP)   relay CPU {cpu_per_gb:5.1f} s/GB"
                )
                summary.append((f"relay {scheme.strip()} {label.strip()} payloads (MB/s)", mbs, "", None))
                summary.append((f"relay {scheme.strip()} {label.strip()} relay CPU (s/GB)", cpu_per_gb, "", None))
            p50, p99 = yield relay_round_trip(service, tls, rtts)
            print(
                f"relay {scheme} 1-byte round trip       p50 {p50:.3f} ms  p99 {p99:.3f} ms   "
                f"({p50 / base_p50:.1f}x direct TCP p50)"
            )
            summary.append((f"relay {scheme.strip()} RTT p50 - direct TCP p50 (ms)", p50 - base_p50, "", None))
        if options.slow_reader_mb:
            mbs, before, peak = yield slow_reader(service, options.slow_reader_mb * MB)
            print(
                f"relay wss slow reader: {options.slow_reader_mb} MB at {mbs:.0f} MB/s; relay RSS "
                f"{before / 1024:.1f} MiB, at most {peak / 1024:.1f} MiB (+{(peak - before) / 1024:.1f} MiB)"
            )
            growth = (peak - before) / 1024
            summary.append(("relay RSS growth, fast source to slow reader (MiB)", growth, "<= 2", growth <= 2))
    finally:
        service.stop()
    for tls in (False, True):
        # A fresh service each time: memory freed by earlier runs would hide the cost.
        service = ServiceProcess(LIMITS_OFF)
        try:
            before, after, sockets = yield idle_rss(service, options.idle_tunnels, tls)
        finally:
            service.stop()
        per = (after - before) / sockets
        print(
            f"relay {'wss' if tls else 'ws '} idle: RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB "
            f"with {sockets} WebSockets = {per:.1f} KiB per WebSocket (target <= 16)"
        )
        summary.append((f"relay {'wss' if tls else 'ws'} idle RSS per WebSocket (KiB)", per, "<= 16", per <= 16))
    print(f"\nsummary (direct TCP here: {base_mbs:.0f} MB/s, RTT p50 {base_p50:.3f} ms; after: {load_note()})")
    print(f"  {'metric':<52} {'value':>8}   {'target':<7} result")
    for text, value, target, ok in summary:
        verdict = "-" if ok is None else ("ok" if ok else "MISSED")
        print(f"  {text:<52} {value:8.2f}   {target:<7} {verdict}")


def main() -> None:
    if sys.argv[1:2] == ["--sender"]:
        sender(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    parser.add_argument("--size-mb", type=int, default=None, help="MB per throughput run")
    parser.add_argument("--idle-tunnels", type=int, default=None, help="idle tunnels for the RSS figure")
    parser.add_argument("--idle-only", action="store_true", help="only the idle-memory figure")
    parser.add_argument(
        "--slow-reader-mb", type=int, default=None, help="MB sent to a slow reader (0: skip)"
    )
    options = parser.parse_args()
    if options.size_mb is None:
        options.size_mb = 64 if options.quick else 512
    if options.slow_reader_mb is None:
        options.slow_reader_mb = 64 if options.quick else 1024
    if options.idle_only:
        options.slow_reader_mb = 0
    if options.idle_tunnels is None:
        options.idle_tunnels = 100 if options.quick else 1000
    task.react(lambda _reactor: run(options))


if __name__ == "__main__":
    main()
