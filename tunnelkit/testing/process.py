# -*- test-case-name: tests.e2e.test_localproxy_tunnel -*-
"""
Real processes on 127.0.0.1 for end-to-end tests and benchmarks (which must not import C{tests/}).

Synchronous and blocking: call it from a trial test method, a thread, or a script.  Every child runs in
its own directory under one temporary root with its output in C{<dir>/<name>.log}; L{Processes.cleanup}
stops them all and removes the root (register it as a cleanup, or call it in a C{finally}).

    procs = Processes("tunnelkit-bench-")
    node = procs.twistd("node1", ["--mode", "service", "--listen", "tcp:0:interface=127.0.0.1", ...])
    port = int(node.wait_for_log(r"API listening on http://127\\.0\\.0\\.1:(\\d+)/").group(1))
    node.kill()        # kill -9
    node.restart()     # the same command line again, appending to the same log

A server that cannot bind port 0 and report its port (HAProxy) gets a socket bound and listening here
(L{listening_socket}) and inherits it (C{pass_fds}; HAProxy's C{bind fd@N}): no window in which another
process could take the port.

For tunnelkit's own processes, L{Harness} (built on L{Processes}) registers L{Processes.cleanup} on a
trial test case (or on nothing: the caller calls it) and knows the service, the API and the proxies:

    h = Harness(self)                          # self: the trial TestCase
    service = h.start_service(tls=True)        # twistd tunnelkit --mode service on an ephemeral port
    tunnel = h.open_tunnel(["SSH1"])           # botocore against the service's API
    sshd = h.start_sshd()                      # OpenSSH on 127.0.0.1, throwaway host and user keys
    dst = h.start_destination(tunnel.destination_token, f"SSH1={sshd.port}")
    src = h.start_source(tunnel.source_token, "SSH1=0")
    port = src.port_of("SSH1")                 # the ephemeral port it logged
    out = sshd.run("echo hi", port=port)       # ssh through the tunnel
    h.close_tunnel(tunnel)
    src.wait_exit(10)                          # 0

Tokens go through the environment.  Also on L{Harness}: C{kill_service()} / C{restart_service()}
(kill -9, then the same port and state directory; C{service.process.restart()} also comes back on
its port), C{api()} (botocore with the service's generated credentials), C{start_echo()},
C{start_apps()} (the L{tunnelkit.testapps} server).  And: L{unassigned_port} and
L{start_on_told_port} (for servers that cannot bind port 0 and report it), L{start_sshd}, L{exchange}
(send bytes to a local port, read the answer), L{rss_mb}, and L{ServiceProcess} (the service on a TLS
and a plain port with a boto3 client, without a harness).
The in-memory tunnel, for tests that need no process, is L{tunnelkit.testing.memory}.
"""


from __future__ import annotations

import configparser
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

#: This checkout (put first on the children's PYTHONPATH, so a worktree's code is the one that runs).
REPOSITORY_TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SCP = shutil.which("scp") or "/usr/bin/scp"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"

#: Seconds a single wait may take by default.
DEFAULT_TIMEOUT = 30.0
#: The environment variable naming AWS's C++ localproxy binary.
LOCALPROXY_VARIABLE = "TUNNELKIT_AWS_LOCALPROXY"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll C{predicate} until it returns something true (returned); C{AssertionError} naming C{what} on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def listening_socket(host: str = "127.0.0.1", backlog: int = 1024) -> socket.socket:
    """A TCP socket bound to an ephemeral port of C{host} and listening, inheritable (for C{pass_fds})."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(backlog)
    s.set_inheritable(True)
    return s


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on C{host}:C{port} now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


#: Where L{unassigned_port} picks: below the kernel's ephemeral range (C{net.ipv4.ip_local_port_range},
#: 32768-60999 by default), which port 0 and outgoing connections draw from.
UNASSIGNED_PORTS = (20000, 32768)


def unassigned_port() -> int:
    """
    A random port for a server that must be told its port (sshd, mosquitto): outside the ephemeral
    range, so no server binding port 0 and no outgoing connection can take it between this call and
    the server's bind.  Only another caller of this function may pick the same one, and then the server
    that binds second fails with "address in use": start it with L{start_on_told_port}, which tries
    another port then.  (A port bound and closed to learn a free one has no such guarantee: another
    test may bind port 0 and get it before the server binds it.)
    """
    low, high = UNASSIGNED_PORTS
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = min(high, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    return random.randrange(low, high)


def start_on_told_port(start: Callable[[int], Child], listening: str, taken: str = r"[Aa]ddress already in use",
                       attempts: int = 10, timeout: float = DEFAULT_TIMEOUT) -> Tuple[Child, int]:
    """
    Start a server that cannot bind port 0 and report it: C{start(port)} on an L{unassigned_port}
    until its log matches C{listening} (a pattern, C{{port}} replaced by the port) rather than C{taken}.

    @return: the server and its port.
    """
    for _ in range(attempts):
        port = unassigned_port()
        child = start(port)
        match = child.wait_for_log(f"(?P<listening>{listening.format(port=port)})|(?P<taken>{taken})", timeout)
        if match.group("listening"):
            return child, port
        child.kill()
    raise AssertionError(f"{attempts} ports were taken in a row: {taken!r} each time")


def rss_mb(pid: int) -> float:
    """Resident set size of a process (MB), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def exchange(port: int, payload: bytes, expected: Optional[int] = None, timeout: float = 30.0) -> bytes:
    """
    Send C{payload} to 127.0.0.1:C{port} and return what comes back: C{expected} bytes (default: as
    many as were sent), or fewer if the peer closes first.  The payload is sent from a thread, so an
    echo of a large one cannot block both ways.
    """
    wanted = len(payload) if expected is None else expected
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        received = bytearray()
        try:
            while len(received) < wanted:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                received += chunk
        finally:
            sender.join(timeout)
    return bytes(received)


class Child:
    """One process with its output in a log file; L{restart} runs the same command line again."""

    def __init__(self, name: str, argv: Sequence[str], cwd: str, env: Dict[str, str],
                 pass_fds: Sequence[int] = ()) -> None:
        self.name, self.argv, self.cwd, self.env = name, list(argv), cwd, env
        self.pass_fds = tuple(pass_fds)
        self.log_path = os.path.join(cwd, f"{name}.log")
        self.popen: Optional[subprocess.Popen] = None
        self.mark = 0
        self.restart()

    def restart(self) -> None:
        """Start (again), appending to the same log; C{mark} is the log offset where this run begins."""
        self.mark = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, pass_fds=self.pass_fds,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return int(self.popen.pid)

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self, start: int = 0) -> str:
        """The log from character C{start}."""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[start:]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = DEFAULT_TIMEOUT, start: Optional[int] = None) -> "re.Match[str]":
        """
        Wait until the log (from C{start}, default: where the current run began) matches C{pattern}
        (C{^} and C{$} match at every line).

        @raise AssertionError: on timeout or when the process exits first, with the log's tail.
        """
        regex = re.compile(pattern, re.M)
        begin = self.mark if start is None else start
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log(), begin)
            if match:
                return match
            if not self.running():
                code = self.popen.returncode if self.popen else None
                raise AssertionError(f"{self.name} exited with {code} before logging {pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {pattern!r} within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the process to end; its exit status."""
        assert self.popen is not None
        try:
            return int(self.popen.wait(timeout))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:g} s:\n{self.tail()}") from None

    def terminate(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it lingers; the exit status."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return self.popen.returncode if self.popen is not None else None

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


class Processes:
    """
    Children under one temporary root; L{cleanup} stops them (last started first) and removes it.

    @param repository_top: the checkout whose code the children run (first on their PYTHONPATH;
        default: this one), e.g. a C{git worktree} of another commit for an A/B benchmark.
    """

    def __init__(self, prefix: str = "tunnelkit-procs-", repository_top: Optional[str] = None) -> None:
        self.repository_top = repository_top or REPOSITORY_TOP
        self.root = tempfile.mkdtemp(prefix=prefix)
        self.children: List[Child] = []
        self._sockets: List[socket.socket] = []

    def directory(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        return path

    def environment(self, cwd: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The environment of a child: this one without tunnel tokens or web proxies, this checkout first."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_") and k.lower() != "https_proxy"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.repository_top, env.get("PYTHONPATH", "")) if p)
        env["XDG_STATE_HOME"] = os.path.join(cwd, "state-home")  # kept client tokens stay in its directory
        env.update(extra or {})
        return env

    def spawn(self, name: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None, pass_fds: Sequence[int] = ()) -> Child:
        """Start C{argv} in C{cwd} (default: its own directory C{<root>/<name>})."""
        directory = cwd or self.directory(name)
        child = Child(name, argv, directory, self.environment(directory, env), pass_fds)
        self.children.append(child)
        return child

    def twistd(self, name: str, args: Sequence[str], env: Optional[Dict[str, str]] = None,
               cwd: Optional[str] = None) -> Child:
        """C{twistd -n --pidfile= tunnelkit ARGS}."""
        return self.spawn(name, [*TWISTD, "-n", "--pidfile=", "tunnelkit", *args], env, cwd)

    def listening_socket(self, host: str = "127.0.0.1") -> socket.socket:
        """L{listening_socket}, closed at L{cleanup}."""
        s = listening_socket(host)
        self._sockets.append(s)
        return s

    def cleanup(self) -> None:
        for child in reversed(self.children):
            try:
                child.terminate(5)
            except Exception:
                child.kill()
        for s in self._sockets:
            s.close()
        shutil.rmtree(self.root, ignore_errors=True)


#: A tunnelkit end-to-end test's process.
Process = Child


@dataclass
class Service:
    """A running tunnelkit service."""

    process: Process
    port: int
    secure: bool
    state_dir: str
    listen: str

    @property
    def api_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://127.0.0.1:{self.port}"

    @property
    def proxy_endpoint(self) -> str:
        """The local proxies' C{-e} value."""
        return f"127.0.0.1:{self.port}" if self.secure else f"ws://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> str:
        return os.path.join(self.state_dir, "ca.pem")


@dataclass
class Tunnel:
    tunnel_id: str
    source_token: str
    destination_token: str


class Proxy(Child):
    """A local proxy process (source or destination)."""

    def port_of(self, service_id: str, timeout: float = DEFAULT_TIMEOUT) -> int:
        """The port the source listens on for C{service_id} (from its log)."""
        match = self.wait_for_log(
            rf"Listening for new connection on port (\d+) \([^,]*, service {re.escape(service_id or '-')},", timeout
        )
        return int(match.group(1))


class Sshd:
    """A real OpenSSH server on 127.0.0.1 accepting one throwaway key for the current user."""

    def __init__(self, harness: "Harness") -> None:
        self.dir = harness.directory("sshd")
        self.user = _current_user()
        host_key = os.path.join(self.dir, "host_ed25519")
        self.key = os.path.join(self.dir, "user_ed25519")
        for path in (host_key, self.key):
            subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
        shutil.copy(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        os.chmod(os.path.join(self.dir, "authorized_keys"), 0o600)
        self.process, self.port = start_sshd(
            lambda argv: harness.spawn("sshd", argv, self.dir), self.dir, host_key,
            os.path.join(self.dir, "authorized_keys"), "Subsystem sftp internal-sftp\n",
        )
        wait_until(self._banner, DEFAULT_TIMEOUT, f"sshd on port {self.port}")

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def ssh_options(self, port: int) -> List[str]:
        return [
            "-i", self.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
        ]

    def run(self, command: str, port: Optional[int] = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """C{ssh -p PORT user@127.0.0.1 COMMAND} (default: straight to sshd)."""
        port = port or self.port
        return subprocess.run(
            [SSH, *self.ssh_options(port), "-p", str(port), f"{self.user}@127.0.0.1", command],
            capture_output=True, timeout=timeout,
        )

    def scp_to(self, local: str, remote: str, port: Optional[int] = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """C{scp -P PORT LOCAL user@127.0.0.1:REMOTE}."""
        port = port or self.port
        return subprocess.run(
            [SCP, *self.ssh_options(port), "-q", "-P", str(port), local, f"{self.user}@127.0.0.1:{remote}"],
            capture_output=True, timeout=timeout,
        )


def start_sshd(spawn: Callable[[List[str]], Child], directory: str, host_key: str, authorized_keys: str,
               extra_config: str = "") -> Tuple[Child, int]:
    """
    OpenSSH's sshd on 127.0.0.1 (public keys in C{authorized_keys} only), with its configuration in
    C{directory}; C{spawn(argv)} starts it.  sshd cannot listen on port 0 and say which port it got:
    it is told one (C{-p}) by L{start_on_told_port}.  The process and its port.
    """
    config = os.path.join(directory, "sshd_config")
    with open(config, "w") as f:
        f.write(
            f"ListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {authorized_keys}\n"
            "PidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nLogLevel INFO\n" + extra_config
        )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    return start_on_told_port(
        lambda port: spawn([SSHD, "-D", "-e", "-f", config, "-p", str(port)]),
        r"Server listening on 127\.0\.0\.1 port {port}\.",
        r"Address already in use|Cannot bind any address",
    )


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name



class Harness:
    """
    Starts tunnelkit's processes for one test (or one benchmark) and cleans up after it.

    @param testcase: the trial TestCase (L{cleanup} is registered on it), or anything with an
        C{addCleanup} method; L{None}: the caller calls L{cleanup} itself.
    @param repository_top: the checkout whose code the children run (L{Processes}).
    @ivar procs: the L{Processes} that runs them (L{processes}: the children, in start order).
    """

    def __init__(self, testcase: Any = None, prefix: str = "tunnelkit-e2e-",
                 repository_top: Optional[str] = None) -> None:
        self.testcase = testcase
        self.procs = Processes(prefix, repository_top)
        self.root = self.procs.root
        self.service: Optional[Service] = None
        if testcase is not None:
            testcase.addCleanup(self.cleanup)

    @property
    def processes(self) -> List[Child]:
        return self.procs.children

    def directory(self, name: str) -> str:
        return self.procs.directory(name)

    def spawn(self, name: str, argv: Sequence[str], cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
              process_class: type = Child) -> Any:
        """Start C{argv} (registered for cleanup) as a C{process_class}; its log is C{<cwd>/<name>.log}."""
        directory = cwd or self.directory(name)
        process = process_class(name, argv, directory, self.procs.environment(directory, env))
        self.procs.children.append(process)
        return process

    def twistd(self, name: str, args: Sequence[str], env: Optional[Dict[str, str]] = None,
               process_class: type = Process, cwd: Optional[str] = None) -> Any:
        """C{twistd -n --pidfile= tunnelkit ARGS} as a subprocess."""
        return self.spawn(name, [*TWISTD, "-n", "--pidfile=", "tunnelkit", *args], cwd, env, process_class)

    # --- the service ---

    def start_service(self, tls: bool = False, port: int = 0, extra: Sequence[str] = (), name: str = "service",
                      state_dir: Optional[str] = None) -> Service:
        """
        Start C{--mode service} on C{port} (0: ephemeral) with a fresh state directory under the
        process's own directory (or C{state_dir}); it becomes L{Harness.service}, which the API and
        proxy helpers use.  Several services may run at once under different names.
        """
        state_dir = state_dir or os.path.join(self.directory(name), "state")
        kind = "ssl" if tls else "tcp"
        listen = f"{kind}:{port}:interface=127.0.0.1"
        process = self.twistd(name, ["--mode", "service", "--listen", listen, "--state-dir", state_dir, *extra],
                              cwd=self.directory(name))
        match = process.wait_for_log(r"API listening on https?://127\.0\.0\.1:(\d+)/")
        bound = int(match.group(1))
        # L{Process.restart} comes back on the same port, where the proxies reconnect.
        process.argv[process.argv.index(listen)] = f"{kind}:{bound}:interface=127.0.0.1"
        self.service = Service(process, bound, tls, state_dir, listen)
        return self.service

    def restart_service(self) -> Service:
        """Start the service again on the same port and state directory (after L{kill_service})."""
        assert self.service is not None
        previous = self.service
        return self.start_service(
            previous.secure, previous.port, name=f"{previous.process.name}-restarted", state_dir=previous.state_dir
        )

    def kill_service(self) -> None:
        """kill -9 the service."""
        assert self.service is not None
        self.service.process.kill()

    # --- the API ---

    def api(self) -> Any:
        """A botocore C{iotsecuretunneling} client for the service, with its generated credentials."""
        import botocore.session

        assert self.service is not None
        credentials = configparser.ConfigParser()
        credentials.read(os.path.join(self.service.state_dir, "credentials"))
        session = botocore.session.Session()
        return session.create_client(
            "iotsecuretunneling",
            region_name="us-east-1",
            endpoint_url=self.service.api_url,
            verify=self.service.ca_pem if self.service.secure else False,
            aws_access_key_id=credentials["default"]["aws_access_key_id"],
            aws_secret_access_key=credentials["default"]["aws_secret_access_key"],
        )

    def open_tunnel(self, services: Sequence[str] = (), thing_name: str = "thing1", **kwargs: Any) -> Tunnel:
        """OpenTunnel (with a destinationConfig when C{services} are given)."""
        if services:
            kwargs["destinationConfig"] = {"thingName": thing_name, "services": list(services)}
        answer = self.api().open_tunnel(**kwargs)
        return Tunnel(answer["tunnelId"], answer["sourceAccessToken"], answer["destinationAccessToken"])

    def close_tunnel(self, tunnel: Tunnel) -> None:
        self.api().close_tunnel(tunnelId=tunnel.tunnel_id)

    # --- local proxies ---

    def _proxy(self, mode: str, token: str, mapping_flag: str, mapping: Optional[str], extra: Sequence[str],
               name: Optional[str], client_token: Optional[str]) -> Proxy:
        assert self.service is not None
        args = ["--mode", mode, "-e", self.service.proxy_endpoint]
        if self.service.secure:
            args += ["-c", self.service.ca_pem]
        if mapping is not None:
            args += [mapping_flag, mapping]
        if mode == "source":
            args += ["-b", "127.0.0.1"]
        env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": token}
        if client_token:
            env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = client_token
        count = sum(1 for p in self.processes if p.name.startswith(mode))
        return self.twistd(name or f"{mode}{count or ''}", [*args, *extra], env, Proxy)

    def start_source(self, token: str, mapping: Optional[str] = None, extra: Sequence[str] = (),
                     name: Optional[str] = None, client_token: Optional[str] = None) -> Proxy:
        """C{--mode source} with C{-s MAPPING} (use port 0 and L{Proxy.port_of})."""
        return self._proxy("source", token, "-s", mapping, extra, name, client_token)

    def start_destination(self, token: str, mapping: str, extra: Sequence[str] = (),
                          name: Optional[str] = None, client_token: Optional[str] = None) -> Proxy:
        """C{--mode destination} with C{-d MAPPING}."""
        return self._proxy("destination", token, "-d", mapping, extra, name, client_token)

    def start_sshd(self) -> Sshd:
        return Sshd(self)

    def start_echo(self, name: str = "echo") -> int:
        """A TCP echo server (a subprocess) on 127.0.0.1, on a port it bound itself; its port."""
        script = (
            "import sys\n"
            "from twisted.internet import reactor, protocol\n"
            "class Echo(protocol.Protocol):\n"
            "    def dataReceived(self, data):\n"
            "        self.transport.write(data)\n"
            "f = protocol.Factory.forProtocol(Echo)\n"
            "port = reactor.listenTCP(0, f, interface='127.0.0.1')\n"
            "print('echo listening on', port.getHost().port, flush=True)\n"
            "reactor.run()\n"
        )
        process = self.spawn(name, [sys.executable, "-c", script])
        return int(process.wait_for_log(r"echo listening on (\d+)").group(1))

    def start_apps(self, name: str = "apps") -> int:
        """The L{tunnelkit.testapps} server (sink, echo, ...) on 127.0.0.1; its port."""
        apps = self.spawn(name, [sys.executable, "-m", "tunnelkit.testapps", "serve"])
        return int(apps.wait_for_log(r"^(\d+)$").group(1))

    # --- cleanup ---

    def cleanup(self) -> None:
        self.procs.cleanup()


# --- the service without a harness ---------------------------------------------------------------

def _logged_urls(log: str) -> Dict[str, List[str]]:
    """From a JSON event log: C{url} fields of the events whose format begins with each known text."""
    found: Dict[str, List[str]] = {}
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        text = str(event.get("log_format", ""))
        for start in ("API listening on", "Metrics (Prometheus) on"):
            if text.startswith(start) and "url" in event:
                found.setdefault(start, []).append(str(event["url"]))
    return found


def _url_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


class ServiceProcess:
    """
    C{tunnelkit --mode service} in a child process (C{python -m twisted}), on two ephemeral loopback
    ports it binds itself and logs: C{tls_port} (wss/https) and C{tcp_port} (ws/http) (and
    C{metrics_port} with C{--metrics-listen tcp:0:...}), with its state in a temporary
    directory.  C{api} is a boto3 C{iotsecuretunneling} client for it (the generated credentials,
    verified against the generated CA, whose PEM is C{ca}).  Always call L{stop}.
    """

    def __init__(self, extra_args: Sequence[str] = (), timeout: float = 30.0) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="tunnelkit-service-")
        self.log_path = os.path.join(self.state_dir, "service.log")
        args = [
            sys.executable, "-m", "twisted",
            "--log-file", self.log_path,
            "tunnelkit", "--mode", "service", "--state-dir", self.state_dir,
            "--listen", "ssl:0:interface=127.0.0.1",
            "--listen", "tcp:0:interface=127.0.0.1",
            *extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ca_path = os.path.join(self.state_dir, "ca.pem")
        credentials_path = os.path.join(self.state_dir, "credentials")
        metrics = "--metrics-listen" in extra_args or any(a.startswith("--metrics-listen=") for a in extra_args)
        #: The port of C{--metrics-listen} (if given), as the service bound and logged it.
        self.metrics_port: Optional[int] = None
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    error = self.process.stderr.read().decode()  # type: ignore[union-attr]
                    raise RuntimeError(f"the service exited at start: {error}")
                log = ""
                if os.path.exists(self.log_path):
                    with open(self.log_path, "rb") as f:
                        log = f.read().decode("utf-8", "replace")
                # the ports it bound (port 0 above), from its log (twist's: one JSON event a line)
                urls = _logged_urls(log)
                tls = [u for u in urls.get("API listening on", []) if u.startswith("https://")]
                tcp = [u for u in urls.get("API listening on", []) if u.startswith("http://")]
                scraped = urls.get("Metrics (Prometheus) on", [])
                if tls and tcp and (scraped or not metrics) and os.path.exists(credentials_path):
                    self.tls_port, self.tcp_port = _url_port(tls[0]), _url_port(tcp[0])
                    self.metrics_port = _url_port(scraped[0]) if scraped else None
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the service did not start in {timeout} s:\n{log[-2000:]}")
                time.sleep(0.05)
        except BaseException:
            self.process.kill()
            self.process.wait()
            shutil.rmtree(self.state_dir, True)
            raise
        with open(self.ca_path, "rb") as f:
            self.ca = f.read()
        import boto3

        credentials = configparser.ConfigParser()
        credentials.read(credentials_path)
        section = credentials[credentials.sections()[0]]
        session = boto3.session.Session(
            aws_access_key_id=section["aws_access_key_id"],
            aws_secret_access_key=section["aws_secret_access_key"],
            region_name="us-east-1",
        )
        self.api = session.client(
            "iotsecuretunneling",
            endpoint_url=f"https://127.0.0.1:{self.tls_port}",
            verify=self.ca_path,
        )

    @property
    def pid(self) -> int:
        """The service's process id."""
        return int(self.process.pid)

    def open_tunnel(self, services: Sequence[str] = ("SSH",), **kwargs: Any) -> Dict[str, Any]:
        """OpenTunnel through the API (C{services} empty: no destinationConfig)."""
        if services:
            kwargs["destinationConfig"] = {"services": list(services)}
        return dict(self.api.open_tunnel(**kwargs))

    def stop(self) -> None:
        """Stop the service and remove its state."""
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self.state_dir, True)
