# -*- test-case-name: tests.test_thing_session -*-
"""
One command to a thing: a source local proxy run in this process for a tunnel just opened, and the
wait for the thing's agent to connect (C{tunnelkit ssh}, C{tunnelkit connect}; the API calls are in
L{tunnelkit.cli_operator}).

L{SourceUntilReady} starts the source session for one service on C{127.0.0.1} (a free port unless
given) and fires L{SourceUntilReady.ready} with the bound port once the tunnel's services matched
and the destination side is connected, as C{destination_connected()} (DescribeTunnel) reports;
meanwhile it calls C{progress(seconds)} every L{PROGRESS_INTERVAL} seconds.  It fails with
L{DeviceNotConnected} after C{wait} seconds, or with L{SessionEnded} if the session ends first (a
refused token, a closed tunnel).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall

from tunnelkit.errors import TunnelkitError
from tunnelkit.localproxy.endpoint import ServiceEndpoint
from tunnelkit.localproxy.session_service import LocalProxySession, SessionEnd
from tunnelkit.localproxy.source import SourceSide

__all__ = ["DeviceNotConnected", "PROGRESS_INTERVAL", "SessionEnded", "SourceUntilReady", "ssh_command"]

#: Seconds between two checks of the destination, and between two progress lines.
POLL_INTERVAL = 1.0
PROGRESS_INTERVAL = 5.0

#: OpenSSH's options that take a value (ssh(1) SYNOPSIS).
_SSH_OPTIONS_WITH_VALUE = set("BbcDEeFIiJLlmOoPpRSWw")


class DeviceNotConnected(TunnelkitError):
    """The thing's destination did not connect in time."""


class SessionEnded(TunnelkitError):
    """The source session ended before the tunnel was usable."""


class SourceUntilReady:
    """
    A source session for C{service_id} and the wait until the tunnel is usable (see the module).

    @param destination_connected: returns a Deferred firing True once the tunnel's destination is
        connected (a DescribeTunnel in a thread); its failures are retried.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: ServiceEndpoint,
        access_token: str,
        service_id: str,
        destination_connected: Callable[[], Deferred],
        local_port: int = 0,
        wait: float = 60.0,
        progress: Callable[[float], None] = lambda seconds: None,
        clock: Any = None,
    ) -> None:
        self.clock = clock if clock is not None else reactor
        self.service_id = service_id
        self.side = SourceSide({service_id: local_port}, "127.0.0.1", reactor)
        self.session = LocalProxySession(
            self.side, endpoint, access_token, str(uuid.uuid4()), reactor, self.clock
        )
        self._destination_connected = destination_connected
        self._wait = wait
        self._progress = progress
        self._started_at = 0.0
        self._next_progress = PROGRESS_INTERVAL
        self._checking = False
        self._poll = LoopingCall(self._check)
        self._poll.clock = self.clock
        self.ready: Deferred = Deferred()
        self.session.ended.addCallback(self._session_ended)

    def start(self) -> Deferred:
        """Start the session and the wait; L{ready} fires with the local port."""
        self._started_at = self.clock.seconds()
        self.session.startService()
        self._poll.start(POLL_INTERVAL, now=False)
        return self.ready

    def stop(self) -> Deferred:
        """Stop the wait and the session (closing its listener and connections)."""
        if self._poll.running:
            self._poll.stop()
        if self.session.running:
            return maybeDeferred(self.session.stopService)
        return maybeDeferred(lambda: None)

    def _check(self) -> None:
        if self.ready.called:
            return
        elapsed = self.clock.seconds() - self._started_at
        if elapsed >= self._wait:
            self._fail(DeviceNotConnected(
                f"the thing's destination did not connect within {self._wait:g} s: is its agent running "
                "(twistd -n tunnelkit --mode agent --thing-name THING ...) and the service started with "
                "--mqtt? (--wait SECONDS waits longer)"
            ))
            return
        if elapsed >= self._next_progress:
            self._next_progress += PROGRESS_INTERVAL
            self._progress(elapsed)
        port = self.side.ports.get(self.service_id)
        if not self.session.session.ready or port is None or self.service_id not in self.side.listeners:
            return
        if self._checking:
            return
        self._checking = True

        def answered(connected: Any) -> None:
            self._checking = False
            if connected and not self.ready.called:
                if self._poll.running:
                    self._poll.stop()
                self.ready.callback(port)

        def failed(failure: Any) -> None:
            self._checking = False  # asked again at the next poll

        self._destination_connected().addCallbacks(answered, failed)

    def _fail(self, error: Exception) -> None:
        if self._poll.running:
            self._poll.stop()
        if not self.ready.called:
            self.ready.errback(error)

    def _session_ended(self, end: SessionEnd) -> SessionEnd:
        if not self.ready.called:
            self._fail(SessionEnded(end.message))
        return end


def ssh_command(
    target: str, port: int, ssh_args: Any = (), thing: Optional[str] = None, ssh: str = "ssh"
) -> list:
    """
    The C{ssh} command line to reach C{target} (C{[USER@]THING}) through the local port: C{ssh -p PORT
    [SSH OPTIONS] [USER@]127.0.0.1 [COMMAND]}, with C{ssh_args} split into ssh's own options (before
    the host) and the remote command (after it), and the host key remembered under the thing's name
    (C{HostKeyAlias}), not under a port that changes every time.
    """
    user, at, host = target.rpartition("@")
    thing = thing or host
    options, rest = [], list(ssh_args)
    if rest and rest[0] == "--":  # tunnelkit's own separator
        rest.pop(0)
    while rest and rest[0].startswith("-") and rest[0] != "--":
        argument = rest.pop(0)
        options.append(argument)
        if len(argument) == 2 and argument[1] in _SSH_OPTIONS_WITH_VALUE and rest:
            options.append(rest.pop(0))
    if rest and rest[0] == "--":
        rest.pop(0)
    destination = f"{user}@127.0.0.1" if at else "127.0.0.1"
    return [ssh, "-p", str(port), "-o", f"HostKeyAlias=tunnelkit-{thing}", *options, destination, *rest]
