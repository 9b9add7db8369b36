"""
The end-to-end tests' process helpers: they live in L{tunnelkit.testing.process} (shared with the
benchmarks); this module names them for the tests that import them from here.
"""

from tunnelkit.testing.process import (
    DEFAULT_TIMEOUT,
    REPOSITORY_TOP,
    SCP,
    SSH,
    SSH_KEYGEN,
    SSHD,
    TWISTD,
    Harness,
    Process,
    Proxy,
    Service,
    Sshd,
    Tunnel,
    exchange,
    wait_until,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "REPOSITORY_TOP",
    "SCP",
    "SSH",
    "SSH_KEYGEN",
    "SSHD",
    "TWISTD",
    "Harness",
    "Process",
    "Proxy",
    "Service",
    "Sshd",
    "Tunnel",
    "exchange",
    "wait_until",
]
