# -*- test-case-name: tests.test_cli -*-
"""
The C{tunnelkit} command: an API client of the tunnel service, and the operator's account commands.

API commands take the flags of C{aws iotsecuretunneling} and print the same JSON (nothing for an empty
response), through botocore itself (the SigV4 client, with the C{iotsecuretunneling} model)::

    tunnelkit open-tunnel --destination-config thingName=dev1,services=SSH --source-token-file src.token
    tunnelkit rotate-tunnel-access-token --tunnel-id ID --client-mode DESTINATION \\
        --destination-config thingName=dev1,services=SSH
    tunnelkit close-tunnel --tunnel-id ID --delete

They default to the local service: C{--endpoint-url https://127.0.0.1:8443}, credentials from
C{<state-dir>/credentials} (profile C{default}), and the CA C{<state-dir>/ca.pem}, with the state
directory C{./tunnelkit-state} (or C{$TUNNELKIT_STATE_DIR}, or C{--state-dir}).  C{$TUNNELKIT_ENDPOINT_URL}
and C{$TUNNELKIT_REGION} set the other two defaults (AWS's own variables are deliberately not read: they
usually point at AWS).

Operator commands work directly on the state directory's database (the service may be running)::

    tunnelkit admin create-account NAME [--account-id 123456789012]
    tunnelkit admin create-key ACCOUNT [--credentials-file FILE [--profile NAME]]
    tunnelkit admin revoke-key KEYID
    tunnelkit admin list-keys
    tunnelkit admin list-accounts
    tunnelkit admin migrate        (apply pending schema migrations; every admin command takes --store)
    tunnelkit admin create-user|reset-password|delete-user ACCOUNT NAME   (console users; password from stdin)
    tunnelkit admin list-users [ACCOUNT]

Exit status: 0 on success, 2 for a usage error, 255 when the service refuses a request or cannot be
reached (as the AWS CLI), 1 for any other error.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import stat
import sys
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import tunnelkit
from tunnelkit import cli_operator
from tunnelkit.errors import TunnelkitError

DEFAULT_ENDPOINT = "https://127.0.0.1:8443"
DEFAULT_STATE_DIR = "./tunnelkit-state"
DEFAULT_REGION = "us-east-1"
API_FAILED = 255
EXIT_STATUS_HELP = (
    "Exit status: 0 on success, 2 for a usage error, 255 when the service refuses a request or cannot be "
    "reached (as the AWS CLI), 1 for any other error."
)


class CliError(TunnelkitError):
    """A command cannot run; the message says what to change.  C{status} is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# --- the AWS CLI's shorthand syntax, for the shapes this API has ---


def _read_value(text: str) -> str:
    if text.startswith("file://"):
        path = text[len("file://") :]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise CliError(f"cannot read {path}: {e.strerror}") from None
    return text


def parse_structure(text: str, option: str, lists: Sequence[str] = (), integers: Sequence[str] = ()) -> Dict[str, Any]:
    """
    A structure given as JSON or as shorthand C{a=1,b=x,y} (an item without C{=} continues the list of the
    key before it; C{lists} are always lists, C{integers} are whole numbers).

    @raise CliError: naming C{option} and the bad part.
    """
    text = _read_value(text).strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise CliError(f"{option}: invalid JSON: {e}", 2) from None
        if not isinstance(value, dict):
            raise CliError(f"{option}: expected a JSON object", 2)
        return value
    result: Dict[str, Any] = {}
    key: Optional[str] = None
    for item in text.split(","):
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if not key:
                raise CliError(f"{option}: expected key=value, got {item!r}", 2)
            if key in result:
                raise CliError(f"{option}: {key} is given twice", 2)
            result[key] = [value.strip()] if key in lists else value.strip()
        elif key is not None and key in lists:
            result[key].append(item.strip())
        elif key is not None and item.strip():
            result[key] = [result[key], item.strip()]
        else:
            raise CliError(f"{option}: expected key=value[,key=value...], got {text!r}", 2)
    for name in integers:
        if name in result:
            try:
                result[name] = int(result[name])
            except (TypeError, ValueError):
                raise CliError(f"{option}: {name} must be a whole number, got {result[name]!r}", 2) from None
    return result


def parse_tags(values: Sequence[str], option: str = "--tags") -> List[Dict[str, str]]:
    """Tags given as one JSON list, or as shorthand items C{key=k,value=v} (C{Key}/C{Value} also accepted)."""
    if len(values) == 1 and _read_value(values[0]).strip().startswith("["):
        try:
            tags = json.loads(_read_value(values[0]))
        except ValueError as e:
            raise CliError(f"{option}: invalid JSON: {e}", 2) from None
        if not isinstance(tags, list):
            raise CliError(f"{option}: expected a JSON list", 2)
        return tags
    tags = []
    for value in values:
        item = {k.lower(): v for k, v in parse_structure(value, option).items()}
        if set(item) - {"key", "value"} or "key" not in item:
            raise CliError(f"{option}: each tag is key=NAME,value=TEXT, got {value!r}", 2)
        item.setdefault("value", "")
        tags.append(item)
    return tags


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# --- the parser ---


def _api_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("service")
    group.add_argument(
        "--endpoint-url", help=f"the service's URL (default $TUNNELKIT_ENDPOINT_URL or {DEFAULT_ENDPOINT})"
    )
    group.add_argument(
        "--state-dir",
        help=f"the service's state directory: credentials and ca.pem are read there "
        f"(default $TUNNELKIT_STATE_DIR or {DEFAULT_STATE_DIR})",
    )
    group.add_argument("--credentials-file", help="AWS shared-credentials file (default <state-dir>/credentials)")
    group.add_argument("--profile", default="default", help="profile in the credentials file (default: default)")
    group.add_argument(
        "--region", help=f"the service's region, for signing (default $TUNNELKIT_REGION or {DEFAULT_REGION})"
    )
    group.add_argument("--ca-bundle", help="CA certificate(s) to verify the service (default <state-dir>/ca.pem)")
    group.add_argument("--no-verify-ssl", action="store_true", help="do not verify the service's certificate")
    group.add_argument("--cli-connect-timeout", type=float, default=10.0, help="seconds (default 10)")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The C{tunnelkit} command line."""
    parser = argparse.ArgumentParser(
        prog="tunnelkit",
        description="Client of the tunnelkit service (the AWS IoT Secure Tunneling API) and operator commands.",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"tunnelkit {tunnelkit.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    common = _api_options()

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, parents=[common], help=help_text, description=help_text, epilog=EXIT_STATUS_HELP
        )

    p = command("open-tunnel", "Open a tunnel and print its id, ARN and access tokens.")
    p.add_argument("--description")
    p.add_argument("--tags", nargs="+", metavar="key=K,value=V")
    p.add_argument("--destination-config", metavar="thingName=T,services=S1,S2")
    p.add_argument("--timeout-config", metavar="maxLifetimeTimeoutMinutes=N")
    _token_files(p)

    p = command("describe-tunnel", "Describe a tunnel.")
    p.add_argument("--tunnel-id", required=True)

    p = command("list-tunnels", "List tunnels, newest first, one page (pass on its nextToken for the next).")
    p.add_argument("--thing-name")
    p.add_argument("--max-results", type=int)
    p.add_argument("--next-token")

    p = command("close-tunnel", "Close a tunnel (and with --delete, forget it at once).")
    p.add_argument("--tunnel-id", required=True)
    p.add_argument("--delete", nargs="?", const=True, default=None, type=_boolean, metavar="true|false")
    p.add_argument("--no-delete", dest="delete", action="store_false")

    p = command("rotate-tunnel-access-token", "Revoke a tunnel's tokens and print new ones.")
    p.add_argument("--tunnel-id", required=True)
    p.add_argument("--client-mode", required=True, choices=["SOURCE", "DESTINATION", "ALL"])
    p.add_argument("--destination-config", metavar="thingName=T,services=S1,S2")
    _token_files(p)

    p = command("tag-resource", "Add tags to a tunnel.")
    p.add_argument("--resource-arn", required=True)
    p.add_argument("--tags", nargs="+", required=True, metavar="key=K,value=V")

    p = command("untag-resource", "Remove tags from a tunnel.")
    p.add_argument("--resource-arn", required=True)
    p.add_argument("--tag-keys", nargs="+", required=True)

    p = command("list-tags-for-resource", "List a tunnel's tags.")
    p.add_argument("--resource-arn", required=True)

    admin = commands.add_parser("admin", help="Operator commands on the state directory's accounts and keys.")
    admin_commands = admin.add_subparsers(dest="admin_command", metavar="ADMIN-COMMAND")
    admin_commands.required = True
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", help=f"the service's state directory (default {DEFAULT_STATE_DIR})")
    state.add_argument(
        "--store",
        help="the service's database, as its --store: sqlite:PATH (default: tunnelkit.sqlite3 in --state-dir) "
        "or postgresql://USER:PASSWORD@HOST:PORT/DATABASE ($TUNNELKIT_STORE)",
    )
    a = admin_commands.add_parser("create-account", parents=[state], help="Create an account.")
    a.add_argument("name")
    a.add_argument("--account-id", help="12 digits (default: random)")
    a = admin_commands.add_parser("create-key", parents=[state], help="Create an access key for an account.")
    a.add_argument("account", help="account name or id")
    a.add_argument("--credentials-file", help="also write the key to this AWS credentials file")
    a.add_argument("--profile", default="default", help="profile name in --credentials-file (default: default)")
    a = admin_commands.add_parser("revoke-key", parents=[state], help="Revoke an access key at once.")
    a.add_argument("key_id", metavar="KEYID")
    admin_commands.add_parser("list-keys", parents=[state], help="List access keys (without secrets).")
    admin_commands.add_parser("list-accounts", parents=[state], help="List accounts.")
    admin_commands.add_parser(
        "migrate", parents=[state], help="Apply the database's pending schema migrations (the service does at start)."
    )
    _add_console_user_commands(admin_commands, state)
    cli_operator.add_commands(commands, command)
    return parser


CONSOLE_USER_COMMANDS = ("create-user", "list-users", "reset-password", "delete-user")


def _add_console_user_commands(admin_commands: Any, state: argparse.ArgumentParser) -> None:
    """The web console's users (run by L{tunnelkit.service.console.admin}); the password comes from stdin."""
    a = admin_commands.add_parser(
        "create-user", parents=[state], help="Create a console user (password asked, or read from stdin)."
    )
    a.add_argument("account", help="account name or id")
    a.add_argument("name", help="user name (1-64 of A-Z a-z 0-9 . _ @ + -)")
    a = admin_commands.add_parser("list-users", parents=[state], help="List console users.")
    a.add_argument("account", nargs="?", help="only this account's (name or id)")
    a = admin_commands.add_parser(
        "reset-password", parents=[state], help="Set a console user's password (signs the user out)."
    )
    a.add_argument("account", help="account name or id")
    a.add_argument("name")
    a = admin_commands.add_parser("delete-user", parents=[state], help="Delete a console user.")
    a.add_argument("account", help="account name or id")
    a.add_argument("name")


def _token_files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-token-file", help="write the source token to this file (mode 0600), not to the output")
    p.add_argument(
        "--destination-token-file", help="write the destination token to this file (mode 0600), not to the output"
    )


# --- running ---


def _state_dir(args: argparse.Namespace) -> str:
    return args.state_dir or os.environ.get("TUNNELKIT_STATE_DIR") or DEFAULT_STATE_DIR


def _credentials(path: str, profile: str) -> Dict[str, str]:
    from botocore.configloader import raw_config_parse
    from botocore.exceptions import ConfigParseError

    if not os.path.exists(path):
        raise CliError(
            f"no credentials file {path}: start the service once with this state directory "
            f"(twistd -n tunnelkit --mode service --state-dir DIR), or pass --state-dir or --credentials-file"
        )
    try:
        profiles = raw_config_parse(path)
    except ConfigParseError as e:
        raise CliError(f"{path}: not a credentials file: {e}") from None
    section = profiles.get(profile)
    if not section or "aws_access_key_id" not in section or "aws_secret_access_key" not in section:
        raise CliError(f"{path}: no profile [{profile}] with aws_access_key_id and aws_secret_access_key")
    return section


def _not_an_address(host: str) -> bool:
    """Whether C{host} is all digits and dots without being an IPv4 address (a port given as the host)."""
    if not host.replace(".", "").isdigit():
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def make_client(args: argparse.Namespace) -> Any:
    """A botocore C{iotsecuretunneling} client for the service the arguments name."""
    import botocore.session
    from botocore.config import Config

    endpoint_url = args.endpoint_url or os.environ.get("TUNNELKIT_ENDPOINT_URL") or DEFAULT_ENDPOINT
    parts = urllib.parse.urlsplit(endpoint_url)
    if parts.scheme not in ("https", "http") or not parts.hostname or _not_an_address(parts.hostname):
        raise CliError(f"--endpoint-url {endpoint_url!r}: expected https://HOST[:PORT] (e.g. {DEFAULT_ENDPOINT})", 2)
    state_dir = _state_dir(args)
    credentials = _credentials(args.credentials_file or os.path.join(state_dir, "credentials"), args.profile)
    verify: Any = True
    if args.no_verify_ssl:
        verify = False
    else:
        verify = args.ca_bundle or os.path.join(state_dir, "ca.pem")
        if not os.path.exists(verify):
            raise CliError(f"no CA certificate {verify}: pass --ca-bundle FILE (the service's ca.pem) or --state-dir")
    session = botocore.session.get_session()
    # Timestamps print as the service sends them (epoch seconds), as the AWS CLI does.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=lambda value: value)
    return session.create_client(
        "iotsecuretunneling",
        region_name=args.region or os.environ.get("TUNNELKIT_REGION") or DEFAULT_REGION,
        endpoint_url=endpoint_url,
        verify=verify,
        aws_access_key_id=credentials["aws_access_key_id"],
        aws_secret_access_key=credentials["aws_secret_access_key"],
        config=Config(
            connect_timeout=args.cli_connect_timeout,
            read_timeout=60,
            retries={"mode": "standard", "max_attempts": 2},
        ),
    )


def write_token_file(path: str, token: str) -> None:
    """Write C{token} (and a newline) to C{path}, readable by its owner only."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.fchmod(fd, 0o600)  # also when the file existed with a wider mode
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def _token_paths(args: argparse.Namespace) -> List[Tuple[str, str, str]]:
    """(response field, option, path) of each token file given."""
    files = [
        ("sourceAccessToken", "--source-token-file", getattr(args, "source_token_file", None)),
        ("destinationAccessToken", "--destination-token-file", getattr(args, "destination_token_file", None)),
    ]
    return [(field, option, path) for field, option, path in files if path]


def check_token_files(args: argparse.Namespace) -> None:
    """
    Refuse, before anything is asked of the service, a token file that cannot be written (its
    directory is missing or read-only, or it is a directory): the tokens would be lost.

    @raise CliError: status 2, naming the option and the path.
    """
    for _, option, path in _token_paths(args):
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise CliError(f"{option} {path}: is a directory; give a file name", 2)
        if not os.path.isdir(directory):
            raise CliError(f"{option} {path}: no directory {directory}", 2)
        if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise CliError(f"{option} {path}: not writable", 2)


def _divert_tokens(args: argparse.Namespace, response: Dict[str, Any]) -> List[str]:
    """Move the tokens to their files; a file that cannot be written keeps its token in C{response}."""
    problems = []
    for field, option, path in _token_paths(args):
        if field in response:
            try:
                write_token_file(path, response[field])
            except OSError as e:
                problems.append(f"{option} {path}: cannot write: {e.strerror}; the token is in the output instead")
            else:
                del response[field]
    return problems


def _api_request(args: argparse.Namespace) -> Dict[str, Any]:
    request: Dict[str, Any] = {}
    if args.command == "open-tunnel":
        if args.description is not None:
            request["description"] = args.description
        if args.tags:
            request["tags"] = parse_tags(args.tags)
        if args.destination_config:
            request["destinationConfig"] = parse_structure(
                args.destination_config, "--destination-config", lists=("services",)
            )
        if args.timeout_config:
            request["timeoutConfig"] = parse_structure(
                args.timeout_config, "--timeout-config", integers=("maxLifetimeTimeoutMinutes",)
            )
    elif args.command == "describe-tunnel":
        request["tunnelId"] = args.tunnel_id
    elif args.command == "list-tunnels":
        if args.thing_name:
            request["thingName"] = args.thing_name
        if args.max_results is not None:
            request["maxResults"] = args.max_results
        if args.next_token:
            request["nextToken"] = args.next_token
    elif args.command == "close-tunnel":
        request["tunnelId"] = args.tunnel_id
        if args.delete is not None:
            request["delete"] = args.delete
    elif args.command == "rotate-tunnel-access-token":
        request["tunnelId"] = args.tunnel_id
        request["clientMode"] = args.client_mode
        if args.destination_config:
            request["destinationConfig"] = parse_structure(
                args.destination_config, "--destination-config", lists=("services",)
            )
    elif args.command == "tag-resource":
        request["resourceArn"] = args.resource_arn
        request["tags"] = parse_tags(args.tags)
    elif args.command == "untag-resource":
        request["resourceArn"] = args.resource_arn
        request["tagKeys"] = list(args.tag_keys)
    elif args.command == "list-tags-for-resource":
        request["resourceArn"] = args.resource_arn
    return request


def run_api_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run one API command; print its JSON response."""
    request = _api_request(args)
    check_token_files(args)
    client = make_client(args)
    try:
        response = call_api(client, args.command, request)
    finally:
        client.close()
    return print_response(args, response, out)


def print_response(args: argparse.Namespace, response: Dict[str, Any], out: TextIO) -> int:
    """Print an API response as JSON, its tokens moved to the token files given; the exit status."""
    problems = _divert_tokens(args, response)
    if response:
        out.write(json.dumps(response, indent=4, ensure_ascii=False) + "\n")
    if problems:
        raise CliError("; ".join(problems))
    return 0


def call_api(client: Any, command: str, request: Dict[str, Any]) -> Dict[str, Any]:
    """
    Call the API operation of C{command} (C{open-tunnel}) with C{request}; the response without
    its C{ResponseMetadata}.

    @raise CliError: status 255, saying what the service answered or why it cannot be reached.
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        ParamValidationError,
        SSLError,
    )

    method = command.replace("-", "_")
    operation = "".join(part.capitalize() for part in command.split("-"))
    response: Dict[str, Any]
    try:
        response = getattr(client, method)(**request)
    except ClientError as e:
        error = e.response.get("Error", {})
        raise CliError(
            f"An error occurred ({error.get('Code', 'Unknown')}) when calling the {operation} operation: "
            f"{error.get('Message', '')}",
            API_FAILED,
        ) from None
    except ParamValidationError as e:
        raise CliError(str(e), API_FAILED) from None
    except SSLError as e:
        raise CliError(
            f"TLS failed with {client.meta.endpoint_url}: {e}. Is --ca-bundle the service's ca.pem?", API_FAILED
        ) from None
    except ConnectionClosedError as e:
        hint = " (if the service listens with TLS, use https:// in --endpoint-url)"
        raise CliError(f"{e}{hint if client.meta.endpoint_url.startswith('http://') else ''}", API_FAILED) from None
    except EndpointConnectionError as e:
        raise CliError(f"{e} (is the service running? see --endpoint-url)", API_FAILED) from None
    except BotoCoreError as e:
        raise CliError(str(e), API_FAILED) from None
    response.pop("ResponseMetadata", None)
    return response


def run_admin_command(args: argparse.Namespace, out: TextIO, now: Callable[[], float] = time.time) -> int:
    """Run one operator command on the state directory's database."""
    from tunnelkit.service import auth
    from tunnelkit.service.dbrunner import Blocking, resolved
    from tunnelkit.service.store import StoreError
    from tunnelkit.service.stores import check_store, describe_store, is_postgres, open_configured_store

    state_dir = _state_dir(args)
    spec = getattr(args, "store", None) or os.environ.get("TUNNELKIT_STORE") or None
    if spec is not None:
        try:
            check_store(spec)
        except ValueError as e:
            raise CliError(f"--store: {e}", 2) from None
    if not os.path.isdir(state_dir) and not is_postgres(spec):
        raise CliError(
            f"no state directory {state_dir}: start the service with it once "
            f"(twistd -n tunnelkit --mode service --state-dir {state_dir}) or pass --state-dir"
        )
    shown = describe_store(spec, state_dir)
    try:
        real = open_configured_store(spec, state_dir)  # synchronous: the commands run before any reactor
    except StoreError as e:
        raise CliError(str(e) if is_postgres(spec) else f"{shown}: {e}") from None
    store = Blocking(real)
    try:
        result: Dict[str, Any]
        if args.admin_command == "create-account":
            account_id = args.account_id
            if account_id is not None:
                try:
                    auth.check_account_id(account_id)
                except ValueError as e:
                    raise CliError(f"--account-id: {e}", 2) from None
            account = store.create_account(args.name, account_id or auth.new_account_id(), now())
            result = {"Account": _account_json(account)}
        elif args.admin_command == "create-key":
            account = store.get_account(args.account)
            key = resolved(auth.create_access_key(real, account, now()))
            if args.credentials_file:
                auth.write_credentials_file(args.credentials_file, key, args.profile)
            result = {
                "AccessKey": {
                    "AccountId": key.account_id,
                    "AccountName": account.name,
                    "AccessKeyId": key.access_key_id,
                    "SecretAccessKey": key.secret_access_key,
                    "Status": "Active",
                    "CreateDate": _iso(key.created_at),
                }
            }
        elif args.admin_command == "revoke-key":
            key = store.revoke_access_key(args.key_id, now())
            result = {"AccessKeyId": key.access_key_id, "AccountId": key.account_id, "Status": "Revoked"}
        elif args.admin_command == "list-keys":
            names = {a.account_id: a.name for a in store.list_accounts()}
            result = {
                "AccessKeys": [
                    {
                        "AccessKeyId": k.access_key_id,
                        "AccountId": k.account_id,
                        "AccountName": names.get(k.account_id, ""),
                        "Status": "Active" if k.revoked_at is None else "Revoked",
                        "CreateDate": _iso(k.created_at),
                    }
                    for k in store.list_access_keys()
                ]
            }
        elif args.admin_command == "list-accounts":
            result = {"Accounts": [_account_json(a) for a in store.list_accounts()]}
        elif args.admin_command == "migrate":
            applied = [{"Version": v, "Description": d} for v, d in real.applied]
            result = {
                "Store": shown,
                "Applied": applied,
                "Message": f"applied {len(applied)} migration(s)" if applied else "the schema is up to date: nothing to apply",
            }
        elif args.admin_command in CONSOLE_USER_COMMANDS:
            from tunnelkit.service.console.admin import run_user_command

            result = run_user_command(args, store, state_dir, now())
        else:  # pragma: no cover - argparse only allows the commands above
            raise CliError(f"unknown admin command {args.admin_command}", 2)
    except StoreError as e:
        raise CliError(f"{shown}: {e}") from None
    finally:
        real.close()
    out.write(json.dumps(result, indent=4) + "\n")
    return 0


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _account_json(account: Any) -> Dict[str, Any]:
    return {"AccountId": account.account_id, "Name": account.name, "CreateDate": _iso(account.created_at)}


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The console script: returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in cli_operator.COMMANDS:
            return cli_operator.run(args, out, err)
        if args.command == "admin":
            return run_admin_command(args, out)
        return run_api_command(args, out)
    except CliError as e:
        err.write(f"tunnelkit: {e}\n" if e.status != API_FAILED else f"\n{e}\n")
        return e.status
    except TunnelkitError as e:
        err.write(f"tunnelkit: {e}\n")
        return 1
    except ModuleNotFoundError as e:
        if e.name != "botocore" and not (e.name or "").startswith("botocore."):
            raise
        err.write('tunnelkit: this command needs botocore, which a device install leaves out: install '
                  '"tunnelkit[service]" (in a checkout: bash tools/install.sh)\n')
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
