"""
Real TCP applications for end-to-end tests and benchmarks: what a user's programs do at either end
of a tunnel, with every byte checked.

The server (C{python -m tunnelkit.testapps serve}, prints its port; or L{AppServer} in a thread)
reads one command line per connection, then:

  - C{echo}: sends back everything it reads; at end of stream it closes its side too;
  - C{push N SEED}: sends N bytes of L{pattern}C{(SEED)}, then closes;
  - C{sink}: reads until end of stream, then answers C{"<count> <sha256 hex>\\n"} and closes
    (the half-close check: the client shuts down its write side and reads the answer);
  - C{sink N}: the same after exactly N bytes, for paths that cannot carry a half-close.

The clients are blocking functions: L{echo_round_trips}, L{push}, L{sink} and L{StalledReader}
(a connection that asks for a push and then reads nothing, or reads at a set rate).  A failure is an
exception naming what went wrong (short read, reset, wrong checksum); a peer that resets shows as
L{ConnectionResetError}.
"""

from __future__ import annotations

import fcntl
import hashlib
import socket
import sys
import termios
import threading
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

__all__ = [
    "AppServer",
    "StalledReader",
    "Outcome",
    "pattern",
    "pattern_digest",
    "echo_round_trips",
    "push",
    "sink",
    "classify",
]

#: Bytes per block of the pattern and per socket call.
BLOCK = 1 << 16
_LISTEN_BACKLOG = 256


def pattern(seed: int, total: int) -> Iterator[bytes]:
    """The C{total} bytes of the seeded pattern, in blocks: block i is SHAKE-128(seed, i)."""
    index = 0
    left = total
    while left > 0:
        n = min(BLOCK, left)
        yield hashlib.shake_128(b"%d:%d" % (seed, index)).digest(n)
        index += 1
        left -= n


def pattern_digest(seed: int, total: int) -> str:
    """SHA-256 hex of L{pattern}C{(seed, total)}."""
    digest = hashlib.sha256()
    for block in pattern(seed, total):
        digest.update(block)
    return digest.hexdigest()


def _read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
        if len(line) > 200:
            break
    return line.strip()


class AppServer:
    """The command server of this module on 127.0.0.1 (port 0: the kernel chooses); one thread each."""

    def __init__(self, port: int = 0) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(_LISTEN_BACKLOG)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> "AppServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                command = _read_line(conn).split()
                if not command:
                    return
                if command[0] == b"echo":
                    while True:
                        data = conn.recv(BLOCK)
                        if not data:
                            conn.shutdown(socket.SHUT_WR)
                            return
                        conn.sendall(data)
                elif command[0] == b"push":
                    for block in pattern(int(command[2]), int(command[1])):
                        conn.sendall(block)
                elif command[0] == b"sink":
                    wanted = int(command[1]) if len(command) > 1 else None
                    digest = hashlib.sha256()
                    count = 0
                    buffer = bytearray(BLOCK)
                    while wanted is None or count < wanted:
                        n = conn.recv_into(buffer, BLOCK if wanted is None else min(BLOCK, wanted - count))
                        if not n:
                            break
                        digest.update(memoryview(buffer)[:n])
                        count += n
                    conn.sendall(b"%d %s\n" % (count, digest.hexdigest().encode()))
        except OSError:
            return


def _connect(port: int, timeout: float) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def echo_round_trips(port: int, count: int = 20, size: int = 1000, timeout: float = 60.0) -> List[float]:
    """
    C{count} round trips of C{size} bytes through C{echo} on one connection; each one's seconds.

    @raise AssertionError: if an answer differs from what was sent.
    """
    samples = []
    with _connect(port, timeout) as conn:
        conn.sendall(b"echo\n")
        for i in range(count):
            message = (b"%08d" % i) * (size // 8) + b"x" * (size % 8)
            start = time.perf_counter()
            conn.sendall(message)
            answer = b""
            while len(answer) < len(message):
                chunk = conn.recv(len(message) - len(answer))
                if not chunk:
                    raise AssertionError(f"echo closed after {len(answer)} of {len(message)} bytes (round trip {i})")
                answer += chunk
            samples.append(time.perf_counter() - start)
            if answer != message:
                raise AssertionError(f"echo answered different bytes on round trip {i}")
    return samples


def push(port: int, total: int, seed: int = 1, timeout: float = 60.0) -> Tuple[int, str]:
    """Ask for C{total} bytes of pattern C{seed}; read to the end: (bytes received, their sha256 hex)."""
    digest = hashlib.sha256()
    count = 0
    buffer = bytearray(BLOCK * 4)
    with _connect(port, timeout) as conn:
        conn.sendall(b"push %d %d\n" % (total, seed))
        while True:
            n = conn.recv_into(buffer)
            if not n:
                break
            digest.update(memoryview(buffer)[:n])
            count += n
    return count, digest.hexdigest()


def sink(port: int, total: int, seed: int = 2, half_close: bool = True, timeout: float = 60.0) -> Tuple[int, str]:
    """
    Send C{total} bytes of pattern C{seed} to C{sink}; with C{half_close}, end with
    C{shutdown(SHUT_WR)} and read the answer on the still-open read side.  The server's answer:
    (bytes it counted, their sha256 hex).
    """
    with _connect(port, timeout) as conn:
        conn.sendall(b"sink\n" if half_close else b"sink %d\n" % total)
        for block in pattern(seed, total):
            conn.sendall(block)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = conn.recv(200)
            if not chunk:
                break
            answer += chunk
    parts = answer.split()
    if len(parts) != 2:
        raise AssertionError(f"sink answered {answer!r}, not '<count> <sha256>'")
    return int(parts[0]), parts[1].decode()


class StalledReader:
    """
    A connection that asks for C{push TOTAL SEED} and then reads nothing (C{rate} None) or C{rate}
    bytes a second, in a thread; L{drain} then reads the rest at full speed and checks it.
    """

    def __init__(self, port: int, total: int, seed: int = 3, rate: Optional[int] = None, timeout: float = 120.0) -> None:
        self.total = total
        self.seed = seed
        self.received = 0
        self._digest = hashlib.sha256()
        self.conn = socket.socket()
        # a small receive buffer, so the stall is felt upstream at once
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.conn.settimeout(timeout)
        self.conn.connect(("127.0.0.1", port))
        self.conn.sendall(b"push %d %d\n" % (total, seed))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if rate is not None:
            self._thread = threading.Thread(target=self._trickle, args=(rate,), daemon=True)
            self._thread.start()

    def _take(self, limit: int) -> int:
        chunk = self.conn.recv(limit)
        self._digest.update(chunk)
        self.received += len(chunk)
        return len(chunk)

    def _trickle(self, rate: int) -> None:
        piece = max(1, rate // 10)
        while not self._stop.wait(0.1):
            try:
                if not self._take(piece):
                    return
            except OSError:
                return

    def queued(self) -> int:
        """Bytes that arrived and wait unread in this connection's receive buffer."""
        count = bytearray(4)
        fcntl.ioctl(self.conn.fileno(), termios.FIONREAD, count)
        return int.from_bytes(count, sys.byteorder)

    def drain(self) -> Tuple[int, bool]:
        """Stop trickling, read to the end: (bytes received in all, whether they are the pattern)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        while self._take(BLOCK * 4):
            pass
        self.conn.close()
        return self.received, self._digest.hexdigest() == pattern_digest(self.seed, self.received)

    def close(self) -> None:
        self._stop.set()
        self.conn.close()


@dataclass
class Outcome:
    """How one checksummed transfer ended, from the application's side."""

    kind: str  # "exact", "reset", "short-clean-eof", "corrupted", "refused"
    received: int
    detail: str = ""


def classify(port: int, total: int, seed: int, timeout: float = 60.0) -> Outcome:
    """
    One L{push} of C{total} bytes, read to the end, classified: the whole pattern (exact), an error
    from the socket (reset, or refused before any byte), fewer bytes then a clean end of stream
    (short-clean-eof: what must never happen), or different bytes (corrupted).
    """
    digest = hashlib.sha256()
    count = 0
    buffer = bytearray(BLOCK * 4)
    try:
        conn = _connect(port, timeout)
    except OSError as e:
        return Outcome("refused", 0, str(e))
    try:
        with conn:
            conn.sendall(b"push %d %d\n" % (total, seed))
            while True:
                n = conn.recv_into(buffer)
                if not n:
                    break
                digest.update(memoryview(buffer)[:n])
                count += n
    except OSError as e:
        return Outcome("reset", count, f"{type(e).__name__}: {e}")
    if count > total or digest.hexdigest() != pattern_digest(seed, count):
        return Outcome("corrupted", count)
    if count < total:
        return Outcome("short-clean-eof", count)
    return Outcome("exact", count)


def main(argv: List[str]) -> int:
    if argv[:1] != ["serve"]:
        print("usage: python -m tunnelkit.testapps serve [PORT]", file=sys.stderr)
        return 2
    server = AppServer(int(argv[1]) if len(argv) > 1 else 0)
    print(server.port, flush=True)
    server._accept()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
