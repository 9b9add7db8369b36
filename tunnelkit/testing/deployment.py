"""
A whole deployment on 127.0.0.1 for end-to-end tests and benchmarks: N tunnelkit service nodes as real
processes (one shared store), a real HAProxy running the shipped C{deploy/haproxy.cfg} in front, and
tunnels opened through it with botocore.

Every node listens on two ports it bound itself (port 0, read back from its log): C{haproxy:tcp:} (plain
HTTP behind HAProxy's PROXY v2 header, the TLS-terminated front end) and C{ssl:} with the shared
certificate (the pass-through front end, and clients that reach a node directly).  A node killed and
restarted comes back on the same two ports, which HAProxy's configuration names.

    procs = Processes()
    deployment = Deployment(procs, nodes=3, store="postgresql://...")    # store None: SQLite, 1 node only
    deployment.haproxy.wait_servers()
    api = deployment.api()                       # through HAProxy (TLS terminated); api(node) direct
    tunnel = deployment.open_tunnel(["SSH1"])
    deployment.twistd_proxy("source", tunnel.source_token, "-s", "SSH1=0", endpoint=deployment.tls_endpoint)
"""

from __future__ import annotations

import base64
import configparser
import os
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from tunnelkit.testing.haproxy import Backend, Certificate, HAProxy, shared_certificate
from tunnelkit.testing.process import DEFAULT_TIMEOUT, Child, Processes

_PLAIN = re.compile(r"API listening on http://127\.0\.0\.1:(\d+)/")
_TLS = re.compile(r"API listening on https://127\.0\.0\.1:(\d+)/")


@dataclass
class Tunnel:
    tunnel_id: str
    source_token: str
    destination_token: str


def cluster_available() -> bool:
    """Whether this checkout's service has the cluster options (tunnelkit.service.cluster)."""
    import importlib.util

    return importlib.util.find_spec("tunnelkit.service.cluster") is not None


class Node:
    """One C{--mode service} process; C{plain_port} (PROXY protocol) and C{tls_port} once started."""

    def __init__(self, procs: Processes, name: str, certificate: Certificate, store: Optional[str],
                 extra: Sequence[str] = (), cluster_secret: Optional[str] = None) -> None:
        self.name = name
        self.directory = procs.directory(name)
        self.state_dir = os.path.join(self.directory, "state")
        self.certificate = certificate
        self._store_args = ["--store", store] if store else []
        if cluster_secret is not None:  # the other nodes forward peers to it on a port it binds itself
            self._store_args += ["--cluster-listen", "tcp:0:interface=127.0.0.1", "--node-id", name,
                                 "--cluster-secret-file", cluster_secret]
        self._extra = list(extra)
        self.child: Child = procs.twistd(name, self._args(0, 0), cwd=self.directory)
        self.plain_port = int(self.child.wait_for_log(_PLAIN.pattern).group(1))
        self.tls_port = int(self.child.wait_for_log(_TLS.pattern).group(1))
        # From now on the same command line binds the same ports (HAProxy's configuration names them).
        self.child.argv = self.child.argv[: -len(self._args(0, 0))] + self._args(self.plain_port, self.tls_port)

    def _args(self, plain_port: int, tls_port: int) -> List[str]:
        return [
            "--mode", "service", "--state-dir", self.state_dir,
            "--listen", f"haproxy:tcp:{plain_port}:interface=127.0.0.1",
            "--listen", self.certificate.listen(tls_port),
            # Through the pass-through front end every client has HAProxy's address (deploy/haproxy.cfg).
            "--max-pending-per-address", "0", "--failed-handshakes-per-address", "0",
            *self._store_args, *self._extra,
        ]  # fmt: skip

    @property
    def backend(self) -> Backend:
        return Backend(self.name, self.plain_port, self.tls_port)

    @property
    def endpoint(self) -> str:
        """The local proxies' C{-e} to reach this node directly (TLS)."""
        return f"127.0.0.1:{self.tls_port}"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def kill(self) -> None:
        """kill -9."""
        self.child.kill()

    def restart(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start again on the same ports and state directory; returns once it listens."""
        self.child.restart()
        self.child.wait_for_log(_TLS.pattern, timeout)


class Deployment:
    """
    C{nodes} service nodes sharing C{store} (None: each its own SQLite, only meaningful with one node)
    behind one HAProxy, cluster nodes (C{--cluster-listen}, one secret) when C{cluster} and this checkout
    has the cluster options; the first node starts alone (it creates the default account and its
    credentials), the others after it.
    """

    def __init__(self, procs: Processes, nodes: int = 3, store: Optional[str] = None,
                 extra: Sequence[str] = (), haproxy: bool = True, cluster: bool = True) -> None:
        if store is None and nodes > 1:
            raise ValueError("several nodes need a shared store (store='postgresql://...')")
        self.procs = procs
        self.certificate = shared_certificate(procs.directory("certificate"))
        self.cluster_secret: Optional[str] = None
        if store is not None and cluster and cluster_available():
            self.cluster_secret = os.path.join(procs.directory("certificate"), "cluster-secret")
            with open(os.open(self.cluster_secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        self.nodes: List[Node] = [Node(procs, "node1", self.certificate, store, extra, self.cluster_secret)]
        self.credentials_path = os.path.join(self.nodes[0].state_dir, "credentials")
        for index in range(2, nodes + 1):
            self.nodes.append(Node(procs, f"node{index}", self.certificate, store, extra, self.cluster_secret))
        self.haproxy: Optional[HAProxy] = None
        if haproxy:
            self.haproxy = HAProxy(procs, [node.backend for node in self.nodes], self.certificate)

    @property
    def ca_cert(self) -> str:
        return self.certificate.ca_cert

    @property
    def tls_endpoint(self) -> str:
        """C{-e} through HAProxy, TLS terminated there."""
        assert self.haproxy is not None
        return f"127.0.0.1:{self.haproxy.tls_port}"

    @property
    def passthrough_endpoint(self) -> str:
        """C{-e} through HAProxy, TLS passed through to a node."""
        assert self.haproxy is not None
        return f"127.0.0.1:{self.haproxy.passthrough_port}"

    def url(self, node: Optional[Node] = None, passthrough: bool = False) -> str:
        """The API's URL: through HAProxy (TLS terminated, or passed through), or C{node} directly."""
        if node is not None:
            return node.url
        assert self.haproxy is not None
        return f"https://127.0.0.1:{self.haproxy.passthrough_port if passthrough else self.haproxy.tls_port}"

    def api(self, node: Optional[Node] = None, passthrough: bool = False) -> Any:
        """A botocore C{iotsecuretunneling} client with the generated credentials (see L{url})."""
        import botocore.session
        from botocore.config import Config

        credentials = configparser.ConfigParser()
        credentials.read(self.credentials_path)
        section = credentials[credentials.sections()[0]]
        return botocore.session.Session().create_client(
            "iotsecuretunneling",
            region_name="us-east-1",
            endpoint_url=self.url(node, passthrough),
            verify=self.ca_cert,
            aws_access_key_id=section["aws_access_key_id"],
            aws_secret_access_key=section["aws_secret_access_key"],
            config=Config(retries={"max_attempts": 1}),
        )

    def open_tunnel(self, services: Sequence[str] = ("SSH1",), api: Any = None, **kwargs: Any) -> Tunnel:
        if services:
            kwargs.setdefault("destinationConfig", {"services": list(services)})
        answer = (api or self.api()).open_tunnel(**kwargs)
        return Tunnel(answer["tunnelId"], answer["sourceAccessToken"], answer["destinationAccessToken"])

    def proxy(self, name: str, mode: str, token: str, mapping: str, endpoint: str,
              extra: Sequence[str] = (), client_token: Optional[str] = None) -> Child:
        """A tunnelkit local proxy (C{mode} source: C{-s MAPPING}, destination: C{-d MAPPING}) to C{endpoint}."""
        flag = "-s" if mode == "source" else "-d"
        env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": token}
        if client_token:
            env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = client_token
        args = ["--mode", mode, "-e", endpoint, "-c", self.ca_cert, flag, mapping, *extra]
        if mode == "source":
            args += ["-b", "127.0.0.1"]
        return self.procs.twistd(name, args, env)


def source_port(child: Child, service_id: str, timeout: float = DEFAULT_TIMEOUT) -> int:
    """The port a source proxy listens on for C{service_id} (from its log)."""
    match = child.wait_for_log(
        rf"Listening for new connection on port (\d+) \([^,]*, service {re.escape(service_id)},", timeout
    )
    return int(match.group(1))
