"""
End-to-end: how connections end (issue 10, "honest ends").  A connection that ends because something
failed (a proxy or the service killed with kill -9) ends with a TCP reset, so the application sees
ECONNRESET and never mistakes a prefix for the whole; while the tunnel is not connected, new local
connections are reset at once.  A proxy killed itself resets its applications' connections too (its
sockets keep SO_LINGER {1, 0} until they end honestly), and an honest end still delivers every byte.
"""

import socket
import sys

from twisted.trial.unittest import TestCase

from tests.e2e.harness import Harness, wait_until

#: A server that sends C{total} bytes to each connection, then closes it.
FIREHOSE = r"""
import socket, sys, threading
total = int(sys.argv[2])
def serve(conn):
    block = b"x" * 65536
    sent = 0
    try:
        while sent < total:
            conn.sendall(block)
            sent += len(block)
    except OSError:
        pass
    conn.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
print("firehose ready on", s.getsockname()[1], flush=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


#: A server that reads each connection to its end and prints how it ended ("sink: N bytes, reset").
SINK = r"""
import socket, sys, threading
def serve(conn):
    received = 0
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                print(f"sink: {received} bytes, eof", flush=True)
                break
            received += len(chunk)
    except ConnectionResetError:
        print(f"sink: {received} bytes, reset", flush=True)
    except OSError as e:
        print(f"sink: {received} bytes, {e!r}", flush=True)
    conn.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
print("sink ready on", s.getsockname()[1], flush=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def read_until_end(connection: socket.socket, timeout: float = 30.0) -> tuple:
    """Read until EOF or an error: (bytes read, the error or None)."""
    connection.settimeout(timeout)
    received = 0
    while True:
        try:
            chunk = connection.recv(1 << 16)
        except OSError as e:
            return received, e
        if not chunk:
            return received, None
        received += len(chunk)


class HonestEndTests(TestCase):
    timeout = 120

    def tunnel_with_firehose(self, h: Harness, total: int, server: str = FIREHOSE) -> tuple:
        h.start_service(tls=False)
        name = "firehose" if server is FIREHOSE else "sink"
        self.server = h.spawn(name, [sys.executable, "-c", server, "0", str(total)])  # binds a free port
        port = int(self.server.wait_for_log(rf"{name} ready on (\d+)").group(1))
        tunnel = h.open_tunnel(["BULK"])
        destination = h.start_destination(tunnel.destination_token, f"BULK={port}")
        source = h.start_source(tunnel.source_token, "BULK=0")
        bulk_port = source.port_of("BULK")
        destination.wait_for_log("The tunnel is ready")
        source.wait_for_log("The tunnel is ready")
        return source, destination, bulk_port

    def start_transfer(self, port: int) -> socket.socket:
        """Connect and read the first megabyte: the transfer is under way."""
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        received = 0
        while received < 1 << 20:
            chunk = connection.recv(1 << 16)
            self.assertTrue(chunk, "the transfer ended early")
            received += len(chunk)
        return connection

    def test_killed_destination_resets_the_application(self) -> None:
        """kill -9 of the destination mid-transfer: the source's application gets ECONNRESET, not EOF."""
        h = Harness(self)
        total = 1 << 30
        source, destination, port = self.tunnel_with_firehose(h, total)
        connection = self.start_transfer(port)
        destination.kill()
        received, error = read_until_end(connection)
        connection.close()
        self.assertLess(received, total)
        self.assertIsInstance(error, ConnectionResetError, f"{received} bytes then {error!r}, not a reset")
        source.wait_for_log("Resetting connection 1 of BULK")

    def test_killed_source_resets_the_application(self) -> None:
        """
        kill -9 of the source itself mid-transfer: the kernel closes the application's connection,
        and with SO_LINGER {1, 0} kept on it since it was accepted that close is a reset: the
        application gets ECONNRESET, not a short prefix and a clean end of stream.
        """
        h = Harness(self)
        total = 1 << 30
        source, destination, port = self.tunnel_with_firehose(h, total)
        connection = self.start_transfer(port)
        source.kill()
        received, error = read_until_end(connection)
        connection.close()
        self.assertLess(received, total)
        self.assertIsInstance(error, ConnectionResetError, f"{received} bytes then {error!r}, not a reset")

    def test_killed_destination_resets_the_server(self) -> None:
        """
        kill -9 of the destination while an application sends: the server it connected to gets
        ECONNRESET (its socket kept SO_LINGER {1, 0}), not a clean end of stream.
        """
        h = Harness(self)
        source, destination, port = self.tunnel_with_firehose(h, 0, server=SINK)
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        block = b"y" * 65536
        for _ in range(64):  # 4 MiB on the way: the destination is connected to the sink
            connection.sendall(block)
        destination.wait_for_log("Connected to")
        destination.kill()
        outcome = self.server.wait_for_log(r"sink: (\d+) bytes, (\S+)")
        connection.close()
        self.assertEqual(outcome.group(2), "reset", outcome.group(0))

    def test_honest_end_delivers_every_byte_to_a_slow_reader(self) -> None:
        """
        The application shuts down its write side at once (it has nothing to send); the server
        sends 1.5 MiB (within one flow-control window) and closes while the application does not
        read yet: the source has it all when the end arrives, both sides have ended, and its socket
        closes once the kernel holds the last of it.  The close clears SO_LINGER first, so the
        application still reads every byte, then a clean end of stream (with {1, 0} left on, the
        kernel would drop them and reset).
        """
        h = Harness(self)
        total = 1536 << 10
        source, destination, port = self.tunnel_with_firehose(h, total)
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        connection.recv(1)
        connection.shutdown(socket.SHUT_WR)
        source.wait_for_log("Closing connection 1 of BULK")
        received, error = read_until_end(connection)
        connection.close()
        self.assertIsNone(error, f"{received} bytes then {error!r}")
        self.assertEqual(received + 1, total)

    def test_killed_service_resets_and_refuses(self) -> None:
        """
        kill -9 of the service mid-transfer: the application gets ECONNRESET; while the service is
        down, a new connection to the source's (still open) listener is reset at once.
        """
        h = Harness(self)
        source, destination, port = self.tunnel_with_firehose(h, 1 << 30)
        connection = self.start_transfer(port)
        h.kill_service()
        received, error = read_until_end(connection)
        connection.close()
        self.assertIsInstance(error, ConnectionResetError, f"{received} bytes then {error!r}, not a reset")
        source.wait_for_log("reconnecting to")
        try:
            late = socket.create_connection(("127.0.0.1", port), timeout=30)
        except ConnectionResetError as e:  # reset before connect() returned: a reset all the same
            error = e
        else:
            _, error = read_until_end(late)
            late.close()
        self.assertIsInstance(error, ConnectionResetError, f"{error!r}: the refused connection was not reset")
        source.wait_for_log("Resetting the connection from 127.0.0.1:.*: the tunnel is not connected")
        # the listener stays open and the tunnel comes back with the service
        start = len(source.log())
        h.restart_service()
        source.wait_for_log("The tunnel is ready", start=start)

        def transfers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as again:
                    return bool(again.recv(10))
            except OSError:
                return False

        wait_until(transfers, 30, "a transfer through the restarted service")
