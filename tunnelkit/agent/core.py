# -*- test-case-name: tests.test_agent -*-
"""
The device agent: takes destination tokens from MQTT and runs destination sessions for them.

It subscribes (QoS 1) to C{$aws/things/<thing>/tunnels/notify} (reference section 4) and, for each
valid notification, starts a destination session in this process, through an
L{IDestinationStarter} (L{tunnelkit.agent.starter} plugs in the local proxy's destination).  Unlike
AWS's Device Client it runs several tunnels at once and several services per tunnel, and maps any
service id to any target (C{-d SERVICE=HOST:PORT}).

Bookkeeping:
  - a notification whose token was seen before is a duplicate (MQTT QoS 1 may deliver twice):
    ignored;
  - a notification naming the tunnel of a running session (C{tunnelId}, which tunnelkit's service
    adds to the AWS payload) carries a rotated token: the old session stops, the new one starts;
    without C{tunnelId} (AWS's service) the old session ends when the service refuses its token;
  - a session that ends by itself (tunnel closed, token refused) is forgotten.

Bad notifications (not JSON, not for a destination, an unknown service, no token, too large) are
logged with the reason and ignored.  Tokens are never logged: a short fingerprint stands in.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from tunnelkit.adapters import Target, describe_target
from tunnelkit.errors import TunnelkitError
from tunnelkit.localproxy.endpoint import region_host
from tunnelkit.mqtt import IMQTTClient
from tunnelkit.protocol.notification import REGION_RE, SERVICE_RE, TUNNEL_ID_RE, notify_topic
from tunnelkit.protocol.tokens import MAX_ACCESS_TOKEN_LENGTH, sendable_access_token

__all__ = [
    "Agent",
    "BadNotification",
    "DEFAULT_TARGETS",
    "IDestinationSession",
    "IDestinationStarter",
    "MAX_NOTIFICATION_SIZE",
    "Notification",
    "data_endpoint_for_region",
    "notify_topic",
    "parse_notification",
]

log = Logger()

#: The agent's service -> target table unless configured (reference section 4.2 has SSH and VNC).
DEFAULT_TARGETS: Dict[str, Target] = {
    "SSH": ("127.0.0.1", 22),
    "VNC": ("127.0.0.1", 5900),
    "HTTP": ("127.0.0.1", 80),
    "FTP": ("127.0.0.1", 21),
}

#: A real notification is well under 5 KB (a token is at most 4096 characters).
MAX_NOTIFICATION_SIZE = 64 * 1024



class BadNotification(TunnelkitError):
    """A notification the agent cannot act on; the message says why (never quoting the token)."""


def data_endpoint_for_region(region: str) -> str:
    """AWS's data-plane endpoint for C{region}: its host (as the local proxy's C{-r}), port 443."""
    return f"{region_host(region)}:443"


def token_fingerprint(token: str) -> str:
    """A short, one-way name for a token, fit for logs."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Notification:
    """A valid notification: the destination token, its services, and where to connect."""

    access_token: str = field(repr=False)
    services: Tuple[str, ...]
    region: Optional[str]
    tunnel_id: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        """The token's short one-way name (L{token_fingerprint}), fit for logs."""
        return token_fingerprint(self.access_token)

    @property
    def name(self) -> str:
        """How logs name it: the tunnel id if known, else the token's fingerprint."""
        return self.tunnel_id or f"token {self.fingerprint}"


def parse_notification(
    payload: bytes, known_services: Mapping[str, Any], region_required: bool = True
) -> Notification:
    """
    Check a notify-topic payload (reference section 4.1) and return what it asks for.

    @param known_services: the services this agent can reach; any other is refused.
    @param region_required: False when the data-plane endpoint is configured.
    @raise BadNotification: saying what is wrong.
    """
    if len(payload) > MAX_NOTIFICATION_SIZE:
        raise BadNotification(f"payload of {len(payload)} bytes is over the {MAX_NOTIFICATION_SIZE}-byte limit")
    try:
        document = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadNotification("payload is not UTF-8 text") from None
    except ValueError as e:
        raise BadNotification(f"payload is not valid JSON ({e})") from None
    if not isinstance(document, dict):
        raise BadNotification(f"payload is a JSON {type(document).__name__}, not an object")

    mode = document.get("clientMode")
    if not isinstance(mode, str) or mode.lower() != "destination":
        raise BadNotification(f"clientMode is {mode!r}, not 'destination'")

    token = document.get("clientAccessToken")
    if not isinstance(token, str) or not token:
        raise BadNotification("no clientAccessToken")
    if not sendable_access_token(token):
        raise BadNotification(
            f"clientAccessToken is not a token (over {MAX_ACCESS_TOKEN_LENGTH} characters or control characters)"
        )

    services = document.get("services")
    if not isinstance(services, list) or not services:
        raise BadNotification("no services requested")
    for service in services:
        if not isinstance(service, str) or not SERVICE_RE.match(service):
            raise BadNotification(f"service {service!r} is not a service id")
    if len(set(services)) != len(services):
        raise BadNotification(f"services {services!r} name a service twice")
    unknown = [s for s in services if s not in known_services]
    if unknown:
        raise BadNotification(
            f"unknown service {unknown[0]!r}: this agent maps {', '.join(sorted(known_services)) or 'nothing'}"
            f" (add it with -d {unknown[0]}=HOST:PORT)"
        )

    region = document.get("region")
    if region is not None and (not isinstance(region, str) or not REGION_RE.match(region)):
        raise BadNotification(f"region {region!r} is not a region name")
    if region is None and region_required:
        raise BadNotification("no region, and no --proxy-endpoint configured")

    tunnel_id = document.get("tunnelId")
    if tunnel_id is not None and (not isinstance(tunnel_id, str) or not TUNNEL_ID_RE.match(tunnel_id)):
        raise BadNotification(f"tunnelId {tunnel_id!r} is not a tunnel id")
    return Notification(token, tuple(services), region, tunnel_id)


class IDestinationSession(Interface):
    """One running destination session (a local proxy in destination mode, in this process)."""

    ended = Attribute("A Deferred firing when the session ends by itself (tunnel closed, token refused).")

    def stop() -> Deferred:
        """End the session: close its WebSocket and local connections; fires when done."""


class IDestinationStarter(Interface):
    """Starts destination sessions for the agent."""

    def start(
        notification: Notification, endpoint: str, targets: Mapping[str, Target]
    ) -> IDestinationSession:
        """
        Connect to the data plane at C{endpoint} (C{host:port}) with the notification's token and
        carry its services to C{targets} (exactly the notification's services).
        """


class Agent(Service):
    """
    The agent's bookkeeping, between an L{IMQTTClient} and an L{IDestinationStarter}.  See the
    module docstring.
    """

    def __init__(
        self,
        thing_name: str,
        mqtt: IMQTTClient,
        starter: IDestinationStarter,
        targets: Mapping[str, Target],
        proxy_endpoint: Optional[str] = None,
        remembered_tokens: int = 1024,
        clock: Optional[IReactorTime] = None,
        stop_timeout: float = 3.0,
        max_sessions: int = 32,
    ) -> None:
        """
        @param clock: with it, stopping waits at most C{stop_timeout} seconds for the sessions to
            close (a peer that never answers a close must not hold the process).
        """
        self.thing_name = thing_name
        self.topic = notify_topic(thing_name)
        self.mqtt = mqtt
        self._starter = starter
        self.targets = dict(targets)
        self.proxy_endpoint = proxy_endpoint
        self._seen: "OrderedDict[str, None]" = OrderedDict()
        self._remembered = remembered_tokens
        self.sessions: Dict[str, Tuple[Notification, IDestinationSession]] = {}
        self._clock = clock
        self._stop_timeout = stop_timeout
        self.max_sessions = max_sessions

    def startService(self) -> None:
        super().startService()
        self.mqtt.subscribe(self.topic, 1, self.notification_received)
        log.info(
            "Agent of thing {thing_name} listening on {topic}; services: {services}",
            thing_name=self.thing_name,
            topic=self.topic,
            services=", ".join(f"{name}->{describe_target(target)}" for name, target in sorted(self.targets.items())),
        )

    def stopService(self) -> Deferred:
        super().stopService()
        sessions, self.sessions = self.sessions, {}
        stops = [maybeDeferred(session.stop) for _, session in sessions.values()]
        done: Deferred = DeferredList(stops, consumeErrors=True)
        if self._clock is not None and stops:

            def gave_up(result: Any, timeout: float) -> None:
                log.warn(
                    "{count} destination session(s) did not close within {timeout} s; stopping anyway",
                    count=len(stops),
                    timeout=timeout,
                )

            done.addTimeout(self._stop_timeout, self._clock, onTimeoutCancel=gave_up)
        return done.addCallback(lambda _: None)

    def notification_received(self, topic: str, payload: bytes) -> None:
        """Handle one message of the notify topic (the MQTT client's handler)."""
        try:
            notification = parse_notification(payload, self.targets, region_required=self.proxy_endpoint is None)
        except BadNotification as e:
            log.warn("Ignored a notification on {topic}: {reason}", topic=topic, reason=str(e))
            return
        if not self.running:
            return
        if notification.fingerprint in self._seen:
            log.info("Ignored a duplicate notification for {name}", name=notification.name)
            return
        self._remember(notification.fingerprint)
        key = notification.tunnel_id or notification.fingerprint
        if key not in self.sessions and len(self.sessions) >= self.max_sessions:
            log.warn(
                "Ignored the notification for {name}: {count} sessions already run (the most allowed; "
                "see --max-sessions)",
                name=notification.name,
                count=len(self.sessions),
            )
            return
        replaced = self.sessions.pop(key, None)
        if replaced is not None:
            log.info("Tunnel {tunnel_id}: new destination token; replacing its session", tunnel_id=key)
            maybeDeferred(replaced[1].stop).addErrback(
                lambda f: log.failure("Stopping the replaced session of {tunnel_id} failed", f, tunnel_id=key)
            )
        self._start(key, notification)

    def _endpoint(self, notification: Notification) -> str:
        if self.proxy_endpoint is not None:
            return self.proxy_endpoint
        assert notification.region is not None
        return data_endpoint_for_region(notification.region)

    def _start(self, key: str, notification: Notification) -> None:
        endpoint = self._endpoint(notification)
        targets = {service: self.targets[service] for service in notification.services}
        try:
            session = self._starter.start(notification, endpoint, targets)
        except Exception:
            log.failure("Could not start a destination session for {name}", name=notification.name)
            return
        self.sessions[key] = (notification, session)
        log.info(
            "Started a destination session for {name} to {endpoint}: {services}",
            name=notification.name,
            endpoint=endpoint,
            services=", ".join(f"{s}->{describe_target(t)}" for s, t in targets.items()),
        )
        session.ended.addBoth(self._ended, key, session)

    def _ended(self, result: Any, key: str, session: IDestinationSession) -> None:
        current = self.sessions.get(key)
        if current is not None and current[1] is session:
            del self.sessions[key]
            if isinstance(result, Failure):
                log.warn("Destination session {name} ended: {reason}", name=current[0].name, reason=result.getErrorMessage())
            else:
                log.info("Destination session {name} ended", name=current[0].name)

    def _remember(self, fingerprint: str) -> None:
        self._seen[fingerprint] = None
        while len(self._seen) > self._remembered:
            self._seen.popitem(last=False)

    def running_sessions(self) -> List[Notification]:
        """The notifications of the sessions running now."""
        return [notification for notification, _ in self.sessions.values()]

