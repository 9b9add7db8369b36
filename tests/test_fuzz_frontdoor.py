"""
Fuzzing the service's front door with hypothesis (issue 11): the WebSocket handshake, the frames
at the relay, and the API, each on the real site and protocols over in-memory transports.

Invariants checked on every case: no answer is a 5xx, nothing is logged as a failure, every log line
stays bounded, the service's state stays consistent; after any mix of bad handshakes, the holder of
a valid token still connects.

Cases per test: C{TUNNELKIT_FUZZ_CASES} (default 60, the CI run); a long run is documented in
C{benchmarks/fuzz_frontdoor.md}.
"""

from __future__ import annotations

import json
import os
import string
from typing import Any, Dict, List

import txaio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.test_api_helpers import ServiceTestCase as ApiTestCase
from tunnelkit.service.api import HEAD_TIMEOUT, ServiceSite
from tunnelkit.protocol.message_pb2 import Message
from tunnelkit.testing import V3, RawPeer, ServiceHarness, client_frame, tunnel_frame, upgrade_request

CASES = int(os.environ.get("TUNNELKIT_FUZZ_CASES", "60"))
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    derandomize=os.environ.get("TUNNELKIT_FUZZ_RANDOM") is None,  # reproducible in CI unless asked
)

#: The longest log line any case may produce.
MAX_LINE = 1500

_HEADER_TEXT = st.text(alphabet=string.printable.replace("\r", "").replace("\n", ""), max_size=200)


class _LogWatch:
    """Collects log events; fails on a failure event or an overlong line."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def check(self, test: SynchronousTestCase) -> None:
        for event in self.events:
            test.assertNotIn("log_failure", event, formatEvent(event))
            test.assertLess(event.get("log_level", LogLevel.info), LogLevel.error, formatEvent(event))
            test.assertLess(len(formatEvent(event) or ""), MAX_LINE)
        self.events.clear()


def _clock_for_autobahn(test: SynchronousTestCase) -> Clock:
    clock = Clock()
    clock.advance(1_800_000_000)
    txaio.use_twisted()
    old = txaio.config.loop
    txaio.config.loop = clock
    test.addCleanup(setattr, txaio.config, "loop", old)
    return clock


@st.composite
def handshakes(draw: Any, token: str) -> bytes:
    """An upgrade request mutated from the reference one: headers added, dropped, changed."""
    mode = draw(st.sampled_from(["source", "destination", None, "", "sideways", "source&local-proxy-mode=source"]))
    choice = draw(st.sampled_from(["valid-shape", "garbage", "none", "long", "wrong-secret"]))
    value = {
        "valid-shape": token,
        "garbage": draw(_HEADER_TEXT),
        "none": None,
        "long": "x" * draw(st.integers(0, 20000)),
        "wrong-secret": token[:20] + "Q" + token[21:],
    }[choice]
    protocols = draw(st.lists(st.sampled_from([V3, "aws.iot.securetunneling-1.0", "nope", ""]), max_size=3))
    extra = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["client-token", "access-token", "cookie", "X-Junk", "Sec-WebSocket-Version"]),
                _HEADER_TEXT,
            ),
            max_size=4,
        )
    )
    path = draw(st.sampled_from(["/tunnel", "/tunnel/", "/", "/x" * 3]))
    request = upgrade_request(mode, value, protocols=protocols, path=path, extra=extra)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(request)))
        request = request[:cut] + draw(st.binary(max_size=64)) + request[cut:]
    return request


class HandshakeFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(data=st.data())
    def test_handshakes(self, data: Any) -> None:
        """Whatever the upgrade request, the answer is a 1xx or 4xx, and a valid token still connects."""
        clock = _clock_for_autobahn(self)
        watch = _LogWatch(self)
        harness = ServiceHarness(clock)
        site = ServiceSite(harness.root, reactor=clock)  # the service's own front door
        tunnel = harness.open_tunnel(["SSH"])
        for n in range(data.draw(st.integers(1, 12))):
            request = data.draw(handshakes(tunnel.source_token))
            peer = RawPeer(site, request, 40000 + n, host=data.draw(st.sampled_from(["127.0.0.2", "127.0.0.3"])))
            if peer.status is None:
                # Not a complete head (a splice broke its blank line): reset by the head deadline.
                clock.advance(HEAD_TIMEOUT)
                self.assertTrue(peer.transport.disconnected, request[-400:])
                peer.channel.connectionLost(None)
                continue
            self.assertTrue(peer.status == 101 or 400 <= peer.status < 500, peer.status)
            if peer.status == 101:
                peer.lose()
        watch.check(self)
        destination = RawPeer(site, upgrade_request("destination", tunnel.destination_token), 41000)
        self.assertEqual(destination.status, 101)


@st.composite
def peer_input(draw: Any) -> bytes:
    """What a peer sends after its upgrade: tunnel frames (valid or not), in WebSocket frames of any kind."""
    pieces = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["frame", "garbage", "control", "raw"]))
        if kind == "frame":
            message = Message(
                type=draw(st.integers(0, 9)),
                streamId=draw(st.integers(0, 3)),
                serviceId=draw(st.sampled_from(["", "SSH", "S" * 300, "HTTP"])),
                connectionId=draw(st.integers(0, 3)),
                payload=draw(st.binary(max_size=300)),
            )
            payload = tunnel_frame(**{f.name: v for f, v in message.ListFields()}) if message.ListFields() else b"\x00\x00"
            pieces.append(client_frame(payload))
        elif kind == "garbage":
            pieces.append(client_frame(draw(st.binary(max_size=400)), opcode=draw(st.sampled_from([1, 2]))))
        elif kind == "control":
            pieces.append(client_frame(draw(st.binary(max_size=125)), opcode=draw(st.sampled_from([8, 9, 10]))))
        else:
            pieces.append(draw(st.binary(max_size=64)))
    return b"".join(pieces)


class RelayFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(source_bytes=peer_input(), destination_bytes=peer_input(), split=st.integers(1, 50))
    def test_frames(self, source_bytes: bytes, destination_bytes: bytes, split: int) -> None:
        """Any bytes from either peer: no exception, bounded logs, and the relay's books stay consistent."""
        clock = _clock_for_autobahn(self)
        watch = _LogWatch(self)
        harness = ServiceHarness(clock)
        tunnel = harness.open_tunnel(["SSH", "HTTP"])
        source = RawPeer(harness.site, upgrade_request("source", tunnel.source_token), 40001)
        destination = RawPeer(harness.site, upgrade_request("destination", tunnel.destination_token), 40002)
        self.assertEqual((source.status, destination.status), (101, 101))
        for peer, data in ((source, source_bytes), (destination, destination_bytes)):
            for start in range(0, len(data), split):
                if peer.protocol.state == peer.protocol.STATE_OPEN:  # type: ignore[attr-defined]
                    peer.send_raw(data[start : start + split])
        clock.advance(30)
        source.poll()
        destination.poll()
        relay = harness.events
        for peer in (source, destination):
            if peer.transport.disconnecting:
                peer.lose()  # the service closed it: the connection ends
        watch.check(self)
        open_now = sum(len(link.peers) for link in relay.links.values())  # type: ignore[attr-defined]
        self.assertEqual(relay.websockets_of("123456789012"), open_now)  # type: ignore[attr-defined]


_OPERATIONS = [
    "OpenTunnel", "CloseTunnel", "DescribeTunnel", "ListTunnels", "RotateTunnelAccessToken",
    "TagResource", "UntagResource", "ListTagsForResource",
]  # fmt: skip

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=12,
)
_FIELDS = [
    "tunnelId", "clientMode", "destinationConfig", "thingName", "services", "timeoutConfig",
    "maxLifetimeTimeoutMinutes", "tags", "key", "value", "resourceArn", "tagKeys", "description",
    "maxResults", "nextToken", "delete",
]  # fmt: skip


class ApiFuzzTests(ApiTestCase):
    @FUZZ
    @given(
        operation=st.sampled_from(_OPERATIONS + ["Nope", ""]),
        body=st.dictionaries(st.sampled_from(_FIELDS), _json_values, max_size=6),
        raw=st.one_of(st.none(), st.binary(max_size=200)),
    )
    def test_requests(self, operation: str, body: Dict[str, Any], raw: Any) -> None:
        """Signed requests with random bodies: 200, 400 or 404, never a 5xx, and bounded logs."""
        watch = _LogWatch(self)
        data = raw if raw is not None else json.dumps(body).encode()
        status, answer = self.call_raw("IoTSecuredTunneling." + operation, data)
        self.assertIn(status, (200, 400, 404), answer)
        if status != 200:
            self.assertIn("__type", answer)
        watch.check(self)
