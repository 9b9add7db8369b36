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
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

#: This checkout (put first on the children's PYTHONPATH, so a worktree's code is the one that runs).
REPOSITORY_TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]

#: Seconds a single wait may take by default.
DEFAULT_TIMEOUT = 30.0


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
        Wait until the log (from C{start}, default: where the current run began) matches C{pattern}.

        @raise AssertionError: on timeout or when the process exits first, with the log's tail.
        """
        regex = re.compile(pattern)
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
