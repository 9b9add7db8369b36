# -*- test-case-name: tests.test_api -*-
"""
Tunnel lifetimes on the service's clock: OPEN tunnels close when C{maxLifetimeTimeoutMinutes} ends, and
CLOSED tunnels are purged once they have been visible for the retention period (3 hours by default).

One timer per OPEN tunnel fires at its deadline; at start-up the timers are armed again from the store,
so a tunnel whose deadline passed while the service was down closes as soon as the service starts.
A purge pass runs every minute (or every retention period, if shorter).  All timers use the injected
L{IReactorTime}, and nothing stays scheduled after L{TunnelLifecycle.stopService}.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tunnelkit.service.store import IControlStore

log = Logger()

PURGE_INTERVAL = 60.0


class TunnelLifecycle(Service):
    """
    Expiry and purge timers.

    @param on_closed: called as C{on_closed(tunnel_id, "expired")} for each tunnel this closes.
    """

    name = "tunnel-lifecycle"  # type: ignore[assignment]  # twisted leaves Service.name untyped (inferred None)

    def __init__(
        self,
        store: IControlStore,
        clock: IReactorTime,
        on_closed: Callable[[str, str], None],
        closed_retention: float,
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_closed = on_closed
        self.closed_retention = closed_retention
        self._timers: Dict[str, IDelayedCall] = {}
        self._purger: Optional[LoopingCall] = None
        #: Fires once the timers are armed at start (for tests).
        self.armed: Any = None

    def startService(self) -> None:
        super().startService()
        self.armed = Deferred.fromCoroutine(self._arm())
        self._purger = LoopingCall(self.purge)
        self._purger.clock = self._clock
        self._purger.start(min(PURGE_INTERVAL, max(self.closed_retention, 1.0)), now=True)

    async def _arm(self) -> None:
        """Close what expired while the service was down, then arm a timer per OPEN tunnel."""
        try:
            await self.expire_due()
            if not self.running:
                return
            for tunnel_id, expires_at in await self._store.open_deadlines():
                self.schedule(tunnel_id, expires_at)
        except Exception:
            if self.running:  # else the service stopped meanwhile (its store closed): nothing to arm
                log.failure("Arming the tunnel expiry timers from the store failed")

    def stopService(self) -> None:
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        self._purger = None

    def schedule(self, tunnel_id: str, expires_at: float) -> None:
        """Close C{tunnel_id} at C{expires_at} (epoch seconds on the clock)."""
        if not self.running:
            return  # startService arms every OPEN tunnel from the store
        self.cancel(tunnel_id)
        delay = max(0.0, expires_at - self._clock.seconds())
        self._timers[tunnel_id] = self._clock.callLater(delay, self._deadline, tunnel_id)

    def cancel(self, tunnel_id: str) -> None:
        """Forget C{tunnel_id}'s deadline (it was closed or deleted)."""
        timer = self._timers.pop(tunnel_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def pending(self) -> List[str]:
        """Ids of the tunnels with an armed deadline (for tests and metrics)."""
        return sorted(self._timers)

    def _deadline(self, tunnel_id: str) -> None:
        self._timers.pop(tunnel_id, None)
        self.expire_due()

    def expire_due(self) -> "Deferred[List[str]]":
        """Close every OPEN tunnel whose lifetime has ended; a Deferred of their ids (empty on a store error)."""
        d = self._store.expire_due(self._clock.seconds())
        d.addCallback(self._expired)
        d.addErrback(self._failed, "Closing the expired tunnels failed", [])
        return d

    def _expired(self, expired: List[str]) -> List[str]:
        for tunnel_id in expired:
            self.cancel(tunnel_id)
            try:
                self._on_closed(tunnel_id, "expired")
            except Exception:
                log.failure("Telling others that tunnel {tunnel_id} expired failed", tunnel_id=tunnel_id)
        return expired

    def purge(self) -> "Deferred[int]":
        """Delete CLOSED tunnels older than the retention period; a Deferred of how many."""
        d = self._store.purge_closed(self._clock.seconds() - self.closed_retention)
        d.addCallback(self._purged)
        d.addErrback(self._failed, "Purging the closed tunnels failed", 0)
        return d

    @staticmethod
    def _purged(purged: int) -> int:
        if purged:
            log.info("Purged {count} closed tunnel(s) past their retention", count=purged)
        return purged

    def _failed(self, failure: Failure, what: str, value: Any) -> Any:
        if self.running:  # else the service is stopping and its store closed: nothing lost
            log.failure(what, failure)
        return value
