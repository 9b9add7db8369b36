# -*- test-case-name: tests.e2e.test_cluster_nodes -*-
"""
Several tunnelkit service nodes as real processes on one PostgreSQL store, each a cluster node
(C{--cluster-listen ssl:...}, or C{tcp:} with C{cluster_tls=False}) on 127.0.0.1 with ports it bound itself (read back from its log), for the
cluster's end-to-end test and benchmark.  Blocking, like L{tunnelkit.testing.process}.

    procs = Processes("tunnelkit-cluster-")
    cluster = ClusterNodes(procs, dsn, ["a", "b", "c"])   # dsn: tunnelkit.testing.postgres
    tunnel = cluster.open_tunnel("a")                      # OpenTunnel through node a
    cluster.nodes["b"].port                                # its plain-HTTP API and data plane port
    cluster.nodes["a"].child.kill(); cluster.nodes["a"].restart()
"""

from __future__ import annotations

import configparser
import os
from typing import Any, Dict, Optional, Sequence

from tunnelkit.testing.process import DEFAULT_TIMEOUT, Child, Processes

__all__ = ["ClusterNode", "ClusterNodes", "connect_retrying"]

_API = r"API listening on http://127\.0\.0\.1:(\d+)/"
_CLUSTER = r"Cluster node \S+: forwarded peers on (?:tls:)?127\.0\.0\.1:(\d+)"
SECRET = "tunnelkit-e2e-cluster-secret-0123456789"


class ClusterNode:
    """One C{--mode service} node; C{port} (API and data plane, plain HTTP) and C{cluster_port}."""

    def __init__(self, procs: Processes, name: str, dsn: str, secret_file: str, state_dir: str,
                 heartbeat: float, node_timeout: float, extra: Sequence[str] = (), cluster_tls: bool = True) -> None:
        self.name = name
        self.state_dir = state_dir
        self.cluster_scheme = "ssl" if cluster_tls else "tcp"
        self.port = 0
        self.cluster_port = 0
        self.args = [
            "--mode", "service", "--store", dsn, "--state-dir", state_dir, "--no-console",
            "--audit-log", "", "--max-pending-per-address", "0", "--failed-handshakes-per-address", "0",
            "--handshakes-per-second", "0", "--node-id", name, "--cluster-secret-file", secret_file,
            "--cluster-heartbeat", str(heartbeat), "--cluster-node-timeout", str(node_timeout), *extra,
        ]
        self.child: Child = procs.twistd(name, self._argv(0, 0), cwd=procs.directory(name))
        self._started()
        # From now on the same command line binds the same ports.
        self.child.argv = self.child.argv[: -len(self._argv(0, 0))] + self._argv(self.port, self.cluster_port)

    def _argv(self, port: int, cluster_port: int) -> list:
        return [*self.args, "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--cluster-listen", f"{self.cluster_scheme}:{cluster_port}:interface=127.0.0.1"]

    def _started(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.port = int(self.child.wait_for_log(_API, timeout).group(1))
        self.cluster_port = int(self.child.wait_for_log(_CLUSTER, timeout).group(1))

    def restart(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start it again (after L{Child.kill}): the same id, ports and state directory."""
        self.child.restart()
        self._started(timeout)


class ClusterNodes:
    """The nodes (C{nodes[name]}), all on C{dsn}; the first one made the account and its key."""

    def __init__(self, procs: Processes, dsn: str, names: Sequence[str], heartbeat: float = 0.5,
                 node_timeout: float = 2.0, extra: Sequence[str] = (), cluster_tls: bool = True) -> None:
        self.procs = procs
        top = procs.directory("cluster")
        self.secret_file = os.path.join(top, "cluster-secret")
        with open(os.open(self.secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(SECRET + "\n")
        self.nodes: Dict[str, ClusterNode] = {}
        self.credentials: Optional[Dict[str, str]] = None
        for name in names:
            state = os.path.join(top, f"state-{name}")
            self.nodes[name] = ClusterNode(procs, name, dsn, self.secret_file, state, heartbeat, node_timeout, extra,
                                           cluster_tls)
            path = os.path.join(state, "credentials")
            if self.credentials is None and os.path.exists(path):
                parser = configparser.ConfigParser()
                parser.read(path)
                self.credentials = dict(parser["default"])
        assert self.credentials is not None, "no node wrote the default account's credentials"

    def api(self, name: str) -> Any:
        """A botocore C{iotsecuretunneling} client of node C{name} (the shared account's key)."""
        import botocore.session
        from botocore.config import Config

        assert self.credentials is not None
        return botocore.session.Session().create_client(
            "iotsecuretunneling",
            region_name="us-east-1",
            endpoint_url=f"http://127.0.0.1:{self.nodes[name].port}",
            aws_access_key_id=self.credentials["aws_access_key_id"],
            aws_secret_access_key=self.credentials["aws_secret_access_key"],
            config=Config(retries={"max_attempts": 1}),
        )

    def open_tunnel(self, name: str, services: Sequence[str] = ("SSH",), **kwargs: Any) -> Dict[str, Any]:
        return self.api(name).open_tunnel(destinationConfig={"services": list(services)}, **kwargs)  # type: ignore[no-any-return]

    def states(self, name: str, tunnel_id: str) -> tuple:
        """(source, destination) connection states as node C{name}'s DescribeTunnel says."""
        tunnel = self.api(name).describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        return tunnel["sourceConnectionState"]["status"], tunnel["destinationConnectionState"]["status"]




def connect_retrying(port: int, mode: str, token: str, client_token: str, within: float, every: float = 0.1) -> Any:
    """
    A Deferred: connect a L{tunnelkit.testing.TunnelTestClient} as a reconnecting local proxy does
    (every C{every} s), until C{within} seconds have passed (then its last failure).
    """
    import time

    from twisted.internet import defer, reactor, task

    from tunnelkit.testing import connect_client

    @defer.inlineCallbacks
    def attempt() -> Any:
        deadline = time.monotonic() + within
        while True:
            try:
                client = yield connect_client(port, mode, token, client_token=client_token).addTimeout(2, reactor)
                return client
            except Exception:
                if time.monotonic() > deadline:
                    raise
                yield task.deferLater(reactor, every, lambda: None)

    return attempt()
