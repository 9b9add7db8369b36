"""
Experiment: does TLS straight on the socket (OpenSSL reading and writing the file descriptor, Python's
``ssl.SSLSocket``) cost less per GB than TLS over memory BIOs driven from Python (``ssl.SSLObject``,
what ``tunnelkit/transport/stdtls.py`` does)?  With memory BIOs every byte is copied into the BIO
and out of it once more than with OpenSSL on the socket, but the records of one write leave in one
``send``.

Two threads of one process joined by a TCP connection on 127.0.0.1: the measured side runs one way of
driving TLS, the other side a blocking ``SSLSocket``.  Receiving: the far side sends --megabytes MiB
in 131076-byte writes (the largest tunnel WebSocket message), the measured side decrypts it (memory
BIO: ``recv`` 256 KiB, ``incoming.write``, ``read`` per record as stdtls does; socket: ``recv`` per
record).  Sending: the measured side encrypts 131076-byte writes (memory BIO: ``write``, then
``outgoing.read()`` and one ``sendall``; socket: ``sendall``).  Printed: the measured thread's CPU
seconds per GB (its own ``thread_time``: the other thread and other processes do not count), medians
of --repeat runs, and the socket's figure as a ratio to the memory BIO's.

    python benchmarks/lever_tls_socket.py [--megabytes 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from machine import load_note  # noqa: E402 - benchmarks/machine.py (the script's own directory)
from tunnelkit.service.certs import ensure_certificates  # noqa: E402

WRITE = 131076
RECORD = 16384


def contexts(directory: str) -> Tuple[ssl.SSLContext, ssl.SSLContext]:
    made = ensure_certificates(directory)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(made.server_cert, made.server_key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(made.ca_cert)
    client.check_hostname = False
    return server, client


def connected_pair() -> Tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    for s in (near, far):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return near, far


class Lever:
    def __init__(self, total: int) -> None:
        self.total = total
        self.server, self.client = contexts(tempfile.mkdtemp(prefix="tunnelkit-lever-"))
        self.payload = os.urandom(WRITE)
        #: Set when the measured side is done: the far side keeps its socket open until then (closing
        #: it with the server's session tickets unread would reset the connection under the reader).
        self.done = threading.Event()

    # --- the far side (blocking SSLSocket) ---

    def far_sender(self, raw: socket.socket) -> None:
        tls = self.client.wrap_socket(raw, server_hostname="127.0.0.1")
        for _ in range(self.total // WRITE):
            tls.sendall(self.payload)
        self.done.wait()

    def far_receiver(self, raw: socket.socket) -> None:
        tls = self.server.wrap_socket(raw, server_side=True)
        buffer = bytearray(1 << 20)
        got = 0
        while got < self.total // WRITE * WRITE:
            n = tls.recv_into(buffer)
            if not n:
                return
            got += n

    # --- the measured side ---

    @staticmethod
    def _bio_handshake(tls: ssl.SSLObject, raw: socket.socket, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        if outgoing.pending:
            raw.sendall(outgoing.read())

    def receive_bio(self, raw: socket.socket) -> Tuple[float, int]:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.server.wrap_bio(incoming, outgoing, server_side=True)
        self._bio_handshake(tls, raw, incoming, outgoing)
        got, start = 0, time.thread_time()
        while got < self.total // WRITE * WRITE:
            data = raw.recv(262144)
            if not data:
                break
            incoming.write(data)
            try:
                while True:
                    chunk = tls.read(RECORD)
                    if not chunk:
                        break
                    got += len(chunk)
                    if not incoming.pending and not tls.pending():
                        break
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                raw.sendall(outgoing.read())
        return time.thread_time() - start, got

    def receive_socket(self, raw: socket.socket) -> Tuple[float, int]:
        tls = self.server.wrap_socket(raw, server_side=True)
        got, start = 0, time.thread_time()
        while got < self.total // WRITE * WRITE:
            chunk = tls.recv(RECORD)
            if not chunk:
                break
            got += len(chunk)
        return time.thread_time() - start, got

    def send_bio(self, raw: socket.socket) -> Tuple[float, int]:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.client.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        self._bio_handshake(tls, raw, incoming, outgoing)
        sent, start = 0, time.thread_time()
        for _ in range(self.total // WRITE):
            tls.write(self.payload)
            raw.sendall(outgoing.read())
            sent += WRITE
        return time.thread_time() - start, sent

    def send_socket(self, raw: socket.socket) -> Tuple[float, int]:
        tls = self.client.wrap_socket(raw, server_hostname="127.0.0.1")
        sent, start = 0, time.thread_time()
        for _ in range(self.total // WRITE):
            tls.sendall(self.payload)
            sent += WRITE
        return time.thread_time() - start, sent

    def seconds_per_gb(self, measured: Callable[[socket.socket], Tuple[float, int]],
                       far: Callable[[socket.socket], None]) -> float:
        near, other = connected_pair()
        self.done.clear()
        thread = threading.Thread(target=far, args=(other,))
        thread.start()
        try:
            cpu, moved = measured(near)
        finally:
            self.done.set()
            thread.join()
            near.close()
            other.close()
        return cpu / (moved / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256, help="MiB moved per run (256)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each variant, interleaved (5)")
    args = parser.parse_args()
    lever = Lever(args.megabytes << 20)
    variants = {
        "receive, memory BIO": (lever.receive_bio, lever.far_sender),
        "receive, SSLSocket": (lever.receive_socket, lever.far_sender),
        "send, memory BIO": (lever.send_bio, lever.far_receiver),
        "send, SSLSocket": (lever.send_socket, lever.far_receiver),
    }
    print(f"lever_tls_socket: {args.megabytes} MiB per run, {args.repeat} runs; {ssl.OPENSSL_VERSION}; {load_note()}")
    figures: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, (measured, far) in variants.items():
            figures[name].append(lever.seconds_per_gb(measured, far))
    for name, runs in figures.items():
        print(f"  {name:<20} {statistics.median(runs):6.3f} CPU s/GB of the measured thread"
              f"   (runs {', '.join(f'{r:.2f}' for r in runs)})")
    for way in ("receive", "send"):
        bio, sock = figures[f"{way}, memory BIO"], figures[f"{way}, SSLSocket"]
        ratio = statistics.median(s / b for s, b in zip(sock, bio))
        print(f"  {way}: SSLSocket / memory BIO = {ratio:.2f} (median of per-run ratios)")
    print(load_note())


if __name__ == "__main__":
    main()
