"""
Fuzzing a real relay and a real destination proxy from a fake source (issue 10: nothing a peer sends
kills the other peer).

A hand-driven WebSocket source (L{tunnelkit.testing.TunnelTestClient}) sends hypothesis-generated
frames (random bytes, and well-formed messages that break the rules: empty, unknown and huge service
ids, stale and negative stream ids, unknown types, the ignorable flag, DATA before any start) to
C{tunnelkit --mode service}, which relays them to a real C{--mode destination} process.  After each
example it checks that the destination and the service still run, that the destination still
serves a fresh stream of this tunnel (an echo through it, byte-exact), and that another tunnel with
real local proxies still carries an echo.  If the relay closes the fake source for what it sent, the
source connects again with its client token, as a real one would.

C{$TUNNELKIT_FUZZ_EXAMPLES} sets the number of examples (default 25, a short run for CI).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, List, Tuple

from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness, wait_until
from tests.e2e.test_tunnel_independence import start_apps
from tunnelkit.protocol.framing import encode_message
from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.testapps import echo_round_trips
from tunnelkit.testing import connect_client

EXAMPLES = int(os.environ.get("TUNNELKIT_FUZZ_EXAMPLES", "25"))
CLIENT_TOKEN = "fuzzing-source-client-token-0123456789"
#: Stream ids the fuzzer uses stay below this; each probe takes the next id above it.
FUZZ_STREAM_IDS = 1000

service_ids = st.one_of(
    st.sampled_from(["", "ECHO", "OTHER", "NOPE", "E" * 300]),
    st.text(max_size=12),
)
messages = st.builds(
    Message,
    # AWS's types, unknown ones, and tunnelkit's ignorable extension types (1001-1003)
    type=st.one_of(st.integers(0, 12), st.sampled_from([1001, 1002, 1003]), st.integers(0, 2**31 - 1)),
    streamId=st.one_of(st.integers(-3, 5), st.integers(0, FUZZ_STREAM_IDS - 1)),
    ignorable=st.booleans(),
    payload=st.binary(max_size=3000),
    serviceId=service_ids,
    availableServiceIds=st.lists(service_ids, max_size=3),
    connectionId=st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
)
#: One WebSocket message: (False, well-formed frames, one or several) or (True, any bytes at all).
websocket_messages = st.one_of(
    st.tuples(st.just(False), st.lists(messages.map(encode_message), min_size=1, max_size=3).map(b"".join)),
    st.tuples(st.just(True), st.binary(max_size=200)),
)


def describe(payloads: List[bytes]) -> str:
    """The tunnel messages in C{payloads}, for a failure's report (what does not parse says so)."""
    from tunnelkit.protocol.framing import FrameDecoder, parse_message

    decoder, parts = FrameDecoder(), []
    for payload in payloads:
        try:
            parts += [str(parse_message(body)).replace("\n", " ") for body in decoder.feed(payload)]
        except Exception as e:  # the relay rejects it too; say what it was
            parts.append(f"<{type(e).__name__}: {e}>")
            decoder = FrameDecoder()
    return " | ".join(parts)


def _send(client: Any, payload: bytes) -> None:
    """On the reactor: send one binary message unless the relay has closed this client meanwhile."""
    from autobahn.exception import Disconnected

    try:
        client.sendMessage(payload, True)
    except Disconnected:
        pass


def _frames(*messages: Message) -> List[Tuple[bool, bytes]]:
    return [(False, encode_message(m)) for m in messages]


#: The rule-breaking frames of issue 10, always tried first.
KNOWN_CASES = [
    _frames(Message(type=Message.STREAM_START, streamId=7, serviceId="", connectionId=1)),
    _frames(Message(type=Message.STREAM_START, streamId=8, serviceId="ECHO", connectionId=1),
            Message(type=Message.CONNECTION_START, streamId=8, serviceId="", connectionId=2)),
    _frames(Message(type=Message.STREAM_START, streamId=9, serviceId="NOPE", connectionId=1)),
    _frames(Message(type=Message.DATA, streamId=3, serviceId="OTHER", connectionId=5, payload=b"early")),
    # a window update and an end-of-stream of tunnelkit's extension for a connection that never was
    _frames(Message(type=1002, ignorable=True, streamId=4, serviceId="ECHO", connectionId=9, payload=b"\xff\xff\xff\xff"),
            Message(type=1003, ignorable=True, streamId=4, serviceId="ECHO", connectionId=9)),
]


class FuzzedSource:
    """The fake source, driven from a thread; it reconnects when the relay has closed it."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.client: Any = None
        self.closes: List[Tuple[Any, ...]] = []
        self.probe_id = FUZZ_STREAM_IDS
        self.echoed: List[bytes] = []
        self._expected = b""  # what the running probe's echo must answer
        self._answered = threading.Event()  # set (in the reactor's thread) once it has, or the client closed

    def ensure_connected(self) -> None:
        if self.client is not None and not self.client.closed.called:
            return
        if self.client is not None:
            self.closes.append(self.client.closed.result)
        # the service runs without its per-tunnel handshake rate (the fuzzer reconnects after each
        # close it provokes), so a reconnect is never answered 429 and never waits
        self.client = blockingCallFromThread(
            reactor, connect_client, self.port, "source", self.token, client_token=CLIENT_TOKEN
        )
        self.client.on_data = self._on_data

    def _on_data(self, message: Message) -> None:
        if message.streamId == self.probe_id:
            self.echoed.append(message.payload)
            if b"".join(self.echoed) == self._expected:
                self._answered.set()

    def drop(self) -> None:
        """Drop the WebSocket (no close frame) and wait until it is gone; the next send reconnects."""
        client = self.client
        if client is None:
            return
        reactor.callFromThread(client.transport.loseConnection)
        wait_until(lambda: client.closed.called, 10, "the dropped WebSocket to close", interval=0.02)

    def send(self, payloads: List[bytes], raw: bool) -> None:
        """
        Send each payload as one WebSocket message.  After C{raw} bytes the frame stream may be cut
        anywhere (a length prefix still waiting for its bytes swallows what follows, as it must), so
        this source then drops its WebSocket and connects again, as a real one would.
        """
        self.ensure_connected()
        for payload in payloads:
            reactor.callFromThread(_send, self.client, payload)
        if raw:
            self.drop()

    def probe(self, timeout: float = 10.0) -> bytes:
        """
        A fresh stream on ECHO through the destination: what its echo answered.  If the relay
        closes this source meanwhile (for a fuzzed frame still in flight), connect again and start
        the probe over.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.ensure_connected()
            client = self.client
            self.probe_id += 1
            self.echoed = []
            text = b"probe %d" % self.probe_id
            self._expected = text
            answered = self._answered = threading.Event()

            def ended(result: Any, answered: threading.Event = answered) -> Any:
                answered.set()  # the relay closed this source: no answer is coming on it
                return result

            reactor.callFromThread(client.closed.addBoth, ended)
            start = Message(type=Message.STREAM_START, streamId=self.probe_id, serviceId="ECHO", connectionId=1)
            data = Message(type=Message.DATA, streamId=self.probe_id, serviceId="ECHO", connectionId=1,
                           payload=b"echo\n" + text)
            reactor.callFromThread(_send, client, encode_message(start))
            reactor.callFromThread(_send, client, encode_message(data))
            answered.wait(max(0.0, deadline - time.monotonic()))
            if not client.closed.called or time.monotonic() >= deadline:
                return b"".join(self.echoed)


class FuzzTests(TestCase):
    timeout = 60 + EXAMPLES * 20

    def test_destination_relay_and_other_tunnel_stay_up(self) -> Any:
        # Before issue 10's fixes (bf2b141) the first known case (a STREAM_START without a service
        # id on a new WebSocket of a two-service tunnel) passed the relay and the destination exited 1.
        return deferToThread(self._fuzz)

    def _fuzz(self) -> None:
        h = Harness(self)
        apps = start_apps(h)
        service = h.start_service(extra=["--handshakes-per-second", "0"])
        fuzzed = h.open_tunnel(["ECHO", "OTHER"])
        destination = h.start_destination(fuzzed.destination_token, f"ECHO={apps},OTHER={apps}")
        other = h.open_tunnel(["ECHO"])
        h.start_destination(other.destination_token, f"ECHO={apps}", name="other-destination")
        other_source = h.start_source(other.source_token, "ECHO=0", name="other-source")
        other_port = other_source.port_of("ECHO")
        other_source.wait_for_log("The tunnel is ready")  # its destination is connected too
        destination.wait_for_log("Connected to the tunnel")  # the fuzzing source announces nothing
        source = FuzzedSource(service.port, fuzzed.source_token)
        self.assertEqual(source.probe(), b"probe %d" % source.probe_id, destination.tail())

        # no shrinking: each example costs real round trips; the failing one is printed as it was
        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.booleans(), st.lists(websocket_messages, min_size=1, max_size=6))
        @example(True, KNOWN_CASES[0])
        @example(True, KNOWN_CASES[1])
        @example(True, KNOWN_CASES[2])
        @example(True, KNOWN_CASES[3])
        @example(False, KNOWN_CASES[4])
        def one_case(fresh: bool, messages: List[Tuple[bool, bytes]]) -> None:
            """C{fresh}: on a new WebSocket (its first stream message decides V1/V2/V3 rules)."""
            if fresh:
                source.drop()
            payloads = [payload for _, payload in messages]
            sent = f"after {'a new WebSocket and ' if fresh else ''}the WebSocket messages {payloads!r}\n(as tunnel frames: {describe(payloads)})"
            note(sent)
            source.send(payloads, raw=any(raw for raw, _ in messages))
            answer = source.probe()
            self.assertTrue(service.process.running(), f"the service exited {sent}:\n{service.process.tail()}")
            self.assertTrue(destination.running(), f"the destination exited {sent}:\n{destination.tail()}")
            self.assertEqual(answer, b"probe %d" % source.probe_id, f"no echo through the destination {sent}:\n"
                             f"{destination.tail()}\nrelay closes so far: {source.closes}")
            echo_round_trips(other_port, count=1, size=100, timeout=30)

        one_case()
