# -*- test-case-name: tests.test_api -*-
"""
The errors of the service's API, in the shape AWS JSON services report them (reference section 3):
L{ApiError} and the constructors of the common ones.  The operations (L{tunnelkit.service.operations}),
the request signatures (L{tunnelkit.service.auth}), the HTTP resource (L{tunnelkit.service.api}) and the
console raise or answer them; this module depends on none of them.
"""

from __future__ import annotations

from typing import Any

from tunnelkit.errors import TunnelkitError

__all__ = ["ApiError", "not_found", "serialization_error", "validation_error"]


class ApiError(TunnelkitError):
    """
    An API error as AWS JSON services report them: C{{"__type": error_type, "message": message}}.

    @ivar status: the HTTP status (400 for a bad request, 403 for authentication, 404 for an unknown
        tunnel, ...).
    """

    def __init__(self, error_type: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status


def validation_error(field: str, value: Any, constraint: str) -> ApiError:
    """A C{ValidationException} in AWS's wording, naming C{field}."""
    shown = value if isinstance(value, (int, float)) else _shorten(str(value))
    return ApiError(
        "ValidationException",
        f"1 validation error detected: Value '{shown}' at '{field}' failed to satisfy constraint: {constraint}",
    )


def serialization_error(field: str, expected: str, value: Any) -> ApiError:
    """A C{SerializationException}: C{field} has the wrong JSON type."""
    return ApiError(
        "SerializationException",
        f"'{field}' must be {expected}, got {_json_type(value)}",
    )


def not_found(tunnel_id: str) -> ApiError:
    """The C{ResourceNotFoundException} for a tunnel the caller cannot see."""
    return ApiError("ResourceNotFoundException", f"Tunnel {tunnel_id} does not exist", status=404)


def _shorten(text: str) -> str:
    return text if len(text) <= 100 else text[:97] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
