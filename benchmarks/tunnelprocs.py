"""
Real processes for the issue-10 benchmarks (bench_hol, bench_faults, bench_ftp), on 127.0.0.1 only:
the service, tunnelkit's local proxies, AWS's C++ localproxy, and the tunnelkit.testapps server.

Benchmarks do not import the test suite: the processes are L{tunnelkit.testing.process}'s (the
end-to-end tests' too); this module adds what these benchmarks share.  Every process runs in its own
directory under one temporary root with its log there, and L{Processes.cleanup} stops them all (call
it in a C{finally}).  A proxy or the service can be killed (C{kill -9}) and started again with
L{Process.restart}: the same arguments, ports, state directory and client token.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Dict, Optional, Sequence

from tunnelkit.testing.process import LOCALPROXY_VARIABLE, Harness, Process, rss_mb

__all__ = ["Child", "Processes", "rss_mb", "source_port"]

#: A benchmark's process (L{Process.restart}, L{Process.mark}, L{Process.wait_for_log}).
Child = Process


class Processes(Harness):
    """Starts the processes of one benchmark and stops them all in L{cleanup}."""

    def __init__(self) -> None:
        super().__init__(None, prefix="tunnelkit-bench-")

    @property
    def tls(self) -> bool:
        assert self.service is not None
        return self.service.secure

    @property
    def service_port(self) -> int:
        assert self.service is not None
        return self.service.port

    @property
    def state_dir(self) -> str:
        assert self.service is not None
        return self.service.state_dir

    def start_service_process(self, tls: bool = False) -> Process:
        """C{--mode service} on an ephemeral port (kept across L{Process.restart})."""
        return self.start_service(tls).process

    def tokens(self, services: Sequence[str]) -> Dict[str, str]:
        """OpenTunnel: C{{"source": token, "destination": token}}."""
        tunnel = self.open_tunnel(services, thing_name="bench")
        return {"source": tunnel.source_token, "destination": tunnel.destination_token}

    def start_proxy(self, mode: str, token: str, mapping: str, name: Optional[str] = None,
                    client_token: Optional[str] = None) -> Process:
        """tunnelkit's C{--mode source|destination} (C{-s}/C{-d} C{mapping}), once connected; a fixed
        client token (default: one per name) so a restarted process may use the same access token."""
        name = name or mode
        client_token = client_token or f"bench-{name}-".ljust(36, "0")
        if mode == "source":
            child = self.start_source(token, mapping, name=name, client_token=client_token)
        else:
            child = self.start_destination(token, mapping, name=name, client_token=client_token)
        child.wait_for_log("Successfully established websocket connection", 60)
        return child

    def cpp_binary(self) -> Optional[str]:
        path = os.environ.get(LOCALPROXY_VARIABLE) or shutil.which("localproxy")
        return path if path and os.access(path, os.X_OK) else None

    def start_cpp_proxy(self, mode: str, token: str, mapping: str, name: Optional[str] = None) -> Process:
        """AWS's C++ localproxy (C{-m src|dst}); the service must run with TLS."""
        binary = self.cpp_binary()
        if binary is None or not self.tls:
            raise RuntimeError(f"the C++ localproxy needs ${LOCALPROXY_VARIABLE} and a TLS service")
        child = self.spawn(name or f"cpp-{mode}", [binary, "-m", mode, "-e", f"127.0.0.1:{self.service_port}",
                                                   "-s" if mode == "src" else "-d", mapping, "-b", "127.0.0.1"],
                           env={"AWSIOT_TUNNEL_ACCESS_TOKEN": token,
                                "SSL_CERT_FILE": os.path.join(self.state_dir, "ca.pem")})
        child.wait_for_log("Successfully established websocket connection", 60)
        return child


def source_port(source: Process, service_id: str) -> int:
    """The port a tunnelkit source logged for C{service_id}."""
    return int(source.wait_for_log(rf"Listening for new connection on port (\d+) \([^,]*, service {re.escape(service_id)},", 60).group(1))
