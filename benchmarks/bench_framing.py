#!/usr/bin/env python
"""
Encode and decode tunnel DATA frames: how fast is the protocol core?

Prints MB/s (payload bytes) and frames/s for DATA payloads of 1 B, 4 KiB and 63 KiB:
  - encode with protobuf (Message + SerializeToString + length prefix);
  - encode with the session's hand-built DataFrameEncoder (byte-identical);
  - decode (FrameDecoder + parse_message) of whole frames;
  - the incremental decoder (+ parse) on the stream cut into 1,500-byte pieces;
  - what the service's relay does per frame: parse + PeerRules.check;
  - a source session's local_data and a destination session's feed (the full hot path);
and, as a baseline measured in the same run, copying the same bytes once (C{bytes(bytearray)}).

Usage: python benchmarks/bench_framing.py [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, List

from tunnelkit.protocol.framing import FrameDecoder, Message, encode_frame, encode_message, parse_message
from tunnelkit.protocol.rules import PeerRules
from tunnelkit.protocol.session import DataFrameEncoder, DestinationSession, SourceSession

SIZES = [("1 B", 1), ("4 KiB", 4096), ("63 KiB", 64512)]


def rate(run: Callable[[], int], seconds: float) -> float:
    """Calls per second of C{run} (which returns how many frames it handled), best of 3 rounds."""
    best = 0.0
    for _ in range(3):
        count = 0
        start = time.perf_counter()
        deadline = start + seconds / 3
        while True:
            count += run()
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, count / (now - start))
    return best


def report(name: str, payload: int, frames_per_second: float, baseline: float) -> None:
    megabytes = frames_per_second * payload / 1e6
    print(
        f"  {name:<34} {megabytes:10.1f} MB/s {frames_per_second:12,.0f} frames/s"
        f"   {megabytes / baseline if baseline else 0:6.2f}x copy"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    seconds = parser.parse_args().seconds

    for label, size in SIZES:
        payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        print(f"DATA payload {label} ({size} bytes), service id 'SSH', connection id 1")
        batch = max(1, min(10_000, 1_000_000 // size))  # up to ~1 MB or 10,000 frames per call

        # Baseline: copy the payload bytes once.
        source_buffer = bytearray(payload * batch)

        def copy() -> int:
            bytes(source_buffer)
            return batch

        baseline_fps = rate(copy, seconds)
        baseline = baseline_fps * size / 1e6
        print(f"  {'baseline: bytes copy':<34} {baseline:10.1f} MB/s")

        def protobuf_encode() -> int:
            for _ in range(batch):
                encode_frame(
                    Message(
                        type=Message.DATA, streamId=1, payload=payload, serviceId="SSH", connectionId=1
                    ).SerializeToString()
                )
            return batch

        report("encode: protobuf", size, rate(protobuf_encode, seconds), baseline)

        encoder = DataFrameEncoder(1, "SSH", 1)
        assert encoder.encode(payload) == [
            encode_message(
                Message(type=Message.DATA, streamId=1, payload=payload, serviceId="SSH", connectionId=1)
            )
        ]

        def hand_encode() -> int:
            encode = encoder.encode
            for _ in range(batch):
                encode(payload)
            return batch

        report("encode: DataFrameEncoder", size, rate(hand_encode, seconds), baseline)

        stream = b"".join(encoder.encode(payload)[0] for _ in range(batch))

        def decode_whole() -> int:
            bodies = FrameDecoder().feed(stream)
            for body in bodies:
                parse_message(body).payload
            return len(bodies)

        report("decode: whole stream + parse", size, rate(decode_whole, seconds), baseline)

        pieces: List[bytes] = [stream[i : i + 1500] for i in range(0, len(stream), 1500)]

        def decode_pieces() -> int:
            decoder = FrameDecoder()
            count = 0
            for piece in pieces:
                for body in decoder.feed(piece):
                    parse_message(body).payload
                    count += 1
            return count

        report("decode: 1,500-byte pieces + parse", size, rate(decode_pieces, seconds), baseline)

        # What the service's relay does per frame: parse and check the rules.
        rules = PeerRules("source", ["SSH"])
        rules.check(Message(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1), 11)
        bodies = FrameDecoder().feed(stream)

        def relay_check() -> int:
            check = rules.check
            for body in bodies:
                check(parse_message(body), len(body))
            return len(bodies)

        report("relay: parse + PeerRules.check", size, rate(relay_check, seconds), baseline)

        # The sessions' hot paths: a local read becomes frames; WebSocket bytes become writes.
        source = SourceSession(["SSH"])
        source.websocket_opened()
        source.receive(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH"]))
        connection_id, _ = source.local_accepted("SSH")

        def source_local_data() -> int:
            local_data = source.local_data
            for _ in range(batch):
                local_data("SSH", connection_id, payload)
            return batch

        report("session: source local_data", size, rate(source_local_data, seconds), baseline)

        destination = DestinationSession(["SSH"])
        destination.websocket_opened()
        destination.receive(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH"]))
        destination.receive(
            Message(type=Message.STREAM_START, streamId=1, serviceId="SSH", connectionId=1)
        )
        destination.local_connected("SSH", 1)
        websocket_messages = [stream[i : i + 131076] for i in range(0, len(stream), 131076)]

        def destination_feed() -> int:
            count = 0
            for message in websocket_messages:
                count += len(destination.feed(message))
            return count

        report("session: destination feed", size, rate(destination_feed, seconds), baseline)
        print()


if __name__ == "__main__":
    main()
