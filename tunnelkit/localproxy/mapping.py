# -*- test-case-name: tests.test_localproxy_mapping -*-
"""
Service-id mappings of the local proxy: C{-s/--source-listen-port}, C{-d/--destination-app} and the
files of C{--config-dir}.

Syntax (as AWS's localproxy): a comma-separated list of C{SERVICE=ENDPOINT} items, or a single
item without C{=} (the V1 format: service id C{""}, renamed to the tunnel's only service id once
SERVICE_IDS arrives).  Service ids match C{^[a-zA-Z0-9_-]{1,128}$}.

  - source endpoints are a port (C{0} = an ephemeral port, logged once bound);
  - destination endpoints are a port (on C{-b}'s address, default 127.0.0.1), C{HOST:PORT},
    C{[V6]:PORT}, or a unix socket path (contains C{/}).

A C{--config-dir} holds files of C{SERVICE=ENDPOINT} lines (INI-like; C{#}/C{;} comments and
C{[section]} headers are ignored).  Command-line items win over files; among files the first one
(sorted by path) defining a service id wins.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

from twisted.logger import Logger

from tunnelkit.adapters import Target, describe_target
from tunnelkit.errors import ConfigError

__all__ = [
    "V1_SERVICE_ID",
    "HOST_NAME_RE",
    "Target",
    "describe_target",
    "parse_source_mapping",
    "parse_destination_mapping",
    "parse_destination_endpoint",
    "read_config_dir",
    "validate_service_id",
]

log = Logger()

#: The service id of a bare V1-format mapping (C{-s 5555}, C{-d 22}).
V1_SERVICE_ID = ""

_SERVICE_ID = re.compile(r"\A[a-zA-Z0-9_-]{1,128}\Z")
#: A host name or IPv4 address as C{-d} and C{-e} take it (loosely: DNS checks the rest).
HOST_NAME_RE = re.compile(r"\A[a-zA-Z0-9.\-_]{1,253}\Z")


def validate_service_id(service_id: str) -> str:
    """Return C{service_id} if valid, else raise L{ConfigError} naming it."""
    if not _SERVICE_ID.match(service_id):
        raise ConfigError(
            f"bad service id {service_id!r}: use 1-128 letters, digits, '_' or '-'"
        )
    return service_id


def _port(text: str, what: str, allow_zero: bool) -> int:
    if not text.isdigit():
        raise ConfigError(f"bad {what} {text!r}: expected a port number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"bad {what} {text!r}: a port must be {low}-65535")
    return port


def _items(text: str, option: str) -> List[Tuple[str, str]]:
    """Split C{text} into (service id, endpoint) pairs; a lone bare item is the V1 format."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{option}: empty mapping")
    pairs: List[Tuple[str, str]] = []
    for item in items:
        if "=" in item:
            service_id, _, endpoint = item.partition("=")
            service_id, endpoint = service_id.strip(), endpoint.strip()
            try:
                validate_service_id(service_id)
            except ConfigError as e:
                raise ConfigError(f"{option}: {item!r}: {e}") from None
            if not endpoint:
                raise ConfigError(f"{option}: {item!r}: no endpoint after '='")
            pairs.append((service_id, endpoint))
        else:
            if len(items) > 1:
                raise ConfigError(
                    f"{option}: {item!r} has no service id: with several items, write SERVICE=ENDPOINT each"
                )
            pairs.append((V1_SERVICE_ID, item))
    return pairs


def _merge(pairs: Sequence[Tuple[str, object]], option: str) -> Dict[str, object]:
    mapping: Dict[str, object] = {}
    for service_id, endpoint in pairs:
        if service_id in mapping:
            raise ConfigError(f"{option}: service id {service_id!r} is mapped twice")
        mapping[service_id] = endpoint
    return mapping


def parse_source_mapping(text: str, option: str = "-s/--source-listen-port") -> Dict[str, int]:
    """
    C{"5555"} -> C{{"": 5555}}; C{"SSH1=5555,HTTP1=8080"} -> C{{"SSH1": 5555, "HTTP1": 8080}}.

    @raise ConfigError: on a malformed item, a bad port or a duplicate service id.
    """
    pairs = [(sid, _port(ep, f"listen port for {sid or 'the service'}", True)) for sid, ep in _items(text, option)]
    ports = [port for _, port in pairs if port]
    if len(ports) != len(set(ports)):
        raise ConfigError(f"{option}: {text!r}: the same port is used for two services")
    return _merge(pairs, option)  # type: ignore[return-value]


def parse_destination_endpoint(endpoint: str, default_host: str = "127.0.0.1") -> Target:
    """
    C{"22"} -> C{("127.0.0.1", 22)}; C{"host:22"}; C{"[::1]:22"}; C{"/run/app.sock"} -> that path
    (a unix socket).  Targets are L{tunnelkit.adapters.Target}s: C{(host, port)} or a path.

    @raise ConfigError: if C{endpoint} is none of these.
    """
    if "/" in endpoint:
        return endpoint
    if endpoint.isdigit():
        return (default_host, _port(endpoint, "destination port", False))
    if endpoint.startswith("["):
        host, sep, rest = endpoint[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"bad destination {endpoint!r}: expected [IPV6]:PORT")
        return (host, _port(rest[1:], "destination port", False))
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not HOST_NAME_RE.match(host):
        raise ConfigError(
            f"bad destination {endpoint!r}: expected PORT, HOST:PORT, [IPV6]:PORT or a unix socket path"
        )
    return (host, _port(port, "destination port", False))


def parse_destination_mapping(
    text: str, default_host: str = "127.0.0.1", option: str = "-d/--destination-app"
) -> Dict[str, Target]:
    """
    C{"22"} -> C{{"": 127.0.0.1:22}}; C{"SSH1=22,HTTP1=10.0.0.1:80,APP=/run/app.sock"}.

    @raise ConfigError: on a malformed item or a duplicate service id.
    """
    pairs: List[Tuple[str, object]] = []
    for service_id, endpoint in _items(text, option):
        try:
            pairs.append((service_id, parse_destination_endpoint(endpoint, default_host)))
        except ConfigError as e:
            raise ConfigError(f"{option}: {e}") from None
    return _merge(pairs, option)  # type: ignore[return-value]


def read_config_dir(path: str) -> Dict[str, str]:
    """
    Read every regular file under C{path} (recursively, sorted) as C{SERVICE=ENDPOINT} lines.

    Returns the raw endpoints per service id (parse them with the mode's parser).  A line that is
    not C{SERVICE=ENDPOINT} is an error naming the file and line; a service id defined twice keeps
    its first definition, with a warning.

    @raise ConfigError: if C{path} is not a readable directory or a line is malformed.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"--config-dir {path}: not a directory")
    found: Dict[str, str] = {}
    where: Dict[str, str] = {}
    files: List[str] = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files.extend(os.path.join(root, name) for name in sorted(names))
    for file in files:
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config-dir: {file}: cannot read: {e}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line[0] in "#;" or (line.startswith("[") and line.endswith("]")):
                continue
            service_id, sep, endpoint = line.partition("=")
            service_id, endpoint = service_id.strip(), endpoint.strip()
            if not sep or not endpoint:
                raise ConfigError(f"--config-dir: {file}:{number}: expected SERVICE=ENDPOINT, got {line!r}")
            try:
                validate_service_id(service_id)
            except ConfigError as e:
                raise ConfigError(f"--config-dir: {file}:{number}: {e}") from None
            if service_id in found:
                log.warn(
                    "Duplicate mapping of {service_id} in {file} ignored (first set in {first})",
                    service_id=service_id,
                    file=file,
                    first=where[service_id],
                )
                continue
            found[service_id] = endpoint
            where[service_id] = file
    return found


#: A mapping's endpoint: a listen port (source) or a target (destination).
_Endpoint = TypeVar("_Endpoint")


def merge_config_dir(
    command_line: Optional[Mapping[str, _Endpoint]], from_dir: Mapping[str, _Endpoint]
) -> Dict[str, _Endpoint]:
    """Command-line items win; the directory adds the service ids the command line did not name."""
    merged = dict(from_dir)
    merged.update(command_line or {})
    if V1_SERVICE_ID in merged and len(merged) > 1:
        raise ConfigError(
            "a bare port (V1 format) cannot be combined with SERVICE=ENDPOINT mappings from --config-dir"
        )
    return merged
