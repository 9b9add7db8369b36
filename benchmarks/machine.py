"""
What the benchmark scripts say about the machine, so a reader can judge whether anything else ran.
"""

import os
import time
from typing import Tuple


def load_note() -> str:
    """The machine's load averages."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def busy_before(seconds: float = 1.0) -> str:
    """How busy the CPUs are while the benchmark does nothing (anything else running shows here)."""

    def times() -> Tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = times()
    time.sleep(seconds)
    busy1, total1 = times()
    share = 100.0 * (busy1 - busy0) / max(1, total1 - total0)
    return f"the CPUs were {share:.0f}% busy during {seconds:g} s of quiet before the run"
