"""
A real mosquitto broker for end-to-end tests: on a loopback port outside the ephemeral range
(L{tunnelkit.testing.process.unassigned_port}: mosquitto cannot bind port 0 and say which port it got;
another port is tried if that one is taken at the first start), with a generated
configuration in a temporary directory, started and stopped by the test (and restartable on the
same port, to play a broker outage; persistence is on by default, as on a deployed broker).

    broker = Mosquitto(reactor)
    await broker.start()          # or yield from a Deferred in trial
    broker.endpoint               # "tcp:host=127.0.0.1:port=NNNNN"
    await broker.stop()

With C{users={"name": "password"}} the broker requires those credentials.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tunnelkit.testing.process import unassigned_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
START_TIMEOUT = 10.0
#: What mosquitto logs once every listener is bound, and when a port is taken.
RUNNING = b" running"
TAKEN = b"Address already in use"
#: First starts tried on other ports when the port is taken.
ATTEMPTS = 10


class _BrokerProcess(ProcessProtocol):
    def __init__(self, ready_marker: bytes) -> None:
        self.output = bytearray()
        self.ready: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self._marker = ready_marker

    def _data(self, data: bytes) -> None:
        self.output += data
        if not self.ready.called and self._marker in self.output:
            self.ready.callback(None)

    outReceived = _data
    errReceived = _data

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(
                RuntimeError("mosquitto exited before listening:\n" + self.output.decode("utf-8", "replace"))
            )
        self.ended.callback(None)


class Mosquitto:
    """One mosquitto process at a time on a fixed free port; see the module docstring."""

    def __init__(
        self,
        reactor,
        users: Optional[Dict[str, str]] = None,
        persistence: bool = True,
        tls: Optional[Tuple[str, str, str]] = None,
        require_certificate: bool = False,
    ) -> None:
        """
        @param tls: C{(ca_cert, server_cert, server_key)} PEM paths: the listener speaks TLS.
        @param require_certificate: with C{tls}, clients must show a certificate signed by that CA
            (as AWS IoT Core requires).
        """
        self.require_certificate = require_certificate
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self._reactor = reactor
        self.port = unassigned_port()
        self._attempts = ATTEMPTS  # until the first start succeeds: then the port stays
        self.directory = tempfile.mkdtemp(prefix="tunnelkit-mosquitto-")
        self.users = dict(users or {})
        self.persistence = persistence
        self.tls = tls
        self._process: Optional[_BrokerProcess] = None
        self._transport = None
        self.logs: List[str] = []
        self._write_config()

    @property
    def endpoint(self) -> str:
        """The Twisted client endpoint string of the broker (C{tls:} with C{tls})."""
        if self.tls:
            return f"tls:host=127.0.0.1:port={self.port}"
        return f"tcp:host=127.0.0.1:port={self.port}"

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            # As a deployed broker: sessions and queued QoS 1 messages survive a restart.
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.directory}/",
            # Started as root, mosquitto would switch to the user "mosquitto", who cannot read
            # this private directory: stay the user running the tests.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "log_dest stderr",
            "log_type all",
        ]
        if self.tls:
            ca_cert, server_cert, server_key = self.tls
            lines += [f"cafile {ca_cert}", f"certfile {server_cert}", f"keyfile {server_key}", "tls_version tlsv1.2"]
            if self.require_certificate:
                lines.append("require_certificate true")
        if self.users:
            if MOSQUITTO_PASSWD is None:
                raise RuntimeError("mosquitto_passwd is not installed")
            password_file = os.path.join(self.directory, "passwords")
            open(password_file, "w").close()
            os.chmod(password_file, 0o600)
            for user, password in self.users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", password_file, user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        self.config = os.path.join(self.directory, "mosquitto.conf")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self) -> defer.Deferred:
        """Start the broker; fires once it listens (fails after START_TIMEOUT seconds)."""
        assert self._process is None, "already running"
        process = _BrokerProcess(RUNNING)
        self._process = process
        self._transport = self._reactor.spawnProcess(
            process, MOSQUITTO, [MOSQUITTO, "-c", self.config], env={"PATH": os.environ.get("PATH", "")}
        )
        timeout = self._reactor.callLater(
            START_TIMEOUT, lambda: process.ready.called or process.ready.errback(RuntimeError("mosquitto did not start"))
        )

        def started(result):
            if timeout.active():
                timeout.cancel()
            self._attempts = 0
            return result

        def failed(reason):
            if timeout.active():
                timeout.cancel()
            if TAKEN in process.output and self._attempts > 1:
                self._attempts -= 1
                self.port = unassigned_port()
                self._write_config()
                return self.stop().addCallback(lambda _: self.start())
            return self.stop().addCallback(lambda _: reason)

        return process.ready.addCallbacks(started, failed)

    def stop(self) -> defer.Deferred:
        """Stop the broker (if running); fires once the process has exited."""
        process, self._process = self._process, None
        if process is None:
            return defer.succeed(None)
        self.logs.append(process.output.decode("utf-8", "replace"))
        if not process.ended.called:
            try:
                self._transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
            kill = self._reactor.callLater(5.0, self._kill)
        else:
            kill = None

        def ended(_):
            if kill is not None and kill.active():
                kill.cancel()

        return process.ended.addCallback(ended)

    def _kill(self) -> None:
        try:
            self._transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def cleanup(self) -> defer.Deferred:
        """Stop the broker and remove its directory (use with addCleanup)."""
        return self.stop().addBoth(lambda _: shutil.rmtree(self.directory, ignore_errors=True))

    @property
    def output(self) -> str:
        """Everything the broker logged so far (all runs)."""
        current = self._process.output.decode("utf-8", "replace") if self._process else ""
        return "".join(self.logs) + current




class HarnessMosquitto(Mosquitto):
    """
    The same broker run as a process of L{tests.e2e.harness.Harness} (blocking calls, for tests that
    drive subprocesses synchronously); cleaned up with the harness.

        broker = HarnessMosquitto(harness)
        broker.start(); ...; broker.stop(); broker.start()   # an outage, same port and sessions
    """

    def __init__(
        self, harness, users: Optional[Dict[str, str]] = None, persistence: bool = True, tls: Optional[Tuple[str, str, str]] = None
    ) -> None:
        super().__init__(None, users, persistence, tls)
        self._harness = harness
        self.process = None
        harness.testcase.addCleanup(shutil.rmtree, self.directory, True)

    def start(self, timeout: float = START_TIMEOUT) -> None:  # type: ignore[override]
        """Start the broker and wait until it listens."""
        assert self.process is None or not self.process.running(), "already running"
        log_path = os.path.join(self.directory, "mosquitto.log")
        before = 0
        if os.path.exists(log_path):  # a restart appends to the same log
            with open(log_path, "rb") as f:
                before = len(f.read().decode("utf-8", "replace"))
        self.process = self._harness.spawn("mosquitto", [MOSQUITTO, "-c", self.config], cwd=self.directory)
        match = self.process.wait_for_log(rf"{RUNNING.decode()}|{TAKEN.decode()}", timeout, start=before)
        if match.group(0) == TAKEN.decode() and self._attempts > 1:
            self._attempts -= 1
            self.process.kill()
            self.port = unassigned_port()
            self._write_config()
            self.process = None
            return self.start(timeout)
        if match.group(0) == TAKEN.decode():
            raise AssertionError(f"mosquitto: port {self.port} is taken:\n{self.process.tail()}")
        self._attempts = 0

    def stop(self) -> None:  # type: ignore[override]
        """Stop the broker (SIGTERM: it saves its sessions)."""
        if self.process is not None:
            self.process.terminate()

    @property
    def output(self) -> str:
        return self.process.log() if self.process is not None else ""


__all__ = ["Mosquitto", "HarnessMosquitto"]
