# -*- test-case-name: tests.test_cli_operator -*-
"""
The operator commands of the C{tunnelkit} CLI beside the API ones (L{tunnelkit.cli}):

    tunnelkit example-config > tap.yml     the example configuration of every mode (tap.yml)
"""

from __future__ import annotations

import argparse
from importlib import resources
from typing import Any, Callable, TextIO

__all__ = ["COMMANDS", "add_commands", "example_config", "run"]

#: The commands this module adds and runs.
COMMANDS = ("example-config",)


def example_config() -> str:
    """The text of the example configuration C{tap.yml} shipped in the package."""
    return resources.files("tunnelkit").joinpath("tap.yml").read_text(encoding="utf-8")


def add_commands(commands: Any, api_command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """
    Add this module's commands to C{tunnelkit}'s subparsers.

    @param api_command: makes a command with the API options (endpoint, credentials, CA).
    """
    commands.add_parser(
        "example-config",
        help="Print the example configuration of every mode (tap.yml).",
        description="Print the example configuration (tap.yml): tunnelkit example-config > tap.yml, then "
        "twistd -n tunnelkit --mode MODE --config tap.yml.",
    )


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run one of L{COMMANDS}; the exit status."""
    if args.command == "example-config":
        out.write(example_config())
        return 0
    raise AssertionError(f"not an operator command: {args.command}")  # pragma: no cover
