"""
End to end over a real mosquitto: the service's notifier publishes, the agent receives.

The notifier runs with its real SQLite queue and MQTT client; the agent with its real MQTT client
(persistent session, as C{--mode agent} runs it).  The agent's sessions are recorded instead of
connecting to a tunnel service: the whole chain with the service and a source proxy is in
L{tests.e2e.test_agent_tunnel}.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, List, Optional

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.mosquitto import MOSQUITTO, Mosquitto
from tests.test_agent import RecordingStarter
from tunnelkit.service.dbrunner import Blocking
from tunnelkit.agent import DEFAULT_TARGETS, Agent, Notification
from tunnelkit.mqtt import MQTTClient, MQTTSettings, build_endpoint
from tunnelkit.service.certs import ensure_certificates
from tunnelkit.service.notify import DATABASE_NAME, MQTTNotifier, SQLiteNotificationQueue

TIMEOUT = 15.0


def fast_retries() -> Callable[[int], float]:
    return backoffPolicy(initialDelay=0.1, maxDelay=0.5, factor=1.5, jitter=lambda: 0.0)


async def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll C{condition} on the real reactor until it is true; fail naming C{what} after C{timeout}."""
    waited = 0.0
    while True:
        value = condition()
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await task.deferLater(reactor, 0.05)
        waited += 0.05


class AgentOverMosquittoTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if MOSQUITTO is None:
            raise SkipTest("mosquitto is not installed")
        self.state_dir = tempfile.mkdtemp(prefix="tunnelkit-notify-")
        self.addCleanup(shutil.rmtree, self.state_dir, True)
        self.logged: List[dict] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    async def start_broker(self, **kwargs: Any) -> Mosquitto:
        broker = Mosquitto(reactor, **kwargs)
        self.addCleanup(broker.cleanup)
        await broker.start()
        return broker

    def client(
        self,
        broker: Mosquitto,
        client_id: str,
        clean_session: bool = True,
        ca_file: Optional[str] = None,
        cert_file: Optional[str] = None,
        key_file: Optional[str] = None,
        **kwargs: Any,
    ) -> MQTTClient:
        settings = MQTTSettings(broker.endpoint, client_id, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        return MQTTClient(
            build_endpoint(reactor, settings),
            client_id,
            reactor,
            retry_policy=fast_retries(),
            clean_session=clean_session,
            **kwargs,
        )

    def keep_running(self, service: Any) -> None:
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)

    def start_agent(self, broker: Mosquitto) -> RecordingStarter:
        starter = RecordingStarter()
        top = MultiService()
        agent = Agent("t1", self.client(broker, "tunnelkit-agent-t1", clean_session=False), starter, DEFAULT_TARGETS)
        agent.setServiceParent(top)
        agent.mqtt.setServiceParent(top)
        self.agent = agent
        self.keep_running(top)
        return starter

    def start_notifier(self, broker: Mosquitto) -> MQTTNotifier:
        queue = SQLiteNotificationQueue(os.path.join(self.state_dir, DATABASE_NAME))
        self.addCleanup(queue.close)
        top = MultiService()
        client = self.client(broker, "tunnelkit-service")
        client.setServiceParent(top)
        notifier = MQTTNotifier(queue, client, reactor)
        notifier.setServiceParent(top)
        self.keep_running(top)
        self.notifier_top = top
        return notifier

    async def test_delivery(self) -> None:
        """OpenTunnel's notification reaches the agent, which starts a session with its token."""
        broker = await self.start_broker()
        starter = self.start_agent(broker)
        await self.agent.mqtt.when_connected()
        notifier = self.start_notifier(broker)
        await wait_for(lambda: self.agent.mqtt.connected and self.subscribed(), "the agent's subscription")
        notifier.notify_destination("tun-1", "t1", "token-1", ("SSH", "HTTP"), "us-east-1")
        [session] = await wait_for(lambda: starter.sessions, "a session")
        self.assertEqual(session.notification, Notification("token-1", ("SSH", "HTTP"), "us-east-1", "tun-1"))
        self.assertEqual(session.endpoint, "data.tunneling.iot.us-east-1.amazonaws.com:443")
        self.assertEqual(session.targets, {"SSH": ("127.0.0.1", 22), "HTTP": ("127.0.0.1", 80)})
        await wait_for(lambda: not Blocking(notifier.queue).pending(), "the queue to empty")
        self.assertNotIn("token-1", repr(self.logged))

    def subscribed(self) -> bool:
        return self.subscriptions() > 0

    def subscriptions(self) -> int:
        """How many times an MQTT client subscribed (the agent, after each connection)."""
        return sum(1 for e in self.logged if e.get("log_format", "").startswith("Subscribed to"))

    def failed_attempts(self) -> int:
        """How many connection attempts to the broker failed."""
        return sum(1 for e in self.logged if e.get("log_format", "").startswith("Could not connect to"))

    async def test_broker_down_at_open(self) -> None:
        """
        The broker is stopped before the open and started after: the notification waits in the
        queue and is delivered once the broker is back (the agent's session survives the restart).
        """
        broker = await self.start_broker()
        starter = self.start_agent(broker)
        await wait_for(self.subscribed, "the agent's subscription")
        notifier = self.start_notifier(broker)
        await self.notifier_top.services[0].when_connected()
        await broker.stop()
        failures = self.failed_attempts()
        notifier.notify_destination("tun-1", "t1", "token-1", ("SSH",), "us-east-1")
        self.assertEqual(len(Blocking(notifier.queue).pending()), 1)
        await wait_for(lambda: self.failed_attempts() > failures, "an attempt to reach the stopped broker")
        self.assertEqual(starter.sessions, [])
        await broker.start()
        [session] = await wait_for(lambda: starter.sessions, "the session after the broker restart")
        self.assertEqual(session.notification.access_token, "token-1")
        await wait_for(lambda: not Blocking(notifier.queue).pending(), "the queue to empty")

    async def test_service_restart(self) -> None:
        """Queued while the broker is down, the service restarts, and the new process delivers it."""
        broker = await self.start_broker()
        starter = self.start_agent(broker)
        await wait_for(self.subscribed, "the agent's subscription")
        await broker.stop()
        notifier = self.start_notifier(broker)
        notifier.notify_destination("tun-1", "t1", "token-1", ("SSH",), "us-east-1")
        await self.notifier_top.stopService()
        subscriptions = self.subscriptions()
        await broker.start()
        await wait_for(lambda: self.subscriptions() > subscriptions, "the agent back on the restarted broker")
        self.assertEqual(starter.sessions, [])  # the stopped service delivered nothing
        restarted = self.start_notifier(broker)
        [session] = await wait_for(lambda: starter.sessions, "the session from the restarted service")
        self.assertEqual(session.notification.tunnel_id, "tun-1")
        await wait_for(lambda: not Blocking(restarted.queue).pending(), "the queue to empty")

    async def test_rotation_and_second_tunnel(self) -> None:
        """A rotated token replaces the tunnel's session; another tunnel runs alongside."""
        broker = await self.start_broker()
        starter = self.start_agent(broker)
        await wait_for(self.subscribed, "the agent's subscription")
        notifier = self.start_notifier(broker)
        notifier.notify_destination("tun-1", "t1", "token-1", ("SSH",), "us-east-1")
        await wait_for(lambda: len(starter.sessions) == 1, "the first session")
        notifier.notify_destination("tun-2", "t1", "token-2", ("SSH", "FTP"), "us-east-1")
        await wait_for(lambda: len(starter.sessions) == 2, "the second tunnel's session")
        notifier.notify_destination("tun-1", "t1", "token-1b", ("SSH",), "us-east-1")
        await wait_for(lambda: len(starter.sessions) == 3, "the rotated session")
        first, second, rotated = starter.sessions
        self.assertTrue(first.ended.called)
        self.assertFalse(second.ended.called)
        self.assertEqual(rotated.notification.access_token, "token-1b")
        self.assertEqual(sorted(n.access_token for n in self.agent.running_sessions()), ["token-1b", "token-2"])

    async def test_bad_notifications(self) -> None:
        """Bad payloads published by anyone are logged with the reason; the agent keeps working."""
        broker = await self.start_broker()
        starter = self.start_agent(broker)
        await wait_for(self.subscribed, "the agent's subscription")
        other = self.client(broker, "someone")
        self.keep_running(other)
        await other.when_connected()
        topic = "$aws/things/t1/tunnels/notify"
        for payload in [
            b"not json",
            json.dumps({"clientAccessToken": "x", "clientMode": "source", "region": "r", "services": ["SSH"]}).encode(),
            json.dumps({"clientAccessToken": "x", "clientMode": "destination", "region": "r", "services": ["RDP"]}).encode(),
            json.dumps({"clientMode": "destination", "region": "r", "services": ["SSH"]}).encode(),
            b"{" + b" " * (1024 * 1024) + b"}",
        ]:
            await other.publish(topic, payload, 1)
        await wait_for(
            lambda: len([e for e in self.logged if e.get("log_format", "").startswith("Ignored a notification")]) == 5,
            "five refusals",
        )
        await other.publish(
            topic,
            json.dumps({"clientAccessToken": "ok", "clientMode": "destination", "region": "r", "services": ["SSH"]}).encode(),
            1,
        )
        await wait_for(lambda: starter.sessions, "a session from the good notification")

    async def test_credentials(self) -> None:
        """A broker requiring a password: right credentials connect, wrong ones are refused and logged."""
        broker = await self.start_broker(users={"device": "right"})
        good = self.client(broker, "good", username="device", password="right")
        self.keep_running(good)
        await good.when_connected()
        bad = self.client(broker, "bad", username="device", password="wrong")
        self.keep_running(bad)
        await wait_for(
            lambda: any("refused the MQTT session" in e.get("log_format", "") for e in self.logged), "the refusal"
        )
        self.assertFalse(bad.connected)
        self.assertNotIn("wrong", repr([e for e in self.logged if "refused" in e.get("log_format", "")]))

    async def test_tls_broker(self) -> None:
        """A TLS broker: --mqtt-ca with its CA connects and delivers; another CA is refused."""
        certificates = ensure_certificates(os.path.join(self.state_dir, "tls"))
        broker = await self.start_broker(tls=(certificates.ca_cert, certificates.server_cert, certificates.server_key))
        received: List[bytes] = []
        subscriber = self.client(broker, "sub", ca_file=certificates.ca_cert)
        subscriber.subscribe("a/b", 1, lambda topic, payload: received.append(payload))
        self.keep_running(subscriber)
        await subscriber.when_connected()
        await wait_for(self.subscribed, "the subscription")
        publisher = self.client(broker, "pub", ca_file=certificates.ca_cert)
        self.keep_running(publisher)
        await publisher.publish("a/b", b"over tls", 1)
        await wait_for(lambda: received == [b"over tls"], "the message over TLS")

        other = ensure_certificates(os.path.join(self.state_dir, "other-ca"))
        stranger = self.client(broker, "stranger", ca_file=other.ca_cert)
        self.keep_running(stranger)
        await wait_for(
            lambda: any("ended before the MQTT session started" in e.get("log_format", "") for e in self.logged),
            "the TLS failure to be logged",
        )
        self.assertFalse(stranger.connected)

    async def test_client_certificate(self) -> None:
        """A broker requiring client certificates (as AWS IoT Core): --mqtt-cert/--mqtt-key connect."""
        directory = os.path.join(self.state_dir, "mtls")
        certificates = ensure_certificates(directory)
        cert_file, key_file = issue_client_certificate(directory, "t1")
        broker = await self.start_broker(
            tls=(certificates.ca_cert, certificates.server_cert, certificates.server_key), require_certificate=True
        )
        device = self.client(broker, "t1", ca_file=certificates.ca_cert, cert_file=cert_file, key_file=key_file)
        self.keep_running(device)
        await device.when_connected()
        anonymous = self.client(broker, "anonymous", ca_file=certificates.ca_cert)
        self.keep_running(anonymous)
        await wait_for(
            lambda: any("ended before the MQTT session started" in e.get("log_format", "") for e in self.logged),
            "the certificate-less client to be turned away",
        )
        self.assertFalse(anonymous.connected)


def issue_client_certificate(directory: str, name: str):
    """A client certificate for C{name} signed by the CA in C{directory} (ca.pem, ca.key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    with open(os.path.join(directory, "ca.pem"), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(directory, "ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file = os.path.join(directory, f"{name}.pem")
    key_file = os.path.join(directory, f"{name}.key")
    with open(cert_file, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_file, key_file
