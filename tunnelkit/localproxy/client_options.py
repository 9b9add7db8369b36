# -*- test-case-name: tests.test_localproxy_options,tests.test_agent_tap -*-
"""
The options every mode shares that connects to the tunnel service's data plane as a client: the local
proxy's source and destination (L{tunnelkit.localproxy.tap}) and the device agent
(L{tunnelkit.agent.tap}).  Both mode modules import this one, never each other.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence

from twisted.python import usage

from tunnelkit.adapters import available_adapters, parse_adapter_overrides
from tunnelkit.config import ModeOptions
from tunnelkit.errors import ConfigError
from tunnelkit.transport.nvx import NvxOptions, NvxUnavailable, require_nvx
from tunnelkit.transport.tls import check_tls_library

__all__ = ["TunnelClientOptions"]


class TunnelClientOptions(NvxOptions, ModeOptions):
    """
    Options of every mode that connects to the tunnel service's data plane (the local proxy's
    source and destination, and the agent): C{-k}, C{-c}, C{--adapter}, and C{postOptions} turning
    each configuration error into a one-line usage error.  Subclasses check the rest in C{_check}.
    """

    optFlags = [
        ["no-ssl-host-verify", "k", "Do not check the tunnel service's TLS certificate or host name (DANGEROUS)."],
        ["no-probe", None, "Destination: do not probe each target's protocol (SSH banner, RFB greeting, ...) "
         "when connected to the tunnel."],
    ]

    optParameters = [
        ["capath", "c", None, "A CA file (PEM) or hashed CA directory to check the tunnel service's certificate."],
        ["tls-library", None, "stdlib", "TLS to the service through Python's ssl (stdlib: less CPU and memory) or "
         "pyOpenSSL (pyopenssl: its own OpenSSL, with post-quantum X25519MLKEM768 key exchange where the system's "
         "OpenSSL is older than 3.5)."],
    ]

    repeatable: Mapping[str, Any] = {"adapter": str}

    def opt_adapter(self, value: str) -> None:
        """SERVICE=NAME: the service adapter of a service (repeatable; default by prefix)."""
        self["adapter"].append(value)

    def postOptions(self) -> None:
        try:
            self._check()
            require_nvx(bool(self["allow-slow-websocket"]))
        except (ConfigError, ValueError, NvxUnavailable) as e:
            raise usage.UsageError(str(e)) from None

    def _check(self) -> None:
        """Check and derive the mode's options; raise L{ConfigError} naming the option at fault."""
        raise NotImplementedError(f"{type(self).__name__} must define _check")

    def _checked_capath(self) -> Optional[str]:
        """C{-c}, which must exist when given."""
        capath = self["capath"]
        if capath is not None and not os.path.exists(capath):
            raise ConfigError(f"-c/--capath {capath}: no such file or directory")
        return capath

    def _checked_tls_library(self) -> str:
        """C{--tls-library}: C{stdlib} or C{pyopenssl}."""
        return check_tls_library(self["tls-library"])

    def _checked_adapter_overrides(self, items: Sequence[str]) -> Dict[str, str]:
        """C{--adapter SERVICE=NAME} items as a mapping, each naming an installed adapter."""
        overrides = parse_adapter_overrides(list(items))
        known = available_adapters()
        for service_id, name in overrides.items():
            if name not in known:
                raise ConfigError(
                    f"--adapter {service_id}={name}: unknown adapter (known: {', '.join(sorted(known))})"
                )
        return overrides
