# -*- test-case-name: tests.test_console_live -*-
"""
Live tunnel states for the console's pages, as server-sent events (C{GET /console/events}).

L{StateWatcher} is told of each change on this node (L{tunnel_changed}: the relay recorded a side's
connection state, the control plane opened, closed or expired a tunnel; see
L{tunnelkit.service.interfaces.ITunnelStateObserver}) and reads that one tunnel again; each subscriber
gets the changes: one C{tunnel} event per changed tunnel (JSON: id, status, source, destination,
updated) and a C{gone} event for a tunnel that disappeared.  Changes made by other service nodes are
not told here: a full reading of the subscribed accounts' tunnels every C{interval} (L{FALLBACK}, 10 s,
only while some page listens) catches them.  A comment line every L{KEEPALIVE} seconds keeps proxies
from closing an idle stream.  One reading serves every page of an account.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from tunnelkit.service.console.web import iso_time
from tunnelkit.service.interfaces import ITunnelStateObserver
from tunnelkit.service.store import IControlStore, Tunnel

log = Logger()

KEEPALIVE = 15.0
#: Seconds between full readings (changes from other service nodes; this node's are told at once).
FALLBACK = 10.0
#: The page size used to read an account's tunnels.
PAGE = 1000

State = Tuple[str, str, str, float]  # status, source, destination, last_updated_at


async def all_tunnels(store: IControlStore, account_id: str) -> List[Tunnel]:
    """Every tunnel of the account, newest first (read page by page)."""
    after: Optional[int] = None
    found: List[Tunnel] = []
    while True:
        tunnels, after = await store.list_tunnels(account_id, None, PAGE, after)
        found.extend(tunnels)
        if after is None:
            return found


def tunnel_state(tunnel: Tunnel) -> State:
    return (tunnel.status, tunnel.source.status, tunnel.destination.status, tunnel.last_updated_at)


def state_event(tunnel_id: str, state: State) -> bytes:
    """One C{tunnel} event."""
    data = {
        "id": tunnel_id,
        "status": state[0],
        "source": state[1],
        "destination": state[2],
        "updated": iso_time(state[3]),
    }
    return b"event: tunnel\ndata: " + json.dumps(data).encode() + b"\n\n"


class _Subscriber:
    def __init__(self, request: Any, session_id: str, tunnel_id: Optional[str]) -> None:
        self.request = request
        self.session_id = session_id
        self.tunnel_id = tunnel_id  # only this tunnel's events (a tunnel page), or None (the hub)


@implementer(ITunnelStateObserver)
class StateWatcher:
    """
    Sends live states to the pages that listen.

    @param store: read with L{IControlStore.list_tunnels} and L{IControlStore.get_tunnel}.
    @param clock: runs the readings.
    @param interval: seconds between full readings.
    """

    def __init__(self, store: IControlStore, clock: IReactorTime, interval: float = FALLBACK) -> None:
        self._store = store
        self._clock = clock
        self.interval = interval
        self._subscribers: Dict[str, List[_Subscriber]] = {}
        self._known: Dict[str, Dict[str, State]] = {}
        self._loop: Optional[LoopingCall] = None
        self._last_keepalive = clock.seconds()
        #: (account id, tunnel id) being read again, and those changed again meanwhile.
        self._reading: Set[Tuple[str, str]] = set()
        self._again: Set[Tuple[str, str]] = set()
        #: account id -> tunnels read again while a full reading of the account runs.
        self._fresh: Dict[str, Set[str]] = {}

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def subscribe(self, account_id: str, session_id: str, request: Any, tunnel_id: Optional[str] = None) -> None:
        """
        Stream events to C{request} (an open twisted.web request) until it finishes or
        L{end_session} is called for C{session_id}.  The current states are sent first.
        """
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        subscriber = _Subscriber(request, session_id, tunnel_id)
        request.write(b"retry: 2000\n\n")
        self._subscribers.setdefault(account_id, []).append(subscriber)
        request.notifyFinish().addBoth(lambda _: self._unsubscribe(account_id, subscriber))
        if self._loop is None:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=False)
        Deferred.fromCoroutine(self._send_current(account_id, subscriber))

    async def _send_current(self, account_id: str, subscriber: _Subscriber) -> None:
        """The current states, first thing on a new stream."""
        if account_id not in self._known:
            try:
                known = await self._read(account_id)
            except Exception:
                log.failure("Console: cannot read the tunnel states of account {account_id}", account_id=account_id)
                return
            self._known.setdefault(account_id, known)
        request = subscriber.request
        if request.finished or getattr(request, "_disconnected", False):
            return
        for tid, state in self._known.get(account_id, {}).items():
            if subscriber.tunnel_id is None or tid == subscriber.tunnel_id:
                request.write(state_event(tid, state))

    def _unsubscribe(self, account_id: str, subscriber: _Subscriber) -> None:
        subscribers = self._subscribers.get(account_id, [])
        if subscriber in subscribers:
            subscribers.remove(subscriber)
        if not subscribers:
            self._subscribers.pop(account_id, None)
            self._known.pop(account_id, None)
        if not self._subscribers and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def end_session(self, session_id: str) -> None:
        """The session ended (sign-out, expiry): close its streams."""
        for account_id, subscribers in list(self._subscribers.items()):
            for subscriber in list(subscribers):
                if subscriber.session_id == session_id:
                    self._finish(subscriber.request)

    @staticmethod
    def _finish(request: Any, event: bytes = b"signedout") -> None:
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(b"event: " + event + b"\ndata: {}\n\n")
            request.finish()

    def tunnel_changed(self, account_id: Optional[str], tunnel_id: str) -> None:
        """
        L{ITunnelStateObserver}: read the tunnel again and send its change to the account's pages (an
        unknown C{account_id}: the accounts whose pages show the tunnel).  One reading per tunnel at a
        time; a change told meanwhile reads it once more after.
        """
        if account_id is not None:
            accounts = [account_id] if account_id in self._subscribers else []
        else:
            accounts = [a for a, known in self._known.items() if tunnel_id in known]
        for account in accounts:
            key = (account, tunnel_id)
            if key in self._reading:
                self._again.add(key)
            else:
                self._read_one(key)

    def _read_one(self, key: Tuple[str, str]) -> None:
        self._reading.add(key)
        d = Deferred.fromCoroutine(self._update_one(*key))

        def done(_: Any) -> None:
            self._reading.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._read_one(key)

        d.addErrback(lambda f: log.failure("Console: cannot read tunnel {tunnel_id}", f, tunnel_id=key[1]))
        d.addBoth(done)

    async def _update_one(self, account_id: str, tunnel_id: str) -> None:
        tunnel = await self._store.get_tunnel(account_id, tunnel_id)
        known = self._known.get(account_id)
        subscribers = self._subscribers.get(account_id)
        if known is None or not subscribers:
            return  # the account's pages went away meanwhile (or its first reading is not done)
        if account_id in self._fresh:
            self._fresh[account_id].add(tunnel_id)
        if tunnel is None:
            if known.pop(tunnel_id, None) is None:
                return
            event = b"event: gone\ndata: " + json.dumps({"id": tunnel_id}).encode() + b"\n\n"
        else:
            state = tunnel_state(tunnel)
            if known.get(tunnel_id) == state:
                return
            known[tunnel_id] = state
            event = state_event(tunnel_id, state)
        for subscriber in list(subscribers):
            if (subscriber.tunnel_id is None or subscriber.tunnel_id == tunnel_id) and not subscriber.request.finished:
                subscriber.request.write(event)

    async def _read(self, account_id: str) -> Dict[str, State]:
        return {t.tunnel_id: tunnel_state(t) for t in await all_tunnels(self._store, account_id)}

    def tick(self) -> "Deferred[None]":
        """Read the states once and send the changes (the next reading waits for this one)."""
        return Deferred.fromCoroutine(self._tick())

    async def _tick(self) -> None:
        now = self._clock.seconds()
        keepalive = now - self._last_keepalive >= KEEPALIVE
        if keepalive:
            self._last_keepalive = now
        for account_id, subscribers in list(self._subscribers.items()):
            self._fresh[account_id] = set()
            try:
                current = await self._read(account_id)
            except Exception:
                log.failure("Console: cannot read the tunnel states of account {account_id}", account_id=account_id)
                continue
            finally:
                fresh = self._fresh.pop(account_id, set())
            if account_id not in self._subscribers:
                continue  # its last page went away meanwhile
            before = self._known.get(account_id, {})
            for tid in fresh:  # read again (told) while this reading ran: that reading is the newer
                if tid in before:
                    current[tid] = before[tid]
                else:
                    current.pop(tid, None)
            self._known[account_id] = current
            changed = [(tid, s) for tid, s in current.items() if before.get(tid) != s]
            gone = [tid for tid in before if tid not in current]
            for subscriber in list(subscribers):
                out: List[bytes] = []
                for tid, state in changed:
                    if subscriber.tunnel_id is None or subscriber.tunnel_id == tid:
                        out.append(state_event(tid, state))
                for tid in gone:
                    if subscriber.tunnel_id is None or subscriber.tunnel_id == tid:
                        out.append(b"event: gone\ndata: " + json.dumps({"id": tid}).encode() + b"\n\n")
                if keepalive:
                    out.append(b": keepalive\n\n")
                if out and not subscriber.request.finished:
                    subscriber.request.write(b"".join(out))

    def stop(self) -> None:
        """Close every stream (the service stops)."""
        for subscribers in list(self._subscribers.values()):
            for subscriber in list(subscribers):
                self._finish(subscriber.request, b"stopping")
