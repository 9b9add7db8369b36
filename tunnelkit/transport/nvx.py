# -*- test-case-name: tests.test_nvx -*-
"""
A start-up check that autobahn's NVX accelerator is active.

autobahn masks and unmasks every WebSocket payload byte.  With its native NVX extension (prebuilt in
the PyPI wheel, on by default) that costs nothing measurable; without it the masking loop is pure
Python and a tunnel moves about 5 MB/s instead of hundreds (see performance.md).  NVX can be missing
(a build without the extension) or turned off (C{AUTOBAHN_USE_NVX=0} in the environment).

Every mode refuses to start without NVX unless the operator says C{--allow-slow-websocket}; then it
starts with a loud warning.  Mode options mix in L{NvxOptions} and their C{makeService} calls
L{require_nvx} with the flag's value.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from twisted.logger import Logger

from tunnelkit.errors import ConfigError

__all__ = ["NvxUnavailable", "NvxOptions", "nvx_status", "require_nvx", "ALLOW_FLAG"]

log = Logger()

#: The command-line flag that lets a mode start without NVX.
ALLOW_FLAG = "allow-slow-websocket"


class NvxUnavailable(ConfigError):
    """
    autobahn runs without its NVX accelerator and the operator did not allow that.  A
    L{ConfigError}, so a mode's C{makeService} reports it as a one-line usage error.
    """


def nvx_status() -> Optional[str]:
    """
    None when autobahn uses NVX; otherwise why not, in words an operator can act on.
    """
    import os

    import autobahn.websocket as websocket

    if getattr(websocket, "USES_NVX", False):
        return None
    if getattr(websocket, "HAS_NVX", False):
        setting = os.environ.get("AUTOBAHN_USE_NVX", "")
        return (
            "autobahn's NVX accelerator is built but turned off "
            f"(AUTOBAHN_USE_NVX={setting!r} in the environment): unset AUTOBAHN_USE_NVX"
        )
    return (
        "autobahn's NVX accelerator is not available in this installation: install autobahn "
        "from its PyPI wheel (pip install --force-reinstall autobahn), or build it with "
        "AUTOBAHN_USE_NVX=1 and a C compiler with cffi"
    )


def require_nvx(allow_slow: bool = False) -> None:
    """
    Check NVX at start-up.

    @param allow_slow: the operator's C{--allow-slow-websocket}: start anyway, with a warning.
    @raise NvxUnavailable: when NVX is not in use and C{allow_slow} is false.
    """
    problem = nvx_status()
    if problem is None:
        return
    if not allow_slow:
        raise NvxUnavailable(
            f"refusing to start: {problem}. Without it WebSocket masking runs in pure Python, "
            f"about fifty times slower (~5 MB/s per tunnel). Fix the installation, or pass "
            f"--{ALLOW_FLAG} to run slowly anyway."
        )
    log.warn(
        "WARNING: {problem}. Running with pure-Python WebSocket masking (~5 MB/s per tunnel) "
        "because --{flag} was given.",
        problem=problem,
        flag=ALLOW_FLAG,
    )


class NvxOptions:
    """
    Mixin for a mode's C{usage.Options}: adds C{--allow-slow-websocket}.

    After parsing, C{options["allow-slow-websocket"]} is 1 when given; pass
    C{bool(options["allow-slow-websocket"])} to L{require_nvx}.
    """

    optFlags: List[Sequence[Any]] = [
        [
            ALLOW_FLAG,
            None,
            "Start even when autobahn's NVX accelerator is off (WebSocket traffic is then about "
            "fifty times slower).",
        ],
    ]
