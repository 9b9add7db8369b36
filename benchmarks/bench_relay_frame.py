#!/usr/bin/env python
"""
Micro-benchmark of the relay's per-frame cost, in memory (no sockets, no TLS): the real data plane
(L{tunnelkit.testing.ServiceHarness}, autobahn's protocol, the relay) fed masked WebSocket messages
of one 63 KiB DATA frame each (the largest payload), from a source to a destination, with the audit trail off and on.

Reported, in microseconds of this process's CPU time per DATA frame (median of --rounds rounds of
--frames frames; CPU time, so that other processes on a shared machine count less):
  - the whole relay step: WebSocket frame parsed and unmasked, tunnel frame parsed and checked,
    accounted (audit on), queued and written toward the destination;
  - the protocol rules alone (L{tunnelkit.protocol.rules.PeerRules.check}), and the rules plus the
    audit trail's accounting of the frame.

Usage: python benchmarks/bench_relay_frame.py [--frames N] [--rounds N] [--payload BYTES]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, List

import txaio
from twisted.internet.task import Clock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_note  # noqa: E402  (benchmarks/machine.py)

from tunnelkit.protocol.framing import parse_message  # noqa: E402
from tunnelkit.protocol.message_pb2 import Message  # noqa: E402
from tunnelkit.protocol.rules import PeerRules  # noqa: E402
from tunnelkit.service.audit import AuditTrail  # noqa: E402
from tunnelkit.testing import RawPeer, ServiceHarness, client_frame, tunnel_frame, upgrade_request  # noqa: E402


def _median_us(run: Callable[[], None], count: int, rounds: int) -> float:
    samples: List[float] = []
    for _ in range(rounds):
        started = time.process_time()  # CPU time of this process: time others take the CPU is not counted
        run()
        samples.append((time.process_time() - started) / count * 1e6)
    return statistics.median(samples)


def relay_step(audit: bool, frames: int, rounds: int, payload: int) -> float:
    """Microseconds per DATA frame through the relay (source's bytes in, destination's bytes out)."""
    clock = Clock()
    clock.advance(1_800_000_000)
    txaio.use_twisted()
    txaio.config.loop = clock
    harness = ServiceHarness(clock, {"handshakes-per-second": 0})
    relay: Any = harness.events
    directory = tempfile.mkdtemp()
    if audit:
        relay.audit = AuditTrail(os.path.join(directory, "audit.jsonl"), clock)
    tunnel = harness.open_tunnel(["SSH"])
    source = RawPeer(harness.site, upgrade_request("source", tunnel.source_token), 40001)
    destination = RawPeer(harness.site, upgrade_request("destination", tunnel.destination_token), 40002)
    assert (source.status, destination.status) == (101, 101), (source.status, destination.status)
    start = tunnel_frame(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
    source.send(start)
    data = tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x" * payload)
    wire = client_frame(data)
    feed = source.protocol.dataReceived  # type: ignore[attr-defined]
    out = destination.transport

    def run() -> None:
        for _ in range(frames):
            feed(wire)
            out.clear()

    run()  # warm up
    result = _median_us(run, frames, rounds)
    if audit:
        relay.audit.close()
    return result


def rules_step(audit: bool, frames: int, rounds: int, payload: int) -> float:
    """Microseconds per DATA frame for the rules check (and the audit's accounting of it)."""
    clock = Clock()
    body = tunnel_frame(type=Message.DATA, streamId=1, serviceId="SSH", connectionId=1, payload=b"x" * payload)[2:]
    message = parse_message(body)
    size = len(body)
    rules = PeerRules("source", ["SSH"])
    rules.note_stream_started("SSH")
    check: Callable[[], None]
    if not audit:
        def check() -> None:
            rules.check(message, size)
    else:
        trail = AuditTrail(os.path.join(tempfile.mkdtemp(), "audit.jsonl"), clock)
        try:  # after review 2: the relay calls the tunnel's ledger beside the rules
            from tunnelkit.service.audit import TunnelLedger

            ledger = TunnelLedger(trail, "t-1")
            ledger.started("source", Message(type=Message.STREAM_START, streamId=1, serviceId="SSH",
                                             connectionId=1))

            def check() -> None:
                rules.check(message, size)
                ledger.data("source", message, size)
        except ImportError:  # before: a wrapper around the rules (AccountingRules)
            from tunnelkit.service.audit import AccountingRules  # type: ignore[attr-defined]

            wrapped = AccountingRules(rules, trail, "t-1", "source")
            wrapped.check(Message(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1), 10)

            def check() -> None:
                wrapped.check(message, size)

    def run() -> None:
        for _ in range(frames):
            check()

    run()
    return _median_us(run, frames, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--payload", type=int, default=64512)  # the largest DATA payload (MAX_PAYLOAD_SIZE)
    options = parser.parse_args()
    print(f"relay per-frame cost, {options.payload}-byte DATA payloads, median of {options.rounds} rounds "
          f"of {options.frames} frames ({load_note()})")
    for name, step in (("relay step", relay_step), ("rules check", rules_step)):
        off = step(False, options.frames, options.rounds, options.payload)
        on = step(True, options.frames, options.rounds, options.payload)
        print(f"  {name:12s} audit off {off:8.2f} us   audit on {on:8.2f} us   (+{on - off:.2f} us)")


if __name__ == "__main__":
    main()
