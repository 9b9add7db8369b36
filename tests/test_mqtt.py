"""
Tests for L{tunnelkit.mqtt}: the MQTT client over an in-memory transport, checked against MQTT 3.1.1
packets written out byte by byte here (the broker side of the conversation).
"""

from __future__ import annotations

import os
import struct
import tempfile

from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from zope.interface.verify import verifyObject

from tunnelkit.mqtt import (
    IMQTTClient,
    MQTT_OPTIONS,
    MQTTClient,
    MQTTClientStopped,
    MQTTSettings,
    build_endpoint,
    client_from_settings,
    mqtt_settings,
)


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    length = len(body)
    encoded = bytearray()
    while True:
        digit, length = length % 128, length // 128
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            break
    return bytes([first_byte]) + bytes(encoded) + body


CONNACK_OK = _packet(0x20, b"\x00\x00")
CONNACK_BAD_CREDENTIALS = _packet(0x20, b"\x00\x04")
PINGRESP = _packet(0xD0, b"")


def puback(mid: int) -> bytes:
    return _packet(0x40, struct.pack("!H", mid))


def suback(mid: int, granted: int) -> bytes:
    return _packet(0x90, struct.pack("!H", mid) + bytes([granted]))


def publish(topic: str, payload: bytes, qos: int, mid: int = 0, dup: bool = False) -> bytes:
    body = _utf8(topic) + (struct.pack("!H", mid) if qos else b"") + payload
    return _packet(0x30 | (0x08 if dup else 0) | (qos << 1), body)


def split_packets(data: bytes):
    """(first byte, body) of each MQTT packet in C{data}."""
    packets = []
    i = 0
    while i < len(data):
        first = data[i]
        i += 1
        multiplier, length = 1, 0
        while True:
            digit = data[i]
            i += 1
            length += (digit & 0x7F) * multiplier
            multiplier *= 128
            if not digit & 0x80:
                break
        packets.append((first, data[i : i + length]))
        i += length
    return packets


class BrokerSide:
    """The test's end of one connection: what the client wrote, and feeding it the broker's bytes."""

    def __init__(self, reactor: MemoryReactorClock, index: int) -> None:
        host, port, factory, timeout, bind = reactor.tcpClients[index]
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def take(self):
        data = self.transport.value()
        self.transport.clear()
        return split_packets(data)

    def feed(self, data: bytes, one_byte_at_a_time: bool = False) -> None:
        if one_byte_at_a_time:
            for i in range(len(data)):
                self.protocol.dataReceived(data[i : i + 1])
        else:
            self.protocol.dataReceived(data)

    def drop(self) -> None:
        from twisted.internet.error import ConnectionLost

        self.protocol.connectionLost(Failure(ConnectionLost()))


class MQTTClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = MQTTClient(
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1883),
            "agent-t1",
            self.reactor,
            username="device",
            password="s3cret",
            retry_policy=lambda attempt: 2.0,
        )
        self.messages = []
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def start(self) -> BrokerSide:
        self.client.startService()
        self.addCleanup(self._stop)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        return BrokerSide(self.reactor, 0)

    def _stop(self) -> None:
        if self.client.running:
            self.client.stopService()

    def connect(self) -> BrokerSide:
        broker = self.start()
        broker.take()
        broker.feed(CONNACK_OK)
        return broker

    def test_interface(self) -> None:
        verifyObject(IMQTTClient, self.client)

    def test_connect_packet(self) -> None:
        """The client opens with a CONNECT: MQTT 3.1.1, clean session, its id, user and password."""
        broker = self.start()
        [(first, body)] = broker.take()
        self.assertEqual(first, 0x10)
        self.assertEqual(body[:7], _utf8("MQTT") + b"\x04")
        flags = body[7]
        self.assertEqual(flags, 0x80 | 0x40 | 0x02)  # username, password, clean session
        self.assertEqual(struct.unpack("!H", body[8:10])[0], 60)  # keep-alive
        self.assertEqual(body[10:], _utf8("agent-t1") + _utf8("device") + _utf8("s3cret"))
        self.assertFalse(self.client.connected)

    def test_connected_after_connack(self) -> None:
        """A CONNACK accepting the session makes the client connected and fires when_connected."""
        broker = self.start()
        waiting = self.client.when_connected()
        self.assertNoResult(waiting)
        broker.feed(CONNACK_OK)
        self.assertTrue(self.client.connected)
        self.assertIsNone(self.successResultOf(waiting))
        self.assertIsNone(self.successResultOf(self.client.when_connected()))

    def test_subscribe_after_connect_and_receive(self) -> None:
        """Subscriptions are sent once connected; a QoS 1 message reaches the handler and is PUBACKed."""
        self.client.subscribe("$aws/things/t1/tunnels/notify", 1, lambda t, p: self.messages.append((t, p)))
        broker = self.connect()
        [(first, body)] = broker.take()
        self.assertEqual(first, 0x82)
        mid = struct.unpack("!H", body[:2])[0]
        self.assertEqual(body[2:], _utf8("$aws/things/t1/tunnels/notify") + b"\x01")
        broker.feed(suback(mid, 1))
        broker.feed(publish("$aws/things/t1/tunnels/notify", b'{"a": 1}', qos=1, mid=77))
        self.assertEqual(self.messages, [("$aws/things/t1/tunnels/notify", b'{"a": 1}')])
        self.assertEqual(broker.take(), [(0x40, b"\x00\x4d")])

    def test_persistent_session(self) -> None:
        """clean_session=False asks the broker to keep the session (CONNECT flag bit 1 clear)."""
        client = MQTTClient(
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1883), "agent-t1", self.reactor, clean_session=False
        )
        client.startService()
        self.addCleanup(client.stopService)
        [(first, body)] = BrokerSide(self.reactor, 0).take()
        self.assertEqual(body[7], 0x00)

    def test_lost_connection_logged_with_reason(self) -> None:
        """Losing the broker is logged once, with the transport's reason."""
        broker = self.connect()
        broker.drop()
        warnings = [e for e in self.logged if e.get("log_format", "").startswith("Lost the connection")]
        self.assertEqual(len(warnings), 1)
        self.assertIn("Connection to the other side was lost", warnings[0]["reason"])

    def test_lost_before_session_logged(self) -> None:
        """A connection that ends before the CONNACK (a TLS failure, say) is logged with the reason."""
        broker = self.start()
        broker.drop()
        warnings = [e for e in self.logged if "ended before the MQTT session started" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_connect_failure_logged(self) -> None:
        """A broker that cannot be reached is logged with the reason at each attempt, not only the retry."""
        self.client.startService()
        self.addCleanup(self._stop)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("Connection refused")))
        warnings = [e for e in self.logged if e.get("log_format", "").startswith("Could not connect to")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["description"], "the MQTT broker")
        self.assertIn("Connection refused", warnings[0]["error"])
        self.reactor.advance(2.0)
        self.assertEqual(len(self.reactor.tcpClients), 2)  # and it retries

    def test_bytes_one_at_a_time(self) -> None:
        """Packets split at every byte are reassembled."""
        self.client.subscribe("a/b", 1, lambda t, p: self.messages.append((t, p)))
        broker = self.start()
        broker.take()
        broker.feed(CONNACK_OK, one_byte_at_a_time=True)
        self.assertTrue(self.client.connected)
        broker.take()
        payload = b"x" * 300  # a two-byte remaining length
        broker.feed(publish("a/b", payload, qos=1, mid=5) + publish("a/b", b"second", qos=0), one_byte_at_a_time=True)
        self.assertEqual(self.messages, [("a/b", payload), ("a/b", b"second")])

    def test_several_packets_in_one_read(self) -> None:
        """Several packets arriving together are all handled."""
        self.client.subscribe("a/b", 1, lambda t, p: self.messages.append(p))
        broker = self.start()
        broker.take()
        broker.feed(CONNACK_OK + publish("a/b", b"1", qos=1, mid=1) + publish("a/b", b"2", qos=1, mid=2))
        self.assertEqual(self.messages, [b"1", b"2"])
        packets = broker.take()
        self.assertIn((0x40, b"\x00\x01"), packets)
        self.assertIn((0x40, b"\x00\x02"), packets)

    def test_refused_subscription_is_logged(self) -> None:
        """A SUBACK refusing the subscription (0x80) is logged as an error naming the topic."""
        self.client.subscribe("$aws/things/t1/tunnels/notify", 1, lambda t, p: None)
        broker = self.connect()
        [(first, body)] = broker.take()
        broker.feed(suback(struct.unpack("!H", body[:2])[0], 0x80))
        errors = [e for e in self.logged if "refused the subscription" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["topic"], "$aws/things/t1/tunnels/notify")

    def test_handler_failure_is_contained(self) -> None:
        """A handler raising is logged; the message is still acknowledged and the client stays up."""

        def handler(topic, payload):
            raise ValueError("boom")

        self.client.subscribe("a/b", 1, handler)
        broker = self.connect()
        broker.take()
        broker.feed(publish("a/b", b"x", qos=1, mid=9))
        self.assertEqual(broker.take(), [(0x40, b"\x00\x09")])
        self.assertTrue(self.client.connected)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_publish_qos1_fires_on_puback(self) -> None:
        """A QoS 1 publish is written at once; its Deferred fires on the matching PUBACK only."""
        broker = self.connect()
        d = self.client.publish("$aws/things/t1/tunnels/notify", b"payload", 1)
        [(first, body)] = broker.take()
        self.assertEqual(first, 0x32)
        topic = _utf8("$aws/things/t1/tunnels/notify")
        self.assertEqual(body[: len(topic)], topic)
        mid = struct.unpack("!H", body[len(topic) : len(topic) + 2])[0]
        self.assertEqual(body[len(topic) + 2 :], b"payload")
        broker.feed(puback(mid + 1))
        self.assertNoResult(d)
        broker.feed(puback(mid))
        self.assertIsNone(self.successResultOf(d))

    def test_publish_while_disconnected_is_sent_after_connect(self) -> None:
        """A publish made before there is a connection goes out right after the CONNACK."""
        d = self.client.publish("t/x", b"early", 1)
        broker = self.start()
        self.assertEqual([first for first, _ in broker.take()], [0x10])
        broker.feed(CONNACK_OK)
        [(first, body)] = broker.take()
        self.assertEqual(first, 0x32)
        self.assertTrue(body.endswith(b"early"))
        broker.feed(puback(struct.unpack("!H", body[5:7])[0]))
        self.assertIsNone(self.successResultOf(d))

    def test_cancel_withdraws_waiting_publish(self) -> None:
        """Cancelling a publish made while disconnected withdraws it: it is never sent."""
        kept = self.client.publish("t/kept", b"1", 1)
        withdrawn = self.client.publish("t/withdrawn", b"2", 1)
        withdrawn.cancel()
        self.failureResultOf(withdrawn, CancelledError)
        broker = self.start()
        broker.take()
        broker.feed(CONNACK_OK)
        packets = broker.take()
        self.assertEqual(len(packets), 1)
        self.assertIn(b"t/kept", packets[0][1])
        self.assertNoResult(kept)
        self.client.stopService()
        self.failureResultOf(kept, MQTTClientStopped)

    def test_reconnect_with_backoff_resends_unacknowledged(self) -> None:
        """
        After the connection drops, the client reconnects after the retry policy's delay,
        subscribes again, and sends the unacknowledged QoS 1 message again with DUP set.
        """
        self.client.subscribe("a/b", 1, lambda t, p: None)
        broker = self.connect()
        broker.take()
        d = self.client.publish("t/x", b"once", 1)
        [(first, body)] = broker.take()
        mid = struct.unpack("!H", body[5:7])[0]
        broker.drop()
        self.assertFalse(self.client.connected)
        self.reactor.advance(1.9)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        second = BrokerSide(self.reactor, 1)
        [(connect, _)] = second.take()
        self.assertEqual(connect, 0x10)
        second.feed(CONNACK_OK)
        packets = second.take()
        firsts = sorted(p[0] for p in packets)
        self.assertEqual(firsts, [0x3A, 0x82])  # PUBLISH QoS 1 + DUP, SUBSCRIBE
        self.assertNoResult(d)
        second.feed(puback(mid))
        self.assertIsNone(self.successResultOf(d))

    def test_refused_session(self) -> None:
        """A CONNACK refusing the session is logged, closes the connection, and is retried."""
        broker = self.start()
        broker.take()
        broker.feed(CONNACK_BAD_CREDENTIALS)
        self.assertFalse(self.client.connected)
        self.assertTrue(broker.transport.disconnecting)
        errors = [e for e in self.logged if "refused the MQTT session" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertNotIn("s3cret", repr(errors))
        broker.drop()
        self.reactor.advance(2.1)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_client_from_settings(self) -> None:
        """Parsed broker options make a client of their endpoint, id, login, keep-alive and session kind."""
        settings = MQTTSettings(
            "tcp:host=127.0.0.1:port=1884", "svc-1", username="u", password="pw", keepalive=30
        )
        client = client_from_settings(self.reactor, settings, clean_session=False)
        client.startService()
        self.addCleanup(client.stopService)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 1884))
        [(first, body)] = BrokerSide(self.reactor, 0).take()
        self.assertEqual(body[7], 0x80 | 0x40)  # username, password, persistent session
        self.assertEqual(struct.unpack("!H", body[8:10])[0], 30)
        self.assertEqual(body[10:], _utf8("svc-1") + _utf8("u") + _utf8("pw"))
        self.assertIn("tcp:host=127.0.0.1:port=1884", client.description)

    def test_keepalive_ping(self) -> None:
        """paho's keep-alive runs from the client's tick: a PINGREQ once the session is idle."""
        client = MQTTClient(
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1883), "c", self.reactor, keepalive=1
        )
        client.startService()
        self.addCleanup(client.stopService)
        broker = BrokerSide(self.reactor, 0)
        broker.take()
        broker.feed(CONNACK_OK)
        # paho measures idle time with its own monotonic clock: make the last packet look old.
        client._paho._last_msg_out -= 5
        self.reactor.advance(1.0)
        self.assertEqual(broker.take(), [(0xC0, b"")])
        broker.feed(PINGRESP)
        self.assertTrue(client.connected)

    def test_stop_sends_disconnect_and_fails_waiting_publishes(self) -> None:
        """Stopping sends DISCONNECT, fails unacknowledged publishes, and leaves nothing scheduled."""
        broker = self.connect()
        d = self.client.publish("t/x", b"late", 1)
        broker.take()
        stopped = self.client.stopService()
        self.assertEqual(broker.take(), [(0xE0, b"")])
        self.failureResultOf(d, MQTTClientStopped)
        broker.drop()
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_before_connect(self) -> None:
        """Stopping while never connected fails when_connected and leaves nothing scheduled."""
        self.start()
        waiting = self.client.when_connected()
        self.client.stopService()
        self.failureResultOf(waiting, MQTTClientStopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_publish_qos(self) -> None:
        """QoS 2 is not offered."""
        self.assertRaises(ValueError, self.client.publish, "t", b"", 2)


class SettingsTests(SynchronousTestCase):
    def options(self, **kwargs):
        base = {name[0]: None for name in MQTT_OPTIONS}
        base.update(kwargs)
        return base

    def test_off(self) -> None:
        """No --mqtt: no settings."""
        self.assertIsNone(mqtt_settings(self.options(), "x"))

    def test_extras_need_endpoint(self) -> None:
        """A broker option without --mqtt names the option."""
        e = self.assertRaises(UsageError, mqtt_settings, self.options(mqtt_username="u"), "x")
        self.assertIn("--mqtt-username needs --mqtt", str(e))

    def test_defaults(self) -> None:
        s = mqtt_settings(self.options(mqtt="tcp:host=127.0.0.1:port=1883"), "default-id")
        self.assertEqual(s, MQTTSettings("tcp:host=127.0.0.1:port=1883", "default-id"))

    def test_password_file(self) -> None:
        """The password file's first line is the password; it never shows in repr."""
        fd, path = tempfile.mkstemp()
        os.write(fd, b"hunter2\nignored\n")
        os.close(fd)
        self.addCleanup(os.remove, path)
        s = mqtt_settings(
            self.options(mqtt="tcp:host=h:port=1", mqtt_username="u", mqtt_password_file=path), "x"
        )
        self.assertEqual(s.password, "hunter2")
        self.assertNotIn("hunter2", repr(s))

    def test_bad_combinations(self) -> None:
        cases = [
            (dict(mqtt_password="p"), "--mqtt-password needs --mqtt-username"),
            (dict(mqtt_username="u", mqtt_password="p", mqtt_password_file="f"), "only one of"),
            (dict(mqtt_username="u", mqtt_password_file="/nonexistent/pw"), "cannot read it"),
            (dict(mqtt_ca="/nonexistent/ca.pem"), "tls: endpoints only"),
            (dict(mqtt_cert="/x.pem"), "go together"),
        ]
        for extra, message in cases:
            e = self.assertRaises(UsageError, mqtt_settings, self.options(mqtt="tcp:host=h:port=1", **extra), "x")
            self.assertIn(message, str(e))
        e = self.assertRaises(
            UsageError, mqtt_settings, self.options(mqtt="tls:h:8883", mqtt_ca="/nonexistent/ca.pem"), "x"
        )
        self.assertIn("no such file", str(e))
        fd, ca = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.remove, ca)
        e = self.assertRaises(
            UsageError, mqtt_settings, self.options(mqtt="tls:h:8883", mqtt_cert="/c.pem", mqtt_key="/k.pem"), "x"
        )
        self.assertIn("--mqtt-cert needs --mqtt-ca", str(e))
        e = self.assertRaises(
            UsageError,
            mqtt_settings,
            self.options(mqtt="tls:h:8883", mqtt_ca=ca, mqtt_cert="/nonexistent/c.pem", mqtt_key=ca),
            "x",
        )
        self.assertIn("--mqtt-cert /nonexistent/c.pem: no such file", str(e))

    def test_build_endpoint_with_ca(self) -> None:
        """--mqtt-ca makes a TLS endpoint trusting that CA; a file that is not PEM is refused."""
        from tunnelkit.mqtt import build_endpoint as build

        fd, path = tempfile.mkstemp(suffix=".pem")
        os.write(fd, b"not a certificate")
        os.close(fd)
        self.addCleanup(os.remove, path)
        e = self.assertRaises(UsageError, build, MemoryReactorClock(), MQTTSettings("tls:h:8883", "c", ca_file=path))
        self.assertIn("not a PEM certificate", str(e))

    def test_build_endpoint_plain(self) -> None:
        endpoint = build_endpoint(MemoryReactorClock(), MQTTSettings("tcp:host=127.0.0.1:port=1883", "c"))
        self.assertEqual((endpoint._host, endpoint._port), ("127.0.0.1", 1883))
