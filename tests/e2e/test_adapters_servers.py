"""
Real servers for the adapter end-to-end tests, and each adapter's probe against them.

The fixtures run on 127.0.0.1 ephemeral ports and are cleaned up by the test that starts them:
pyftpdlib (a subprocess), a twisted.web site with name-based virtual hosts (in process), OpenSSH
sshd (a subprocess, generated host key and throwaway user key) and an RFB server (x11vnc on Xvfb,
when installed), plus a blocking RFB client handshake.  Other adapter e2e modules import them.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
from typing import Any, Dict, List

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web import resource, server, vhost

from tunnelkit.testing.process import Processes, start_sshd, wait_until

FTP_USER, FTP_PASSWORD = "tunnel", "kit-secret"

_FTP_SERVER = r"""
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

home, user, password, masquerade = sys.argv[1:5]
authorizer = DummyAuthorizer()
authorizer.add_user(user, password, home, perm="elradfmwMT")
FTPHandler.authorizer = authorizer
if masquerade:
    FTPHandler.masquerade_address = masquerade
server = FTPServer(("127.0.0.1", 0), FTPHandler)
print(server.address[1], flush=True)
server.serve_forever()
"""


def closed_port(test: TestCase) -> int:
    """A port of 127.0.0.1 that refuses connections until the test ends: bound, never listening, so
    that no other test can start a server on it meanwhile."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    test.addCleanup(s.close)
    return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _read_port(process: subprocess.Popen, what: str, log_path: str) -> int:
    line = process.stdout.readline() if process.stdout else b""
    if not line.strip().isdigit():
        _stop(process)
        with open(log_path, "rb") as f:
            raise RuntimeError(f"{what} did not start: {line!r} {f.read()[-2000:]!r}")
    return int(line)


def start_ftp_server(test: TestCase, home: str, masquerade: str = "") -> int:
    """pyftpdlib serving C{home} to L{FTP_USER}; returns its port.  C{masquerade}: PASV address."""
    log_path = os.path.join(test.mktemp() + "-ftpd.log")
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-c", _FTP_SERVER, home, FTP_USER, FTP_PASSWORD, masquerade],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    test.addCleanup(log.close)
    test.addCleanup(_stop, process)
    return _read_port(process, "pyftpdlib", log_path)


class HostEcho(resource.Resource):
    """A virtual host's page: its name and the Host header it was reached with."""

    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request: Any) -> bytes:
        host = request.getHeader(b"host") or b"-"
        page = b"vhost=" + self.name + b" host=" + host + b" path=" + request.uri
        forwarded = request.getHeader(b"forwarded")
        if forwarded is not None:
            page += b" forwarded=" + forwarded
        return page

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        return self.render_GET(request) + b" body=%d" % len(body)


def start_vhost_site(test: TestCase, reactor: Any, names: List[bytes]) -> int:
    """A twisted.web site with one virtual host per name and a C{default} one; returns its port."""
    root = vhost.NameVirtualHost()
    root.default = HostEcho(b"default")
    for name in names:
        root.addHost(name, HostEcho(name))
    port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return port.getHost().port


class SSHServer:
    """OpenSSH sshd on 127.0.0.1 with a generated host key; root logs in with L{key_path}."""

    def __init__(self, test: TestCase) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd) or not shutil.which("ssh-keygen"):
            raise SkipTest("OpenSSH sshd is not installed")
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(self.dir, mode=0o700)
        os.chmod(self.dir, 0o700)
        self.host_key = os.path.join(self.dir, "host_ed25519")
        self.key_path = os.path.join(self.dir, "user_ed25519")
        for path in (self.host_key, self.key_path):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True, stdin=subprocess.DEVNULL
            )
        authorized = os.path.join(self.dir, "authorized_keys")
        shutil.copy(self.key_path + ".pub", authorized)
        os.chmod(authorized, 0o600)
        os.makedirs("/run/sshd", exist_ok=True)
        procs = Processes("tunnelkit-sshd-")
        test.addCleanup(procs.cleanup)
        self.process, self.port = start_sshd(
            lambda argv: procs.spawn("sshd", [sshd, *argv[1:]], cwd=self.dir), self.dir, self.host_key, authorized
        )
        self.log_path = self.process.log_path

    def ssh_command(self, port: int, command: str) -> List[str]:
        """An ssh client command line running C{command} through 127.0.0.1:C{port}."""
        return [
            "ssh", "-p", str(port), "-i", self.key_path, "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "root@127.0.0.1", command,
        ]  # fmt: skip


class VNCServer:
    """x11vnc sharing an Xvfb display (640x480), no password, on 127.0.0.1."""

    WIDTH, HEIGHT = 640, 480

    def __init__(self, test: TestCase) -> None:
        if not (shutil.which("Xvfb") and shutil.which("x11vnc")):
            raise SkipTest("x11vnc and Xvfb are not installed (apt-get install x11vnc xvfb)")
        read_fd, write_fd = os.pipe()
        self.xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{self.WIDTH}x{self.HEIGHT}x24", "-nolisten", "tcp"],
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write_fd)
        test.addCleanup(_stop, self.xvfb)
        with os.fdopen(read_fd, "rb") as r:
            display = r.readline().strip().decode()
        if not display.isdigit():
            raise RuntimeError("Xvfb did not report its display")
        self.log_path = os.path.abspath(test.mktemp() + "-x11vnc.log")
        # x11vnc takes the first free port from 5900 up (-autoport) and says which (PORT=N)
        out_path = self.log_path + ".out"
        with open(out_path, "wb") as out:
            self.process = subprocess.Popen(
                ["x11vnc", "-display", f":{display}", "-autoport", "5900", "-localhost", "-nopw",
                 "-forever", "-shared", "-quiet", "-noxdamage", "-o", self.log_path],
                stdout=out, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        test.addCleanup(_stop, self.process)
        def announced() -> List[bytes]:
            if self.process.poll() is not None:
                raise RuntimeError(f"x11vnc exited at start (see {self.log_path})")
            with open(out_path, "rb") as f:
                return [line[5:] for line in f.read().splitlines() if line.startswith(b"PORT=")]

        self.port = int(wait_until(announced, 15, f"x11vnc to announce its port (see {self.log_path})", interval=0.1)[0])
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if s.recv(12).startswith(b"RFB "):
                return
        raise RuntimeError(f"x11vnc did not start (see {self.log_path})")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"RFB server closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def rfb_handshake(port: int) -> Dict[str, Any]:
    """A blocking RFB 3.8 client handshake (RFC 6143 7.1-7.3.2) with security type None."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        version = _recv_exactly(s, 12)
        s.sendall(b"RFB 003.008\n")
        count = _recv_exactly(s, 1)[0]
        if count == 0:
            length = struct.unpack("!I", _recv_exactly(s, 4))[0]
            raise ConnectionError(f"RFB server refused: {_recv_exactly(s, length)!r}")
        types = list(_recv_exactly(s, count))
        if 1 not in types:
            raise ConnectionError(f"RFB server offers no 'None' security: {types}")
        s.sendall(b"\x01")
        result = struct.unpack("!I", _recv_exactly(s, 4))[0]
        s.sendall(b"\x01")  # ClientInit: shared
        width, height = struct.unpack("!HH", _recv_exactly(s, 4))
        _recv_exactly(s, 16)  # pixel format
        name_length = struct.unpack("!I", _recv_exactly(s, 4))[0]
        name = _recv_exactly(s, name_length)
        return {"version": version, "types": types, "result": result, "width": width, "height": height, "name": name}


@defer.inlineCallbacks
def wait_for(reactor: Any, condition: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll C{condition()} on the reactor until true, or fail after C{timeout} s."""
    from twisted.internet.task import deferLater

    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        yield deferLater(reactor, interval, lambda: None)
        waited += interval


__all__ = [
    "FTP_USER",
    "FTP_PASSWORD",
    "closed_port",
    "start_ftp_server",
    "start_vhost_site",
    "SSHServer",
    "VNCServer",
    "rfb_handshake",
    "wait_for",
]


class ProbeRealServersTests(TestCase):
    """Each adapter's probe against the real server it is for, and against a wrong one."""

    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor

    def probe(self, service_id: str, port: int, timeout: float = 10) -> defer.Deferred:
        from tunnelkit.adapters import resolve_adapter

        return resolve_adapter(service_id).probe(self.reactor, ("127.0.0.1", port), timeout)

    @defer.inlineCallbacks
    def test_ssh(self) -> Any:
        sshd = SSHServer(self)
        banner = yield self.probe("SSH1", sshd.port)
        self.assertTrue(banner.startswith("SSH-2.0-OpenSSH"), banner)

    @defer.inlineCallbacks
    def test_ftp(self) -> Any:
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        port = start_ftp_server(self, home)
        greeting = yield self.probe("FTP1", port)
        self.assertTrue(greeting.startswith("220 "), greeting)

    @defer.inlineCallbacks
    def test_http(self) -> Any:
        port = start_vhost_site(self, self.reactor, [b"127.0.0.1"])
        status = yield self.probe("HTTP1", port)
        self.assertTrue(status.startswith("HTTP/1.1 "), status)

    @defer.inlineCallbacks
    def test_vnc(self) -> Any:
        vnc = VNCServer(self)
        version = yield self.probe("VNC1", vnc.port)
        self.assertTrue(version.startswith("RFB 003."), version)

    @defer.inlineCallbacks
    def test_wrong_protocol_and_closed_port(self) -> Any:
        from tunnelkit.adapters import ProbeFailed, probe_and_log, resolve_adapter

        port = start_vhost_site(self, self.reactor, [])
        with self.assertRaises(ProbeFailed):
            yield self.probe("SSH1", port, 1)
        ok = yield probe_and_log(resolve_adapter("VNC1"), self.reactor, "VNC1", ("127.0.0.1", closed_port(self)), 5)
        self.assertFalse(ok)
