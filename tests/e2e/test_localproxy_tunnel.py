"""
End-to-end: the tunnelkit service, a source and a destination local proxy as real processes on
loopback, carrying real ssh/scp to a real sshd and many parallel echo connections; kill -9 and
restart of the service; CloseTunnel ending both proxies with status 0.  (Refusals, rotation,
replacement and reconnection without a process: tests/test_memory_tunnel.py.)
"""

import hashlib
import os
import re
import threading

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.harness import SSHD, Harness, exchange, wait_until


def _echo_exchange(port, payload, results, index):
    try:
        results[index] = exchange(port, payload) == payload
    except OSError as e:
        results[index] = e


def parallel_echo(ports, per_port, size):
    """per_port simultaneous connections to each port, each echoing C{size} distinct bytes."""
    threads, results = [], {}
    index = 0
    for port in ports:
        for n in range(per_port):
            payload = hashlib.sha256(b"%d" % index).digest() * (size // 32)
            thread = threading.Thread(target=_echo_exchange, args=(port, payload, results, index))
            threads.append(thread)
            index += 1
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


class SshThroughTunnelTests(TestCase):
    """wss:// with the service's own CA: ssh runs a command, scp of 20 MB arrives intact."""

    timeout = 180

    def test_ssh_and_scp(self):
        if not os.path.exists(SSHD):
            raise SkipTest("OpenSSH server not installed")
        h = Harness(self)
        h.start_service(tls=True)
        sshd = h.start_sshd()
        tunnel = h.open_tunnel(["SSH1"])
        destination = h.start_destination(tunnel.destination_token, f"SSH1={sshd.port}")
        source = h.start_source(tunnel.source_token, "SSH1=0")
        port = source.port_of("SSH1")
        destination.wait_for_log("The tunnel is ready")

        result = sshd.run("echo hello-through-the-tunnel; uname -s", port=port)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split(b"\n")[0], b"hello-through-the-tunnel")

        data = os.urandom(20 * 1024 * 1024)
        local = os.path.join(h.directory("files"), "big.bin")
        with open(local, "wb") as f:
            f.write(data)
        remote = os.path.join(h.directory("received"), "big.bin")
        copied = sshd.scp_to(local, remote, port=port)
        self.assertEqual(copied.returncode, 0, copied.stderr)
        with open(remote, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), hashlib.sha256(data).hexdigest())

        # the logs name connections and bytes, never the token
        # (between tunnelkit peers a connection ends by half-closes: "both applications closed")
        wait_until(
            lambda: re.search(r"Disconnected from|both applications closed their side", source.log()),
            10,
            "the source to log the closed connection",
        )
        for process in (source, destination, h.service.process):
            self.assertNotIn(tunnel.source_token.split(".")[-1], process.log())
            self.assertNotIn(tunnel.destination_token.split(".")[-1], process.log())


class ManyConnectionsTests(TestCase):
    """ws://: 3 services x 16 simultaneous connections; kill -9 of the service; CloseTunnel."""

    timeout = 180

    def test_parallel_restart_and_close(self):
        h = Harness(self)
        h.start_service(tls=False)
        echo = h.start_echo()
        services = ["ECHO1", "ECHO2", "ECHO3"]
        tunnel = h.open_tunnel(services)
        destination = h.start_destination(tunnel.destination_token, ",".join(f"{s}={echo}" for s in services))
        source = h.start_source(tunnel.source_token, ",".join(f"{s}=0" for s in services))
        ports = [source.port_of(s) for s in services]
        destination.wait_for_log("The tunnel is ready")

        results = parallel_echo(ports, 16, 256 * 1024)
        self.assertEqual(len(results), 48)
        self.assertEqual([i for i, ok in results.items() if ok is not True], [], results)

        # kill -9 the service; both proxies reconnect to its restart, new connections work
        source_mark, destination_mark = len(source.log()), len(destination.log())
        h.kill_service()
        source.wait_for_log("reconnecting", start=source_mark)
        h.restart_service()
        source.wait_for_log("The tunnel is ready", start=source_mark, timeout=60)
        destination.wait_for_log("The tunnel is ready", start=destination_mark, timeout=60)
        results = parallel_echo(ports, 4, 64 * 1024)
        self.assertEqual([i for i, ok in results.items() if ok is not True], [], results)

        # CloseTunnel: both proxies exit with status 0
        h.close_tunnel(tunnel)
        self.assertEqual(source.wait_exit(20), 0, source.tail())
        self.assertEqual(destination.wait_exit(20), 0, destination.tail())
        self.assertIn("Web socket close received. Code: 1000", source.log())
