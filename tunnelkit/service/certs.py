# -*- test-case-name: tests.test_api_tap -*-
"""
The service's own TLS material, generated into its state directory on first start:

  - C{ca.pem} / C{ca.key}: a private CA (EC P-256, 10 years) that clients trust (C{--ca-bundle},
    localproxy C{-c}, C{AWS_CA_BUNDLE});
  - C{server.pem} / C{server.key}: the server certificate (EC P-256, 825 days) signed by that CA, with
    subject alternative names C{IP:127.0.0.1}, C{IP:::1}, C{DNS:localhost} and every C{--hostname}.

The server certificate is issued again (by the same CA) when the wanted names change or it is within
30 days of expiry; the CA is never replaced once made.  Keys are written private to the user.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from typing import Iterable, List, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

from tunnelkit.errors import ConfigError
from tunnelkit.service.statefiles import write_atomically

log = Logger()

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_NAMES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServiceCertificates:
    """Paths of the generated TLS files."""

    ca_cert: str
    server_cert: str
    server_key: str


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def wanted_names(hostnames: Iterable[str]) -> List[str]:
    """The SANs the server certificate must carry: the loopback names and C{hostnames}, in order."""
    names: List[str] = []
    for name in list(DEFAULT_NAMES) + list(hostnames):
        if name not in names:
            names.append(name)
    return names


def _certificate_names(cert: x509.Certificate) -> List[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: List[str] = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    names.extend(san.get_values_for_type(x509.DNSName))
    return names


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _make_ca(state_dir: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tunnelkit"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"tunnelkit service CA ({os.path.basename(os.path.abspath(state_dir))})"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomically(os.path.join(state_dir, CA_KEY), _key_pem(key), 0o600)
    write_atomically(os.path.join(state_dir, CA_CERT), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _make_server(state_dir: str, names: Sequence[str]) -> None:
    with open(os.path.join(state_dir, CA_KEY), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    with open(os.path.join(state_dir, CA_CERT), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    write_atomically(os.path.join(state_dir, SERVER_KEY), _key_pem(key), 0o600)
    write_atomically(os.path.join(state_dir, SERVER_CERT), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_certificates(state_dir: str, hostnames: Iterable[str] = ()) -> ServiceCertificates:
    """
    Make sure C{state_dir} holds the CA and a current server certificate for C{hostnames}.

    @raise ConfigError: if existing files cannot be read.
    """
    paths = ServiceCertificates(
        os.path.join(state_dir, CA_CERT), os.path.join(state_dir, SERVER_CERT), os.path.join(state_dir, SERVER_KEY)
    )
    names = wanted_names(hostnames)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    ca_key = os.path.join(state_dir, CA_KEY)
    if not os.path.exists(paths.ca_cert):
        if os.path.exists(paths.server_cert):
            raise ConfigError(
                f"{state_dir}: {SERVER_CERT} exists but {CA_CERT} is missing; restore {CA_CERT} or remove "
                f"{SERVER_CERT} and {SERVER_KEY} to generate new TLS material"
            )
        _make_ca(state_dir)
        log.info("Generated a new CA: {path}", path=paths.ca_cert)
    reissue = not (os.path.exists(paths.server_cert) and os.path.exists(paths.server_key))
    if not reissue:
        try:
            with open(paths.server_cert, "rb") as f:
                current = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{paths.server_cert}: cannot read the server certificate: {e}") from None
        expires = current.not_valid_after_utc
        reissue = set(_certificate_names(current)) != set(names) or expires - _now() < datetime.timedelta(days=30)
    if reissue:
        if not os.path.exists(ca_key):
            raise ConfigError(
                f"{state_dir}: cannot issue a server certificate: {CA_KEY} is missing (it signs {SERVER_CERT})"
            )
        _make_server(state_dir, names)
        log.info("Issued a server certificate for {names}: {path}", names=", ".join(names), path=paths.server_cert)
    return paths
