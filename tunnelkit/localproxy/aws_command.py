# -*- test-case-name: tests.test_localproxy_aws_command -*-
"""
C{tunnelkit-localproxy}: AWS's C{localproxy} command line, unchanged, running tunnelkit's local proxy.

    tunnelkit-localproxy -r us-east-1 -s 5555 -t TOKEN
    tunnelkit-localproxy --config lp.ini --settings-json settings.json -v 5

It reads the options of AWS's C{localproxy} (reference section 2.2): C{-t -i -e -r -s -d -b -c -k -y -v
-m --config --config-dir --settings-json --export-default-settings -h -V}, plus tunnelkit's
C{--access-token-file} and C{--client-token-file}, and runs the same process as
C{twistd -n tunnelkit --mode source|destination ...} with them (same log lines, same exit statuses).

  - C{--config FILE}: AWS's INI form, C{key = value} per long option name (C{region = us-east-1});
    the command line wins over it, and it over the environment.
  - C{--settings-json FILE}: AWS's fine-grained settings (C{tunneling.proxy.*}); the ones tunnelkit
    has (L{SETTINGS}) become options, the others are logged as not used.
  - C{-m src|dst} (or C{-s}/C{-d}) chooses the mode; without C{-s}/C{-d} the mapping comes from
    C{--config-dir} (default C{./config} when it exists), as AWS's does.
  - C{-y} other than V1/V2 warns and means V3, as AWS's does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import tunnelkit

__all__ = ["SETTINGS", "main", "twistd_arguments", "UsageError"]

#: AWS's settings (under C{tunneling.proxy.}) that tunnelkit has: setting -> (option, its value).
SETTINGS: Dict[str, Tuple[str, Any]] = {
    "default_bind_address": ("--local-bind-address", str),
    "tcp.connection_retry_count": ("--connect-retries", lambda v: str(max(int(v), 0))),
    "tcp.connection_retry_delay_ms": ("--connect-retry-delay", lambda v: f"{int(v) / 1000:g}"),
    "tcp.max_active_connections": ("--max-connections", lambda v: str(int(v))),
}

#: The defaults AWS's C{--export-default-settings} writes for the settings tunnelkit has.
DEFAULT_SETTINGS = {
    "tunneling": {
        "proxy": {
            "default_bind_address": "localhost",
            "tcp": {"connection_retry_count": 5, "connection_retry_delay_ms": 2500, "max_active_connections": 128},
        }
    }
}

#: Long options whose value passes to tunnelkit's local proxy as it is.
_PASSED = ("access-token", "client-token", "proxy-endpoint", "region", "source-listen-port", "destination-app",
           "local-bind-address", "capath", "config-dir", "verbose", "access-token-file", "client-token-file",
           "pace")
_MODES = {"src": "source", "source": "source", "dst": "destination", "destination": "destination"}


class UsageError(Exception):
    """A command line AWS's localproxy would refuse; the message is AWS's where it has one."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _parser() -> _Parser:
    p = _Parser(prog="tunnelkit-localproxy", add_help=False,
                description="AWS's localproxy command line, running tunnelkit's local proxy.")
    add = p.add_argument
    add("-h", "--help", action="store_true", help="print this help and exit")
    add("-V", "--version", action="store_true", help="print the version and exit")
    add("-t", "--access-token", help="the client access token (prefer AWSIOT_TUNNEL_ACCESS_TOKEN)")
    add("--access-token-file", help="tunnelkit: a file holding the access token")
    add("-i", "--client-token", help="the client token (AWSIOT_TUNNEL_CLIENT_TOKEN)")
    add("--client-token-file", help="tunnelkit: keep the client token in this file (0600)")
    add("--pace", help="tunnelkit: bytes per second per connection toward a peer without flow control "
        "(AWS's localproxy as the far end); 0: off")
    add("-e", "--proxy-endpoint", help="the tunnel service, HOST[:PORT] (AWSIOT_TUNNEL_ENDPOINT)")
    add("-r", "--region", help="an AWS region (AWSIOT_TUNNEL_REGION)")
    add("-s", "--source-listen-port", help="source: PORT or SERVICE=PORT[,...]")
    add("-d", "--destination-app", help="destination: PORT, HOST:PORT, a path or SERVICE=TARGET[,...]")
    add("-b", "--local-bind-address", help="source: the listen address; destination: host of PORT-only targets")
    add("-c", "--capath", help="a CA directory (or file) to check the service's certificate")
    add("-k", "--no-ssl-host-verify", action="store_true", help="do not check the service's certificate (DANGEROUS)")
    add("-y", "--destination-client-type", help="source: V1 or V2 destinations")
    add("-v", "--verbose", help="log detail 0-255 (4 = info)")
    add("-m", "--mode", help="src, source, dst or destination")
    add("--config", help="INI file of KEY = VALUE lines, keys the long option names")
    add("--config-dir", help="a directory of SERVICE=ENDPOINT files (default ./config when it exists)")
    add("--settings-json", help="AWS's fine-grained settings (JSON)")
    add("--export-default-settings", help="write the default settings (JSON) to this file and exit")
    return p


def read_config_file(path: str) -> Dict[str, str]:
    """AWS's C{--config} file: C{key = value} lines (C{#} and C{;} comments, C{[sections]} ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    values: Dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text[0] in "#;" or (text.startswith("[") and text.endswith("]")):
            continue
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--config {path}:{number}: expected KEY = VALUE, got {text[:80]!r}")
        values[key.strip()] = value.strip()
    return values


def read_settings(path: str) -> Dict[str, Any]:
    """AWS's C{--settings-json} file, flattened to C{tcp.max_active_connections}-style keys."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--settings-json {path}: cannot read it as JSON: {getattr(e, 'strerror', None) or e}") from None
    flat: Dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", document)
    return {key[len("tunneling.proxy."):] if key.startswith("tunneling.proxy.") else key: value
            for key, value in flat.items()}


def twistd_arguments(argv: Sequence[str], environ: Mapping[str, str], err: TextIO) -> List[str]:
    """
    The C{twistd} command line (after C{twistd}) that runs what AWS's C{localproxy ARGV} asks for.

    @raise UsageError: for what AWS's localproxy refuses (its messages).
    """
    args = _parser().parse_args(list(argv))
    given = {name: getattr(args, name.replace("-", "_")) for name in (*_PASSED, "mode", "destination-client-type")}
    if args.config:
        known = set(given) | {"no-ssl-host-verify", "settings-json"}
        for key, value in read_config_file(args.config).items():
            name = key.replace("_", "-")
            if name not in known:
                raise UsageError(f"--config {args.config}: unrecognised option '{key}'")
            if name == "no-ssl-host-verify":
                args.no_ssl_host_verify = args.no_ssl_host_verify or value.lower() in ("1", "true", "yes", "on")
            elif name == "settings-json":
                args.settings_json = args.settings_json or value
            elif given.get(name) is None:
                given[name] = value

    source, destination = given["source-listen-port"], given["destination-app"]
    if source and destination:
        raise UsageError("Must specify one and only one of --source-listen-port/-s or --destination-app/-d")
    mode: Optional[str] = None
    if given["mode"] is not None:
        mode = _MODES.get(given["mode"])
        if mode is None:
            raise UsageError("Mode value is wrong! Allowed values are: src, dst, source, destination")
    implied = "source" if source else "destination" if destination else None
    if mode and implied and mode != implied:
        flag = "-s" if source else "-d"
        raise UsageError(f"{flag} and --mode have mismatched mode. Mode is set to {mode}!")
    mode = mode or implied
    if mode is None:
        raise UsageError("Must specify one of --source-listen-port/-s or --destination-app/-d or --mode")
    if not source and not destination and not given["config-dir"] and os.path.isdir("config"):
        given["config-dir"] = "config"

    out = ["-n", "--pidfile=", "tunnelkit", "--mode", mode]
    for name in _PASSED:
        if given[name] is not None:
            out += [f"--{name}", str(given[name])]
    if args.no_ssl_host_verify:
        out.append("--no-ssl-host-verify")
    client_type = given["destination-client-type"]
    if client_type is not None:
        if client_type.upper() in ("V1", "V2") and mode == "source":
            out += ["--destination-client-type", client_type.upper()]
        else:
            err.write("unknown value for destination-client-type, assuming default protocol V3.\n")
    if args.settings_json:
        for key, value in read_settings(args.settings_json).items():
            if key not in SETTINGS:
                err.write(f"tunnelkit-localproxy: setting {key} is not used by tunnelkit's local proxy\n")
                continue
            option, convert = SETTINGS[key]
            if option == "--local-bind-address" and given["local-bind-address"] is not None:
                continue  # -b wins over the default
            if mode == "source" and option in ("--connect-retries", "--connect-retry-delay"):
                continue  # the destination's target retries
            if mode == "destination" and option == "--max-connections":
                continue
            try:
                out += [option, convert(value)]
            except (TypeError, ValueError):
                raise UsageError(f"--settings-json {args.settings_json}: {key}: bad value {value!r}") from None
    return out


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run tunnelkit's local proxy from AWS's command line; returns only for help, version or errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        if any(a in ("-h", "--help") for a in argv):
            out.write(parser.format_help())
            return 0
        if any(a in ("-V", "--version") for a in argv):
            out.write(f"Running AWS IoT Secure Tunneling Local Proxy version: tunnelkit {tunnelkit.__version__}\n")
            return 0
        known, _ = parser.parse_known_args(argv)
        if known.export_default_settings:
            with open(known.export_default_settings, "w", encoding="utf-8") as f:
                json.dump(DEFAULT_SETTINGS, f, indent=4)
                f.write("\n")
            return 0
        arguments = twistd_arguments(argv, os.environ, err)
    except UsageError as e:
        err.write(f"{e}\nTry 'tunnelkit-localproxy --help' for a list of options.\n")
        return 1
    except OSError as e:
        err.write(f"tunnelkit-localproxy: {e}\n")
        return 1
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *arguments]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
