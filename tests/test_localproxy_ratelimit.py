"""
The local proxy against a service that answers C{429 Too Many Requests}: it retries with a growing
delay instead of exiting (issue 11), on an injected clock.
"""

from autobahn.websocket.types import ConnectionDeny
from twisted.trial.unittest import TestCase

from tests import test_localproxy_reconnect as reconnect
from tunnelkit.localproxy.session_service import RateLimitedRetry


class RateLimitedRetryTests(TestCase):
    def test_floor_doubles_up_to_the_most(self):
        policy = RateLimitedRetry(lambda attempt: 0.5, max_delay=10.0)
        self.assertEqual(policy(1), 0.5)
        self.assertEqual([policy.rate_limited() for _ in range(6)], [1.0, 2.0, 4.0, 8.0, 10.0, 10.0])
        self.assertEqual(policy(1), 10.0)
        policy.connected()
        self.assertEqual(policy(1), 0.5)

    def test_base_policy_wins_when_longer(self):
        policy = RateLimitedRetry(lambda attempt: 30.0)
        policy.rate_limited()
        self.assertEqual(policy(3), 30.0)


class TooManyRequestsTests(TestCase):
    """The in-memory service of L{reconnect.ReconnectTests} (base retry policy: 2 s), answering 429s."""

    setUp = reconnect.ReconnectTests.setUp
    start = reconnect.ReconnectTests.start
    stop = reconnect.ReconnectTests.stop
    settle = reconnect.ReconnectTests.settle

    def attempts_after(self, seconds):
        self.settle(0)
        self.reactor.advance(seconds)
        self.settle(0)
        return len(self.service.requests)

    def test_429_is_retried_with_a_growing_delay(self):
        self.start(*[ConnectionDeny(429, "Too Many Requests")] * 4)
        self.settle(0.01)
        self.assertEqual(len(self.service.requests), 1)
        self.assertIsNone(self.proxy.end)
        # Delays: max(2 s base, 1, 2, 4, 8 s) -> 2, 2, 4, 8.
        self.assertEqual(self.attempts_after(1.9), 1)
        self.assertEqual(self.attempts_after(0.2), 2)
        self.assertEqual(self.attempts_after(2.0), 3)
        self.assertEqual(self.attempts_after(3.8), 3)
        self.assertEqual(self.attempts_after(0.3), 4)
        self.assertEqual(self.attempts_after(7.8), 4)
        self.assertEqual(self.attempts_after(0.3), 5)
        self.assertTrue(self.proxy.session.ready)  # the fifth attempt was admitted
        self.assertIsNone(self.proxy.end)
        self.assertEqual(self.proxy.retry_policy.refusals, 0)
        for request in self.service.requests:
            self.assertEqual(request.headers["client-token"], self.proxy.factory.client_token)

    def test_other_4xx_still_ends(self):
        self.start(ConnectionDeny(429, "Too Many Requests"), ConnectionDeny(403, "Forbidden"))
        self.settle(0.01)
        self.assertIsNone(self.proxy.end)
        self.reactor.advance(2.0)
        self.settle(0.01)
        end = self.successResultOf(self.proxy.ended)
        self.assertEqual(end.status, 1)
        self.assertIn("403", end.message)
