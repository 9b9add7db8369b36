# -*- test-case-name: tests.test_statechanges -*-
"""
Who is told of tunnel state changes on this node (L{ITunnelStateObserver}): the relay and the control
plane tell one L{StateChanges}, which tells each observer added (the console).  Nothing is told when
no observer is added, and an observer that raises is logged, never the relay's or the API's problem.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.logger import Logger
from zope.interface import implementer

from tunnelkit.service.interfaces import ITunnelStateObserver

log = Logger()


@implementer(ITunnelStateObserver)
class StateChanges:
    """Fans a tunnel's state change out to the observers added."""

    def __init__(self) -> None:
        self._observers: List[ITunnelStateObserver] = []

    def add(self, observer: ITunnelStateObserver) -> None:
        self._observers.append(observer)

    def remove(self, observer: ITunnelStateObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def tunnel_changed(self, account_id: Optional[str], tunnel_id: str) -> None:
        for observer in list(self._observers):
            try:
                observer.tunnel_changed(account_id, tunnel_id)
            except Exception:
                log.failure("A tunnel state observer failed on tunnel {tunnel_id}", tunnel_id=tunnel_id)
