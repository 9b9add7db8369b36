# -*- test-case-name: tests.test_framing,tests.test_rules,tests.test_config -*-
"""
The typed errors tunnelkit raises.  Each carries a message a user can act on.
"""


class TunnelkitError(Exception):
    """Base class of every error tunnelkit raises on purpose."""


class ConfigError(TunnelkitError):
    """A configuration file or command-line option is wrong."""


class ProtocolError(TunnelkitError):
    """The tunneling protocol was not followed by a peer."""


class FramingError(ProtocolError):
    """A tunnel frame could not be decoded (bad length or unparseable message)."""


class ProtocolViolation(ProtocolError):
    """
    A well-formed message broke one of the protocol's rules (reference section 1.7).

    @ivar rule: a short machine-readable name of the broken rule, used as a metrics label.
    """

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
