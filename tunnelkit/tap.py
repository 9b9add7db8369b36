# -*- test-case-name: tests.test_tap -*-
"""
C{twistd tunnelkit --mode MODE ...}: one plugin, every mode.

The mode picks which Options class parses the rest of the command line; each mode lives in its own
module (see L{tunnelkit.config.MODES}) exposing C{Options} (a L{tunnelkit.config.ModeOptions}) and
C{makeService(options)}, which returns a L{tunnelkit.process.ModeService} holding the mode's parts
(it applies the mode's log filter and exit status under twistd) or raises L{ConfigError}.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn, Optional, Sequence

from twisted.application.service import IService
from twisted.python import usage

import tunnelkit
from tunnelkit.config import MODES, ConfigFiles, find_mode, missing_mode_message
from tunnelkit.errors import ConfigError
from tunnelkit.internals import MissingInternals, check_internals
from tunnelkit.process import exit_with_message

_GENERAL_HELP = f"""\
Usage: twistd [twistd options] tunnelkit --mode MODE [options]

tunnelkit {tunnelkit.__version__}: self-hostable secure tunneling, wire-compatible with AWS IoT
Secure Tunneling.

Modes:
  service      the tunnel service: the AWS-compatible API and the WebSocket relay
  source       local proxy, source side: listens for local clients (like localproxy -s)
  destination  local proxy, destination side: connects to local targets (like localproxy -d)
  agent        device agent: takes tokens over MQTT and starts destination sessions

Options:
  --mode MODE    one of the modes above
  --config FILE  read options from a YAML file (see tap.yml)
  -h, --help     this help; with --mode, the mode's options
  --version      print tunnelkit's version

Example: twistd -n tunnelkit --mode service --help

Files: in the foreground (-n) twistd writes no pid file unless --pidfile is given, so several modes
run side by side in one directory; daemonized, the pid file is tunnelkit-MODE.pid and the log
tunnelkit-MODE.log unless --pidfile/--logfile say otherwise.
"""

#: twistd's own default pid file, which every twistd process in a directory would share.
TWISTD_DEFAULT_PIDFILE = "twistd.pid"

#: The extra that brings the service's dependencies, by the modules it provides.
_SERVICE_EXTRA_MODULES = ("botocore", "prometheus_client")


class ModeNotBuilt(usage.UsageError):
    """The mode exists in the design but this build of tunnelkit does not have it yet."""


def load_mode(mode: str) -> Any:
    """
    Import the module implementing C{mode}.

    @raise usage.UsageError: for an unknown mode, or L{ModeNotBuilt} for one not built yet.
    """
    if mode not in MODES:
        raise usage.UsageError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    name = MODES[mode]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            raise ModeNotBuilt(
                f"mode {mode!r} is not built yet in tunnelkit {tunnelkit.__version__}"
            ) from None
        if (e.name or "").partition(".")[0] in _SERVICE_EXTRA_MODULES:
            raise usage.UsageError(
                f"mode {mode!r} needs {e.name}, which a device install leaves out: install "
                "\"tunnelkit[service]\" (in a checkout: bash tools/install.sh)"
            ) from None
        raise


def default_process_files(server_options: Any, mode: str) -> None:
    """
    Give twistd's pid file and log file defaults of their own to C{mode}, so that every documented
    command runs side by side in one directory (twistd's one C{twistd.pid} otherwise stops the second
    process with "Another twistd server is running").

    In the foreground (C{-n}) a process is watched by its shell or its supervisor (systemd), which
    know its pid: no pid file, as Twisted's own systemd guide runs C{twistd --nodaemon --pidfile=}.
    Daemonized, the pid file is C{tunnelkit-MODE.pid} (a second daemon of the same mode in the same
    directory is still refused) and the log C{tunnelkit-MODE.log}.  An explicit C{--pidfile} or
    C{--logfile} wins (except C{--pidfile=twistd.pid}, which looks like the default).

    @param server_options: twistd's C{ServerOptions} (the plugin options' C{parent}), or None.
    """
    if server_options is None or not hasattr(server_options, "get"):
        return
    if server_options.get("pidfile") == TWISTD_DEFAULT_PIDFILE:
        server_options["pidfile"] = "" if server_options.get("nodaemon") else f"tunnelkit-{mode}.pid"
    if "logfile" in server_options and server_options.get("logfile") is None and not server_options.get("nodaemon"):
        server_options["logfile"] = f"tunnelkit-{mode}.log"


class Options(usage.Options):
    """
    The plugin's options: finds C{--mode} (or the single section of C{--config}), then lets that
    mode's Options parse everything.  Usage errors are one line on stderr and exit status 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mode: Optional[str] = None
        self.modeOptions: Optional[usage.Options] = None

    def __str__(self) -> str:
        if self.modeOptions is not None:
            return str(self.modeOptions)
        return _GENERAL_HELP

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        args = list(sys.argv[1:] if options is None else options)
        files = ConfigFiles()  # --config's file, read once for the mode, its options and any error
        mode = find_mode(args, files=files)
        if mode is None:
            if any(a in ("-h", "--help") for a in args):
                print(_GENERAL_HELP)
                sys.exit(0)
            if "--version" in args:
                print(f"tunnelkit {tunnelkit.__version__}")
                sys.exit(0)
            try:
                message = missing_mode_message(args, files)
            except ConfigError as e:
                message = str(e)
            _fail(None, message)
        try:
            module = load_mode(mode)
            self.mode = mode
            mode_options = module.Options()
            mode_options.config_files = files
            if mode in ("source", "destination"):
                mode_options.mode = mode  # one Options class serves both; it sets its "mode" key
            mode_options.twistd_options = getattr(self, "parent", None)
            self.modeOptions = mode_options
            mode_options.parseOptions(args)
        except (usage.UsageError, ConfigError) as e:
            _fail(mode if mode in MODES else None, str(e))  # an unknown mode has no help of its own
        default_process_files(getattr(self, "parent", None), mode)
        try:
            check_internals(warn=_warn)
        except MissingInternals as e:
            sys.stderr.write(f"tunnelkit: error: {e}\n")
            sys.exit(1)


def _warn(message: str) -> None:
    sys.stderr.write(f"tunnelkit: warning: {message}\n")


def _fail(mode: Optional[str], message: str) -> NoReturn:
    hint = f"twistd tunnelkit --mode {mode} --help" if mode else "twistd tunnelkit --help"
    sys.stderr.write(f"tunnelkit: error: {message} (see '{hint}')\n")
    sys.exit(1)


def makeService(options: Options) -> IService:
    """
    Build the mode's service from its parsed options: each mode module's C{makeService(options)}
    returns a L{tunnelkit.process.ModeService}, or raises L{ConfigError} for what stops it before it
    starts (one line on stderr and status 1 here, as a usage error).
    """
    assert options.mode is not None and options.modeOptions is not None
    module = load_mode(options.mode)
    try:
        service: IService = module.makeService(options.modeOptions)
    except ConfigError as e:
        exit_with_message(str(e))
    return service
