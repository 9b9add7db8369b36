# -*- test-case-name: tests.test_console_sessions -*-
"""
Console sign-in sessions, CSRF tokens and the sign-in rate limit, sans-IO: time comes from an injected
C{now()} function and nothing here touches the network.

Sessions are kept in the service's memory (a restart signs everyone out).  The browser holds only a
random 256-bit session id in the C{__Host-tunnelkit-console} cookie (C{Secure; HttpOnly;
SameSite=Strict; Path=/}); the server keeps, per session, the user, the expiry (idle and absolute),
the CSRF token that every state-changing request must carry, and the secrets the console holds for a
while on the user's behalf (the tokens of the one-time token page, the source token of a quick setup).

Sign-in rate limit (L{SignInLimiter}): each failure is counted per user name and per client address;
after L{SignInLimiter.free_failures} failures within L{SignInLimiter.window} seconds, the next attempt
must wait 1 s, then 2, 4, ... up to L{SignInLimiter.max_delay}; an attempt made too early is refused
without checking the password.  A success clears the user's count.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Tuple

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

COOKIE_NAME = "__Host-tunnelkit-console"
#: A session ends after this long without a request...
IDLE_TIMEOUT = 30 * 60.0
#: ... and in any case this long after sign-in.
MAX_AGE = 12 * 3600.0
#: How long the console keeps tokens shown on the one-time token page if Done is never pressed.
TOKENS_KEPT = 15 * 60.0


@dataclass
class PendingTokens:
    """Tokens to show once on the token page (until Done, or L{TOKENS_KEPT} seconds)."""

    tunnel_id: str
    tokens: Dict[str, str]  # "source"/"destination" -> token
    created_at: float
    thing_name: Optional[str] = None
    services: Tuple[str, ...] = ()


@dataclass
class Session:
    """One signed-in browser."""

    session_id: str
    account_id: str
    account_name: str
    user_name: str
    csrf_token: str
    created_at: float
    last_seen_at: float
    pending: Optional[PendingTokens] = None
    flash: List[str] = field(default_factory=list)

    def take_flash(self) -> List[str]:
        """The messages for the next page (and forget them)."""
        messages, self.flash = self.flash, []
        return messages

    def csrf_ok(self, token: Optional[str]) -> bool:
        """Whether C{token} is this session's CSRF token (constant-time)."""
        return token is not None and hmac.compare_digest(token.encode("utf-8", "replace"), self.csrf_token.encode())


class SessionManager:
    """
    The signed-in sessions.

    @param now: the clock (seconds since the epoch).
    @param on_end: called with each session that ends (sign-out, expiry), to drop what it held.
    """

    def __init__(
        self,
        now: Callable[[], float],
        idle_timeout: float = IDLE_TIMEOUT,
        max_age: float = MAX_AGE,
        on_end: Optional[Callable[[Session], None]] = None,
    ) -> None:
        self._now = now
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self._on_end = on_end
        self._sessions: Dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def now(self) -> float:
        return self._now()

    def create(self, account_id: str, account_name: str, user_name: str) -> Session:
        """A new session for a user who just signed in."""
        self.expire()
        now = self._now()
        session = Session(
            session_id=secrets.token_urlsafe(32),
            account_id=account_id,
            account_name=account_name,
            user_name=user_name,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
        )
        self._sessions[session.session_id] = session
        return session

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_seen_at >= self.idle_timeout or now - session.created_at >= self.max_age

    def get(self, session_id: Optional[str], touch: bool = True) -> Optional[Session]:
        """The live session with this id (its idle timer restarts when C{touch}), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._now()
        if self._expired(session, now):
            self.end(session)
            return None
        if touch:
            session.last_seen_at = now
        if session.pending is not None and now - session.pending.created_at >= TOKENS_KEPT:
            session.pending = None
        return session

    def end(self, session: Session) -> None:
        """Sign out: forget the session and whatever it held."""
        if self._sessions.pop(session.session_id, None) is not None:
            session.pending = None
            if self._on_end is not None:
                self._on_end(session)

    def end_user(self, account_id: str, user_name: str) -> int:
        """End every session of a user (deleted, or password reset); how many."""
        ended = [s for s in self._sessions.values() if s.account_id == account_id and s.user_name == user_name]
        for session in ended:
            self.end(session)
        return len(ended)

    def expire(self) -> int:
        """End the sessions that timed out; how many."""
        now = self._now()
        ended = [s for s in self._sessions.values() if self._expired(s, now)]
        for session in ended:
            self.end(session)
        return len(ended)

    def sessions(self) -> Iterable[Session]:
        return list(self._sessions.values())

    def cookie_max_age(self, session: Session) -> int:
        """The cookie's Max-Age: until the session's absolute end."""
        return max(0, int(session.created_at + self.max_age - self._now()))


@dataclass
class _Failures:
    count: int
    last: float


#: How many password checks (Argon2id, 64 MiB and a thread each) may run at once.
MAX_PASSWORD_CHECKS = 2


class PasswordChecks:
    """
    At most C{limit} password checks at once: Argon2id takes 64 MiB and one of the reactor's threads for
    each, so a flood of sign-ins (with varied names, which the per-user limit does not slow) must not hold
    every thread and that much memory.  Beyond the limit the sign-in is refused at once (429).
    """

    def __init__(self, limit: int = MAX_PASSWORD_CHECKS) -> None:
        self.limit = limit
        self.running = 0

    def start(self, check: Callable[[], "Deferred[bool]"]) -> "Optional[Deferred[bool]]":
        """Run C{check} if a place is free (its Deferred, freeing the place when it fires), else None."""
        if self.running >= self.limit:
            return None
        self.running += 1
        try:
            d = check()
        except BaseException:
            self.running -= 1
            raise

        def done(result: object) -> object:
            self.running -= 1
            return result

        return d.addBoth(done)


class SignInLimiter:
    """
    Slows down password guessing (see the module docstring).

    @param now: the clock.
    """

    free_failures = 5
    window = 15 * 60.0
    max_delay = 15 * 60.0

    def __init__(self, now: Callable[[], float], max_entries: int = 100_000) -> None:
        self._now = now
        self._max_entries = max_entries
        self._failures: Dict[str, _Failures] = {}

    def _keys(self, user_key: str, address: str) -> Tuple[str, str]:
        return ("user:" + user_key, "address:" + address)

    def _delay(self, failures: _Failures) -> float:
        over = failures.count - self.free_failures
        if over < 0:
            return 0.0
        return float(min(self.max_delay, 2.0**over))

    def wait_time(self, user_key: str, address: str) -> float:
        """Seconds the caller must still wait before this attempt may be checked (0: go ahead)."""
        now = self._now()
        wait = 0.0
        for key in self._keys(user_key, address):
            failures = self._failures.get(key)
            if failures is None:
                continue
            if now - failures.last >= self.window + self.max_delay:
                del self._failures[key]
                continue
            wait = max(wait, failures.last + self._delay(failures) - now)
        return max(0.0, wait)

    def failed(self, user_key: str, address: str) -> None:
        """Count a wrong password (or unknown user)."""
        now = self._now()
        if len(self._failures) >= self._max_entries:
            self._prune(now)
        for key in self._keys(user_key, address):
            failures = self._failures.get(key)
            if failures is None or now - failures.last >= self.window + self.max_delay:
                self._failures[key] = _Failures(1, now)
            else:
                failures.count += 1
                failures.last = now

    def succeeded(self, user_key: str, address: str) -> None:
        """A right password: the user's count starts again (the address keeps its own)."""
        self._failures.pop(self._keys(user_key, address)[0], None)

    def _prune(self, now: float) -> None:
        for key, failures in list(self._failures.items()):
            if now - failures.last >= self.window:
                del self._failures[key]
        while len(self._failures) >= self._max_entries:  # still full: forget the oldest
            oldest = min(self._failures, key=lambda k: self._failures[k].last)
            del self._failures[oldest]
