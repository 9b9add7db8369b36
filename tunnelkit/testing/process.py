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
C{start_apps()} (the L{tunnelkit.testapps} server), C{start_old_format_peer(token, "V1"|"V2", port)}
(a destination that speaks only the V1 or V2 message format and exits 3 on anything newer).  And:
L{free_port}, L{exchange} (send bytes to a local port, read the answer), L{rss_mb}, and
L{ServiceProcess} (the service on a TLS and a plain port with a boto3 client, without a harness).
The in-memory tunnel, for tests that need no process, is L{tunnelkit.testing.memory}.
"""


from __future__ import annotations

import configparser
import os
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
from typing import Any, Callable, Dict, List, Optional, Sequence

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


def free_port() -> int:
    """A TCP port nothing listens on at this moment on 127.0.0.1 (for servers told a port up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """Children under one temporary root; L{cleanup} stops them (last started first) and removes it."""

    def __init__(self, prefix: str = "tunnelkit-procs-") -> None:
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
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPOSITORY_TOP, env.get("PYTHONPATH", "")) if p)
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
        self.port = free_port()
        self.user = _current_user()
        host_key = os.path.join(self.dir, "host_ed25519")
        self.key = os.path.join(self.dir, "user_ed25519")
        for path in (host_key, self.key):
            subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
        shutil.copy(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        os.chmod(os.path.join(self.dir, "authorized_keys"), 0o600)
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write(
                f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {host_key}\n"
                f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile none\nUsePAM no\nStrictModes no\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                "Subsystem sftp internal-sftp\nLogLevel INFO\n"
            )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.process = harness.spawn("sshd", [SSHD, "-D", "-e", "-f", config], self.dir)
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


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name



class Harness:
    """
    Starts tunnelkit's processes for one test (or one benchmark) and cleans up after it.

    @param testcase: the trial TestCase (L{cleanup} is registered on it), or anything with an
        C{addCleanup} method; L{None}: the caller calls L{cleanup} itself.
    @ivar procs: the L{Processes} that runs them (L{processes}: the children, in start order).
    """

    def __init__(self, testcase: Any = None, prefix: str = "tunnelkit-e2e-") -> None:
        self.testcase = testcase
        self.procs = Processes(prefix)
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

    def start_old_format_peer(self, token: str, message_format: str, target_port: int) -> Process:
        """A V1- or V2-only destination test peer (see L{run_old_format_peer}) on the ws:// service."""
        assert self.service is not None and not self.service.secure
        url = f"ws://127.0.0.1:{self.service.port}/tunnel?local-proxy-mode=destination"
        return self.spawn(
            f"peer-{message_format}",
            [sys.executable, "-m", "tunnelkit.testing.process", "peer", "--url", url, "--format", message_format,
             "--target", str(target_port)],
            env={"AWSIOT_TUNNEL_ACCESS_TOKEN": token, "PYTHONPATH": REPOSITORY_TOP},
        )

    def start_echo(self, name: str = "echo") -> int:
        """A TCP echo server (a subprocess) on 127.0.0.1; its port."""
        port = free_port()
        script = (
            "import sys\n"
            "from twisted.internet import reactor, protocol\n"
            "class Echo(protocol.Protocol):\n"
            "    def dataReceived(self, data):\n"
            "        self.transport.write(data)\n"
            "f = protocol.Factory.forProtocol(Echo)\n"
            f"reactor.listenTCP({port}, f, interface='127.0.0.1')\n"
            "print('echo listening', flush=True)\n"
            "reactor.run()\n"
        )
        process = self.spawn(name, [sys.executable, "-c", script])
        process.wait_for_log("echo listening")
        return port

    def start_apps(self, name: str = "apps") -> int:
        """The L{tunnelkit.testapps} server (sink, echo, ...) on 127.0.0.1; its port."""
        apps = self.spawn(name, [sys.executable, "-m", "tunnelkit.testapps", "serve"])
        return int(apps.wait_for_log(r"^(\d+)$").group(1))

    # --- cleanup ---

    def cleanup(self) -> None:
        self.procs.cleanup()


# --- the service without a harness ---------------------------------------------------------------

class ServiceProcess:
    """
    C{tunnelkit --mode service} in a child process (C{python -m twisted}), on two ephemeral loopback
    ports: C{tls_port} (wss/https) and C{tcp_port} (ws/http), with its state in a temporary
    directory.  C{api} is a boto3 C{iotsecuretunneling} client for it (the generated credentials,
    verified against the generated CA, whose PEM is C{ca}).  Always call L{stop}.
    """

    def __init__(self, extra_args: Sequence[str] = (), timeout: float = 30.0) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="tunnelkit-service-")
        self.tls_port = free_port()
        self.tcp_port = free_port()
        args = [
            sys.executable, "-m", "twisted",
            "--log-file", os.path.join(self.state_dir, "service.log"),
            "tunnelkit", "--mode", "service", "--state-dir", self.state_dir,
            "--listen", f"ssl:{self.tls_port}:interface=127.0.0.1",
            "--listen", f"tcp:{self.tcp_port}:interface=127.0.0.1",
            *extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ca_path = os.path.join(self.state_dir, "ca.pem")
        credentials_path = os.path.join(self.state_dir, "credentials")
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    error = self.process.stderr.read().decode()  # type: ignore[union-attr]
                    raise RuntimeError(f"the service exited at start: {error}")
                try:
                    for port in (self.tls_port, self.tcp_port):
                        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    if os.path.exists(credentials_path):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the service did not start in {timeout} s")
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


# --- a destination test peer that speaks only the V1 or V2 message format -------------------------

PEER_USAGE = "python -m tunnelkit.testing.process peer --url WS_URL --format V1|V2 --target PORT  (token: $AWSIOT_TUNNEL_ACCESS_TOKEN)"


def run_old_format_peer(url: str, message_format: str, target_port: int, token: str) -> None:
    """
    A destination written from the V1/V2 protocol guides only (no connection ids, one TCP connection
    per stream), like AWS IoT Device Client (V1) or localproxy 2.x (V2).  It exits with status 3 if
    the source sends it anything its format does not have (a connection id, CONNECTION_START/RESET,
    or for V1 a service id), so a test sees the source really speaks that format.
    """
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    from tunnelkit.protocol.framing import FrameDecoder, Message, encode_message, parse_message

    v2 = message_format == "V2"
    subprotocol = "aws.iot.securetunneling-2.0" if v2 else "aws.iot.securetunneling-1.0"

    def fail(text: str) -> None:
        print(f"peer error: {text}", flush=True)
        os._exit(3)

    class Local(Protocol):
        def __init__(self, peer: Any, stream_id: int, service_id: str) -> None:
            self.peer, self.stream_id, self.service_id = peer, stream_id, service_id

        def dataReceived(self, data: bytes) -> None:
            for i in range(0, len(data), 63 * 1024):
                self.peer.send(Message(type=Message.DATA, streamId=self.stream_id, payload=data[i : i + 63 * 1024],
                                       serviceId=self.service_id))

        def connectionLost(self, reason: Any = None) -> None:
            state = self.peer.streams.get(self.service_id)
            if state is not None and state[0] == self.stream_id and state[1] is self:
                del self.peer.streams[self.service_id]
                self.peer.send(Message(type=Message.STREAM_RESET, streamId=self.stream_id, serviceId=self.service_id))

    class Peer(WebSocketClientProtocol):
        def onOpen(self) -> None:
            self.decoder = FrameDecoder()
            self.streams: Dict[str, Any] = {}  # service id -> [stream id, Local or None, pending bytes]
            print(f"peer connected ({message_format})", flush=True)

        def send(self, message: Any) -> None:
            if not v2:
                message.ClearField("serviceId")
            self.sendMessage(encode_message(message), isBinary=True)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            for body in self.decoder.feed(payload):
                self.handle(parse_message(body))

        def handle(self, m: Any) -> None:
            if m.type == Message.SERVICE_IDS:
                print(f"peer service ids {list(m.availableServiceIds)}", flush=True)
                return
            if m.type in (Message.CONNECTION_START, Message.CONNECTION_RESET) or m.connectionId:
                fail(f"received a V3 message: {m}")
            if m.serviceId and not v2:
                fail(f"received a service id: {m}")
            service = m.serviceId
            if m.type == Message.STREAM_START:
                old = self.streams.pop(service, None)
                if old is not None and old[1] is not None:
                    old[1].transport.loseConnection()
                state = self.streams[service] = [m.streamId, None, []]
                print(f"peer stream start {service or '-'} {m.streamId}", flush=True)

                def connected(local: Any) -> None:
                    if self.streams.get(service) is state:
                        state[1] = local
                        for data in state[2]:
                            local.transport.write(data)
                    else:
                        local.transport.loseConnection()

                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", target_port)
                endpoint.connect(Factory.forProtocol(lambda: Local(self, m.streamId, service))).addCallback(connected)
            elif m.type == Message.DATA:
                state = self.streams.get(service)
                if state is None or state[0] != m.streamId:
                    return
                if state[1] is None:
                    state[2].append(m.payload)
                else:
                    state[1].transport.write(m.payload)
            elif m.type == Message.STREAM_RESET:
                state = self.streams.get(service)
                if state is not None and state[0] == m.streamId:
                    del self.streams[service]
                    if state[1] is not None:
                        state[1].transport.loseConnection()

        def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
            print(f"peer closed {code} {reason}", flush=True)
            if reactor.running:
                reactor.stop()

    factory = WebSocketClientFactory(url, protocols=[subprotocol], headers={"access-token": token})
    factory.protocol = Peer
    connectWS(factory)
    reactor.run()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(usage=PEER_USAGE)
    parser.add_argument("command", choices=["peer"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--format", choices=["V1", "V2"], required=True)
    parser.add_argument("--target", type=int, required=True)
    arguments = parser.parse_args()
    run_old_format_peer(arguments.url, arguments.format, arguments.target, os.environ["AWSIOT_TUNNEL_ACCESS_TOKEN"])
