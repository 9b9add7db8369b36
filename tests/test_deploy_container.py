"""
The container build file (C{deploy/Containerfile}): it installs with README's own install command, from a
build context that holds no state, token or credential.  (No container engine runs here: this checks the
file, and tests/e2e/test_fresh_install.py runs that install command on a fresh copy.)
"""

import os
import re

from twisted.trial import unittest

from tunnelkit.testing.process import REPOSITORY_TOP


def read(*parts: str) -> str:
    with open(os.path.join(REPOSITORY_TOP, *parts)) as f:
        return f.read()


class ContainerfileTests(unittest.TestCase):
    def instructions(self):
        text = read("deploy", "Containerfile").replace("\\\n", " ")
        return [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]

    def test_debian_python_in_a_venv_with_the_readme_install(self) -> None:
        instructions = self.instructions()
        self.assertEqual(instructions[0], ["FROM", "debian:12-slim"])
        runs = [arg for kind, arg in instructions if kind == "RUN"]
        self.assertIn("python3 python3-venv", runs[0])
        install = [r for r in runs if "tools/install.sh" in r]
        self.assertEqual(len(install), 1)
        command = re.match(r"(bash tools/install\.sh)( |$)", install[0])
        self.assertIsNotNone(command, install[0])
        self.assertIn(f"```sh\n{command.group(1)} && .venv/bin/twistd", read("README.md"))
        self.assertIn(["USER", "tunnelkit"], instructions)
        self.assertIn(["ENV", "PATH=/opt/tunnelkit/.venv/bin:$PATH"], instructions)

    def test_no_secret_in_the_context(self) -> None:
        ignored = set(read(".dockerignore").split())
        for pattern in ("tunnelkit-state", "**/tunnelkit-state", "*.token", "credentials", ".venv", ".git", "*.key"):
            self.assertIn(pattern, ignored)
        self.assertNotRegex(read("deploy", "Containerfile"), r"(?im)^\s*(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN)")
