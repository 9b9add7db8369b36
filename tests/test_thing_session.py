"""Tests of L{tunnelkit.thing_session}: the wait for a thing (injected clock) and the ssh command line."""

from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from tunnelkit.localproxy.endpoint import ServiceEndpoint
from tunnelkit.protocol.framing import Message
from tunnelkit.thing_session import DeviceNotConnected, SessionEnded, SourceUntilReady, ssh_command


class FakeListener:
    def __init__(self, port):
        self.port = port

    def getHost(self):
        class Address:
            pass

        address = Address()
        address.port = self.port
        return address

    def stopListening(self):
        return succeed(None)


class WaitTests(TestCase):
    def runner(self, connected, wait=60.0):
        self.reactor = MemoryReactorClock()
        self.progress = []
        runner = SourceUntilReady(self.reactor, ServiceEndpoint("127.0.0.1", 9, secure=False), "token", "SSH",
                                  connected, wait=wait, progress=self.progress.append, clock=self.reactor)
        self.addCleanup(runner.stop)
        return runner

    def make_ready(self, runner, port=4242):
        """As if the service's SERVICE_IDS had come and the listener were bound."""
        runner.session.session.receive(Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH"]))
        runner.side.ports["SSH"] = port
        runner.side.listeners["SSH"] = FakeListener(port)

    def test_thing_never_connects(self):
        asked = []
        runner = self.runner(lambda: asked.append(1) or succeed(False), wait=12)
        ready = runner.start()
        self.make_ready(runner)
        self.reactor.advance(1)
        self.assertTrue(asked)  # DescribeTunnel asked while waiting
        for _ in range(12):
            self.reactor.advance(1)
        failure = self.failureResultOf(ready, DeviceNotConnected)
        self.assertIn("did not connect within 12 s", failure.getErrorMessage())
        self.assertEqual(self.progress, [5.0, 10.0])

    def test_ready_once_the_destination_is_connected(self):
        answers = [False, False, True]
        runner = self.runner(lambda: succeed(answers.pop(0)))
        ready = runner.start()
        self.reactor.advance(1)
        self.assertNoResult(ready)  # the tunnel's services are not known yet: not asked
        self.assertEqual(len(answers), 3)
        self.make_ready(runner)
        for _ in range(3):
            self.reactor.advance(1)
        self.assertEqual(self.successResultOf(ready), 4242)

    def test_session_ends_first(self):
        runner = self.runner(lambda: succeed(False))
        ready = runner.start()
        runner.session.finish(1, "401 the token was refused")
        self.assertIn("401", self.failureResultOf(ready, SessionEnded).getErrorMessage())


class SshCommandTests(TestCase):
    def test_user_options_and_command(self):
        self.assertEqual(
            ssh_command("alice@t1", 5555, ["-i", "key", "-A", "-o", "A=B", "uptime", "-a"]),
            ["ssh", "-p", "5555", "-o", "HostKeyAlias=tunnelkit-t1", "-i", "key", "-A", "-o", "A=B",
             "alice@127.0.0.1", "uptime", "-a"],
        )

    def test_thing_only(self):
        self.assertEqual(ssh_command("t1", 1, []), ["ssh", "-p", "1", "-o", "HostKeyAlias=tunnelkit-t1", "127.0.0.1"])

    def test_separators(self):
        self.assertEqual(ssh_command("t1", 1, ["--", "-v", "--", "-x"])[-3:], ["-v", "127.0.0.1", "-x"])
