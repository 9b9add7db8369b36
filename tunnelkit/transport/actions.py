# -*- test-case-name: tests.test_actions -*-
"""
Carrying out a tunnel session's actions (L{tunnelkit.protocol.session}'s C{SendFrames}, C{WriteLocal},
C{CloseLocal}, ...): one handler per action type, every type handled.

Both tunnel sources and destinations that run a session use it: the local proxy
(L{tunnelkit.localproxy.session_service}) and the service console's terminal source
(L{tunnelkit.service.console.terminal}).  A session that gains an action type makes both fail at once
(L{ActionDispatcher} refuses a table without it) instead of one of them dropping it silently.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Tuple, get_args

from twisted.logger import Logger, LogLevel

from tunnelkit.protocol.session import Action, LogEvent

__all__ = ["ACTION_TYPES", "ActionDispatcher", "log_event"]

#: Every action type a session returns (the members of L{tunnelkit.protocol.session.Action}).
ACTION_TYPES: Tuple[type, ...] = get_args(Action)

#: The session's log lines keep the session module's namespace.
_session_log = Logger(namespace="tunnelkit.protocol.session")
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


def log_event(action: LogEvent) -> None:
    """Carry out a L{LogEvent}: one C{twisted.logger} event, with its fields."""
    _session_log.emit(_LEVELS.get(action.level, LogLevel.error), action.format, **action.fields)


class ActionDispatcher:
    """
    Calls, for each action, the handler of its type, in order.

    @param handlers: action type -> handler (called with the action); every type of L{ACTION_TYPES}.
    @raise TypeError: if a type has no handler, or a handler is given for something else.
    """

    __slots__ = ("_handlers",)

    def __init__(self, handlers: Mapping[type, Callable[[Any], None]]) -> None:
        missing = [t.__name__ for t in ACTION_TYPES if t not in handlers]
        unknown = [getattr(t, "__name__", repr(t)) for t in handlers if t not in ACTION_TYPES]
        if missing or unknown:
            raise TypeError(f"action handlers: missing {missing or 'none'}, unknown {unknown or 'none'}")
        self._handlers = dict(handlers)

    def __call__(self, actions: Iterable[Any]) -> None:
        handlers = self._handlers
        for action in actions:
            handlers[type(action)](action)
