# -*- test-case-name: tests.test_agent_tap -*-
"""
C{twistd -n tunnelkit --mode agent}: the device agent (L{tunnelkit.agent.core}) with the local proxy's
destination sessions (L{tunnelkit.agent.starter}) running in this process.

Example::

    twistd -n tunnelkit --mode agent --thing-name t1 --mqtt tcp:host=broker.lan:port=1883 \\
        -e tunnels.example.com:8443 -c ca.pem -d SSH=22,HTTP=127.0.0.1:8080

Without C{-d} the services are SSH -> 127.0.0.1:22, VNC -> 127.0.0.1:5900, HTTP -> 127.0.0.1:80
and FTP -> 127.0.0.1:21; with C{-d} exactly the services listed (same syntax as the destination
mode's C{-d}).  Without C{-e} each session connects to the data plane of the notification's region,
as AWS's Device Client does.
"""

from __future__ import annotations

import os
from typing import Dict

from twisted.logger import Logger

import tunnelkit
from tunnelkit.adapters import Target
from tunnelkit.agent.core import DEFAULT_TARGETS, Agent
from tunnelkit.agent.starter import LocalProxyStarter
from tunnelkit.config import positive_int
from tunnelkit.errors import ConfigError
from tunnelkit.localproxy.client_options import TunnelClientOptions
from tunnelkit.localproxy.endpoint import ServiceEndpoint, parse_proxy_endpoint, region_host
from tunnelkit.localproxy.mapping import V1_SERVICE_ID, parse_destination_mapping
from tunnelkit.mqtt import MQTT_OPTIONS, client_from_settings, mqtt_settings
from tunnelkit.process import LogFilter, ModeService
from tunnelkit.protocol.notification import THING_NAME_RE
from tunnelkit.transport.httpproxy import proxy_from_environment
from tunnelkit.transport.tls import NO_VERIFY_WARNING

__all__ = ["Options", "makeService"]

log = Logger()

def agent_verbosity(text: str) -> int:
    """C{-v}: 0-5; the local proxy's trace levels (6+) would log the tokens the agent receives."""
    if not text.isdigit() or not 0 <= int(text) <= 5:
        raise ValueError(f"-v/--verbose expects 0-5 (4 = info, 5 = debug), got {text!r}")
    return int(text)


class Options(TunnelClientOptions):
    """The agent's options."""

    mode = "agent"
    synopsis = "Usage: twistd -n tunnelkit --mode agent --thing-name NAME --mqtt ENDPOINT [options]"
    longdesc = (
        "The device agent: takes destination tokens from MQTT and runs a destination session per tunnel; "
        "it keeps retrying an unreachable broker or service. Exit status: 1 on a usage error; stopped by a "
        "signal, it ends as twistd does, by that signal (shell status 143 for SIGTERM, 130 for Ctrl-C)."
    )

    optParameters = [
        ["thing-name", None, None, "This device's thing name: listens on $aws/things/NAME/tunnels/notify."],
        *[list(option) for option in MQTT_OPTIONS],
        [
            "destination-app",
            "d",
            None,
            "SERVICE=TARGET[,SERVICE=TARGET...]: the services this device serves and where "
            "(TARGET: PORT, HOST:PORT, [V6]:PORT or a unix socket path). "
            "Default: SSH=22,VNC=5900,HTTP=80,FTP=21 on 127.0.0.1.",
        ],
        [
            "proxy-endpoint",
            "e",
            None,
            "The tunnel service's data plane: HOST[:PORT] (TLS, 443), wss://HOST[:PORT] or ws://HOST[:PORT]. "
            "Default: data.tunneling.iot.REGION.amazonaws.com of each notification's region.",
        ],
        ["max-sessions", None, 32, "The most destination sessions at once; notifications beyond are ignored (logged).", positive_int],
        ["verbose", "v", 4, "Log detail 0-5: 0 nothing, 3 warnings, 4 info (default), 5 debug.", agent_verbosity],
    ]

    def _check(self) -> None:
        thing = self["thing-name"]
        if not thing:
            raise ConfigError("--thing-name NAME is required (the device's thing name)")
        if not THING_NAME_RE.match(thing):
            raise ConfigError(f"--thing-name {thing!r}: use 1-128 letters, digits, ':', '_' or '-'")
        if not self["mqtt"]:
            raise ConfigError("--mqtt ENDPOINT is required (e.g. tcp:host=127.0.0.1:port=1883)")
        self.mqtt = mqtt_settings(self, default_client_id=f"tunnelkit-agent-{thing}")

        text = self["destination-app"]
        if text:
            targets = parse_destination_mapping(text)
            if V1_SERVICE_ID in targets:
                raise ConfigError(
                    f"-d/--destination-app {text!r}: name each service (SERVICE=TARGET): "
                    "notifications name the services they want"
                )
        else:
            targets = dict(DEFAULT_TARGETS)
        self.targets: Dict[str, Target] = targets

        capath = self._checked_capath()
        verify = not self["no-ssl-host-verify"]
        endpoint = self["proxy-endpoint"]
        library = self._checked_tls_library()
        if endpoint:
            host, port, secure = parse_proxy_endpoint(endpoint)
            ServiceEndpoint(host, port, secure, capath, verify, tls_library=library).check()
        else:
            # Check the CA now rather than at the first notification.
            ServiceEndpoint(region_host("us-east-1"), 443, True, capath, verify, tls_library=library).check()
        self.web_proxy = proxy_from_environment(os.environ)

        self.adapter_overrides = self._checked_adapter_overrides(self["adapter"])


def makeService(options: Options) -> ModeService:
    """The agent: an MQTT client, the agent's bookkeeping, and destination sessions on demand."""
    from twisted.internet import reactor

    log.info("Running tunnelkit agent version {version}", version=tunnelkit.__version__)
    if options["no-ssl-host-verify"]:
        for line in NO_VERIFY_WARNING.splitlines():
            log.warn("{line}", line=line)
    if not options["proxy-endpoint"]:
        log.info(
            "No -e/--proxy-endpoint: each session connects to AWS's data plane of its notification's "
            "region (data.tunneling.iot.REGION.amazonaws.com:443); give -e for a tunnelkit service"
        )
    settings = options.mqtt
    assert settings is not None
    top = ModeService(options.twistd_options, LogFilter(options["verbose"]), reactor=reactor)
    # A persistent session: notifications published while the agent is away (a broker restart, a
    # network outage) are queued by the broker and delivered when it is back.
    client = client_from_settings(reactor, settings, clean_session=False)
    starter = LocalProxyStarter(
        reactor,
        capath=options["capath"],
        verify=not options["no-ssl-host-verify"],
        web_proxy=options.web_proxy,
        tls_library=options["tls-library"],
        adapter_overrides=options.adapter_overrides,
        probe_targets=not options["no-probe"],
    )
    agent = Agent(
        options["thing-name"],
        client,
        starter,
        options.targets,
        proxy_endpoint=options["proxy-endpoint"],
        clock=reactor,
        max_sessions=options["max-sessions"],
    )
    agent.setServiceParent(top)
    client.setServiceParent(top)
    return top

