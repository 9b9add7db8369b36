"""
Experiment: what TLS costs per GB in a Python relay, and which way of driving OpenSSL costs least.

One process, no sockets: a TLS client and server joined by memory BIOs, application data moved one
way (the client encrypts, the server decrypts: what each relay leg does once per byte).  For each
TLS 1.3 cipher suite and each application write size it measures, as CPU seconds per GB moved:

  twisted    pyOpenSSL driven as Twisted's TLSMemoryBIOProtocol does it: the write sliced into
             16 KiB pieces, one C{send} and one C{bio_read(32 KiB)} per piece; on the far side one
             C{bio_write} per arriving chunk and C{recv(32 KiB)} until WantReadError (one call,
             one bytes object, one upcall per 16 KiB record);
  pyopenssl  pyOpenSSL with fewer calls: one C{sendall} of the whole write, one C{bio_read} of
             everything pending, C{recv_into} a preallocated buffer until it is empty, one upcall;
  stdlib     the standard library's C{ssl.SSLObject} over C{ssl.MemoryBIO}, the same few calls
             (C{write}, C{outgoing.read()}, C{incoming.write}, C{read(n, buffer)});
  cipher     the AEAD alone (C{cryptography}'s AESGCM / ChaCha20Poly1305) sealing and opening
             16 KiB records: the floor no TLS driver can go under.

    python benchmarks/lever_tls.py [--megabytes 256] [--repeat 5] [--sizes 16384,65536,131076,262144]

Figures are medians of --repeat runs; the machine's load is printed before and after.
"""

from __future__ import annotations

import argparse
import datetime
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import busy_before, load_note  # noqa: E402 - benchmarks/machine.py

SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")
RECORD = 1 << 14


def _certificate(directory: str) -> Tuple[str, str]:
    """A throwaway self-signed P-256 certificate for 127.0.0.1: (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lever_tls")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


# --- pyOpenSSL ------------------------------------------------------------------------------------


def _pyopenssl_pair(suite: str, cert: str, key: str) -> Tuple[SSL.Connection, SSL.Connection]:
    def context(server: bool) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_tls13_ciphersuites(suite.encode())
        if server:
            ctx.use_certificate_file(cert)
            ctx.use_privatekey_file(key)
        return ctx

    client, server = SSL.Connection(context(False), None), SSL.Connection(context(True), None)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
    got = server.get_cipher_name()
    if got != suite:
        raise RuntimeError(f"negotiated {got}, wanted {suite}")
    return client, server


def twisted_style(client: SSL.Connection, server: SSL.Connection, chunk: bytes, total: int) -> None:
    """As twisted.protocols.tls does it (one call each way per 16 KiB record)."""
    upcalls: List[bytes] = []
    moved = 0
    while moved < total:
        sent = 0
        wire: List[bytes] = []
        while sent < len(chunk):
            sent += client.send(chunk[sent : sent + RECORD])
            wire.append(client.bio_read(1 << 15))
        for data in wire:  # the far side receives the records as the kernel hands them over
            server.bio_write(data)
            while True:
                try:
                    upcalls.append(server.recv(1 << 15))
                except SSL.WantReadError:
                    break
        moved += len(chunk)
        upcalls.clear()


def pyopenssl_batched(client: SSL.Connection, server: SSL.Connection, chunk: bytes, total: int) -> None:
    """
    One sendall (pyOpenSSL enables partial writes, so it still loops once per record, but inside
    pyOpenSSL on a memoryview: no slicing copies), one bio_read, one bio_write, then recv_into a
    preallocated buffer until it is empty and one upcall.
    """
    buffer = bytearray(len(chunk) + RECORD)
    view = memoryview(buffer)
    moved = 0
    while moved < total:
        client.sendall(chunk)
        server.bio_write(client.bio_read(len(chunk) + 4096))
        got = 0
        while True:
            try:
                got += server.recv_into(view[got:])
            except SSL.WantReadError:
                break
        if got != len(chunk):
            raise RuntimeError(f"received {got} of {len(chunk)}")
        moved += got


# --- the standard library -------------------------------------------------------------------------


def _stdlib_pair(suite: str, cert: str, key: str) -> Tuple[Tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO], ...]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    for ctx in (server_ctx, client_ctx):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # The ssl module has no TLS 1.3 suite setter: a server taking only the one wanted is the way.
    pairs = []
    for ctx, server_side in ((client_ctx, False), (server_ctx, True)):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        pairs.append((ctx.wrap_bio(incoming, outgoing, server_side=server_side), incoming, outgoing))
    (c, cin, cout), (s, sin, sout) = pairs
    for _ in range(10):
        for obj in (c, s):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        sin.write(cout.read())
        cin.write(sout.read())
    return pairs[0], pairs[1]


def stdlib_batched(client: Tuple, server: Tuple, chunk: bytes, total: int) -> None:
    (c, _, cout), (s, sin, _) = client, server
    buffer = bytearray(len(chunk) + RECORD)
    view = memoryview(buffer)
    moved = 0
    while moved < total:
        c.write(chunk)
        sin.write(cout.read())
        got = 0
        while True:
            try:
                got += s.read(len(buffer) - got, view[got:])
            except ssl.SSLWantReadError:
                break
        if got != len(chunk):
            raise RuntimeError(f"received {got} of {len(chunk)}")
        moved += got


# --- the cipher alone -----------------------------------------------------------------------------


def aead_only(suite: str, total: int) -> float:
    """CPU seconds to seal and open C{total} bytes in 16 KiB records with the suite's AEAD."""
    if "CHACHA" in suite:
        aead = ChaCha20Poly1305(os.urandom(32))
    else:
        aead = AESGCM(os.urandom(16 if "128" in suite else 32))
    record = os.urandom(RECORD)
    nonce = os.urandom(12)
    start = time.process_time()
    for _ in range(total // RECORD):
        aead.decrypt(nonce, aead.encrypt(nonce, record, b"hdr"), b"hdr")
    return time.process_time() - start


def _stdlib_child(suite: str, cert: str, key: str, size: int, args: argparse.Namespace, directory: str) -> float:
    """
    The stdlib driver's median CPU s/GB, measured in a child process whose OPENSSL_CONF allows only
    C{suite} (the ssl module has no setter for TLS 1.3 suites).
    """
    config = os.path.join(directory, f"{suite}.cnf")
    with open(config, "w") as f:
        f.write("openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = tls\n"
                f"[tls]\nCiphersuites = {suite}\n")
    env = dict(os.environ, OPENSSL_CONF=config)
    argv = [sys.executable, os.path.abspath(__file__), "--stdlib-child", suite, cert, key, str(size),
            str(args.megabytes), str(args.repeat)]
    return float(subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout)


def stdlib_child(argv: List[str]) -> None:
    suite, cert, key, size, megabytes, repeat = argv
    chunk, total = os.urandom(int(size)), int(megabytes) << 20
    samples = []
    for _ in range(int(repeat)):
        client, server = _stdlib_pair(suite, cert, key)
        got = client[0].cipher()[0]
        if got != suite:
            raise SystemExit(f"negotiated {got}, wanted {suite}: OPENSSL_CONF was not applied")
        samples.append(timed(lambda: stdlib_batched(client, server, chunk, total)) / (total / (1 << 30)))
    print(statistics.median(samples))


def timed(run: Callable[[], None]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def main() -> None:
    if sys.argv[1:2] == ["--stdlib-child"]:
        stdlib_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", default="16384,65536,131076,262144", help="application write sizes")
    args = parser.parse_args()
    total = args.megabytes << 20
    sizes = [int(s) for s in args.sizes.split(",")]
    gigabytes = total / (1 << 30)
    print(f"lever_tls: {args.megabytes} MiB one way per run, median of {args.repeat}; {ssl.OPENSSL_VERSION}; "
          f"pyOpenSSL over {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}")
    print(f"machine before: {load_note()}; {busy_before()}")
    print("CPU seconds per GB moved (encrypt + decrypt, i.e. one relay leg's work per byte; lower is better)\n")
    with tempfile.TemporaryDirectory() as directory:
        cert, key = _certificate(directory)
        header = "".join(f"{size:>10}" for size in sizes)
        print(f"  {'suite':<30} {'driver':<10} {header}")
        results: Dict[Tuple[str, str, int], float] = {}
        for suite in SUITES:
            aead = statistics.median(aead_only(suite, total) for _ in range(args.repeat)) / gigabytes
            print(f"  {suite:<30} {'cipher':<10} {aead:10.3f}   (16 KiB records, any write size)")
            drivers = {
                "twisted": lambda size: (_pyopenssl_pair(suite, cert, key), twisted_style),
                "pyopenssl": lambda size: (_pyopenssl_pair(suite, cert, key), pyopenssl_batched),
            }
            for driver, make in drivers.items():
                row = []
                for size in sizes:
                    chunk = os.urandom(size)
                    samples = []
                    for _ in range(args.repeat):
                        (client, server), loop = make(size)
                        samples.append(timed(lambda: loop(client, server, chunk, total)) / gigabytes)
                    results[(suite, driver, size)] = statistics.median(samples)
                    row.append(f"{results[(suite, driver, size)]:10.3f}")
                print(f"  {suite:<30} {driver:<10} {''.join(row)}", flush=True)
            row = []
            for size in sizes:
                results[(suite, "stdlib", size)] = _stdlib_child(suite, cert, key, size, args, directory)
                row.append(f"{results[(suite, 'stdlib', size)]:10.3f}")
            print(f"  {suite:<30} {'stdlib':<10} {''.join(row)}", flush=True)
        print("\nratios (same suite, same size; below 1 is cheaper)")
        for suite in SUITES:
            for a, b in (("pyopenssl", "twisted"), ("stdlib", "pyopenssl"), ("stdlib", "twisted")):
                cells = "".join(f"{results[(suite, a, s)] / results[(suite, b, s)]:10.2f}" for s in sizes)
                print(f"  {suite:<30} {a + '/' + b:<18} {cells}")
        for driver in ("twisted", "pyopenssl", "stdlib"):
            cells = "".join(
                f"{results[('TLS_AES_128_GCM_SHA256', driver, s)] / results[('TLS_AES_256_GCM_SHA384', driver, s)]:10.2f}"
                for s in sizes
            )
            print(f"  {'AES-128-GCM / AES-256-GCM':<30} {driver:<18} {cells}")
    print(f"\nmachine after: {load_note()}")


if __name__ == "__main__":
    main()
