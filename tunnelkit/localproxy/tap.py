# -*- test-case-name: tests.test_localproxy_options -*-
"""
C{twistd -n tunnelkit --mode source|destination ...}: tunnelkit's local proxy, a drop-in for AWS's
C{localproxy} (same options, same behaviour; reference section 2).

Examples::

    AWSIOT_TUNNEL_ACCESS_TOKEN=... twistd -n tunnelkit --mode source -r us-east-1 -s 5555
    twistd -n tunnelkit --mode destination -e tunnels.example.com:8443 -c ca.pem -d SSH1=22,HTTP1=8080

Option sources, strongest first: the command line, C{--config FILE} (tap.yml), the environment
(C{AWSIOT_TUNNEL_ACCESS_TOKEN}, C{AWSIOT_TUNNEL_CLIENT_TOKEN}, C{AWSIOT_TUNNEL_ENDPOINT},
C{AWSIOT_TUNNEL_REGION}, C{https_proxy}/C{HTTPS_PROXY}).

Exit status: 0 when the service closes the tunnel (CloseTunnel, expiry, or a close frame); 1 for a
usage error, a refused upgrade (4xx: a used, rotated or wrong token, a closed tunnel -- AWS's
localproxy exits 0 there, tunnelkit exits 1 so scripts notice), a mapping that does not match the
tunnel's services, or a listener that cannot bind.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Dict, Mapping, Optional, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.defer import maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

import tunnelkit
from tunnelkit.adapters import resolve_adapter
from tunnelkit.config import number, positive_int
from tunnelkit.errors import ConfigError
from tunnelkit.localproxy.client_options import TunnelClientOptions
from tunnelkit.localproxy.client_token import KeptClientToken, keep_client_token
from tunnelkit.localproxy.destination import DestinationSide
from tunnelkit.localproxy.endpoint import ServiceEndpoint, parse_proxy_endpoint, region_host
from tunnelkit.localproxy.mapping import (
    merge_config_dir,
    parse_destination_endpoint,
    parse_destination_mapping,
    parse_source_mapping,
    read_config_dir,
)
from tunnelkit.localproxy.session_service import LocalProxySession
from tunnelkit.localproxy.source import SourceSide
from tunnelkit.protocol.tokens import CLIENT_TOKEN_RE, MAX_ACCESS_TOKEN_LENGTH, sendable_access_token
from tunnelkit.transport.httpproxy import proxy_from_environment
from tunnelkit.process import LogFilter, ModeService
from tunnelkit.transport.tls import NO_VERIFY_WARNING

__all__ = ["Options", "makeService", "build_session"]

log = Logger()


def _verbosity(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 255:
        raise ValueError(f"-v/--verbose expects 0-255 (4 = info, 5 = debug, 6+ = trace), got {text!r}")
    return int(text)


class Options(TunnelClientOptions):
    """The local proxy's options, for both C{--mode source} and C{--mode destination}."""

    mode = "source"  # the plugin sets "source" or "destination" before parsing
    synopsis = "Usage: twistd -n tunnelkit --mode source|destination [options]"
    longdesc = (
        "The local proxy, a drop-in for AWS's localproxy. Source: listen for local clients (-s) and carry "
        "their connections through the tunnel. Destination: connect each stream to its target (-d). "
        "Exit status: 0 when the tunnel is closed (or this proxy's token is rotated); 1 on a usage error, "
        "a refused token, a mapping that does not match the tunnel, or a listen port in use. An unreachable "
        "service or an untrusted certificate is retried (with the reason logged), as AWS's localproxy does."
    )

    optParameters = [
        ["access-token", "t", None, "The tunnel's client access token (prefer AWSIOT_TUNNEL_ACCESS_TOKEN)."],
        ["access-token-file", None, None,
         "A file holding the access token (keeps it out of the process list and the environment)."],
        ["client-token", "i", None,
         "32-128 characters [a-zA-Z0-9-] sent on every (re)connection (AWSIOT_TUNNEL_CLIENT_TOKEN); "
         "without it one is generated and kept (--client-token-file, or a file per access token under "
         "$XDG_STATE_HOME/tunnelkit/client-tokens), so the same command started again reconnects."],
        ["client-token-file", None, None,
         "Keep the client token in this file (mode 0600): read it if it exists, else generate one and write it."],
        ["proxy-endpoint", "e", None,
         "The tunnel service: HOST[:PORT] (TLS, port 443), wss://HOST[:PORT] or ws://HOST[:PORT] "
         "(AWSIOT_TUNNEL_ENDPOINT)."],
        ["region", "r", None, "AWS region: connect to data.tunneling.iot.REGION.amazonaws.com (AWSIOT_TUNNEL_REGION)."],
        ["source-listen-port", "s", None, "Source: PORT, or SERVICE=PORT[,SERVICE=PORT...] (0 = any free port)."],
        ["destination-app", "d", None,
         "Destination: PORT, HOST:PORT, a unix socket path, or SERVICE=TARGET[,SERVICE=TARGET...]."],
        ["local-bind-address", "b", None,
         "Source: the address to listen on (default localhost). Destination: the host of PORT-only targets."],
        ["destination-client-type", "y", None,
         "Source: the destination's message format, V1 or V2 (default: V3, simultaneous connections)."],
        ["config-dir", None, None, "A directory of files of SERVICE=ENDPOINT lines."],
        ["verbose", "v", 4, "Log detail 0-255: 4 = info, 5 = debug, 6+ = trace.", _verbosity],
        ["max-connections", None, 128, "Source: the most simultaneous connections per service.", positive_int],
        ["connect-retries", None, 5, "Destination: retries of a refused target before the reset.", number(0, whole=True)],
        ["connect-retry-delay", None, 2.5, "Destination: seconds between those retries (0-3600).", number(0, 3600)],
        ["pace", None, 0, "Bytes per second each connection may send when the far peer has no per-connection "
         "flow control (AWS's localproxy, whose destination dies when data comes faster than its target "
         "reads it); 0: no pacing.", number(0, whole=True)],
    ]

    repeatable = {"adapter": str, "adapters": str, "adapter-option": str}

    def __init__(self) -> None:
        super().__init__()
        self.environ: Mapping[str, str] = os.environ

    def opt_adapter_option(self, value: str) -> None:
        """SERVICE.KEY=VALUE: an option of a service's adapter, e.g. HTTP1.host=intranet.example (repeatable)."""
        self["adapter-option"].append(value)

    def opt_adapters(self, value: str) -> None:
        """SERVICE=NAME[,SERVICE=NAME...]: the same as --adapter (tap.yml: adapters: [SSH1=ssh])."""
        self["adapters"].append(value)

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        self["mode"] = self.mode  # the plugin may set the mode after __init__
        super().parseOptions(options)

    def _check(self) -> None:
        env = self.environ
        mode = self.mode
        if mode not in ("source", "destination"):
            raise ConfigError(f"Mode value is wrong: {mode!r} (allowed: source, destination)")

        # tokens
        if self["access-token-file"]:
            if self["access-token"]:
                raise ConfigError("give one of -t/--access-token and --access-token-file")
            self["access-token"] = read_token_file(self["access-token-file"], "--access-token-file")
        token = self["access-token"] or env.get("AWSIOT_TUNNEL_ACCESS_TOKEN")
        if not token:
            raise ConfigError(
                "the option '--access-token' is required but missing (or set AWSIOT_TUNNEL_ACCESS_TOKEN)"
            )
        if not sendable_access_token(token):
            raise ConfigError(
                f"--access-token: at most {MAX_ACCESS_TOKEN_LENGTH} characters, no control characters"
            )
        self["access-token"] = token
        self.token_on_command_line = "access-token" in self.from_command_line
        client_token = self["client-token"] or env.get("AWSIOT_TUNNEL_CLIENT_TOKEN")
        self.client_token_generated = False
        self.kept_client_token: Optional[KeptClientToken] = None
        if client_token:
            if not CLIENT_TOKEN_RE.match(client_token):
                raise ConfigError("-i/--client-token: expected 32-128 characters of a-z, A-Z, 0-9 and '-'")
            if self["client-token-file"]:
                raise ConfigError("give one of -i/--client-token (or AWSIOT_TUNNEL_CLIENT_TOKEN) and --client-token-file")
        elif self["client-token-file"]:
            self.kept_client_token = keep_client_token(token, self["client-token-file"], env)
            client_token = self.kept_client_token.token
        else:
            client_token = str(uuid.uuid4())  # makeService keeps one for this access token instead
            self.client_token_generated = True
        self["client-token"] = client_token

        # the service
        endpoint_text = self["proxy-endpoint"]
        region = self["region"]
        if not endpoint_text and not region:
            endpoint_text = env.get("AWSIOT_TUNNEL_ENDPOINT")
            region = env.get("AWSIOT_TUNNEL_REGION") if not endpoint_text else None
        if bool(endpoint_text) == bool(region):
            raise ConfigError("Must specify one and only one of --region/-r or --proxy-endpoint/-e options")
        if endpoint_text:
            host, port, secure = parse_proxy_endpoint(endpoint_text)
        else:
            host, port, secure = region_host(region), 443, True
        verify = not self["no-ssl-host-verify"]
        capath = self._checked_capath()
        web_proxy = proxy_from_environment(env)
        self.service_endpoint = ServiceEndpoint(
            host, port, secure, capath, verify, web_proxy, tls_library=self._checked_tls_library()
        )
        self.service_endpoint.check()

        # the mapping
        source, destination = self["source-listen-port"], self["destination-app"]
        if source and destination:
            raise ConfigError("Must specify one and only one of --source-listen-port/-s or --destination-app/-d")
        if mode == "source" and destination:
            raise ConfigError("-d/--destination-app is a destination option, but the mode is source")
        if mode == "destination" and source:
            raise ConfigError("-s/--source-listen-port is a source option, but the mode is destination")
        client_type = (self["destination-client-type"] or "V3").upper()
        if client_type not in ("V1", "V2", "V3"):
            raise ConfigError(f"-y/--destination-client-type: expected V1 or V2, got {self['destination-client-type']!r}")
        if mode == "destination" and self["destination-client-type"]:
            raise ConfigError("-y/--destination-client-type is a source option (the destination detects the format)")
        self["destination-client-type"] = client_type
        bind = self["local-bind-address"]
        config_dir = self["config-dir"]
        from_dir: Dict[str, str] = read_config_dir(config_dir) if config_dir else {}
        if mode == "source":
            given = parse_source_mapping(source) if source else None
            from_files = {sid: parse_source_mapping(f"{sid}={ep}", f"--config-dir {sid}")[sid] for sid, ep in from_dir.items()}
            #: service id -> listen port (source) or target (destination)
            self.mapping: Dict[str, Any] = merge_config_dir(given, from_files)  # empty: every service, any port
            self.bind_address = _resolve_bind(bind or "localhost")
        else:
            default_host = bind or "127.0.0.1"
            given_targets = parse_destination_mapping(destination, default_host) if destination else None
            targets_from_files = {sid: parse_destination_endpoint(ep, default_host) for sid, ep in from_dir.items()}
            self.mapping = merge_config_dir(given_targets, targets_from_files)
            if not self.mapping:
                raise ConfigError(
                    "Must specify one of --destination-app/-d or --config-dir with the service mapping"
                )

        # adapters
        overrides = self._checked_adapter_overrides([*self["adapter"], *self["adapters"]])
        self.adapter_overrides = overrides
        adapter_options: Dict[str, Dict[str, str]] = {}
        for item in self["adapter-option"]:
            target, sep, value = item.partition("=")
            service_id, dot, key = target.partition(".")
            if not sep or not dot or not service_id.strip() or not key.strip():
                raise ConfigError(f"--adapter-option {item!r}: expected SERVICE.KEY=VALUE, e.g. HTTP1.host=intranet.example")
            adapter_options.setdefault(service_id.strip(), {})[key.strip()] = value.strip()
        for service_id in adapter_options:
            resolve_adapter(service_id, overrides, adapter_options)  # rejects unknown or bad options now
        self.adapter_options = adapter_options
        self._check_mapped_services()

    def _check_mapped_services(self) -> None:
        """
        What can be known of the mapping before the single-use token is presented: every mapped
        service's adapter builds with its options.  (Whether the tunnel has these services is known
        only once connected; a restart of the same command then reconnects with the kept client
        token.)
        """
        for service_id in self.mapping:
            if service_id:
                resolve_adapter(service_id, self.adapter_overrides, self.adapter_options)


def read_token_file(path: str, option: str) -> str:
    """The token in the file C{path} (surrounding white space removed)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{option} {path}: not a token (not UTF-8 text)") from None
    if not token:
        raise ConfigError(f"{option} {path}: the file is empty")
    return token


def _keep_generated_client_token(options: "Options") -> None:
    """
    Replace a client token generated for this process by the one kept for its access token
    (L{tunnelkit.localproxy.client_token}), so a restart of the same command reconnects.  Where
    nothing can be kept (no writable home), the generated one serves this process only.
    """
    if not options.client_token_generated:
        return
    try:
        kept = keep_client_token(options["access-token"], None, options.environ)
    except ConfigError as e:
        log.warn(
            "Generated a client token for this process only ({error}): a restart cannot reuse this "
            "access token; give -i/--client-token or --client-token-file to keep one",
            error=str(e),
        )
        return
    options["client-token"] = kept.token
    options.kept_client_token = kept


def _resolve_bind(address: str) -> str:
    """The first address of C{address} (C{localhost} may be ::1 first, as with AWS's localproxy)."""
    import socket

    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"-b/--local-bind-address {address}: cannot resolve it: {e}") from None
    return str(infos[0][4][0])


def build_session(options: Options, reactor: Any, clock: Any = None) -> LocalProxySession:
    """The L{LocalProxySession} for parsed C{options}."""
    side: Any
    if options.mode == "source":
        side = SourceSide(
            options.mapping,
            options.bind_address,
            reactor,
            client_type=options["destination-client-type"],
            max_connections=options["max-connections"],
            adapter_overrides=options.adapter_overrides,
            adapter_options=options.adapter_options,
        )
    else:
        side = DestinationSide(
            options.mapping,
            reactor,
            clock,
            retries=options["connect-retries"],
            retry_delay=options["connect-retry-delay"],
            adapter_overrides=options.adapter_overrides,
            adapter_options=options.adapter_options,
            probe_targets=not options["no-probe"],
        )
    session = LocalProxySession(
        side, options.service_endpoint, options["access-token"], options["client-token"], reactor, clock,
        pace=options["pace"],
    )
    session.factory.verbose = options["verbose"] >= 5
    return session


def makeService(options: Options) -> ModeService:
    """Build the local proxy for C{twistd}: one session, whose end ends the process with its status."""
    from twisted.internet import reactor

    log.info(
        "Running tunnelkit local proxy version {version} ({mode} mode)",
        version=tunnelkit.__version__,
        mode=options.mode,
    )
    if options.token_on_command_line:
        log.warn(
            "Found access token supplied via CLI arg. Consider using environment variable "
            "AWSIOT_TUNNEL_ACCESS_TOKEN instead"
        )
    _keep_generated_client_token(options)
    kept = options.kept_client_token
    if kept is not None and kept.created:
        log.info(
            "No client token given: generated one and kept it in {path}, so this command, started "
            "again, reconnects with the same access token",
            path=kept.path,
        )
    elif kept is not None:
        log.info(
            "Using the client token kept in {path} (this access token connected before)", path=kept.path
        )
    if not options.service_endpoint.verify:
        for line in NO_VERIFY_WARNING.splitlines():
            log.warn("{line}", line=line)
    if options.service_endpoint.web_proxy is not None:
        log.info(
            "Found Web proxy information in the environment variables, will use it to connect via "
            "the proxy: {proxy}",
            proxy=str(options.service_endpoint.web_proxy),
        )
    if options.mapping:
        log.info("Use port mapping:")
        for service_id, endpoint in options.mapping.items():
            shown = endpoint if not isinstance(endpoint, tuple) else f"{endpoint[0]}:{endpoint[1]}"
            log.info("{service_id} = {endpoint}", service_id=service_id or "(v1 format)", endpoint=shown)
    log_filter = LogFilter(options["verbose"], [options["access-token"]], [options["client-token"]])
    top = ModeService(options.twistd_options, log_filter, reactor=reactor)
    session = build_session(options, reactor)
    StartAfterLocalChecks(session).setServiceParent(top)
    session.ended.addCallback(lambda end: top.exit(end.status))
    return top


class StartAfterLocalChecks(MultiService):
    """
    Starts a local proxy session once everything local checks out (a source's fixed listen ports
    are bound: L{SourceSide.reserve_ports}), so that a local mistake ends the process before the
    single-use access token is presented; such a failure ends the session with status 1.
    """

    def __init__(self, session: LocalProxySession) -> None:
        super().__init__()
        self.session = session

    def startService(self) -> None:
        Service.startService(self)  # the session becomes a child (and starts) after the checks
        reserve = getattr(self.session.side, "reserve_ports", None)
        checked = maybeDeferred(reserve) if reserve is not None else succeed(None)
        checked.addCallbacks(self._checked, self._failed)

    def _checked(self, _: Any) -> None:
        if self.running and self.session.end is None:
            self.session.setServiceParent(self)

    def _failed(self, failure: Failure) -> None:
        self.session.finish(1, failure.getErrorMessage())
