"""
Real processes for the issue-10 benchmarks (bench_hol, bench_faults, bench_ftp), on 127.0.0.1 only:
the service, tunnelkit's local proxies, AWS's C++ localproxy, and the tunnelkit.testapps server.

Benchmarks do not import the test suite, so this is a small, separate launcher: every process
runs in its own directory under one temporary root with its log there, and L{Processes.cleanup}
stops them all (call it in a C{finally}).  A proxy or the service can be killed (C{kill -9}) and
started again with the same arguments, ports, state directory and client token.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
#: The environment variable naming AWS's C++ localproxy binary (as in the tests).
LOCALPROXY_VARIABLE = "TUNNELKIT_AWS_LOCALPROXY"


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


class Child:
    """One process with its log file; L{restart} runs the same command line again."""

    def __init__(self, name: str, argv: Sequence[str], cwd: str, env: Dict[str, str]) -> None:
        self.name, self.argv, self.cwd, self.env = name, list(argv), cwd, env
        self.log_path = os.path.join(cwd, f"{name}.log")
        self.starts = 0
        self.popen: Optional[subprocess.Popen] = None
        self.restart()

    def restart(self) -> None:
        """Start (again), appending to the same log; the log offset where this run begins is C{mark}."""
        self.mark = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> "re.Match[str]":
        """Wait until this run's log matches C{pattern}; RuntimeError (with the log's tail) if not."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            match = regex.search(text, self.mark)
            if match:
                return match
            if not self.running() or time.monotonic() > deadline:
                tail = "\n".join(text.splitlines()[-20:])
                raise RuntimeError(f"{self.name} did not log {pattern!r} (running: {self.running()}):\n{tail}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9 and reap."""
        if self.running():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(10)

    def stop(self) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Processes:
    """Starts the processes of one benchmark and stops them all in L{cleanup}."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="tunnelkit-bench-")
        self.children: List[Child] = []
        self.service_port = 0
        self.state_dir = ""

    def spawn(self, name: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> Child:
        cwd = os.path.join(self.root, name)
        os.makedirs(cwd, exist_ok=True)
        environment = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (TOP, environment.get("PYTHONPATH", "")) if p)
        environment.update(env or {})
        child = Child(name, argv, cwd, environment)
        self.children.append(child)
        return child

    def cleanup(self) -> None:
        for child in reversed(self.children):
            child.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- the service and its API ---

    def start_service(self, tls: bool = False) -> Child:
        """C{--mode service} on an ephemeral port (kept across L{Child.restart}: the port is then fixed)."""
        self.state_dir = os.path.join(self.root, "service", "state")
        self.tls = tls
        kind = "ssl" if tls else "tcp"
        service = self.spawn("service", [*TWISTD, "-n", "--pidfile=", "tunnelkit", "--mode", "service",
                                         "--listen", f"{kind}:0:interface=127.0.0.1", "--state-dir", self.state_dir])
        self.service_port = int(service.wait_for_log(r"API listening on https?://127\.0\.0\.1:(\d+)/").group(1))
        # a restart must come back on the same port, where the proxies reconnect
        service.argv[service.argv.index(f"{kind}:0:interface=127.0.0.1")] = f"{kind}:{self.service_port}:interface=127.0.0.1"
        return service

    def api(self) -> Any:
        import botocore.session

        credentials = configparser.ConfigParser()
        credentials.read(os.path.join(self.state_dir, "credentials"))
        return botocore.session.Session().create_client(
            "iotsecuretunneling", region_name="us-east-1",
            endpoint_url=f"{'https' if self.tls else 'http'}://127.0.0.1:{self.service_port}",
            verify=os.path.join(self.state_dir, "ca.pem") if self.tls else False,
            aws_access_key_id=credentials["default"]["aws_access_key_id"],
            aws_secret_access_key=credentials["default"]["aws_secret_access_key"],
        )

    def open_tunnel(self, services: Sequence[str]) -> Dict[str, str]:
        """OpenTunnel: C{{"source": token, "destination": token}}."""
        answer = self.api().open_tunnel(destinationConfig={"thingName": "bench", "services": list(services)})
        return {"source": answer["sourceAccessToken"], "destination": answer["destinationAccessToken"]}

    # --- local proxies ---

    def start_proxy(self, mode: str, token: str, mapping: str, name: Optional[str] = None,
                    client_token: Optional[str] = None) -> Child:
        """tunnelkit's C{--mode source|destination} (C{-s}/C{-d} C{mapping}); a fixed client token
        (default: one per name) so a restarted process may use the same access token."""
        name = name or mode
        args = ["--mode", mode, "-e", f"127.0.0.1:{self.service_port}" if self.tls else f"ws://127.0.0.1:{self.service_port}"]
        if self.tls:
            args += ["-c", os.path.join(self.state_dir, "ca.pem")]
        args += ["-s" if mode == "source" else "-d", mapping]
        if mode == "source":
            args += ["-b", "127.0.0.1"]
        env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": token,
               "AWSIOT_TUNNEL_CLIENT_TOKEN": client_token or f"bench-{name}-".ljust(36, "0")}
        child = self.spawn(name, [*TWISTD, "-n", "--pidfile=", "tunnelkit", *args], env)
        child.wait_for_log("Successfully established websocket connection")
        return child

    def cpp_binary(self) -> Optional[str]:
        path = os.environ.get(LOCALPROXY_VARIABLE) or shutil.which("localproxy")
        return path if path and os.access(path, os.X_OK) else None

    def start_cpp_proxy(self, mode: str, token: str, mapping: str, name: Optional[str] = None) -> Child:
        """AWS's C++ localproxy (C{-m src|dst}); the service must run with TLS."""
        binary = self.cpp_binary()
        if binary is None or not self.tls:
            raise RuntimeError(f"the C++ localproxy needs ${LOCALPROXY_VARIABLE} and a TLS service")
        child = self.spawn(name or f"cpp-{mode}", [binary, "-m", mode, "-e", f"127.0.0.1:{self.service_port}",
                                                   "-s" if mode == "src" else "-d", mapping, "-b", "127.0.0.1"],
                           {"AWSIOT_TUNNEL_ACCESS_TOKEN": token, "SSL_CERT_FILE": os.path.join(self.state_dir, "ca.pem")})
        child.wait_for_log("Successfully established websocket connection")
        return child

    def start_apps(self) -> int:
        """The tunnelkit.testapps server; its port."""
        apps = self.spawn("apps", [sys.executable, "-m", "tunnelkit.testapps", "serve"])
        return int(apps.wait_for_log(r"^(\d+)$").group(1))


def source_port(source: Child, service_id: str) -> int:
    """The port a tunnelkit source logged for C{service_id}."""
    return int(source.wait_for_log(rf"Listening for new connection on port (\d+) \([^,]*, service {re.escape(service_id)},").group(1))
