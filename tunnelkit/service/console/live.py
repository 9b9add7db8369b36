# -*- test-case-name: tests.test_console_live -*-
"""
Live tunnel states for the console's pages, as server-sent events (C{GET /console/events}).

L{StateWatcher} reads the states of the subscribed accounts' tunnels from the store once per
C{interval} (only while some page listens) and sends each subscriber the changes since the previous
reading: one C{tunnel} event per changed tunnel (JSON: id, status, source, destination, updated) and a
C{gone} event for a tunnel that disappeared.  A comment line every L{KEEPALIVE} seconds keeps proxies
from closing an idle stream.  Polling the store, rather than hooking the relay, keeps the data plane
untouched and sees changes made by other service nodes or by the API alike; one reading serves every
page of an account.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tunnelkit.service.console.web import iso_time
from tunnelkit.service.store import IControlStore, Tunnel

log = Logger()

KEEPALIVE = 15.0
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


class StateWatcher:
    """
    Sends live states to the pages that listen.

    @param store: read with L{IControlStore.list_tunnels}.
    @param clock: runs the readings.
    @param interval: seconds between readings.
    """

    def __init__(self, store: IControlStore, clock: IReactorTime, interval: float = 1.0) -> None:
        self._store = store
        self._clock = clock
        self.interval = interval
        self._subscribers: Dict[str, List[_Subscriber]] = {}
        self._known: Dict[str, Dict[str, State]] = {}
        self._loop: Optional[LoopingCall] = None
        self._last_keepalive = clock.seconds()

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
            try:
                current = await self._read(account_id)
            except Exception:
                log.failure("Console: cannot read the tunnel states of account {account_id}", account_id=account_id)
                continue
            if account_id not in self._subscribers:
                continue  # its last page went away meanwhile
            before = self._known.get(account_id, {})
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
