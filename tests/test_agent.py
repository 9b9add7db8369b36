"""
Tests for L{tunnelkit.agent.core}: notification parsing and the agent's session bookkeeping, fed through
a real L{MQTTClient} whose broker side is played byte by byte, with a recording session starter.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.test_mqtt import CONNACK_OK, BrokerSide, publish
from tunnelkit.agent import (
    DEFAULT_TARGETS,
    MAX_NOTIFICATION_SIZE,
    Agent,
    BadNotification,
    IDestinationSession,
    IDestinationStarter,
    Notification,
    data_endpoint_for_region,
    parse_notification,
)
from tunnelkit.mqtt import MQTTClient

TOPIC = "$aws/things/t1/tunnels/notify"


def payload(token: str = "tok-1", services=("SSH",), region: Any = "us-east-1", mode: str = "destination", **extra) -> bytes:
    document: Dict[str, Any] = {"clientAccessToken": token, "clientMode": mode, "services": list(services)}
    if region is not None:
        document["region"] = region
    document.update(extra)
    return json.dumps(document).encode()


@implementer(IDestinationSession)
class RecordedSession:
    """A session as the starter hands it out: ends when the test says, records stop()."""

    def __init__(self, notification: Notification, endpoint: str, targets: Mapping[str, Any]) -> None:
        self.notification = notification
        self.endpoint = endpoint
        self.targets = dict(targets)
        self.ended: Deferred = Deferred()
        self.stopped = False

    def stop(self) -> Deferred:
        self.stopped = True
        if not self.ended.called:
            self.ended.callback(None)
        return succeed(None)


@implementer(IDestinationStarter)
class RecordingStarter:
    def __init__(self) -> None:
        self.sessions: List[RecordedSession] = []
        self.fail_next = False

    def start(self, notification: Notification, endpoint: str, targets: Mapping[str, Any]) -> RecordedSession:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("cannot start")
        session = RecordedSession(notification, endpoint, targets)
        self.sessions.append(session)
        return session


class ParseTests(SynchronousTestCase):
    def test_valid(self) -> None:
        n = parse_notification(payload(services=("SSH", "FTP"), tunnelId="tid"), DEFAULT_TARGETS)
        self.assertEqual((n.access_token, n.services, n.region, n.tunnel_id), ("tok-1", ("SSH", "FTP"), "us-east-1", "tid"))
        self.assertNotIn("tok-1", repr(n))
        self.assertEqual(n.name, "tid")
        self.assertEqual(len(n.fingerprint), 12)

    def test_client_mode_case(self) -> None:
        """AWS writes 'destination'; the API's upper-case spelling is accepted too."""
        self.assertEqual(parse_notification(payload(mode="DESTINATION"), DEFAULT_TARGETS).services, ("SSH",))

    def test_bad(self) -> None:
        """Each bad notification is refused with a reason that names what is wrong."""
        cases = [
            (b"{not json", "not valid JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (b"[1, 2]", "not an object"),
            (payload(mode="source"), "clientMode is 'source'"),
            (json.dumps({"clientMode": "destination", "services": ["SSH"], "region": "r"}).encode(), "no clientAccessToken"),
            (payload(token=""), "no clientAccessToken"),
            (payload(token="a\nb"), "not a token"),
            (payload(token="x" * 5000), "not a token"),
            (payload(services=()), "no services"),
            (payload(services=("SSH", "SSH")), "twice"),
            (payload(services=("S S",)), "not a service id"),
            (payload(services=("SSH", "RDP")), "unknown service 'RDP'"),
            (payload(region="US EAST"), "not a region"),
            (payload(region=None), "no region"),
            (payload(tunnelId="a/b"), "not a tunnel id"),
            (b" " * (1024 * 1024), "over the"),
            (payload(token="y" * (MAX_NOTIFICATION_SIZE + 1)), "over the"),
        ]
        for data, reason in cases:
            e = self.assertRaises(BadNotification, parse_notification, data, DEFAULT_TARGETS)
            self.assertIn(reason, str(e), data[:80])

    def test_secret_not_in_reason(self) -> None:
        e = self.assertRaises(BadNotification, parse_notification, payload(token="secret\x01"), DEFAULT_TARGETS)
        self.assertNotIn("secret", str(e))

    def test_region_optional_with_endpoint(self) -> None:
        self.assertIsNone(parse_notification(payload(region=None), DEFAULT_TARGETS, region_required=False).region)

    def test_endpoint_for_region(self) -> None:
        self.assertEqual(data_endpoint_for_region("us-east-1"), "data.tunneling.iot.us-east-1.amazonaws.com:443")
        self.assertEqual(data_endpoint_for_region("cn-north-1"), "data.tunneling.iot.cn-north-1.amazonaws.com.cn:443")


class AgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = MQTTClient(TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1883), "agent", self.reactor)
        self.starter = RecordingStarter()
        self.logged: List[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.mid = 100

    def start(self, **kwargs) -> Agent:
        agent = Agent("t1", self.client, self.starter, kwargs.pop("targets", DEFAULT_TARGETS), **kwargs)
        agent.startService()
        self.client.startService()
        self.broker = BrokerSide(self.reactor, 0)
        self.broker.take()
        self.broker.feed(CONNACK_OK)
        [(first, body)] = self.broker.take()
        self.assertEqual(first, 0x82)
        self.assertIn(TOPIC.encode(), body)

        def stop():
            agent.stopService()
            self.client.stopService()

        self.addCleanup(stop)
        return agent

    def deliver(self, data: bytes) -> None:
        self.mid += 1
        self.broker.feed(publish(TOPIC, data, qos=1, mid=self.mid))
        self.assertIn((0x40, self.mid.to_bytes(2, "big")), self.broker.take())

    def reasons(self) -> List[str]:
        return [e["reason"] for e in self.logged if e.get("log_format", "").startswith("Ignored a notification")]

    def test_interfaces(self) -> None:
        verifyObject(IDestinationStarter, self.starter)
        verifyObject(IDestinationSession, RecordedSession(Notification("t", ("SSH",), "r"), "e", {}))

    def test_starts_session(self) -> None:
        """A notification starts a session at the region's endpoint with the requested services only."""
        agent = self.start()
        self.deliver(payload(services=("SSH", "HTTP")))
        [session] = self.starter.sessions
        self.assertEqual(session.endpoint, "data.tunneling.iot.us-east-1.amazonaws.com:443")
        self.assertEqual(session.targets, {"SSH": ("127.0.0.1", 22), "HTTP": ("127.0.0.1", 80)})
        self.assertEqual(session.notification.access_token, "tok-1")
        self.assertEqual(len(agent.running_sessions()), 1)
        self.assertNotIn("tok-1", repr(self.logged))

    def test_proxy_endpoint_and_custom_targets(self) -> None:
        """A configured endpoint wins over the region; services map through the configured table."""
        self.start(proxy_endpoint="127.0.0.1:8443", targets={"SSH1": ("127.0.0.1", 2222)})
        self.deliver(payload(services=("SSH1",), region=None))
        [session] = self.starter.sessions
        self.assertEqual(session.endpoint, "127.0.0.1:8443")
        self.assertEqual(session.targets, {"SSH1": ("127.0.0.1", 2222)})

    def test_several_tunnels(self) -> None:
        """Notifications of different tunnels run side by side."""
        agent = self.start()
        self.deliver(payload(token="a", tunnelId="t-a"))
        self.deliver(payload(token="b", services=("SSH", "FTP"), tunnelId="t-b"))
        self.deliver(payload(token="c"))  # from a service that does not send tunnelId
        self.assertEqual(len(self.starter.sessions), 3)
        self.assertEqual(len(agent.running_sessions()), 3)
        self.assertFalse(any(s.stopped for s in self.starter.sessions))

    def test_session_limit(self) -> None:
        """Past max_sessions new tunnels are refused (logged); a rotation of a running one is not."""
        agent = self.start(max_sessions=2)
        self.deliver(payload(token="a", tunnelId="t-a"))
        self.deliver(payload(token="b", tunnelId="t-b"))
        self.deliver(payload(token="c", tunnelId="t-c"))
        self.assertEqual(len(self.starter.sessions), 2)
        self.assertTrue(any("sessions already run" in e.get("log_format", "") for e in self.logged))
        self.deliver(payload(token="a2", tunnelId="t-a"))
        self.assertEqual(sorted(n.access_token for n in agent.running_sessions()), ["a2", "b"])

    def test_duplicate_ignored(self) -> None:
        """The same token again (QoS 1 redelivery) starts nothing, even after its session ended."""
        self.start()
        self.deliver(payload(tunnelId="t-a"))
        self.deliver(payload(tunnelId="t-a"))
        self.assertEqual(len(self.starter.sessions), 1)
        self.starter.sessions[0].ended.callback(None)
        self.deliver(payload(tunnelId="t-a"))
        self.assertEqual(len(self.starter.sessions), 1)

    def test_rotation_replaces(self) -> None:
        """A new token for a running tunnel stops its session and starts one with the new token."""
        agent = self.start()
        self.deliver(payload(token="old", tunnelId="t-a"))
        self.deliver(payload(token="other", tunnelId="t-b"))
        self.deliver(payload(token="new", tunnelId="t-a"))
        old, other, new = self.starter.sessions
        self.assertTrue(old.stopped)
        self.assertFalse(other.stopped)
        self.assertEqual(new.notification.access_token, "new")
        self.assertEqual(sorted(n.access_token for n in agent.running_sessions()), ["new", "other"])

    def test_ended_session_forgotten(self) -> None:
        """A session that ends by itself (tunnel closed) leaves the bookkeeping; a failure is logged."""
        agent = self.start()
        self.deliver(payload(token="a", tunnelId="t-a"))
        self.deliver(payload(token="b", tunnelId="t-b"))
        self.starter.sessions[0].ended.callback(None)
        self.starter.sessions[1].ended.errback(RuntimeError("token refused"))
        self.assertEqual(agent.running_sessions(), [])
        self.assertTrue(any(e.get("reason") == "token refused" for e in self.logged))

    def test_bad_notifications_logged_and_ignored(self) -> None:
        """Bad notifications are logged with the reason and ignored; the agent keeps going."""
        agent = self.start()
        self.deliver(b"{oops")
        self.deliver(payload(mode="source"))
        self.deliver(payload(services=("RDP",)))
        self.deliver(json.dumps({"clientMode": "destination", "services": ["SSH"], "region": "r"}).encode())
        self.deliver(b"x" * (1024 * 1024))
        reasons = self.reasons()
        self.assertEqual(len(reasons), 5)
        for expected, reason in zip(["not valid JSON", "clientMode", "unknown service", "no clientAccessToken", "over the"], reasons):
            self.assertIn(expected, reason)
        self.assertEqual(self.starter.sessions, [])
        self.deliver(payload())
        self.assertEqual(len(agent.running_sessions()), 1)

    def test_starter_failure_contained(self) -> None:
        """A session that cannot start is logged; later notifications still work."""
        agent = self.start()
        self.starter.fail_next = True
        self.deliver(payload(token="a"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.deliver(payload(token="b"))
        self.assertEqual(len(agent.running_sessions()), 1)

    def test_stop_stops_sessions(self) -> None:
        agent = self.start()
        self.deliver(payload(token="a"))
        self.deliver(payload(token="b"))
        d = agent.stopService()
        self.successResultOf(d)
        self.assertTrue(all(s.stopped for s in self.starter.sessions))
        self.assertEqual(agent.running_sessions(), [])

    def test_stop_is_bounded(self) -> None:
        """A session that never finishes closing holds the agent's stop for stop_timeout seconds only."""
        hanging = Deferred()
        agent = Agent("t1", self.client, self.starter, DEFAULT_TARGETS, clock=self.reactor, stop_timeout=3.0)
        agent.startService()
        self.client.startService()
        broker = BrokerSide(self.reactor, 0)
        broker.take()
        broker.feed(CONNACK_OK)
        broker.feed(publish(TOPIC, payload(), qos=1, mid=1))
        [session] = self.starter.sessions
        session.stop = lambda: hanging
        d = agent.stopService()
        self.reactor.advance(2.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(any("did not close within" in e.get("log_format", "") for e in self.logged))
        self.client.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_bad_thing_name(self) -> None:
        self.assertRaises(ValueError, Agent, "t1/#", self.client, self.starter, DEFAULT_TARGETS)
