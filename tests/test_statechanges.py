"""L{tunnelkit.service.statechanges.StateChanges}: fans this node's tunnel state changes out to observers."""

from __future__ import annotations

from typing import List, Optional, Tuple

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunnelkit.service.interfaces import ITunnelStateObserver
from tunnelkit.service.statechanges import StateChanges


@implementer(ITunnelStateObserver)
class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.told: List[Tuple[Optional[str], str]] = []
        self.fail = fail

    def tunnel_changed(self, account_id: Optional[str], tunnel_id: str) -> None:
        self.told.append((account_id, tunnel_id))
        if self.fail:
            raise RuntimeError("observer bug")


class StateChangesTests(SynchronousTestCase):
    def test_fan_out_and_failures(self) -> None:
        changes = StateChanges()
        verifyObject(ITunnelStateObserver, changes)
        changes.tunnel_changed("1", "t0")  # nobody listens: nothing happens
        broken, kept = Recorder(fail=True), Recorder()
        changes.add(broken)
        changes.add(kept)
        changes.tunnel_changed("1", "t1")
        self.assertEqual(kept.told, [("1", "t1")])  # told although the first observer raised
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        changes.remove(broken)
        changes.remove(broken)
        changes.tunnel_changed(None, "t2")
        self.assertEqual((broken.told, kept.told), ([("1", "t1")], [("1", "t1"), (None, "t2")]))
