"""
A real HAProxy (Debian's package) running the shipped C{deploy/haproxy.cfg} on 127.0.0.1, for end-to-end
tests and benchmarks.

HAProxy cannot bind port 0 and report the port it got, so this module binds and listens on an ephemeral
port for each front end itself and hands the sockets over (C{pass_fds}; the file's C{bind
"${TUNNELKIT_TLS_BIND-:443}"} becomes C{fd@N} through the environment): the port is held from the
moment it is chosen, so no other process can take it in between, and nothing is retried.

The configuration is the shipped file with only its C{server} lines replaced, one per node given, keeping
each line's options (health checks, PROXY protocol, ...): the file under test is the file that ships.

    certificate = shared_certificate(directory)                  # CA + server certificate for 127.0.0.1
    haproxy = HAProxy(procs, [Backend("node1", plain_port, tls_port), ...], certificate)
    haproxy.wait_servers_up()
    haproxy.tls_port, haproxy.passthrough_port
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from tunnelkit.testing.process import REPOSITORY_TOP, Child, Processes, wait_until

DEPLOY_CONFIG = os.path.join(REPOSITORY_TOP, "deploy", "haproxy.cfg")
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

#: The node ports the shipped file names: the PROXY-protocol plain listener and the TLS listener.
PLAIN_PORT = 8080
TLS_PORT = 8443

_SERVER_LINE = re.compile(r"^(\s*)server\s+(\S+)\s+(\S+):(\d+)(.*)$")


@dataclass(frozen=True)
class Backend:
    """One node as HAProxy reaches it: its name, its C{haproxy:tcp:} port and its C{ssl:} port."""

    name: str
    plain_port: int
    tls_port: int
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class Certificate:
    """A CA and a server certificate for 127.0.0.1 shared by HAProxy and every node (one name, one CA)."""

    ca_cert: str
    server_cert: str
    server_key: str
    haproxy_pem: str  # the server certificate and its key in one file, as HAProxy's crt wants

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> str:
        """A node's C{--listen} value serving this certificate."""
        return f"ssl:{port}:interface={interface}:privateKey={self.server_key}:certKey={self.server_cert}"


def shared_certificate(directory: str) -> Certificate:
    """Generate (with tunnelkit's own generator) a CA and a server certificate in C{directory}."""
    from tunnelkit.service.certs import ensure_certificates

    made = ensure_certificates(directory)
    pem = os.path.join(directory, "haproxy.pem")
    with open(pem, "wb") as out:
        for path in (made.server_cert, made.server_key):
            with open(path, "rb") as f:
                out.write(f.read())
    os.chmod(pem, 0o600)
    return Certificate(made.ca_cert, made.server_cert, made.server_key, pem)


def render_config(backends: Sequence[Backend], source: str = DEPLOY_CONFIG, reencrypt_ca: Optional[str] = None) -> str:
    """
    The shipped configuration with each backend's run of C{server} lines replaced by one line per node of
    C{backends} (same options; port 8080 becomes the node's plain port, 8443 its TLS port).

    @param reencrypt_ca: the variant the file describes, TLS re-encrypted from HAProxy to the nodes'
        C{ssl:} listeners (verified against this CA) instead of plain HTTP with a PROXY header.
    """
    with open(source) as f:
        lines = f.read().splitlines()
    out: List[str] = []
    replaced = 0
    index = 0
    while index < len(lines):
        match = _SERVER_LINE.match(lines[index])
        if not match:
            out.append(lines[index])
            index += 1
            continue
        indent, _, _, port, options = match.groups()
        while index < len(lines) and _SERVER_LINE.match(lines[index]):
            index += 1  # the template's run of server lines, replaced as a whole
        if int(port) not in (PLAIN_PORT, TLS_PORT):
            raise ValueError(f"{source}: a server line names port {port}, expected {PLAIN_PORT} or {TLS_PORT}")
        plain = int(port) == PLAIN_PORT
        if plain and reencrypt_ca is not None:
            if "send-proxy-v2 check-send-proxy" not in options:
                raise ValueError(f"{source}: cannot make the re-encrypting variant of {lines[index - 1]!r}")
            options = options.replace("send-proxy-v2 check-send-proxy", f"ssl verify required ca-file {reencrypt_ca}")
            plain = False
        for backend in backends:
            node_port = backend.plain_port if plain else backend.tls_port
            out.append(f"{indent}server {backend.name} {backend.host}:{node_port}{options}")
        replaced += 1
    if replaced == 0:
        raise ValueError(f"{source}: no server lines to replace")
    return "\n".join(out) + "\n"


class HAProxy:
    """
    HAProxy in the foreground (C{-db}) with the rendered configuration, started at once; C{tls_port}
    (TLS terminated, HTTP mode) and C{passthrough_port} (TCP mode) are the front ends' ports.
    """

    def __init__(self, procs: Processes, backends: Sequence[Backend], certificate: Certificate,
                 name: str = "haproxy", source: str = DEPLOY_CONFIG, reencrypt: bool = False) -> None:
        self.procs = procs
        self.backends = list(backends)
        self.directory = procs.directory(name)
        self.config_path = os.path.join(self.directory, "haproxy.cfg")
        with open(self.config_path, "w") as f:
            f.write(render_config(backends, source, certificate.ca_cert if reencrypt else None))
        self.stats_path = os.path.join(self.directory, "admin.sock")
        tls = procs.listening_socket()
        passthrough = procs.listening_socket()
        self.tls_port = int(tls.getsockname()[1])
        self.passthrough_port = int(passthrough.getsockname()[1])
        self.env: Dict[str, str] = {
            "TUNNELKIT_TLS_BIND": f"fd@{tls.fileno()}",
            "TUNNELKIT_PASSTHROUGH_BIND": f"fd@{passthrough.fileno()}",
            "TUNNELKIT_HAPROXY_CERT": certificate.haproxy_pem,
            "TUNNELKIT_HAPROXY_STATS": self.stats_path,
            "TUNNELKIT_HAPROXY_LOG": "stderr",
        }
        checked = subprocess.run(
            [HAPROXY, "-c", "-q", "-f", self.config_path], env={**os.environ, **self.env},
            capture_output=True, text=True, pass_fds=(tls.fileno(), passthrough.fileno()),
        )
        if checked.returncode != 0:
            raise AssertionError(f"haproxy -c refused {self.config_path}:\n{checked.stdout}{checked.stderr}")
        self.process: Child = procs.spawn(
            name, [HAPROXY, "-db", "-f", self.config_path], env=self.env, cwd=self.directory,
            pass_fds=(tls.fileno(), passthrough.fileno()),
        )
        wait_until(lambda: os.path.exists(self.stats_path) or not self.process.running(), 30, "HAProxy's stats socket")
        if not self.process.running():
            raise AssertionError(f"haproxy exited at start:\n{self.process.tail()}")

    def command(self, line: str) -> str:
        """One command on the stats socket (C{show stat}, C{disable server be/node1}, ...); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.stats_path)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> Dict[str, Dict[str, str]]:
        """{backend: {server: status}} (UP, DOWN, MAINT, ...) from C{show stat}."""
        text = self.command("show stat").lstrip("# ")
        states: Dict[str, Dict[str, str]] = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row["svname"] not in ("FRONTEND", "BACKEND"):
                states.setdefault(row["pxname"], {})[row["svname"]] = row["status"]
        return states

    def wait_servers(self, up: Optional[Sequence[str]] = None, timeout: float = 30.0) -> None:
        """Wait until the servers named C{up} (default: all) are UP in every backend and the others are not."""
        wanted = set(up if up is not None else [b.name for b in self.backends])

        def settled() -> bool:
            states = self.server_states()
            return bool(states) and all(
                (status == "UP") == (server in wanted) for servers in states.values() for server, status in servers.items()
            )

        try:
            wait_until(settled, timeout, f"HAProxy to see {sorted(wanted)} up", interval=0.1)
        except AssertionError:
            raise AssertionError(f"HAProxy's servers: {self.server_states()}\n{self.process.tail()}") from None
