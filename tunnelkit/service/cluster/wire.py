# -*- test-case-name: tests.test_cluster_forward -*-
"""
The cluster's internal forwarding handshake, sans I/O.

A node that forwards a peer's connection to the node holding its tunnel connects to that node's
C{--cluster-listen} endpoint.  Before any byte of the client's request passes, the two nodes run:

  1. the listener sends a challenge: C{"TKC1"} and 16 random bytes (a fresh nonce per connection);
  2. the forwarder answers C{"TKC1"}, its node id (one length byte, then ASCII), a 32-byte
     HMAC-SHA256 under the cluster secret, and a PROXY protocol v2 header (HAProxy's
     C{proxy-protocol.txt}, section 2.2: command PROXY, TCP over IPv4 or IPv6) carrying the real
     client's address and the address it reached;
  3. the MAC covers a label, the nonce, the node id and the PROXY header: only a holder of the
     secret can make one, it cannot be replayed on another connection (new nonce), and the client
     address cannot be changed.  Over TLS (C{--cluster-listen ssl:...}) it also covers 32 bytes of
     the connection's TLS exporter (RFC 5705, L{channel_binding}): the nodes do not need to trust each
     other's certificates, since a man in the middle, holding two TLS connections, cannot make a MAC
     that holds on either.

What follows is the client's bytes as the forwarder received them (its request head first), in both
directions, until either end closes.  The listener refuses (closes) anything else, without a word:
an outsider learns nothing but that the port speaks this.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from tunnelkit.errors import TunnelkitError

__all__ = [
    "MAGIC",
    "NONCE_SIZE",
    "ForwardRefused",
    "ProxyAddresses",
    "encode_proxy_v2",
    "decode_proxy_v2",
    "challenge",
    "answer",
    "Acceptor",
    "Accepted",
    "load_secret",
]

MAGIC = b"TKC1"
NONCE_SIZE = 16
MAC_SIZE = 32
_LABEL = b"tunnelkit-cluster-forward-v1\x00"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_MAX_NODE_ID = 64
#: The most bytes an answer can take (magic, id, MAC, the largest PROXY v2 header this sends).
MAX_ANSWER = len(MAGIC) + 1 + _MAX_NODE_ID + MAC_SIZE + 16 + 36
MIN_SECRET_BYTES = 16


class ForwardRefused(TunnelkitError):
    """A connection to the cluster listener did not authenticate as a node of this cluster."""


@dataclass(frozen=True)
class ProxyAddresses:
    """The client's address and port and the address and port it connected to."""

    source_host: str
    source_port: int
    destination_host: str
    destination_port: int


def encode_proxy_v2(addresses: ProxyAddresses) -> bytes:
    """A PROXY protocol v2 header (command PROXY, TCP4 or TCP6)."""
    source = ipaddress.ip_address(addresses.source_host)
    destination = ipaddress.ip_address(addresses.destination_host)
    if source.version != destination.version:  # e.g. an IPv4 client on an IPv6 listener
        source = ipaddress.ip_address(f"::ffff:{source}") if source.version == 4 else source
        destination = ipaddress.ip_address(f"::ffff:{destination}") if destination.version == 4 else destination
    family = 0x11 if source.version == 4 else 0x21
    body = source.packed + destination.packed + struct.pack(
        "!HH", addresses.source_port, addresses.destination_port
    )
    return PROXY_V2_SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(body)) + body


def decode_proxy_v2(data: bytes) -> Tuple[Optional[ProxyAddresses], int]:
    """
    Read a PROXY v2 header at the start of C{data}: (addresses, its size), or (None, 0) while it is
    incomplete.

    @raise ForwardRefused: not a PROXY v2 header of command PROXY over TCP.
    """
    if len(data) < 16:
        if not PROXY_V2_SIGNATURE.startswith(bytes(data[:12])):
            raise ForwardRefused("not a PROXY protocol v2 header")
        return None, 0
    if bytes(data[:12]) != PROXY_V2_SIGNATURE or data[12] != 0x21:
        raise ForwardRefused("not a PROXY protocol v2 header with command PROXY")
    family = data[13]
    (length,) = struct.unpack("!H", data[14:16])
    size = 16 + length
    if family == 0x11:
        need, width = 12, 4
    elif family == 0x21:
        need, width = 36, 16
    else:
        raise ForwardRefused(f"PROXY v2 address family 0x{family:02x} is not TCP over IPv4 or IPv6")
    if length < need or length > 216:
        raise ForwardRefused(f"PROXY v2 address block of {length} bytes")
    if len(data) < size:
        return None, 0
    body = bytes(data[16 : 16 + need])
    source = ipaddress.ip_address(body[:width])
    destination = ipaddress.ip_address(body[width : 2 * width])
    source_port, destination_port = struct.unpack("!HH", body[2 * width : 2 * width + 4])
    mapped = getattr(source, "ipv4_mapped", None)
    shown = str(mapped) if mapped is not None else str(source)
    return ProxyAddresses(shown, source_port, str(destination), destination_port), size


def challenge(nonce: Optional[bytes] = None) -> Tuple[bytes, bytes]:
    """(the nonce, the challenge bytes the listener sends first)."""
    nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
    return nonce, MAGIC + nonce


#: The label of the TLS exporter (RFC 5705) that binds the MAC to the TLS connection it was made on.
EXPORTER_LABEL = b"EXPORTER-tunnelkit-cluster-forward"


def channel_binding(transport: Any) -> bytes:
    """
    32 bytes of the TLS exporter of C{transport}'s TLS connection (both ends of one TLS connection
    get the same bytes, a man in the middle gets others), or C{b""} on plain TCP.
    """
    handle = getattr(transport, "getHandle", None)
    connection = handle() if handle is not None else None
    export = getattr(connection, "export_keying_material", None)
    if export is None:
        return b""
    return bytes(export(EXPORTER_LABEL, 32))


def _mac(secret: bytes, nonce: bytes, node_id: bytes, proxy_header: bytes, binding: bytes = b"") -> bytes:
    return hmac.new(
        secret, _LABEL + nonce + bytes((len(node_id),)) + node_id + proxy_header + binding, hashlib.sha256
    ).digest()


def answer(
    secret: bytes, challenge_bytes: bytes, node_id: str, addresses: ProxyAddresses, binding: bytes = b""
) -> bytes:
    """
    The forwarder's answer to C{challenge_bytes} (exactly the listener's first 20 bytes).

    @raise ForwardRefused: the challenge is not one.
    """
    if len(challenge_bytes) != len(MAGIC) + NONCE_SIZE or not challenge_bytes.startswith(MAGIC):
        raise ForwardRefused("the node's cluster listener did not send a challenge")
    encoded = node_id.encode("ascii")
    header = encode_proxy_v2(addresses)
    nonce = challenge_bytes[len(MAGIC) :]
    return MAGIC + bytes((len(encoded),)) + encoded + _mac(secret, nonce, encoded, header, binding) + header


@dataclass(frozen=True)
class Accepted:
    """A forwarder authenticated: who it is, the real client's addresses, and the bytes after."""

    node_id: str
    addresses: ProxyAddresses
    rest: bytes


class Acceptor:
    """
    The listener's side: feed it what the forwarder sends (L{feed}) until it returns an
    L{Accepted}.  Holds at most L{MAX_ANSWER} bytes.
    """

    def __init__(self, secret: bytes, nonce: bytes, binding: bytes = b"") -> None:
        self._secret = secret
        self._nonce = nonce
        self._binding = binding
        self._buffer = b""

    def feed(self, data: bytes) -> Optional[Accepted]:
        """
        @return: None while the answer is incomplete.
        @raise ForwardRefused: the answer is wrong (bad magic, id, MAC or PROXY header, or too long).
        """
        buffer = self._buffer = self._buffer + data
        if not MAGIC.startswith(buffer[: len(MAGIC)]):
            raise ForwardRefused("not a tunnelkit cluster node")
        if len(buffer) < len(MAGIC) + 1:
            return None
        id_size = buffer[len(MAGIC)]
        if not 0 < id_size <= _MAX_NODE_ID:
            raise ForwardRefused(f"node id of {id_size} bytes")
        start = len(MAGIC) + 1 + id_size + MAC_SIZE
        try:
            addresses, size = decode_proxy_v2(buffer[start:]) if len(buffer) > start else (None, 0)
        except ForwardRefused:
            raise
        if addresses is None:
            if len(buffer) > MAX_ANSWER:
                raise ForwardRefused("answer too long")
            return None
        node_id = buffer[len(MAGIC) + 1 : len(MAGIC) + 1 + id_size]
        mac = buffer[len(MAGIC) + 1 + id_size : start]
        header = buffer[start : start + size]
        if not hmac.compare_digest(mac, _mac(self._secret, self._nonce, node_id, header, self._binding)):
            raise ForwardRefused("wrong MAC: the node has another cluster secret")
        try:
            name = node_id.decode("ascii")
        except UnicodeDecodeError:
            raise ForwardRefused("node id is not ASCII") from None
        self._buffer = b""
        return Accepted(name, addresses, buffer[start + size :])


def load_secret(path: str) -> bytes:
    """
    The cluster secret in C{path} (its bytes, surrounding whitespace stripped).

    @raise ForwardRefused: unreadable, or under L{MIN_SECRET_BYTES} bytes.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ForwardRefused(f"--cluster-secret-file {path}: {e.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ForwardRefused(
            f"--cluster-secret-file {path}: the secret is {len(secret)} bytes; use at least "
            f"{MIN_SECRET_BYTES} random bytes, the same file on every node (e.g. head -c 32 /dev/urandom | base64 > FILE)"
        )
    return secret
