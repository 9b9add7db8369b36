"""
The console's sessions, CSRF tokens and sign-in rate limit (L{tunnelkit.service.console.sessions}),
on an injected clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from twisted.internet.defer import Deferred, fail

from tunnelkit.service.console.sessions import (
    TOKENS_KEPT,
    PasswordChecks,
    PendingTokens,
    SessionManager,
    SignInLimiter,
)


class SessionTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.ended = []
        self.sessions = SessionManager(self.clock.seconds, idle_timeout=100, max_age=1000, on_end=self.ended.append)

    def test_create_and_get(self) -> None:
        session = self.sessions.create("123456789012", "default", "alice")
        self.assertIs(self.sessions.get(session.session_id), session)
        self.assertGreaterEqual(len(session.session_id), 43)
        self.assertNotEqual(session.session_id, session.csrf_token)
        self.assertIsNone(self.sessions.get("forged-" + session.session_id))
        self.assertIsNone(self.sessions.get(None))
        self.assertIsNone(self.sessions.get(""))

    def test_idle_timeout_and_touch(self) -> None:
        session = self.sessions.create("1", "a", "alice")
        self.clock.advance(99)
        self.assertIs(self.sessions.get(session.session_id), session)  # restarts the idle timer
        self.clock.advance(99)
        self.assertIs(self.sessions.get(session.session_id), session)
        self.clock.advance(100)
        self.assertIsNone(self.sessions.get(session.session_id))
        self.assertEqual(self.ended, [session])
        self.assertEqual(len(self.sessions), 0)

    def test_absolute_age(self) -> None:
        session = self.sessions.create("1", "a", "alice")
        for _ in range(10):
            self.clock.advance(99)
            self.assertIsNotNone(self.sessions.get(session.session_id))
        self.assertEqual(self.sessions.cookie_max_age(session), 10)
        self.clock.advance(10)
        self.assertIsNone(self.sessions.get(session.session_id))

    def test_sign_out_forgets_tokens(self) -> None:
        session = self.sessions.create("1", "a", "alice")
        session.pending = PendingTokens("t", {"source": "s"}, self.clock.seconds())
        self.sessions.end(session)
        self.assertIsNone(session.pending)
        self.assertIsNone(self.sessions.get(session.session_id))
        self.assertEqual(self.ended, [session])
        self.sessions.end(session)  # twice: nothing more
        self.assertEqual(self.ended, [session])

    def test_pending_tokens_expire(self) -> None:
        sessions = SessionManager(self.clock.seconds)
        session = sessions.create("1", "a", "alice")
        session.pending = PendingTokens("t", {"source": "s"}, self.clock.seconds())
        self.clock.advance(TOKENS_KEPT - 1)
        self.assertIsNotNone(sessions.get(session.session_id).pending)
        self.clock.advance(1)
        self.assertIsNone(sessions.get(session.session_id).pending)

    def test_end_user_and_expire(self) -> None:
        a = self.sessions.create("1", "a", "alice")
        b = self.sessions.create("1", "a", "alice")
        c = self.sessions.create("1", "a", "bob")
        self.assertEqual(self.sessions.end_user("1", "alice"), 2)
        self.assertIsNone(self.sessions.get(a.session_id))
        self.assertIsNone(self.sessions.get(b.session_id))
        self.clock.advance(100)
        self.assertEqual(self.sessions.expire(), 1)
        self.assertIsNone(self.sessions.get(c.session_id))

    def test_csrf(self) -> None:
        session = self.sessions.create("1", "a", "alice")
        self.assertTrue(session.csrf_ok(session.csrf_token))
        self.assertFalse(session.csrf_ok(None))
        self.assertFalse(session.csrf_ok(""))
        self.assertFalse(session.csrf_ok(session.csrf_token[:-1]))
        self.assertFalse(session.csrf_ok(self.sessions.create("1", "a", "alice").csrf_token))
        self.assertFalse(session.csrf_ok("é" + session.csrf_token))

    def test_flash(self) -> None:
        session = self.sessions.create("1", "a", "alice")
        session.flash.append("done")
        self.assertEqual(session.take_flash(), ["done"])
        self.assertEqual(session.take_flash(), [])


class SignInLimiterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.limiter = SignInLimiter(self.clock.seconds)

    def fail(self, times: int, user: str = "default/alice", address: str = "10.0.0.1") -> None:
        for _ in range(times):
            self.assertEqual(self.limiter.wait_time(user, address), 0)
            self.limiter.failed(user, address)

    def test_free_failures_then_doubling(self) -> None:
        self.fail(SignInLimiter.free_failures - 1)
        self.assertEqual(self.limiter.wait_time("default/alice", "10.0.0.1"), 0)
        self.limiter.failed("default/alice", "10.0.0.1")
        self.assertEqual(self.limiter.wait_time("default/alice", "10.0.0.1"), 1)
        self.clock.advance(1)
        self.limiter.failed("default/alice", "10.0.0.1")
        self.assertEqual(self.limiter.wait_time("default/alice", "10.0.0.1"), 2)
        self.clock.advance(1.5)
        self.assertEqual(self.limiter.wait_time("default/alice", "10.0.0.1"), 0.5)
        self.clock.advance(0.5)
        self.limiter.failed("default/alice", "10.0.0.1")
        self.assertEqual(self.limiter.wait_time("default/alice", "10.0.0.1"), 4)

    def test_per_user_and_per_address(self) -> None:
        self.fail(SignInLimiter.free_failures)
        # The same user from another address, and another user from the same address, both wait.
        self.assertEqual(self.limiter.wait_time("default/alice", "10.0.0.2"), 1)
        self.assertEqual(self.limiter.wait_time("default/bob", "10.0.0.1"), 1)
        self.assertEqual(self.limiter.wait_time("default/bob", "10.0.0.2"), 0)

    def test_success_clears_the_user(self) -> None:
        self.fail(SignInLimiter.free_failures - 1)
        self.limiter.succeeded("default/alice", "10.0.0.1")
        self.fail(SignInLimiter.free_failures - 1, address="10.0.0.2")  # the user's count starts again
        self.assertEqual(self.limiter.wait_time("default/alice", "10.0.0.3"), 0)
        self.limiter.failed("default/alice", "10.0.0.2")
        self.assertEqual(self.limiter.wait_time("default/alice", "10.0.0.3"), 1)
        self.assertEqual(self.limiter.wait_time("default/carol", "10.0.0.1"), 0)  # the address has 4

    def test_delay_is_bounded_and_forgotten(self) -> None:
        for _ in range(40):
            self.clock.advance(self.limiter.wait_time("u", "a"))
            self.limiter.failed("u", "a")
        self.assertEqual(self.limiter.wait_time("u", "a"), SignInLimiter.max_delay)
        self.clock.advance(SignInLimiter.window + SignInLimiter.max_delay)
        self.assertEqual(self.limiter.wait_time("u", "a"), 0)
        self.limiter.failed("u", "a")
        self.assertEqual(self.limiter.wait_time("u", "a"), 0)  # a fresh count

    def test_memory_is_bounded(self) -> None:
        limiter = SignInLimiter(self.clock.seconds, max_entries=10)
        for i in range(100):
            limiter.failed(f"user{i}", f"addr{i}")
            self.clock.advance(1)
        self.assertLessEqual(len(limiter._failures), 11)


class PasswordChecksTests(TestCase):
    """At most 2 password checks at once (Argon2: 64 MiB and a thread each)."""

    def test_bound(self) -> None:
        checks = PasswordChecks()
        pending = [Deferred(), Deferred()]
        started = [checks.start(lambda d=d: d) for d in pending]
        self.assertTrue(all(s is not None for s in started))
        self.assertIsNone(checks.start(lambda: self.fail("not run beyond the bound")))
        pending[0].callback(True)
        self.assertEqual(self.successResultOf(started[0]), True)
        third: Deferred = Deferred()
        self.assertIs(checks.start(lambda: third), third)
        self.assertIsNone(checks.start(Deferred))
        pending[1].errback(ValueError("bad hash"))
        self.failureResultOf(started[1], ValueError)
        third.callback(False)
        self.assertEqual(checks.running, 0)

    def test_raising_check_frees_its_place(self) -> None:
        checks = PasswordChecks(limit=1)

        def broken() -> Deferred:
            raise RuntimeError("no thread")

        self.assertRaises(RuntimeError, checks.start, broken)
        self.assertEqual(checks.running, 0)
        self.failureResultOf(checks.start(lambda: fail(KeyError("x"))), KeyError)
        self.assertEqual(checks.running, 0)
