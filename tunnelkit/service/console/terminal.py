# -*- test-case-name: tests.e2e.test_console_terminal -*-
"""
SSH in the browser: the service itself is the tunnel's source and runs an SSH client (Twisted Conch)
to the device's sshd through the tunnel; the page's xterm.js terminal talks to it over a WebSocket
(C{/console/ssh?tunnel=ID}).

The path of the bytes, with the protocol and transport layers every other source uses::

    xterm.js <-WebSocket-> BrowserTerminal <-> Conch SSHClientTransport <-> TunnelSource
        (tunnelkit.protocol.session.SourceSession over tunnelkit.transport.websocket's client)
        <-wss-> the service's own data plane (/tunnel) <-> the relay <-> the destination (agent) <-> sshd

Connecting to the service's own listener, rather than pairing with the relay in memory, keeps the relay
untouched and makes the console's source a peer like any other (its state, limits, audit, rotation); and
with several service nodes the tunnel's destination may be held by another node: the cluster forwards a
WebSocket upgrade to that node, which a pairing in memory with this node's relay would bypass.  The
listener is reached at its bound address (a wildcard one through loopback) or unix path, and its TLS is
checked against the listener's own certificate, pinned (L{pinned_client_tls}): so a certificate from
another CA, or naming other hosts, works as well as the generated one.
Nothing from L{tunnelkit.localproxy} is used.

Where the source token comes from: quick setup keeps the one OpenTunnel returned
(L{Terminals.hold_source}); for any other open tunnel the console generates a new source token
(RotateTunnelAccessToken SOURCE, through the control plane) when a terminal connects, which
disconnects a source proxy connected then (the page says so).  The console connects with its own
client token, so a later terminal reconnects with the same token.  Tokens stay in memory only.

Credentials (password, private key) come in the WebSocket's first message, are used for that SSH
session only, and are dropped once it is authenticated; they are never stored or logged.

Host keys: the fingerprint (SHA256, as OpenSSH shows it) is shown; the first one seen for a thing (for a
tunnel without a thing: for that tunnel, L{host_key_name}) is remembered (L{IConsoleUsers.remember_host_key}); a different one later stops the connection with a
clear warning (the tunnel page can forget the remembered key).

Browser protocol: binary messages are terminal bytes both ways; text messages are JSON: from the page
C{{"type": "connect", "csrf", "user", "password", "key", "passphrase", "cols", "rows"}} and
C{{"type": "resize", "cols", "rows"}}; to the page C{{"type": "status"|"hostkey"|"ready"|"closed", ...}}.

Flow control: when the browser reads slower than the device writes, the browser connection's transport
pauses its producer, which is the tunnel WebSocket's transport: the service stops reading from the
tunnel, and the relay's own flow control slows the destination.
"""

from __future__ import annotations

import json
import secrets
import struct
from http.cookies import SimpleCookie
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.conch.ssh import channel, common, connection, keys, transport, userauth
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer, IReactorTime, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelkit.protocol.session import (
    CloseLocal,
    ConnectTarget,
    Fatal,
    HalfCloseLocal,
    LogEvent,
    LocalConnectionRefused,
    PauseLocal,
    ResumeLocal,
    SendFrames,
    SourceSession,
    StartListening,
    WriteLocal,
)
from tunnelkit.service.console.sessions import COOKIE_NAME, Session
from tunnelkit.service.console.users import host_key_name
from tunnelkit.service.store import CONNECTED, OPEN, NoSuchAccount
from tunnelkit.transport.actions import ActionDispatcher, log_event
from tunnelkit.transport.tls import pinned_client_tls
from tunnelkit.transport.websocket import TunnelWebSocketFactory, WebSocketEnded, tunnel_url

log = Logger()

#: How long a terminal waits for the tunnel's destination (the device's agent) to connect.
DESTINATION_WAIT = 90.0
#: Seconds between readings of the tunnel's state while waiting: this node's changes are told at once
#: (L{Terminals.tunnel_changed}); this catches a destination that connected to another service node.
DESTINATION_POLL = 10.0
#: Terminal size limits accepted from the page.
MAX_COLS, MAX_ROWS = 1000, 500
#: The most bytes of credentials accepted in the first message.
MAX_CREDENTIALS = 32768


class TerminalError(Exception):
    """Why a terminal cannot go on (shown to the user)."""


def host_key_fingerprint(blob: bytes) -> Tuple[str, str]:
    """(key type, C{SHA256:...} fingerprint) of an SSH public key blob."""
    key = keys.Key.fromString(blob)
    fingerprint = key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    return key.sshType().decode("ascii", "replace"), "SHA256:" + fingerprint.rstrip("=")


@implementer(ITransport)
class _TunnelConnection:
    """The SSH client's transport: one connection carried by the tunnel source."""

    disconnecting = False

    def __init__(self, source: "TunnelSource") -> None:
        self._source = source

    def write(self, data: bytes) -> None:
        self._source.send(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._source.send(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._source.close()

    abortConnection = loseConnection

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)

    getHost = getPeer


class TunnelSource:
    """
    The console as one tunnel's source: a WebSocket to the service's data plane running a
    L{SourceSession}, carrying one connection (the SSH client's).

    @param on_ready: called once the tunnel's service ids arrived (the connection may start).
    @param on_data: bytes from the device.
    @param on_end: called once with a message when the connection or the WebSocket ends.
    @param on_pause: called with True when the far peer grants no more credit (stop sending), False
        when it does again (flow control; not negotiated by the console today).
    """

    def __init__(self, service_id: str, on_ready: Callable[[], None], on_data: Callable[[bytes], None],
                 on_end: Callable[[str], None], on_pause: Callable[[bool], None] = lambda paused: None) -> None:
        self.service_id = service_id
        self.session = SourceSession([service_id])
        self._on_ready = on_ready
        self._on_data = on_data
        self._on_end = on_end
        self._on_pause = on_pause
        self._dispatch = ActionDispatcher(self._action_handlers())
        self.websocket: Any = None
        self.connection_id: Optional[int] = None
        self.connector: Any = None
        self._closing = False
        self._reported = False

    # ITunnelWebSocketHandler
    def websocket_opened(self, websocket: Any) -> None:
        self.websocket = websocket
        self._perform(self.session.websocket_opened())

    def messages_received(self, messages: List[Any]) -> None:
        for message in messages:
            self._perform(self.session.receive(message))

    def websocket_ended(self, websocket: Any, ended: WebSocketEnded) -> None:
        self.websocket = None
        if ended.kind == "closed":
            self._end("The tunnel was closed (closed by its owner, or its lifetime ended): the terminal has ended.")
        elif ended.kind == "replaced":
            self._end("Another source took over this tunnel: the terminal has ended.")
        else:
            self._end(f"The connection to the tunnel ended: {ended.message}")

    # the SSH client's side
    def start_connection(self) -> None:
        try:
            self.connection_id, actions = self.session.local_accepted(self.service_id)
        except LocalConnectionRefused as e:
            self._end(f"The tunnel cannot carry the connection: {e}")
            return
        self._perform(actions)

    def send(self, data: bytes) -> None:
        if self.connection_id is not None:
            self._perform(self.session.local_data(self.service_id, self.connection_id, data))

    def close(self) -> None:
        """End the connection and the WebSocket (the SSH session is over)."""
        if self.connection_id is not None:
            cid, self.connection_id = self.connection_id, None
            self._perform(self.session.local_closed(self.service_id, cid))
        self._closing = True
        if self.websocket is not None:
            self.websocket.sendClose(code=1000)
        elif self.connector is not None:
            self.connector.cancel()

    def _perform(self, actions: List[Any]) -> None:
        self._dispatch(actions)
        if self.websocket is not None:
            self.websocket.flush()

    def _action_handlers(self) -> Dict[type, Callable[[Any], None]]:
        """
        Every action of the session (L{ActionDispatcher} refuses a table that lacks one).  The console
        announces no extensions, so the relay sends it no flow-control or half-close messages; should
        the session return those actions anyway, they are carried out: a pause stops reading the
        browser's keystrokes, a half-close from the device ends the SSH session.
        """
        def mine(action: Any) -> bool:
            return bool(action.connection_id == self.connection_id and self.connection_id is not None)

        def send_frames(action: SendFrames) -> None:
            if self.websocket is not None:
                self.websocket.send_frames(action.data, action.boundary)

        def write_local(action: WriteLocal) -> None:
            if mine(action):
                self._on_data(bytes(action.data))

        def close_local(action: CloseLocal) -> None:
            if mine(action):
                self.connection_id = None
                self._end(f"The device closed the connection ({action.reason}).")

        def half_close_local(action: HalfCloseLocal) -> None:
            if mine(action):  # SSH needs both directions: the device's last byte ends the session
                self.connection_id = None
                self._end("The device closed the connection (it sent its last byte).")

        def pause_local(action: PauseLocal) -> None:
            if mine(action):
                self._on_pause(True)

        def resume_local(action: ResumeLocal) -> None:
            if mine(action):
                self._on_pause(False)

        def connect_target(action: ConnectTarget) -> None:  # a destination's action: never at a source
            self._end(f"The tunnel cannot be used: the console's source was asked to connect {action.service_id}.")

        return {
            SendFrames: send_frames,
            StartListening: lambda action: self._on_ready(),
            ConnectTarget: connect_target,
            WriteLocal: write_local,
            CloseLocal: close_local,
            PauseLocal: pause_local,
            ResumeLocal: resume_local,
            HalfCloseLocal: half_close_local,
            Fatal: lambda action: self._end(f"The tunnel cannot be used: {action.message}"),
            LogEvent: log_event,
        }

    def _end(self, message: str) -> None:
        if self._reported:
            return
        self._reported = True
        if self.websocket is not None and not self._closing:
            self._closing = True
            self.websocket.sendClose(code=1000)
        if not self._closing or self.connection_id is None:
            self._on_end(message)


class _Shell(channel.SSHChannel):
    name = b"session"

    def __init__(self, terminal: "BrowserTerminal", **kw: Any) -> None:
        super().__init__(**kw)
        self.terminal = terminal

    @property
    def _ssh(self) -> connection.SSHConnection:
        """The SSH connection the channel is open on."""
        assert self.conn is not None
        return self.conn

    def channelOpen(self, specificData: bytes) -> None:
        cols, rows = self.terminal.size
        pty = common.NS(b"xterm-256color") + struct.pack(">4L", cols, rows, 0, 0) + common.NS(b"\x00")
        d = self._ssh.sendRequest(self, b"pty-req", pty, wantReply=True)
        d.addCallback(lambda _: self._ssh.sendRequest(self, b"shell", b"", wantReply=True))
        d.addCallbacks(lambda _: self.terminal.shell_ready(self), self.terminal.shell_failed)

    def dataReceived(self, data: bytes) -> None:
        self.terminal.output(data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.terminal.output(data)

    def closed(self) -> None:
        self.terminal.finish("The SSH session ended.")
        self.loseConnection()

    def resize(self, cols: int, rows: int) -> None:
        self._ssh.sendRequest(self, b"window-change", struct.pack(">4L", cols, rows, 0, 0))


class _Connection(connection.SSHConnection):
    def __init__(self, terminal: "BrowserTerminal") -> None:
        super().__init__()
        self.terminal = terminal

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.terminal.authenticated()
        self.openChannel(_Shell(self.terminal, conn=self))


class _UserAuth(userauth.SSHUserAuthClient):
    preferredOrder = [b"publickey", b"password", b"keyboard-interactive"]

    def __init__(self, terminal: "BrowserTerminal", user: str, instance: Any) -> None:
        super().__init__(user.encode("utf-8"), instance)
        self.terminal = terminal
        self._password_tries = 0

    def getPassword(self, prompt: Optional[bytes] = None) -> Any:
        password = self.terminal.credentials.get("password")
        if not password or self._password_tries:
            return None
        self._password_tries += 1
        return defer.succeed(password.encode("utf-8"))

    def getGenericAnswers(self, name: bytes, instruction: bytes, questions: List[Tuple[bytes, int]]) -> Any:
        password = self.terminal.credentials.get("password")
        if not password or self._password_tries > 1:
            return defer.fail(TerminalError("no password for keyboard-interactive authentication"))
        self._password_tries += 1
        return defer.succeed([password.encode("utf-8") for _ in questions])

    def _key(self) -> Optional[keys.Key]:
        text = self.terminal.credentials.get("key")
        if not text:
            return None
        passphrase = self.terminal.credentials.get("passphrase") or None
        try:
            return keys.Key.fromString(text.encode("utf-8"), passphrase=passphrase.encode() if passphrase else None)
        except (keys.BadKeyError, keys.EncryptedKeyError, ValueError) as e:
            self.terminal.status(f"The private key cannot be read ({e}); trying the password.")
            self.terminal.credentials.pop("key", None)
            return None

    def getPublicKey(self) -> Optional[keys.Key]:
        if self.lastPublicKey is not None:  # offered once already
            return None
        key = self._key()
        return key.public() if key is not None else None

    def getPrivateKey(self) -> Any:
        key = self._key()
        return defer.succeed(key) if key is not None else defer.fail(TerminalError("no private key"))


class _ClientTransport(transport.SSHClientTransport):
    transport: Optional[_TunnelConnection]

    def __init__(self, terminal: "BrowserTerminal") -> None:
        super().__init__()
        self.terminal = terminal

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Any:
        return self.terminal.check_host_key(hostKey)

    def connectionSecure(self) -> None:
        self.requestService(_UserAuth(self.terminal, self.terminal.user, _Connection(self.terminal)))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        text = description.decode("utf-8", "replace")[:300]
        if reasonCode == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            text = "authentication failed: check the user name and the password or key"
        self.terminal.finish(f"The SSH connection ended: {text}")


class BrowserTerminal(WebSocketServerProtocol):
    """One terminal page's WebSocket, its SSH client and its tunnel source."""

    factory: "_TerminalFactory"

    def __init__(self) -> None:
        super().__init__()
        self.session: Optional[Session] = None
        self.account: Any = None
        self.tunnel_id = ""
        self.thing: Optional[str] = None
        self.service_id = ""
        self.user = ""
        self.credentials: Dict[str, str] = {}
        self.size = (80, 24)
        self.source: Optional[TunnelSource] = None
        self.ssh: Optional[_ClientTransport] = None
        self.shell: Optional[_Shell] = None
        self._finished = False
        self._waiting: Any = None  # the fallback poll of the destination's state
        self._deadline: Any = None  # set while waiting for the destination (DESTINATION_WAIT)
        self._checking = False  # the tunnel's state is being read
        self._check_again = False  # it changed again meanwhile
        self._connecting = False  # a "connect" message is being handled
        self._known_key: Any = None  # the host key remembered for the thing, read before SSH starts

    # --- the handshake: signed in, same origin ---

    def onConnect(self, request: Any) -> Deferred:  # type: ignore[override]  # autobahn takes a Deferred (documented); its annotation lists only the immediate answers
        return Deferred.fromCoroutine(self._check(request))

    async def _check(self, request: Any) -> None:
        terminals = self.factory.terminals
        origin = request.headers.get("origin", "")
        host = request.headers.get("host", "")
        if origin != f"https://{host}" and origin != f"http://{host}":
            raise ConnectionDeny(403, "The terminal's WebSocket must come from the console's own page")
        jar = SimpleCookie()
        try:
            jar.load(request.headers.get("cookie", ""))
        except Exception:
            pass
        morsel = jar.get(COOKIE_NAME)
        session = terminals.console.sessions.get(morsel.value if morsel else None)
        if session is not None and not await terminals.console.users.still_valid(
            session.account_id, session.user_name, session.created_at
        ):
            terminals.console.sessions.end(session)
            session = None
        if session is None:
            raise ConnectionDeny(401, "Not signed in: sign in to the console again")
        tunnel_id = (request.params.get("tunnel") or [""])[0]
        try:
            account = await terminals.console.store.get_account(session.account_id)
        except NoSuchAccount:
            raise ConnectionDeny(401, "Your account no longer exists") from None
        tunnel = await terminals.console.store.get_tunnel(account.account_id, tunnel_id)
        if tunnel is None:
            raise ConnectionDeny(404, f"Tunnel {tunnel_id[:128]} does not exist")
        self.session, self.account, self.tunnel_id, self.thing = session, account, tunnel_id, tunnel.thing_name
        from tunnelkit.service.console.pages import is_ssh_service

        services = [s for s in tunnel.services or () if is_ssh_service(s)]
        self.service_id = services[0] if services else ""

    def onOpen(self) -> None:
        self.factory.terminals.opened(self)
        producer = getattr(self.transport, "producer", None)
        if producer is not None:
            try:
                cast(IConsumer, self.transport).unregisterProducer()  # the HTTP channel's; the tunnel's goes there
            except RuntimeError:
                pass
        self.status("Connected to the console. Give a user name and a password or key.")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            if self.shell is not None:
                self.shell.write(bytes(payload))
            return
        try:
            message = json.loads(bytes(payload)[:MAX_CREDENTIALS].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "resize":
            self.size = _size(message, self.size)
            if self.shell is not None:
                self.shell.resize(*self.size)
        elif kind == "connect" and self.source is None and not self._finished and not self._connecting:
            self._connecting = True
            d = Deferred.fromCoroutine(self._connect(message))
            d.addErrback(self._failed, "Console terminal: connecting failed")

    def _failed(self, failure: Failure, what: str) -> None:
        log.failure(what, failure)
        self.finish("The console failed; try again.")

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.credentials = {}
        self.factory.terminals.closed(self)
        self._finished = True
        self._teardown()

    # --- to the page ---

    def _send(self, **message: Any) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(json.dumps(message).encode("utf-8"), isBinary=False)

    def status(self, text: str) -> None:
        self._send(type="status", text=text)

    def output(self, data: bytes) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(data, isBinary=True)

    def finish(self, text: str) -> None:
        """End the terminal with a message."""
        if self._finished:
            return
        self._finished = True
        self.credentials = {}
        self._send(type="closed", text=text)
        self._teardown()
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendClose(code=1000)

    def _teardown(self) -> None:
        self._stop_waiting()
        if self.ssh is not None:
            ssh, self.ssh = self.ssh, None
            if ssh.transport is not None and not ssh.transport.disconnecting:
                ssh.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"the browser terminal closed")
        if self.source is not None:
            self.source.close()

    # --- connecting ---

    async def _connect(self, message: Dict[str, Any]) -> None:
        terminals = self.factory.terminals
        assert self.session is not None
        if not self.session.csrf_ok(message.get("csrf") if isinstance(message.get("csrf"), str) else None):
            self.finish("Refused: the page is out of date (CSRF token): reload it.")
            return
        if terminals.console.sessions.get(self.session.session_id) is None:
            self.finish("Your session has ended: sign in again.")
            return
        user = message.get("user")
        if not isinstance(user, str) or not user or len(user) > 256:
            self.finish("Give the user name to log in as on the device.")
            return
        self.user = user
        self.credentials = {k: v for k in ("password", "key", "passphrase")
                            if isinstance(v := message.get(k), str) and v}
        if not self.credentials.get("password") and not self.credentials.get("key"):
            self.finish("Give a password or a private key.")
            return
        self.size = _size(message, self.size)
        if not self.service_id:
            self.finish("This tunnel has no SSH service (a service id starting with SSH).")
            return
        try:
            token, client_token = await terminals.source_token(self.session, self.account, self.tunnel_id, self.peer)
        except TerminalError as e:
            self.finish(str(e))
            return
        if self._finished:
            return  # the browser went away meanwhile
        self.source = TunnelSource(self.service_id, self._tunnel_ready, self._from_device, self.finish,
                                   self._pause_keystrokes)
        try:
            terminals.connect_source(self.source, token, client_token)
        except TerminalError as e:
            self.finish(str(e))
            return
        self.status("Connecting to the tunnel...")

    def _tunnel_ready(self) -> None:
        """In the tunnel: wait for its destination, told by L{destination_changed}, polled as a fallback."""
        if self._deadline is not None or self.ssh is not None or self._finished:
            return  # waiting already
        clock = self.factory.terminals.clock
        self._deadline = clock.callLater(DESTINATION_WAIT, self._destination_late)
        self.status(f"Waiting for {self.thing or 'the destination'} to connect to the tunnel (its agent gets the "
                    "destination token over MQTT)...")
        self.destination_changed()

    def destination_changed(self) -> None:
        """The tunnel's state changed (or the fallback poll is due): read it; one reading at a time."""
        if self._finished or self.ssh is not None or self._deadline is None:
            return  # not waiting
        if self._checking:
            self._check_again = True
            return
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        self._checking = True
        d = Deferred.fromCoroutine(self._check_destination())
        d.addErrback(self._failed, "Console terminal: reading the tunnel's state failed")

        def done(_: Any) -> None:
            self._checking = False
            if self._check_again:
                self._check_again = False
                self.destination_changed()
            elif self._deadline is not None and not self._finished and self.ssh is None:
                # Changes made by another service node are not told here: read again later.
                self._waiting = self.factory.terminals.clock.callLater(DESTINATION_POLL, self.destination_changed)

        d.addBoth(done)

    async def _check_destination(self) -> None:
        terminals = self.factory.terminals
        tunnel = await terminals.console.store.get_tunnel(self.account.account_id, self.tunnel_id)
        if self._finished or self._deadline is None:
            return
        if tunnel is None or tunnel.status != OPEN:
            self.finish("The tunnel was closed: the terminal has ended.")
            return
        if tunnel.destination.status == CONNECTED:
            self._stop_waiting()
            # Read before SSH starts: Conch's key exchange wants the host key checked at once.
            self._known_key = await terminals.console.users.get_host_key(
                self.account.account_id, host_key_name(self.thing, self.tunnel_id)
            )
            if self._finished:
                return
            self.status(f"Connected through the tunnel to {self.thing or 'the destination'}; opening SSH...")
            self._start_ssh()

    def _destination_late(self) -> None:
        self._deadline = None
        self.finish(f"{self.thing or 'The destination'} did not connect to the tunnel within "
                    f"{DESTINATION_WAIT:g} s: is its agent running and connected to the MQTT broker?")

    def _stop_waiting(self) -> None:
        for call in (self._waiting, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._waiting = self._deadline = None

    def _start_ssh(self) -> None:
        assert self.source is not None
        self.source.start_connection()
        if self.source.connection_id is None:
            return
        tunnel_ws = self.source.websocket
        if tunnel_ws is not None and tunnel_ws.transport is not None and self.transport is not None:
            try:
                cast(IConsumer, self.transport).registerProducer(cast(IProducer, tunnel_ws.transport), True)
            except RuntimeError:
                pass
        self.ssh = _ClientTransport(self)
        self.ssh.makeConnection(_TunnelConnection(self.source))

    def _pause_keystrokes(self, paused: bool) -> None:
        """The tunnel takes no more bytes toward the device for now: stop (or go on) reading the browser."""
        if self.transport is not None:
            browser = cast(IPushProducer, self.transport)
            (browser.pauseProducing if paused else browser.resumeProducing)()

    def _from_device(self, data: bytes) -> None:
        if self.ssh is not None:
            self.ssh.dataReceived(data)

    def check_host_key(self, blob: bytes) -> Any:
        key_type, fingerprint = host_key_fingerprint(blob)
        users = self.factory.terminals.console.users
        name = host_key_name(self.thing, self.tunnel_id)  # per thing, or per tunnel if it has none
        scope = "thing" if self.thing else "tunnel"
        known = self._known_key  # read before SSH started (_check_destination)
        if known is None:
            d = users.remember_host_key(self.account.account_id, name, key_type, fingerprint,
                                        self.factory.terminals.clock.seconds())
            d.addErrback(lambda f: log.failure("Console: could not remember the host key of {name}", f, name=name))
            self._send(type="hostkey", status="new", scope=scope, key_type=key_type, fingerprint=fingerprint)
            return defer.succeed(True)
        if known.fingerprint == fingerprint:
            self._send(type="hostkey", status="known", key_type=key_type, fingerprint=fingerprint)
            return defer.succeed(True)
        self._send(type="hostkey", status="changed", key_type=key_type, fingerprint=fingerprint,
                   expected=known.fingerprint, expected_type=known.key_type)
        log.warn("Console: host key of {name} changed ({expected} -> {fingerprint}): connection refused",
                 name=name, expected=known.fingerprint, fingerprint=fingerprint)
        self.finish(
            f"WARNING: the host key of {self.thing or 'the device of tunnel ' + self.tunnel_id} has changed (it was {known.key_type} {known.fingerprint}, now "
            f"{key_type} {fingerprint}). Someone may be impersonating the device, or its key was replaced. "
            "The connection was stopped. If you know the key changed, forget the remembered key on the tunnel's page."
        )
        return defer.fail(TerminalError("host key changed"))

    def authenticated(self) -> None:
        self.credentials = {}  # used; never kept
        self.status(f"Logged in as {self.user}.")

    def shell_ready(self, shell: _Shell) -> None:
        self.shell = shell
        self._send(type="ready")

    def shell_failed(self, failure: Failure) -> None:
        self.finish(f"The device refused a terminal: {failure.getErrorMessage()}")


def _size(message: Dict[str, Any], default: Tuple[int, int]) -> Tuple[int, int]:
    cols, rows = message.get("cols"), message.get("rows")
    if isinstance(cols, int) and isinstance(rows, int) and 1 <= cols <= MAX_COLS and 1 <= rows <= MAX_ROWS:
        return cols, rows
    return default


class _TerminalFactory(WebSocketServerFactory):
    protocol = BrowserTerminal  # type: ignore[assignment]  # autobahn's factory is not generic over its protocol (Twisted's Factory[P] default)

    def __init__(self, terminals: "Terminals") -> None:
        super().__init__()
        self.terminals = terminals
        self.setProtocolOptions(maxMessagePayloadSize=1 << 20, autoPingInterval=20, autoPingTimeout=60)


class _TerminalResource(WebSocketResource):
    def render(self, request: Any) -> Any:
        from tunnelkit.service.console import web

        if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
            web.security_headers(request)
            request.setResponseCode(400)
            return b"The terminal's WebSocket: open a tunnel's terminal page instead.\n"
        return super().render(request)


class Terminals:
    """
    The console's browser terminals.

    @param data_plane: returns the service's own listener (L{tunnelkit.service.tap.DataPlaneAddress}:
        its bound address and its TLS certificate) once it listens, or None.
    """

    def __init__(self, console: Any, reactor: Any, clock: IReactorTime, data_plane: Callable[[], Optional[Any]]) -> None:
        self.console = console
        self.reactor = reactor
        self.clock = clock
        self._data_plane = data_plane
        self._held: Dict[str, Tuple[str, str, str]] = {}  # tunnel id -> (account id, token, client token)
        self._open: List[BrowserTerminal] = []

    def resource(self) -> WebSocketResource:
        return _TerminalResource(_TerminalFactory(self))

    def assets_ready(self) -> bool:
        return bool(self.console.assets.ready)

    def assets_problem(self) -> str:
        return str(self.console.assets.problem())

    # --- source tokens ---

    def hold_source(self, account_id: str, tunnel_id: str, token: str) -> None:
        """Keep quick setup's source token (memory only) for the tunnel's terminals."""
        self._held[tunnel_id] = (account_id, token, secrets.token_hex(24))

    def holds_source(self, tunnel_id: str) -> bool:
        return tunnel_id in self._held

    def forget_source(self, tunnel_id: str) -> None:
        """The tunnel's source token was rotated (by the console's user): the held one is void."""
        self._held.pop(tunnel_id, None)

    async def source_token(self, session: Session, account: Any, tunnel_id: str, client: Optional[str]) -> Tuple[str, str]:
        """The token (and client token) the console connects with: held, or a new one (rotation)."""
        held = self._held.get(tunnel_id)
        if held is not None and held[0] == account.account_id:
            return held[1], held[2]
        from tunnelkit.service.errors import ApiError

        try:
            answer = await self.console.pages.run_operation(
                client, session, account, "RotateTunnelAccessToken", {"tunnelId": tunnel_id, "clientMode": "SOURCE"}
            )
        except ApiError as e:
            raise TerminalError(f"No source token for the terminal: {e.message}") from None
        self.hold_source(account.account_id, tunnel_id, answer["sourceAccessToken"])
        held = self._held[tunnel_id]
        return held[1], held[2]

    def connect_source(self, source: TunnelSource, token: str, client_token: str) -> None:
        target = self._data_plane()
        if target is None:
            raise TerminalError("The service is not listening yet: try again in a moment.")
        endpoint, url = self._endpoint(target)
        factory = TunnelWebSocketFactory(url, token, client_token, source, self.clock, reactor=self.reactor)
        d = endpoint.connect(factory)
        source.connector = d

        def failed(failure: Failure) -> None:
            source.connector = None
            source.websocket_ended(None, WebSocketEnded("retry", f"cannot reach the data plane: {failure.getErrorMessage()}"))

        def connected(protocol: Any) -> None:
            source.connector = None

        d.addCallbacks(connected, failed)

    def _endpoint(self, target: Any) -> Tuple[Any, str]:
        """
        The client endpoint and URL of the service's own listener C{target} (a L{DataPlaneAddress}):
        its bound address (a wildcard one through loopback) or unix path, and, for TLS, its own
        certificate pinned (whatever CA signed it and whatever names it carries).
        """
        address = target.address
        if isinstance(address, UNIXAddress):
            endpoint: Any = endpoints.UNIXClientEndpoint(self.reactor, address.name, timeout=30)
            url = tunnel_url(target.secure, "localhost", 80 if not target.secure else 443, "source")
        else:
            v6 = isinstance(address, IPv6Address)
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address.host, address.host)
            endpoint = (endpoints.TCP6ClientEndpoint if v6 else endpoints.TCP4ClientEndpoint)(
                self.reactor, host, address.port, timeout=30
            )
            url = tunnel_url(target.secure, host, address.port, "source")
        if target.certificate is not None:
            endpoint = endpoints.wrapClientTLS(pinned_client_tls(target.certificate), endpoint)
        return endpoint, url

    # --- bookkeeping ---

    def tunnel_changed(self, account_id: Optional[str], tunnel_id: str) -> None:
        """L{ITunnelStateObserver}: the terminals waiting for this tunnel's destination read it again."""
        for terminal in list(self._open):
            if terminal.tunnel_id == tunnel_id and (account_id is None or terminal.account is not None
                                                    and terminal.account.account_id == account_id):
                terminal.destination_changed()

    def opened(self, terminal: BrowserTerminal) -> None:
        self._open.append(terminal)

    def closed(self, terminal: BrowserTerminal) -> None:
        if terminal in self._open:
            self._open.remove(terminal)

    def session_ended(self, session_id: str) -> None:
        for terminal in list(self._open):
            if terminal.session is not None and terminal.session.session_id == session_id:
                terminal.finish("You signed out: the terminal has ended.")

    def stop(self) -> None:
        for terminal in list(self._open):
            terminal.finish("The service is stopping: the terminal has ended.")
        self._held.clear()
