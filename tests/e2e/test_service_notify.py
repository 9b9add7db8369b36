"""
End-to-end: the service with C{--mqtt} publishes the destination token to a real mosquitto on
OpenTunnel with a thing name and on RotateTunnelAccessToken DESTINATION with a destination config
(reference section 4.1); a device-side MQTT subscriber receives it.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Dict, List

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.mosquitto import MOSQUITTO, Mosquitto
from tests.e2e.test_service_inprocess import boto3_client, start_service


class Subscriber:
    """A device's MQTT subscription on its notify topic (paho, its own network thread)."""

    def __init__(self, port: int, thing: str) -> None:
        self.messages: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.topics: List[str] = []
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"device-{thing}")
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"$aws/things/{thing}/tunnels/notify", qos=1)
        self._client.on_subscribe = lambda c, u, mid, codes, p: self._subscribed.set()
        self._client.on_message = self._message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        self.topics.append(message.topic)
        self.messages.put(json.loads(message.payload))

    def wait_subscribed(self) -> None:
        if not self._subscribed.wait(10):
            raise AssertionError("the subscriber did not subscribe within 10 s")

    def next(self) -> Dict[str, Any]:
        return self.messages.get(timeout=15)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class NotifyTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_open_and_rotate_notify(self) -> Any:
        if MOSQUITTO is None:
            raise SkipTest("mosquitto is not installed")
        broker = Mosquitto(reactor)
        yield broker.start()
        self.addCleanup(broker.cleanup)
        service = yield start_service(self, "--mqtt", broker.endpoint)
        port = int(broker.endpoint.rsplit("=", 1)[1])
        subscriber = yield deferToThread(Subscriber, port, "RemoteDeviceA")
        self.addCleanup(subscriber.stop)
        yield deferToThread(subscriber.wait_subscribed)
        key = (yield service.store.list_access_keys())[0]
        credentials = dict(aws_access_key_id=key.access_key_id, aws_secret_access_key=key.secret_access_key)

        def open_tunnel() -> Dict[str, Any]:
            api = boto3_client(service, **credentials)
            try:
                return api.open_tunnel(destinationConfig={"thingName": "RemoteDeviceA", "services": ["SSH"]})
            finally:
                api.close()

        opened = yield deferToThread(open_tunnel)
        message = yield deferToThread(subscriber.next)
        self.assertEqual(
            {k: message[k] for k in ("clientAccessToken", "clientMode", "region", "services")},
            {
                "clientAccessToken": opened["destinationAccessToken"],
                "clientMode": "destination",
                "region": "us-east-1",
                "services": ["SSH"],
            },
        )
        self.assertEqual(subscriber.topics, ["$aws/things/RemoteDeviceA/tunnels/notify"])

        def rotate() -> Dict[str, Any]:
            api = boto3_client(service, **credentials)
            try:
                return api.rotate_tunnel_access_token(
                    tunnelId=opened["tunnelId"], clientMode="DESTINATION",
                    destinationConfig={"thingName": "RemoteDeviceA", "services": ["SSH"]},
                )
            finally:
                api.close()

        rotated = yield deferToThread(rotate)
        message = yield deferToThread(subscriber.next)
        self.assertEqual(message["clientAccessToken"], rotated["destinationAccessToken"])
        self.assertEqual(message["services"], ["SSH"])
