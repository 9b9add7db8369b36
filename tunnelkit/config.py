# -*- test-case-name: tests.test_config -*-
"""
Options common to every mode, and C{tap.yml} loading: validated up front, merged under the command line.

A configuration file is YAML with one section per mode::

    service:
      listen: ["ssl:8443:interface=127.0.0.1"]
      state-dir: ./tunnelkit-state
    source:
      source-listen-port: "SSH1=5555"

Keys are the long option names of the mode (C{state-dir} or C{state_dir}).  Values given on the command
line win over the file.  Every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import yaml
from twisted.python import usage

import tunnelkit
from tunnelkit.errors import ConfigError

#: The modes one twistd plugin runs; the values name the module holding each mode's Options and
#: makeService.
MODES: Dict[str, str] = {
    "service": "tunnelkit.service.tap",
    "source": "tunnelkit.localproxy.tap",
    "destination": "tunnelkit.localproxy.tap",
    "agent": "tunnelkit.agent.tap",
}

#: AWS localproxy's spellings of the modes (C{-m src|dst}).
MODE_ALIASES: Dict[str, str] = {"src": "source", "dst": "destination"}


def canonical_mode(mode: str) -> str:
    """C{src} -> C{source}, C{dst} -> C{destination}; other names unchanged."""
    return MODE_ALIASES.get(mode, mode)


def normalize_key(key: str) -> str:
    """C{state_dir} and C{state-dir} name the same option."""
    return key.replace("_", "-")


class ConfigFiles:
    """
    The configuration files one command line names, each read and parsed once (finding the mode,
    then the mode's options, then perhaps an error message all look at the same document).
    """

    def __init__(self) -> None:
        self._documents: Dict[str, Any] = {}

    def document(self, path: str) -> Any:
        """
        The YAML document in C{path}.

        @raise ConfigError: if the file is unreadable or is not YAML (every time it is asked for).
        """
        if path not in self._documents:
            try:
                self._documents[path] = _read_document(path)
            except ConfigError as e:
                self._documents[path] = e
        document = self._documents[path]
        if isinstance(document, ConfigError):
            raise document
        return document


def _read_document(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def load_config_file(path: str, mode: str, files: Optional[ConfigFiles] = None) -> Dict[str, Any]:
    """
    Read C{path} (through C{files}, if given) and return the mapping of the section for C{mode}
    (empty if the file has none).

    @raise ConfigError: if the file is unreadable, is not YAML, or is not shaped as sections of modes.
    """
    document = (files or ConfigFiles()).document(path)
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of modes ({', '.join(sorted(set(MODES)))}), "
            f"got {type(document).__name__}"
        )
    for key in document:
        if key not in MODES:
            raise ConfigError(
                f"{path}: {key}: unknown section (sections are the modes: "
                f"{', '.join(MODES)})"
            )
    section = document.get(mode) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {mode}: must be a mapping of option names to values")
    return section


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _NamedCoerceParameter(usage.CoerceParameter):
    """A parameter whose bad value is reported under its option's name, not twisted's generic prefix."""

    def dispatch(self, parameterName: str, value: Optional[str]) -> None:
        try:
            super().dispatch(parameterName, value)
        except usage.UsageError as e:
            text, prefix = str(e), "Parameter type enforcement failed: "
            if not text.startswith(prefix):
                raise
            detail = text[len(prefix) :]
            raise usage.UsageError(detail if detail.startswith("-") else f"--{parameterName}: {detail}") from None


class ModeOptions(usage.Options):
    """
    Base of each mode's Options: C{--mode}, C{--config}, C{-h/--help}, C{--version}, and C{tap.yml}
    merging.

    Subclasses list repeatable options (handled by C{opt_NAME} methods that append to C{self[NAME]})
    in C{repeatable}, mapping each long name to a coerce function for one item.
    """

    mode: str = ""
    repeatable: Mapping[str, Callable[[str], Any]] = {}
    #: twistd's own options (C{--logfile}, C{-n}, ...) when twistd runs the mode, set by the plugin
    #: (L{tunnelkit.tap}); the mode's service applies its log filter in front of twistd's observer.
    twistd_options: Optional[Mapping[str, Any]] = None

    optParameters: List[Sequence[Any]] = [
        ["config", None, None, "Read options from this YAML file (tap.yml format); flags win over it."],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, dispatch in list(self._dispatch.items()):
            if type(dispatch) is usage.CoerceParameter:
                self._dispatch[name] = _NamedCoerceParameter(self, dispatch.coerce)
        self["mode"] = self.mode
        for name in self.repeatable:
            self[name] = []
        #: The long names (normalized) of the options the command line gives; set by parseOptions.
        self.from_command_line: Set[str] = set()
        #: Where C{--config}'s file is read (once); the plugin's Options shares its own.
        self.config_files = ConfigFiles()

    # --- the options every mode has ---

    def opt_mode(self, mode: str) -> None:
        """The mode to run: service, source, destination or agent."""
        if canonical_mode(mode) != self.mode:
            raise usage.UsageError(f"--mode {mode} given to the options of mode {self.mode}")

    def opt_help(self) -> None:
        """Show this help and exit."""
        print(self.__str__())
        sys.exit(0)

    opt_h = opt_help

    def opt_version(self) -> None:
        """Print tunnelkit's version and exit."""
        print(f"tunnelkit {tunnelkit.__version__}")
        sys.exit(0)

    def parseArgs(self, *args: str) -> None:
        """No mode takes positional arguments: name the first stray one (often an option's lost value)."""
        if args:
            raise usage.UsageError(
                f"unexpected argument {args[0]!r}: every value follows its option (e.g. -s SSH1=5555); "
                "did the option before it lose its value?"
            )

    # --- tap.yml ---

    def _option_table(self) -> Dict[str, Tuple[str, Optional[Callable[[Any], Any]], str]]:
        """
        Map each normalized long option name to (kind, coerce, key in self) with kind 'param', 'flag'
        or 'list'.
        """
        table: Dict[str, Tuple[str, Optional[Callable[[Any], Any]], str]] = {}
        flags: List[Sequence[Any]] = []
        params: List[Sequence[Any]] = []
        for cls in reversed(type(self).__mro__):
            flags.extend(getattr(cls, "optFlags", None) or [])
            params.extend(getattr(cls, "optParameters", None) or [])
        for flag in flags:
            table[normalize_key(flag[0])] = ("flag", None, flag[0])
        for param in params:
            coerce = param[4] if len(param) > 4 else None
            table[normalize_key(param[0])] = ("param", coerce, param[0])
        for name, coerce in self.repeatable.items():
            table[normalize_key(name)] = ("list", coerce, name)
        for skipped in ("config", "mode", "help", "version"):
            table.pop(skipped, None)
        return table

    def _apply_config(self, path: str) -> None:
        section = load_config_file(path, self.mode, self.config_files)
        table = self._option_table()
        for raw_key, value in section.items():
            key = normalize_key(str(raw_key))
            where = f"{path}: {self.mode}.{raw_key}"
            if key not in table:
                raise ConfigError(
                    f"{where}: unknown key for mode {self.mode} (known keys: {', '.join(sorted(table))})"
                )
            if key in self.from_command_line:
                continue
            kind, coerce, attr = table[key]
            try:
                if kind == "flag":
                    if not isinstance(value, bool):
                        raise ValueError(f"expected true or false, got {_describe(value)}")
                    self[attr] = 1 if value else 0
                elif kind == "list":
                    items = _flatten_mapping(value) if isinstance(value, dict) else value
                    items = items if isinstance(items, list) else [items]
                    converted = []
                    for item in items:
                        if isinstance(item, (dict, list)) or item is None:
                            raise ValueError(f"expected a list of strings, got {_describe(value)}")
                        converted.append(coerce(str(item)) if coerce else str(item))
                    self[attr] = converted
                else:
                    if isinstance(value, (dict, list)) or value is None:
                        raise ValueError(f"expected a single value, got {_describe(value)}")
                    if isinstance(value, bool):
                        raise ValueError(f"expected a value, not {_describe(value)}")
                    self[attr] = coerce(str(value)) if coerce else str(value)
            except (ValueError, usage.UsageError) as e:
                raise ConfigError(f"{where}: {e}") from None

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """
        Fill options from C{--config} first, skipping those the command line sets, then parse the
        command line (so its values win, and C{postOptions} sees the merged result once).
        """
        args = list(sys.argv[1:] if options is None else options)
        self.from_command_line = self._command_line_keys(args)
        config_path = _find_option_value(args, "--config")
        if config_path is not None:
            self._apply_config(config_path)
        super().parseOptions(args)

    def _command_line_keys(self, args: Sequence[str]) -> Set[str]:
        keys = set()
        for arg in args:
            if not arg.startswith("-") or arg == "-":
                continue
            name = arg.lstrip("-").split("=", 1)[0]
            if not arg.startswith("--"):
                name = name[:1]
            canonical = self.synonyms.get(name) or self.synonyms.get(name.replace("-", "_")) or name
            keys.add(normalize_key(canonical))
        return keys


def _flatten_mapping(value: Dict[Any, Any], prefix: str = "") -> List[str]:
    """
    A mapping given for a repeatable option becomes its C{KEY=VALUE} items; nested mappings join
    keys with dots: C{{HTTP1: {host: a}}} -> C{["HTTP1.host=a"]}.
    """
    items: List[str] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            items.extend(_flatten_mapping(item, name + "."))
        elif isinstance(item, (list, type(None))):
            raise ValueError(f"{name}: expected a single value, got {_describe(item)}")
        else:
            item = ("true" if item else "false") if isinstance(item, bool) else item
            items.append(f"{name}={item}")
    return items


def _find_option_value(args: Sequence[str], name: str) -> Optional[str]:
    """The value of C{--name VALUE} or C{--name=VALUE} in C{args}, if present."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def find_mode(
    args: Sequence[str], environ: Mapping[str, str] = os.environ, files: Optional[ConfigFiles] = None
) -> Optional[str]:
    """The mode named by C{--mode}, or the C{mode} key of C{--config}'s file, if any."""
    mode = _find_option_value(args, "--mode")
    if mode is not None:
        return canonical_mode(mode)
    path = _find_option_value(args, "--config")
    if path is not None:
        try:
            document = (files or ConfigFiles()).document(path)
        except ConfigError:
            return None  # reported properly once a mode's Options reads the file
        if isinstance(document, dict):
            sections = [key for key in document if key in MODES]
            if len(sections) == 1:
                return sections[0]
    return None


def missing_mode_message(args: Sequence[str], files: Optional[ConfigFiles] = None) -> str:
    """
    Why L{find_mode} found no mode in C{args}: the C{--config} file's problem if it has one (unreadable,
    not YAML, ...), else which C{--mode} to give.
    """
    choose = "use --mode service|source|destination|agent"
    path = _find_option_value(args, "--config")
    if path is None:
        return f"no mode given: {choose}"
    files = files or ConfigFiles()
    load_config_file(path, "service", files)  # raises ConfigError naming the file's problem, if any
    sections = sorted(key for key in (files.document(path) or {}) if key in MODES)
    if sections:
        return f"no mode given and {path} has several sections ({', '.join(sections)}): {choose}"
    return f"no mode given and {path} has no mode section: {choose}"


def _check_endpoint(description: str, kind_of: str) -> str:
    from tunnelkit.internals import parse_endpoint_description  # syntax only: nothing listens or connects

    try:
        args, kwargs = parse_endpoint_description(description)
    except Exception as e:
        raise ValueError(f"bad {kind_of} endpoint {description!r}: {e}") from None
    kind = (args[0] if args else "").lower()
    if kind == "haproxy" and kind_of == "server":
        # Twisted's PROXY-protocol wrapper (behind HAProxy's send-proxy-v2): the client's address is the
        # one the PROXY header names.  The header comes before any TLS, so it wraps plain listeners only.
        inner = description.split(":", 1)[1] if ":" in description else ""
        if inner.split(":", 1)[0].lower() in ("ssl", "tls"):
            raise ValueError(
                f"bad server endpoint {description!r}: the PROXY header precedes TLS, so haproxy: wraps "
                "plain listeners only (haproxy:tcp:8080:interface=...); let HAProxy terminate TLS"
            )
        _check_endpoint(inner, kind_of)
        return description
    known = {"tcp", "tcp6", "ssl", "unix", "tls", "systemd"}
    if kind not in known:
        raise ValueError(
            f"bad {kind_of} endpoint {description!r}: unknown type {kind!r} (use one of "
            f"{', '.join(sorted(known | ({'haproxy'} if kind_of == 'server' else set())))})"
        )
    if kind in ("tcp", "tcp6", "ssl", "tls"):
        port = kwargs.get("port", args[1] if len(args) > 1 and kind_of == "server" else None)
        if kind_of == "client":
            port = kwargs.get("port", args[2] if len(args) > 2 else None)
            host = kwargs.get("host", args[1] if len(args) > 1 else None)
            if not host:
                raise ValueError(f"bad client endpoint {description!r}: no host")
        if port is None or not str(port).isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"bad {kind_of} endpoint {description!r}: port must be a number 0-65535")
    return description


def server_endpoint(description: str) -> str:
    """Coerce: a Twisted server endpoint string (C{tcp:8443}, C{ssl:443:interface=...})."""
    return _check_endpoint(description, "server")


def client_endpoint(description: str) -> str:
    """Coerce: a Twisted client endpoint string (C{tcp:host=127.0.0.1:port=1883})."""
    return _check_endpoint(description, "client")


_DURATION_RE = re.compile(r"\A([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)?\Z")
_UNIT_SECONDS = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def number(
    low: float = 0,
    high: Optional[float] = None,
    *,
    whole: bool = False,
    duration: bool = False,
    above: bool = False,
    zero_means: str = "",
) -> Callable[[str], Any]:
    """
    The coerce function of a numeric option: every numeric option of every mode uses one, so
    each bad value gets the same kind of message, saying what is expected and what was given (the
    option's name is put in front by L{ModeOptions}, or the file and key by the C{tap.yml} loader).

    @param low: the smallest value allowed (or, with C{above}, the value it must be more than).
    @param high: the largest value allowed (None: no bound).
    @param whole: a whole number (an C{int}); otherwise a C{float}.
    @param duration: seconds, or a number with a unit: C{90}, C{90s}, C{30m}, C{3h}, C{1d}.
    @param zero_means: 0 is allowed too, though below C{low}, and means this (e.g. C{"off"}).
    """
    kind = "a whole number" if whole else "a duration" if duration else "a number"
    if high is not None:
        bound = f"from {low:g} to {high:g}"
    else:
        bound = f"of more than {low:g}" if above else f"of at least {low:g}"
    example = " (seconds, or with a unit: 90s, 30m, 3h, 1d)" if duration else ""
    expected = f"expected {f'0 ({zero_means}) or ' if zero_means else ''}{kind} {bound}{example}"

    def coerce(text: str) -> Any:
        value: float
        try:
            if whole:
                value = int(str(text).strip())
            elif duration:
                match = _DURATION_RE.match(str(text).strip())
                if not match:
                    raise ValueError(text)
                value = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            else:
                value = float(text)
        except ValueError:
            raise ValueError(f"{expected}, got {text!r}") from None
        if value == 0 and zero_means:
            return value
        if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value > high):
            raise ValueError(f"{expected}, got {text!r}")
        return value

    coerce.coerceDoc = ""  # type: ignore[attr-defined]  # the help text says the range itself
    return coerce


#: Coerce: a whole number greater than zero.
positive_int = number(1, whole=True)

#: Coerce: seconds, or a number with a unit (C{90}, C{90s}, C{30m}, C{3h}, C{1d}), 0 or more.
duration = number(0, duration=True)
