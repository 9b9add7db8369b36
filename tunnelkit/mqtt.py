# -*- test-case-name: tests.test_mqtt -*-
"""
An MQTT 3.1.1 client driven by the Twisted reactor, for the service's notifier and the device agent.

The MQTT protocol itself is paho-mqtt's (2.x): packet encoding and decoding, QoS 1 bookkeeping,
resending unacknowledged publishes after a reconnect, keep-alive pings.  Everything that touches the
network is Twisted's: the connection is made by a client endpoint (C{tcp:}, C{tls:}, C{unix:}, ...)
and kept up by L{ClientService} with a backoff policy, so nothing ever blocks the reactor (paho's own
C{connect()} resolves names, connects and does the TLS handshake blocking).  paho talks to the
connection through L{_TransportSocket}, a socket-like object over the Twisted transport; the one
private paho hook used is C{Client._create_socket} (stable across paho 2.x; listed and checked at
start in L{tunnelkit.internals}).

Public surface: L{MQTTClient} (a service providing L{IMQTTClient}: C{subscribe}, C{publish}), L{MQTT_OPTIONS} (the command-line
options shared by the service and the agent), L{mqtt_settings} and L{build_endpoint}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from zope.interface import Attribute, Interface, implementer

from tunnelkit.config import client_endpoint
from tunnelkit.errors import TunnelkitError

__all__ = [
    "IMQTTClient",
    "MQTTClient",
    "MQTTClientStopped",
    "MQTTSettings",
    "MQTT_OPTIONS",
    "mqtt_settings",
    "build_endpoint",
    "client_from_settings",
]

log = Logger()

#: Command-line options naming the broker, shared by C{--mode service} and C{--mode agent}.
MQTT_OPTIONS: List[List[Any]] = [
    [
        "mqtt",
        None,
        None,
        "MQTT broker, as a Twisted client endpoint: tcp:host=HOST:port=1883, "
        "tls:HOST:8883 (with --mqtt-ca), unix:path=/run/mosquitto.sock.",
        client_endpoint,
    ],
    ["mqtt-username", None, None, "User name for the MQTT broker."],
    ["mqtt-password", None, None, "Password for the MQTT broker (prefer --mqtt-password-file)."],
    ["mqtt-password-file", None, None, "File holding the MQTT password (first line)."],
    ["mqtt-ca", None, None, "PEM file of the CA that signs the broker's certificate (tls: endpoints)."],
    ["mqtt-cert", None, None, "PEM file of this client's certificate, for brokers that require one "
     "(AWS IoT Core); with --mqtt-key."],
    ["mqtt-key", None, None, "PEM file of the private key of --mqtt-cert."],
    ["mqtt-client-id", None, None, "MQTT client identifier (default: derived from the mode)."],
]


class MQTTClientStopped(TunnelkitError):
    """The MQTT client was stopped before a publish was acknowledged."""


@dataclass(frozen=True)
class MQTTSettings:
    """Where the broker is and how to log in (the password is never logged)."""

    endpoint: str
    client_id: str
    username: Optional[str] = None
    password: Optional[str] = None
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    keepalive: int = 60

    def __repr__(self) -> str:
        hidden = "<hidden>" if self.password is not None else None
        return (
            f"MQTTSettings(endpoint={self.endpoint!r}, client_id={self.client_id!r}, "
            f"username={self.username!r}, password={hidden}, ca_file={self.ca_file!r}, "
            f"cert_file={self.cert_file!r})"
        )


def _option(options: Mapping[str, Any], name: str) -> Any:
    """C{options[name]}, the option's long name with dashes (usage.Options) or underscores."""
    value = options.get(name)
    if value is None:
        value = options.get(name.replace("-", "_"))
    return value


def mqtt_settings(options: Mapping[str, Any], default_client_id: str) -> Optional[MQTTSettings]:
    """
    Read the L{MQTT_OPTIONS} out of parsed options (keyed by long names, C{mqtt-username}).

    @return: None when C{--mqtt} is absent.
    @raise UsageError: naming the option that is wrong.
    """
    endpoint = _option(options, "mqtt")
    extras = [
        name
        for name in (
            "mqtt-username", "mqtt-password", "mqtt-password-file", "mqtt-ca", "mqtt-cert", "mqtt-key", "mqtt-client-id"
        )
        if _option(options, name)
    ]
    if not endpoint:
        if extras:
            raise UsageError(f"--{extras[0]} needs --mqtt ENDPOINT")
        return None
    password = _option(options, "mqtt-password")
    password_file = _option(options, "mqtt-password-file")
    if password and password_file:
        raise UsageError("give only one of --mqtt-password and --mqtt-password-file")
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise UsageError(f"--mqtt-password-file {password_file}: cannot read it: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--mqtt-password-file {password_file}: not UTF-8 text") from None
    username = _option(options, "mqtt-username") or None
    if password and not username:
        raise UsageError("--mqtt-password needs --mqtt-username")
    ca_file = _option(options, "mqtt-ca") or None
    if ca_file is not None:
        kind = endpoint.split(":", 1)[0].lower()
        if kind != "tls":
            raise UsageError(f"--mqtt-ca applies to tls: endpoints only, not {endpoint!r}")
        if not os.path.isfile(ca_file):
            raise UsageError(f"--mqtt-ca {ca_file}: no such file")
    cert_file = _option(options, "mqtt-cert") or None
    key_file = _option(options, "mqtt-key") or None
    if bool(cert_file) != bool(key_file):
        raise UsageError("--mqtt-cert and --mqtt-key go together")
    if cert_file is not None and ca_file is None:
        raise UsageError("--mqtt-cert needs --mqtt-ca (the CA of the broker's certificate)")
    for option, path in (("--mqtt-cert", cert_file), ("--mqtt-key", key_file)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{option} {path}: no such file")
    client_id = _option(options, "mqtt-client-id") or default_client_id
    if not 1 <= len(client_id.encode("utf-8")) <= 65535:
        raise UsageError("--mqtt-client-id must be 1 to 65535 bytes")
    return MQTTSettings(endpoint, client_id, username, password or None, ca_file, cert_file, key_file)


def build_endpoint(reactor: Any, settings: MQTTSettings) -> IStreamClientEndpoint:
    """
    The client endpoint to reach the broker: C{settings.endpoint} as Twisted parses it, except that
    with C{ca_file} a C{tls:HOST:PORT} endpoint trusts the CA certificates of that PEM file only,
    checks the host name (or IP address) and speaks TLS 1.2 or later.

    @raise UsageError: if C{ca_file} holds no PEM certificate.
    """
    from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS

    from tunnelkit.internals import parse_endpoint_description

    if settings.ca_file is None:
        return clientFromString(reactor, settings.endpoint)
    from twisted.internet.ssl import (
        PrivateCertificate,
        TLSVersion,
        optionsForClientTLS,
        trustRootFromCertificates,
    )

    from tunnelkit.transport.tls import pem_certificates

    args, kwargs = parse_endpoint_description(settings.endpoint)
    host = cast(str, kwargs.get("host", args[1] if len(args) > 1 else None))
    port = int(kwargs.get("port", args[2] if len(args) > 2 else 8883))
    try:
        with open(settings.ca_file, "rb") as f:
            authorities = pem_certificates(f.read())
    except Exception as e:
        raise UsageError(f"--mqtt-ca {settings.ca_file}: not a PEM certificate ({e})") from None
    if not authorities:
        raise UsageError(f"--mqtt-ca {settings.ca_file}: not a PEM certificate (no BEGIN CERTIFICATE)")
    client_certificate = None
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            with open(settings.cert_file, "rb") as f:
                certificate_pem = f.read()
            with open(settings.key_file, "rb") as f:
                key_pem = f.read()
            client_certificate = PrivateCertificate.loadPEM(certificate_pem + b"\n" + key_pem)
        except Exception as e:
            raise UsageError(
                f"--mqtt-cert {settings.cert_file} / --mqtt-key {settings.key_file}: not a PEM certificate "
                f"and its private key ({e})"
            ) from None
    tls = optionsForClientTLS(
        host,
        trustRoot=trustRootFromCertificates(authorities),
        clientCertificate=client_certificate,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
    )
    return wrapClientTLS(tls, HostnameEndpoint(reactor, host, port))


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Logs why a connection attempt to the broker failed (ClientService only logs the retry)."""

    def __init__(self, endpoint: IStreamClientEndpoint, description: str) -> None:
        self._endpoint = endpoint
        self._description = description

    def connect(self, factory: Any) -> Deferred:
        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError):
                log.warn(
                    "Could not connect to {description}: {error}; retrying (is the broker running? check --mqtt)",
                    description=self._description,
                    error=failure.getErrorMessage().rstrip("."),
                )
            return failure

        return self._endpoint.connect(factory).addErrback(failed)

    def __repr__(self) -> str:
        return f"<{self._description}>"


class _TransportSocket:
    """
    What paho sees as its socket: bytes received from the Twisted transport wait in a buffer until
    paho reads them; what paho sends goes straight to C{transport.write} (Twisted buffers it).
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._incoming = bytearray()
        self.closed = False

    def feed(self, data: bytes) -> None:
        self._incoming += data

    def buffered(self) -> int:
        return len(self._incoming)

    def recv(self, size: int) -> bytes:
        if not self._incoming:
            if self.closed:
                return b""  # paho reads end of stream as a lost connection
            raise BlockingIOError()
        data = bytes(self._incoming[:size])
        del self._incoming[:size]
        return data

    def send(self, data: Any) -> int:
        if self.closed:
            raise ConnectionError("the connection to the MQTT broker is closed")
        self._transport.write(bytes(data))
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._transport.loseConnection()

    def fileno(self) -> int:
        return -1

    def setblocking(self, flag: bool) -> None:
        """Nothing to do: this socket never blocks."""

    def pending(self) -> int:
        return 0


class _Paho(paho.Client):
    """paho's client, taking each new connection's socket from L{MQTTClient} instead of dialling."""

    next_socket: Optional[_TransportSocket] = None

    def _create_socket(self) -> Any:
        sock, self.next_socket = self.next_socket, None
        if sock is None:
            raise ConnectionError("no connection to the MQTT broker to start a session on")
        return sock


class _MQTTProtocol(Protocol):
    """One connection to the broker: hands bytes to paho and tells the client about the ends."""

    def __init__(self, client: "MQTTClient") -> None:
        self._client = client
        self.socket: Optional[_TransportSocket] = None

    def connectionMade(self) -> None:
        self.socket = _TransportSocket(self.transport)
        self._client._connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.socket is not None
        self.socket.feed(data)
        self._client._read(self.socket)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.socket is not None:
            self.socket.closed = True
            self._client._connection_lost(self.socket, reason)


MessageHandler = Callable[[str, bytes], None]


class IMQTTClient(Interface):
    """What the notifier and the agent use of an MQTT client."""

    connected = Attribute("True while the broker has accepted the session.")

    def subscribe(topic: str, qos: int, handler: MessageHandler) -> None:
        """Deliver messages on C{topic} to C{handler(topic, payload)}, across reconnects."""

    def publish(topic: str, payload: bytes, qos: int = 1) -> Deferred:
        """Publish; fires once acknowledged (QoS 1) or written (QoS 0)."""

    def when_connected() -> Deferred:
        """Fires once the broker accepted the session."""


@implementer(IMQTTClient)
class MQTTClient(Service):
    """
    A long-lived MQTT session with one broker: connects, reconnects with backoff, (re)subscribes
    after every connect, and publishes with QoS 0 or 1.

    A publish made while disconnected waits in this client (cancelling its Deferred withdraws it)
    and is sent once connected.  QoS 1 publishes are acknowledged by the broker (PUBACK); one sent
    but not acknowledged when the connection drops is sent again on the next connection (by paho).
    That memory lasts as long as the process: callers needing more persist it.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        client_id: str,
        clock: IReactorTime,
        username: Optional[str] = None,
        password: Optional[str] = None,
        keepalive: int = 60,
        retry_policy: Optional[Callable[[int], float]] = None,
        description: str = "the MQTT broker",
        clean_session: bool = True,
    ) -> None:
        """
        @param clean_session: False for a persistent session: the broker keeps the subscriptions
            and queues QoS 1 messages while this client is away (the client id must be stable
            and used by one process only).
        """
        self._endpoint = endpoint
        self._clock = clock
        self.client_id = client_id
        self.description = description
        self._paho = _Paho(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,
        )
        if username is not None:
            self._paho.username_pw_set(username, password)
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_message = self._on_message
        self._paho.on_publish = self._on_publish
        self._paho.on_subscribe = self._on_subscribe
        # Host and port are only for paho's bookkeeping: the endpoint makes the connection.
        self._paho.connect_async("broker", 1883, keepalive)
        self._subscriptions: Dict[str, Tuple[int, MessageHandler]] = {}
        self._pending_subscribe: Dict[int, str] = {}
        self._acks: Dict[int, Deferred] = {}
        self._waiting: List[List[Any]] = []  # [topic, payload, qos, Deferred] published while disconnected
        self._connection: Optional[_MQTTProtocol] = None
        self._lost_reason: Optional[str] = None
        self._refused = False  # the broker refused the current connection's session (logged)
        self.connected = False
        self._connected_observers: List[Deferred] = []
        factory = Factory.forProtocol(lambda: _MQTTProtocol(self))
        factory.noisy = False  # the connection is logged by name, not as "Starting factory <...>"
        self._client_service = ClientService(
            _ReportingEndpoint(endpoint, description),
            factory,
            retryPolicy=retry_policy or backoffPolicy(initialDelay=1.0, maxDelay=30.0),
            clock=clock,
        )
        self._misc = LoopingCall(self._tick)
        self._misc.clock = clock

    # --- public API ---

    def subscribe(self, topic: str, qos: int, handler: MessageHandler) -> None:
        """
        Deliver messages on C{topic} to C{handler(topic, payload)}; subscribes now if connected and
        again after every reconnect.  A handler's exception is logged and the message acknowledged.
        """
        self._subscriptions[topic] = (qos, handler)
        if self.connected:
            self._send_subscribe(topic, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Deferred:
        """
        Publish C{payload}; the Deferred fires when the broker acknowledged it (QoS 1) or it was
        written (QoS 0), and fails with L{MQTTClientStopped} if the client stops first.
        """
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        entry: List[Any] = [topic, payload, qos]

        def withdraw(d: Deferred) -> None:
            # Waiting here: withdrawn.  Already with paho: paho may still send it; stop waiting.
            self._waiting[:] = [other for other in self._waiting if other is not entry]
            for mid, waiter in list(self._acks.items()):
                if waiter is d:
                    del self._acks[mid]

        d: Deferred = Deferred(withdraw)
        if self.connected:
            self._hand_to_paho(topic, payload, qos, d)
        else:
            entry.append(d)
            self._waiting.append(entry)  # held here, not in paho, so that cancelling withdraws it
        return d

    def _hand_to_paho(self, topic: str, payload: bytes, qos: int, d: Deferred) -> None:
        info = self._paho.publish(topic, payload, qos=qos)
        if qos == 0:
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                d.callback(None)
            else:
                d.errback(ConnectionError(f"not connected to {self.description}"))
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            d.errback(ConnectionError(f"cannot queue the message: {paho.error_string(info.rc)}"))
            return
        # Once handed over, a QoS 1 message stays with paho, which sends it again after a reconnect
        # until acknowledged (NO_CONN: the connection dropped in between; it will be sent).
        self._acks[info.mid] = d

    def when_connected(self) -> Deferred:
        """A Deferred firing (with None) once the broker accepted the session (at once if it has)."""
        d: Deferred = Deferred()
        if self.connected:
            d.callback(None)
        else:
            self._connected_observers.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self._client_service.startService()
        self._misc.start(1.0, now=False)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._misc.running:
            self._misc.stop()
        if self.connected:
            self._paho.disconnect()  # a DISCONNECT packet: the broker drops our will and session
        acks, self._acks = self._acks, {}
        waiting, self._waiting = self._waiting, []
        for d in list(acks.values()) + [entry[3] for entry in waiting]:
            d.errback(MQTTClientStopped(f"stopped before {self.description} acknowledged a message"))
        observers, self._connected_observers = self._connected_observers, []
        for d in observers:
            d.errback(MQTTClientStopped(f"stopped before connecting to {self.description}"))
        return self._client_service.stopService()

    # --- the connection ---

    def _connection_made(self, connection: _MQTTProtocol) -> None:
        self._connection = connection
        self._refused = False
        self._paho.next_socket = connection.socket
        self._paho.reconnect()  # sends CONNECT on the new connection

    def _read(self, sock: _TransportSocket) -> None:
        while self._paho.socket() is sock and sock.buffered():
            before = sock.buffered()
            self._paho.loop_read()
            if sock.buffered() == before:
                break
        self._flush()

    def _flush(self) -> None:
        # Packets queued from inside paho's callbacks (a SUBSCRIBE in on_connect, ...) wait in
        # paho's output queue until loop_write; the transport takes them all at once.
        while self._paho.socket() is not None and self._paho.want_write():
            if self._paho.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break

    def _connection_lost(self, sock: _TransportSocket, reason: Optional[Failure]) -> None:
        self._lost_reason = reason.getErrorMessage() if reason is not None else None
        if not self.connected and self.running and not self._refused:
            # A TLS failure, a broker closing at once: say why, or the retries look silent.
            log.warn(
                "The connection to {description} ended before the MQTT session started: {reason}",
                description=self.description,
                reason=self._lost_reason or "closed",
            )
        if self._paho.socket() is sock:
            self._paho.loop_read()  # paho reads the end of stream and reports the disconnect
        if self._connection is not None and self._connection.socket is sock:
            self._connection = None
        self.connected = False

    def _tick(self) -> None:
        self._paho.loop_misc()  # keep-alive pings
        self._flush()

    # --- paho's callbacks ---

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = True
            log.error(
                "{description} refused the MQTT session of {client_id}: {reason}",
                description=self.description,
                client_id=self.client_id,
                reason=str(reason),
            )
            return
        self.connected = True
        log.info(
            "Connected to {description} as {client_id}", description=self.description, client_id=self.client_id
        )
        for topic, (qos, _) in self._subscriptions.items():
            self._send_subscribe(topic, qos)
        waiting, self._waiting = self._waiting, []
        for topic, payload, qos, d in waiting:
            self._hand_to_paho(topic, payload, qos, d)
        observers, self._connected_observers = self._connected_observers, []
        for d in observers:
            d.callback(None)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected, self.connected = self.connected, False
        lost, self._lost_reason = self._lost_reason, None
        if self.running and was_connected:
            log.warn(
                "Lost the connection to {description} ({reason}); reconnecting",
                description=self.description,
                reason=lost or str(reason),
            )

    def _send_subscribe(self, topic: str, qos: int) -> None:
        result, mid = self._paho.subscribe(topic, qos)
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subscribe[mid] = topic

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        topic = self._pending_subscribe.pop(mid, "?")
        for reason in reasons:
            if reason.is_failure:
                log.error(
                    "{description} refused the subscription to {topic} (check the broker's ACL)",
                    description=self.description,
                    topic=topic,
                )
            else:
                log.info("Subscribed to {topic}", topic=topic)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        topic = message.topic
        handler = None
        for pattern, (_, candidate) in self._subscriptions.items():
            if paho.topic_matches_sub(pattern, topic):
                handler = candidate
                break
        if handler is None:
            log.warn("Ignoring an MQTT message on {topic}: not subscribed", topic=topic)
            return
        try:
            handler(topic, bytes(message.payload))
        except Exception:
            log.failure("Handling an MQTT message on {topic} failed", topic=topic)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        d = self._acks.pop(mid, None)
        if d is not None:
            d.callback(None)


def client_from_settings(
    reactor: Any, settings: MQTTSettings, clock: Optional[IReactorTime] = None, clean_session: bool = True
) -> MQTTClient:
    """
    The L{MQTTClient} of parsed broker options: their endpoint (L{build_endpoint}), client id,
    login and keepalive, on C{clock} (default: C{reactor}).
    """
    return MQTTClient(
        build_endpoint(reactor, settings),
        settings.client_id,
        reactor if clock is None else clock,
        username=settings.username,
        password=settings.password,
        keepalive=settings.keepalive,
        description=f"the MQTT broker {settings.endpoint}",
        clean_session=clean_session,
    )
