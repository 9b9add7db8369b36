# -*- test-case-name: tests.test_api_tap,tests.e2e.test_service_inprocess -*-
"""
C{twistd -n tunnelkit --mode service}: the tunnel service.

One HTTP site on every C{--listen} endpoint serves the control-plane API (C{POST /}, AWS JSON 1.1 with
SigV4) and the data plane (C{GET /tunnel}, WebSocket); C{GET /metrics} is on C{--metrics-listen}
only (off by default).  The state directory holds the
database, the generated CA and server certificate, and the generated C{credentials} file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from tunnelkit.config import ModeOptions, duration, number, positive_int, server_endpoint
from tunnelkit.errors import ConfigError
from tunnelkit.process import ModeService
from tunnelkit.protocol.notification import REGION_RE
from tunnelkit.service.api import HEAD_TIMEOUT, MAX_PENDING_PER_ADDRESS, ApiResource, ServiceSite, build_root
from tunnelkit.service.auth import CREDENTIALS_FILE, SigV4Verifier, check_account_id, ensure_initial_credentials
from tunnelkit.service.certs import ServiceCertificates, ensure_certificates
from tunnelkit.service.listeners import is_tls, listen_description, listener_endpoint, names_certificate
from tunnelkit.service.interfaces import ITunnelEvents
from tunnelkit.service.notify import NotifyOptions, build_notifier
from tunnelkit.service.operations import ControlPlane, Limits
from tunnelkit.service.store import StoreError
from tunnelkit.service.dbrunner import Blocking
from tunnelkit.service.stores import check_store, describe_store, open_configured_store
from tunnelkit.transport.nvx import NvxOptions, NvxUnavailable, require_nvx
from tunnelkit.transport.tls import check_tls_library

from tunnelkit.service.audit import AuditedApi, AuditOptions, build_audit_trail
from tunnelkit.service.dataplane import DataPlaneOptions, metrics_site, mount_data_plane
from tunnelkit.service.cluster import ClusterOptions, build_cluster, cluster_enabled
from tunnelkit.service.cluster import cluster_backends as backends_on_store
from tunnelkit.service.console import ConsoleOptions, build_console, mount_console
from tunnelkit.service.health import HealthResource

log = Logger()

DEFAULT_LISTEN = "ssl:8443:interface=127.0.0.1"
DEFAULT_STATE_DIR = "./tunnelkit-state"
DEFAULT_REGION = "us-east-1"
DEFAULT_MAX_OPEN_TUNNELS = 1000
DEFAULT_CLOSED_RETENTION = 3 * 3600.0

_HOSTNAME_RE = re.compile(r"\A(?=.{1,253}\Z)([A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


def region(text: str) -> str:
    """Coerce: an AWS-style region name (C{us-east-1})."""
    if not REGION_RE.match(text):
        raise ValueError(f"a region is 1-64 of a-z 0-9 -, got {text!r}")
    return text


def hostname(text: str) -> str:
    """Coerce: a DNS name or IP address for the server certificate."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(text):
        raise ValueError(f"not a DNS name or IP address: {text!r}")
    return text.lower()


def _tls_library(value: str) -> str:
    """C{--tls-library}'s coercion (a ValueError is Twisted's usage error)."""
    try:
        return check_tls_library(value)
    except ConfigError as e:
        raise ValueError(str(e)) from None


class Options(ModeOptions, DataPlaneOptions, NotifyOptions, AuditOptions, NvxOptions, ConsoleOptions, ClusterOptions):  # type: ignore[misc,valid-type]
    """The options of C{--mode service}."""

    synopsis = "Usage: twistd -n tunnelkit --mode service [options]"
    longdesc = (
        "The tunnel service: the AWS IoT Secure Tunneling API and the WebSocket relay. Exit status: 1 on a "
        "usage error or when it cannot listen; stopped by a signal, it ends as twistd does, by that signal "
        "(shell status 143 for SIGTERM, 130 for Ctrl-C)."
    )

    mode = "service"
    repeatable = {"listen": server_endpoint, "hostname": hostname}
    optParameters: List[Sequence[Any]] = [  # type: ignore[assignment]  # the bases annotate it differently
        ["state-dir", None, DEFAULT_STATE_DIR, "Directory of the database, TLS material and credentials."],
        [
            "store",
            None,
            None,
            "Database of tunnels, tokens and accounts: sqlite:PATH (default: tunnelkit.sqlite3 in "
            "--state-dir) or postgresql://USER:PASSWORD@HOST:PORT/DATABASE, shared by several service "
            "nodes (PGPASSWORD or ~/.pgpass keep the password off the command line).",
            check_store,
        ],
        ["region", None, DEFAULT_REGION, "Region of this service (SigV4 scope, ARNs, notifications).", region],
        [
            "account-id",
            None,
            None,
            "12-digit id of the default account created at first start (default: random).",
            check_account_id,
        ],
        [
            "max-open-tunnels",
            None,
            DEFAULT_MAX_OPEN_TUNNELS,
            "Open tunnels allowed per account (OpenTunnel answers LimitExceededException beyond).",
            positive_int,
        ],
        [
            "tls-library",
            None,
            "stdlib",
            "TLS of the ssl: listeners through Python's ssl (stdlib: less CPU and memory per connection) or "
            "pyOpenSSL (pyopenssl: its own OpenSSL, with post-quantum X25519MLKEM768 key exchange where the "
            "system's OpenSSL is older than 3.5).",
            _tls_library,
        ],
        [
            "metrics-listen",
            None,
            None,
            "Serve the Prometheus metrics (GET /metrics) on this Twisted endpoint, e.g. "
            "tcp:9464:interface=127.0.0.1 (default: off; never on the API's listeners).",
            server_endpoint,
        ],
        [
            "handshake-timeout",
            None,
            HEAD_TIMEOUT,
            "Seconds a new connection has for its TLS handshake and its request line and headers "
            "(and each later request for its head) before it is reset (more than 0: it cannot be "
            "turned off; give a longer time instead).",
            number(0, duration=True, above=True),
        ],
        [
            "max-pending-per-address",
            None,
            MAX_PENDING_PER_ADDRESS,
            "Connections one client address may hold that have not sent a complete request head yet "
            "(idle keep-alive connections do not count); more are reset at once and logged (0: no "
            "limit). Clients behind one NAT address or a reverse proxy share it (haproxy: listeners "
            "count the PROXY header's client).",
            number(0, whole=True),
        ],
        [
            "closed-retention",
            None,
            DEFAULT_CLOSED_RETENTION,
            "How long closed tunnels stay visible before they are purged (seconds, or 30m, 3h, ...).",
            duration,
        ],
    ]

    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted server endpoint, repeatable (default ssl:8443:interface=127.0.0.1); an ssl: endpoint naming no certificate uses the generated one."""
        try:
            self["listen"].append(server_endpoint(description))
        except ValueError as e:
            raise usage.UsageError(f"--listen: {e}") from None

    def opt_hostname(self, name: str) -> None:
        """Also name this host in the generated server certificate (repeatable)."""
        try:
            self["hostname"].append(hostname(name))
        except ValueError as e:
            raise usage.UsageError(f"--hostname: {e}") from None

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        ping, timeout = self["ping-interval"], self["peer-timeout"]
        if timeout <= ping:
            raise usage.UsageError(
                f"--peer-timeout ({timeout:g}) must be longer than --ping-interval ({ping:g}): a silent peer "
                "is pinged first, and taken for gone only if it stays silent until the timeout"
            )
        self.check_cluster_options()


@dataclass(frozen=True)
class DataPlaneAddress:
    """Where the service's own data plane listens: its bound address and, for TLS, its certificate (DER)."""

    address: Any  # IPv4Address, IPv6Address or UNIXAddress (getHost of the listening port)
    certificate: Optional[bytes]  # None: no TLS

    @property
    def secure(self) -> bool:
        return self.certificate is not None


class _Listener(Service):
    """Listens on one endpoint; a failure to listen at start-up is a clear error."""

    def __init__(
        self,
        reactor: Any,
        description: str,
        shown: str,
        factory: Any,
        on_listening: Callable[[str], None],
        api: bool = True,
        tls_library: str = "stdlib",
    ) -> None:
        self._api = api
        self._tls_library = tls_library
        self._reactor = reactor
        self._description = description
        self.shown = shown
        self._factory = factory
        self._on_listening = on_listening
        self.port: Optional[IListeningPort] = None
        self.listening: Optional[Deferred] = None
        #: The certificate (DER) an C{ssl:} listener presents (the console pins it), else None.
        self.certificate: Optional[bytes] = None

    def startService(self) -> None:
        super().startService()
        endpoint, self.certificate = listener_endpoint(self._reactor, self._description, self._tls_library)
        self.listening = endpoint.listen(self._factory)
        failed: List[Failure] = []
        self.listening.addCallbacks(self._listening, failed.append)
        if failed:
            raise ConfigError(
                f"--listen {self.shown}: cannot listen: {failed[0].getErrorMessage().rstrip('.')}; is the service "
                "already running? Otherwise choose another port (e.g. --listen ssl:8444:interface=127.0.0.1)"
            )

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        secure = is_tls(self._description)
        host = getattr(address, "host", "localhost")
        if ":" in host:
            host = f"[{host}]"
        base = f"{'https' if secure else 'http'}://{host}:{getattr(address, 'port', '')}"
        ws = base.replace("http", "ws", 1)
        if self._api:
            log.info("API listening on {url}/  (data plane {ws}/tunnel)", url=base, ws=ws)
        self._on_listening(base)
        return port

    def stopService(self) -> Optional[Deferred]:  # type: ignore[override]
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class _OnStop(Service):
    """Calls C{action} when stopped (a MultiService stops its children in reverse order)."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self._action = action

    def stopService(self) -> None:
        super().stopService()
        self._action()


class TunnelService(MultiService):
    """
    The whole service.  Its parts are attributes so tests and tools can reach them:
    C{store}, C{control}, C{site}, C{listeners} (their C{port} is set once listening),
    C{certificates}, C{credentials_path}, C{account} (the default account).
    """

    def __init__(
        self,
        options: Mapping[str, Any],
        reactor: Any,
        clock: Optional[IReactorTime] = None,
        cluster_backends: Optional[Any] = None,
    ) -> None:
        super().__init__()
        clock = clock if clock is not None else reactor
        self.state_dir = os.path.abspath(options["state-dir"])
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.certificates = ensure_certificates(self.state_dir, options.get("hostname") or ())
        spec = options.get("store")
        clustered = cluster_enabled(options)
        # Start-up work runs synchronously, before the reactor: migrations, the default account, reset.
        boot = open_configured_store(spec, self.state_dir)
        try:
            self.credentials_path = os.path.join(self.state_dir, CREDENTIALS_FILE)
            self.account, created = ensure_initial_credentials(
                boot, self.state_dir, options.get("account-id"), clock.seconds()
            )
            reset = 0
            if not clustered:  # a node of a cluster resets only its own peers (tunnelkit.service.cluster.node)
                reset = Blocking(boot).reset_connection_states(clock.seconds())
        except BaseException:
            boot.close()
            raise
        if reset:
            log.info("Marked {count} peer connection(s) DISCONNECTED after the restart", count=reset)
        if IReactorThreads.providedBy(reactor):
            boot.close()  # the service's store runs its queries on threads, off the reactor
            self.store = open_configured_store(spec, self.state_dir, reactor)
        else:
            self.store = boot  # a test's memory reactor: synchronous
        log.info("State in {store}", store=describe_store(spec, self.state_dir))
        self.region = options["region"]
        # Stopped last (services stop in reverse order): the data plane records disconnections first.
        _OnStop(self.store.close).setServiceParent(self)
        threaded = reactor if IReactorThreads.providedBy(reactor) else None
        shared = self.store.notification_queue() if hasattr(self.store, "notification_queue") else None
        if clustered:
            if cluster_backends is None:
                cluster_backends = backends_on_store(options, self.store, reactor)
            if len(cluster_backends) > 2 and cluster_backends[2] is not None:
                # Nodes claim what they retry (tunnelkit.service.cluster.notifications).
                shared = cluster_backends[2]
        notifier = build_notifier(options, self.state_dir, clock, self, reactor=reactor, shared=shared, threads=threaded)
        root = build_root(Resource())
        relay = mount_data_plane(root, self.store, clock, options)
        events: ITunnelEvents = relay
        #: This node's cluster parts (None: a single node, the default).
        self.cluster = None
        if clustered:
            self.cluster = build_cluster(options, reactor, clock, relay, self.store, cluster_backends, notifier)
            events = self.cluster.events
        self.audit = build_audit_trail(options, self.state_dir, clock)
        if self.audit is not None:
            relay.audit = self.audit
            _OnStop(self.audit.close).setServiceParent(self)  # closed after the relay's shutdown
        # Peers are closed (1001) and recorded DISCONNECTED after the listeners stop, before the store.
        _OnStop(relay.shutdown).setServiceParent(self)
        limits = Limits(
            max_open_tunnels=options.get("max-open-tunnels", DEFAULT_MAX_OPEN_TUNNELS),
            max_services_per_tunnel=int(options.get("max-services-per-tunnel") or 3),
        )
        self.control = ControlPlane(
            self.store,
            clock,
            self.region,
            events,
            notifier,
            limits,
            closed_retention=options.get("closed-retention", DEFAULT_CLOSED_RETENTION),
        )
        #: This node's tunnel state changes (connections, open, close, expiry): the console listens.
        self.state_changes = relay.state_changes
        self.control.state_changes = self.state_changes
        if self.cluster is not None:
            self.cluster.take_lifecycle(self.control.lifecycle)  # one node of the cluster runs it
        else:
            self.control.lifecycle.setServiceParent(self)
        raw_api = ApiResource(self.control, SigV4Verifier(self.store, self.region, clock.seconds))
        # the console's front door (mount_console) serves this same resource: audited if auditing
        api: Resource = raw_api if self.audit is None else AuditedApi(raw_api, self.audit, self.store)
        root.putChild(b"", api)
        self.health = HealthResource()  # GET /healthz for load balancers (deploy/haproxy.cfg)
        root.putChild(b"healthz", self.health)
        self.console = None
        if not options.get("no-console"):  # the web console under /console/ (GET / redirects there)
            self.console = build_console(self, options, clock, reactor)
            mount_console(root, api, self.console)
        self.site = ServiceSite(
            root,
            reactor=reactor,
            head_timeout=float(options.get("handshake-timeout", HEAD_TIMEOUT)),
            max_pending_per_address=options.get("max-pending-per-address", MAX_PENDING_PER_ADDRESS) or None,
        )
        if self.cluster is not None:
            self.cluster.serve(self.site, root, self.certificates)
            self.cluster.setServiceParent(self)
        self.listeners: List[_Listener] = []
        for description in options["listen"]:
            self._check_names(description, options.get("hostname") or ())
            # A haproxy: listener's client address is the one its PROXY header names (see ServiceSite.proxied).
            factory = self.site.proxied() if description.split(":", 1)[0].lower() == "haproxy" else self.site
            listener = _Listener(
                reactor,
                listen_description(description, self.certificates),
                description,
                factory,
                self._announce,
                tls_library=options.get("tls-library", "stdlib"),
            )
            listener.setServiceParent(self)
            self.listeners.append(listener)
        # Stopped first (after the listeners were added): /healthz answers 503 from the moment we stop.
        _OnStop(lambda: setattr(self.health, "stopping", True)).setServiceParent(self)
        self.metrics_listener: Optional[_Listener] = None
        if options.get("metrics-listen"):
            self.metrics_listener = _Listener(
                reactor,
                options["metrics-listen"],
                options["metrics-listen"],
                metrics_site(relay, reactor),
                self._announce_metrics,
                api=False,
            )
            self.metrics_listener.setServiceParent(self)
        log.info("State directory: {path}", path=self.state_dir)
        log.info("CA certificate (give it to clients): {path}", path=self.certificates.ca_cert)
        if created is not None:
            log.info(
                "Created access key {key_id} of account {account_id} in {path} (profile default)",
                key_id=created.access_key_id,
                account_id=self.account.account_id,
                path=self.credentials_path,
            )
        if os.path.exists(self.credentials_path):
            log.info("API credentials (AWS shared-credentials format): {path}", path=self.credentials_path)
        else:
            log.warn(
                "No credentials file {path} (access keys exist in the database): write a new key there with "
                "'tunnelkit admin create-key {account} --state-dir {state} --credentials-file {path}'",
                path=self.credentials_path,
                account=self.account.name,
                state=self.state_dir,
            )
        self._announced = False

    def data_plane_address(self) -> Optional[DataPlaneAddress]:
        """
        The first listener that listens and takes plain connections (not C{haproxy:}, which wants a
        PROXY header), or None: the console's terminals connect to it as a source, so that with several
        nodes the cluster forwards them to the node holding the tunnel as any other client.
        """
        for listener in self.listeners:
            if listener.port is not None and not listener.shown.lower().startswith("haproxy:"):
                return DataPlaneAddress(listener.port.getHost(), listener.certificate)
        return None

    def _check_names(self, description: str, hostnames: Any) -> None:
        """Warn when clients may reach an C{ssl:} listener by a name its generated certificate lacks."""
        if not is_tls(description) or names_certificate(description):
            return
        match = re.search(r"(?:^|:)interface=((?:\\.|[^:])*)", description)
        interface = match.group(1).replace("\\:", ":") if match else ""
        if interface in ("127.0.0.1", "::1", "localhost") or interface in hostnames:
            return
        if not hostnames:
            log.warn(
                "--listen {listen} accepts connections on {where}, but the generated certificate names only "
                "127.0.0.1, ::1 and localhost: add --hostname NAME for each name or address clients use",
                listen=description,
                where=f"interface {interface}" if interface else "every interface",
            )

    def _announce_metrics(self, url: str) -> None:
        log.info("Metrics (Prometheus) on {url}/metrics", url=url)

    def _announce(self, url: str) -> None:
        """Show, once, how to call the API at C{url} with the generated credentials."""
        if self._announced:
            return
        self._announced = True
        ca = f" --ca-bundle {self.certificates.ca_cert}" if url.startswith("https:") else ""
        log.info(
            "Try: AWS_SHARED_CREDENTIALS_FILE={path} aws iotsecuretunneling list-tunnels --endpoint-url {url}"
            "{ca} --region {region}   or: tunnelkit list-tunnels --endpoint-url {url} --state-dir {state}",
            path=self.credentials_path,
            url=url,
            ca=ca,
            region=self.region,
            state=self.state_dir,
        )


def makeService(options: Options) -> ModeService:
    """
    Build the service from C{twistd tunnelkit --mode service} options.  A listener that cannot listen
    ends the process at start with a one-line error (L{ModeService.startService}).

    @raise ConfigError: for what stops the service before it starts (no NVX, an unreachable store,
        a bad state directory); the plugin makes it one line on stderr and status 1.
    """
    from twisted.internet import reactor

    top = ModeService(options.twistd_options, reactor=reactor)
    try:
        require_nvx(bool(options["allow-slow-websocket"]))
        TunnelService(options, reactor).setServiceParent(top)
    except (NvxUnavailable, StoreError) as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        state_dir = options["state-dir"]
        if os.path.exists(state_dir) and not os.path.isdir(state_dir):
            raise ConfigError(
                f"--state-dir {state_dir}: not a directory (give a directory; a missing one is created)"
            ) from None
        raise ConfigError(f"--state-dir {state_dir}: {e.filename or ''}: {e.strerror or e}") from None
    return top
