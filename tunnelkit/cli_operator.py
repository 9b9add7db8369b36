# -*- test-case-name: tests.test_cli_operator -*-
"""
The operator commands of the C{tunnelkit} CLI beside the API ones (L{tunnelkit.cli}):

    tunnelkit example-config > tap.yml     the example configuration of every mode (tap.yml)
    tunnelkit ssh [USER@]THING [-- SSH ARGS]
    tunnelkit connect THING SERVICE --local-port N
    tunnelkit duplicate-tunnel --tunnel-id ID [--lifetime MINUTES]
    tunnelkit audit --tunnel-id ID         the service's audit trail of a tunnel (tunnelkit.service.audit)

C{ssh} and C{connect} open a tunnel to the thing (its agent gets the destination token over MQTT),
run a source local proxy in this process (L{tunnelkit.thing_session}), wait for the thing with a
progress line, then run C{ssh} through it (C{ssh}) or carry C{127.0.0.1:N} until Ctrl-C
(C{connect}), and close the tunnel at the end, as C{aws ssm start-session} or C{tsh ssh} do.
C{ssh} exits with ssh's status; C{connect} with 0 after Ctrl-C or SIGTERM; both with 1 when the
thing does not connect in time or the session ends, and 255 when the service refuses or cannot be
reached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.parse
from importlib import resources
from typing import Any, Callable, Dict, List, TextIO

__all__ = ["COMMANDS", "add_commands", "example_config", "run"]

#: The commands this module adds and runs.
COMMANDS = ("example-config", "ssh", "connect", "duplicate-tunnel", "audit")


def example_config() -> str:
    """The text of the example configuration C{tap.yml} shipped in the package."""
    return resources.files("tunnelkit").joinpath("tap.yml").read_text(encoding="utf-8")


def add_commands(commands: Any, api_command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """
    Add this module's commands to C{tunnelkit}'s subparsers.

    @param api_command: makes a command with the API options (endpoint, credentials, CA).
    """
    from tunnelkit import cli

    commands.add_parser(
        "example-config",
        help="Print the example configuration of every mode (tap.yml).",
        description="Print the example configuration (tap.yml): tunnelkit example-config > tap.yml, then "
        "twistd -n tunnelkit --mode MODE --config tap.yml.",
    )
    p = api_command("ssh", "Open a tunnel to a thing, run ssh through it, close the tunnel when ssh ends.")
    p.add_argument("target", metavar="[USER@]THING")
    p.add_argument("ssh_args", nargs=argparse.REMAINDER, metavar="-- SSH-ARGS",
                   help="after --: ssh's own options, then a remote command")
    p.add_argument("--service", default="SSH", help="the thing's service id for ssh (default SSH)")
    _session_options(p, default_port=0)
    p = api_command("connect", "Open a tunnel to a thing's service and carry 127.0.0.1:PORT to it until Ctrl-C.")
    p.add_argument("thing", metavar="THING")
    p.add_argument("service", metavar="SERVICE")
    _session_options(p, default_port=None)
    p = api_command("duplicate-tunnel", "Open a new tunnel like an existing one (destination, description, tags).")
    p.add_argument("--tunnel-id", required=True)
    p.add_argument("--lifetime", type=_minutes, metavar="MINUTES", help="maxLifetimeTimeoutMinutes (default: the old one's)")
    cli._token_files(p)
    p = commands.add_parser("audit", help="Show a tunnel's records of the service's audit trail.",
                            description="Show the audit trail's records (API calls, peer connects and "
                            "disconnects, TCP connections) of one tunnel, oldest first.")
    p.add_argument("--tunnel-id", help="only this tunnel's records (default: all)")
    p.add_argument("--audit-log", help="the trail (default <state-dir>/audit.jsonl)")
    p.add_argument("--state-dir", help=f"the service's state directory (default {cli.DEFAULT_STATE_DIR})")
    p.add_argument("--json", action="store_true", help="print the records as JSON lines, as stored")


def _minutes(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 720:
        raise argparse.ArgumentTypeError(f"expected 1-720 minutes, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected 0-3600 seconds, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return int(text)


def _session_options(p: argparse.ArgumentParser, default_port: Any) -> None:
    p.add_argument("--local-port", type=_port, default=default_port, required=default_port is None,
                   help="the local port on 127.0.0.1 (0: any free port)")
    p.add_argument("--wait", type=_seconds, default=60.0, help="seconds to wait for the thing to connect (default 60)")
    p.add_argument("--lifetime", type=_minutes, metavar="MINUTES", help="the tunnel's maxLifetimeTimeoutMinutes")
    p.add_argument("-v", "--verbose", action="store_true", help="also show the local proxy's info lines")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run one of L{COMMANDS}; the exit status."""
    if args.command == "example-config":
        out.write(example_config())
        return 0
    if args.command == "audit":
        return show_audit(args, out)
    if args.command == "duplicate-tunnel":
        return duplicate_tunnel(args, out)
    if args.command == "ssh":
        return run_thing_session(args, args.target.rpartition("@")[2], args.service, err, ssh=True)
    if args.command == "connect":
        return run_thing_session(args, args.thing, args.service, err, ssh=False)
    raise AssertionError(f"not an operator command: {args.command}")  # pragma: no cover


def show_audit(args: argparse.Namespace, out: TextIO) -> int:
    """Print the trail's records (of C{--tunnel-id}): one line each, C{time kind key=value ...}."""
    import json

    from tunnelkit import cli
    from tunnelkit.service.audit import read_records, trail_files

    path = args.audit_log or os.path.join(cli._state_dir(args), "audit.jsonl")
    records: List[Dict[str, Any]] = []
    try:
        for name in trail_files(path):
            with open(name, encoding="utf-8", errors="replace") as f:
                records.extend(read_records(f, args.tunnel_id))
    except OSError as e:
        raise cli.CliError(f"cannot read the audit trail {path}: {e.strerror} (pass --audit-log or --state-dir)") from None
    for record in records:
        if args.json:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            continue
        fields = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("time", "kind") and v is not None)
        out.write(f"{record.get('time', '?')} {record.get('kind', '?')} {fields}\n")
    if not records and args.tunnel_id:
        raise cli.CliError(f"no records of tunnel {args.tunnel_id} in {path}")
    return 0


def duplicate_tunnel(args: argparse.Namespace, out: TextIO) -> int:
    """Open a tunnel like C{--tunnel-id}'s (destination, description, tags, lifetime unless given)."""
    from tunnelkit import cli

    cli.check_token_files(args)
    client = cli.make_client(args)
    try:
        old = cli.call_api(client, "describe-tunnel", {"tunnelId": args.tunnel_id})["tunnel"]
        request: Dict[str, Any] = {}
        for field in ("description", "destinationConfig", "tags"):
            if old.get(field):
                request[field] = old[field]
        lifetime = args.lifetime or (old.get("timeoutConfig") or {}).get("maxLifetimeTimeoutMinutes")
        if lifetime:
            request["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": lifetime}
        response = cli.call_api(client, "open-tunnel", request)
    finally:
        client.close()
    return cli.print_response(args, response, out)


def _data_plane(args: argparse.Namespace, endpoint_url: str) -> Any:
    """The data plane of the service at C{endpoint_url} (the same listener), checked as the API is."""
    from tunnelkit import cli
    from tunnelkit.localproxy.endpoint import ServiceEndpoint
    from tunnelkit.transport.httpproxy import proxy_from_environment

    parts = urllib.parse.urlsplit(endpoint_url)
    secure = parts.scheme == "https"
    verify = not args.no_verify_ssl
    capath = args.ca_bundle or os.path.join(cli._state_dir(args), "ca.pem") if secure and verify else None
    return ServiceEndpoint(parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80), secure, capath,
                           verify, proxy_from_environment(os.environ))


def run_thing_session(args: argparse.Namespace, thing: str, service: str, err: TextIO, ssh: bool) -> int:
    """
    Open a tunnel to C{thing}'s C{service}, run the source in this process until the thing is
    connected, then C{ssh} through it (or wait for Ctrl-C), and close the tunnel.
    """
    from tunnelkit import cli

    ssh_program = shutil.which("ssh") if ssh else None
    if ssh and ssh_program is None:
        raise cli.CliError("no ssh command on PATH (install openssh-client)", 1)
    client = cli.make_client(args)
    request: Dict[str, Any] = {
        "destinationConfig": {"thingName": thing, "services": [service]},
        "description": f"tunnelkit {args.command} {thing} {service}",
    }
    if args.lifetime:
        request["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": args.lifetime}
    opened = cli.call_api(client, "open-tunnel", request)
    tunnel_id = opened["tunnelId"]
    err.write(f"tunnelkit: opened tunnel {tunnel_id} to {thing} ({service}); waiting for the thing to connect\n")
    err.flush()
    try:
        endpoint = _data_plane(args, client.meta.endpoint_url)
        return _run_reactor(args, client, tunnel_id, opened["sourceAccessToken"], endpoint, thing, service, err,
                            ssh_program)
    finally:
        try:
            cli.call_api(client, "close-tunnel", {"tunnelId": tunnel_id})
            err.write(f"tunnelkit: closed tunnel {tunnel_id}\n")
        except cli.CliError as e:
            err.write(f"tunnelkit: could not close tunnel {tunnel_id}: {e}\n")
        client.close()


def _run_reactor(args: argparse.Namespace, client: Any, tunnel_id: str, token: str, endpoint: Any, thing: str,
                 service: str, err: TextIO, ssh_program: Any) -> int:
    """The source, the wait and ssh (or the wait for Ctrl-C) on the reactor; the exit status."""
    from twisted.internet import reactor, threads
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import ProcessProtocol
    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner
    from zope.interface import provider

    from tunnelkit.thing_session import SourceUntilReady, ssh_command

    shown = LogLevel.info if args.verbose else LogLevel.warn

    @provider(ILogObserver)
    def to_stderr(event: Dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= shown:
            err.write(f"tunnelkit: {formatEvent(event)}\n")
            err.flush()

    globalLogBeginner.beginLoggingTo([to_stderr], redirectStandardIO=False)

    def destination_connected() -> Deferred:
        def ask() -> bool:
            tunnel = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
            return (tunnel.get("destinationConnectionState") or {}).get("status") == "CONNECTED"

        return threads.deferToThread(ask)

    def progress(seconds: float) -> None:
        err.write(f"tunnelkit: still waiting for {thing} to connect ({seconds:.0f} s)\n")
        err.flush()

    runner = SourceUntilReady(reactor, endpoint, token, service, destination_connected,
                              local_port=args.local_port, wait=args.wait, progress=progress)
    outcome = {"status": 0 if ssh_program is None else 130}  # what Ctrl-C (the reactor stopped) means

    class SshEnded(ProcessProtocol):
        def __init__(self) -> None:
            self.ended: Deferred = Deferred()

        def processEnded(self, reason: Any) -> None:
            self.ended.callback(getattr(reason.value, "exitCode", 1) or 0)

    def ready(port: int) -> Deferred:
        if ssh_program is None:
            err.write(f"tunnelkit: {thing} {service} is at 127.0.0.1:{port}; Ctrl-C closes the tunnel\n")
            err.flush()
            return runner.session.ended.addCallback(lambda end: 0 if end.status == 0 else 1)
        argv = ssh_command(args.target, port, args.ssh_args, thing, ssh_program)
        ended = SshEnded()
        reactor.spawnProcess(ended, argv[0], argv, env=None, childFDs={0: 0, 1: 1, 2: 2})
        return ended.ended

    def finished(status: int) -> None:
        outcome["status"] = status
        stop()

    def failed(failure: Any) -> None:
        err.write(f"tunnelkit: {failure.getErrorMessage()}\n")
        outcome["status"] = 1
        stop()

    def stop() -> None:
        runner.stop().addBoth(lambda _: reactor.stop() if reactor.running else None)

    def start() -> None:
        runner.start().addCallback(ready).addCallbacks(finished, failed)

    reactor.callWhenRunning(start)
    reactor.run()
    return int(outcome["status"])
