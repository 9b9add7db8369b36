"""
The README's commands on a fresh machine: a copy of the checkout, the distribution's Python
(C{/usr/bin/python3}, which refuses a plain C{pip install}: PEP 668) and a PATH without any other
Python stand in for a new Debian or Ubuntu machine.

  - C{bash tools/install.sh} makes the copy's own C{.venv} from that Python and installs tunnelkit
    there, leaving the distribution's Python as it was;
  - the "Using it" commands (service, open-tunnel, destination, source, ssh, close-tunnel) and the
    agent run as written, side by side in one directory, from that C{.venv} (only the ports differ:
    the service takes a free one);
  - after C{pip install -e .} twistd still finds the plugin, and runs the copy's code.

pip installs tunnelkit from the copy; its dependencies come from the package index (pip's cache
makes a second run quick).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional

from twisted.trial import unittest

from tests.e2e.harness import REPOSITORY_TOP, Harness

#: The distribution's own Python (Debian, Ubuntu).
SYSTEM_PYTHON = "/usr/bin/python3"
#: A PATH with the distribution's tools only (no pyenv, no /usr/local).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Seconds tools/install.sh may take (it downloads the dependencies when pip's cache is cold).
INSTALL_TIMEOUT = 600
#: What is not copied from the checkout: its own environment and build and test leftovers.
_NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "_trial_temp*", "tunnelkit-state", "*.token",
    ".hypothesis", "dropin.cache",
)


def _can_make_venv() -> Optional[str]:
    """Why this machine cannot run these tests, or None."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no {SYSTEM_PYTHON}"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode != 0 and os.getuid() != 0:
        return f"{SYSTEM_PYTHON} has no venv/ensurepip and apt-get needs root"
    return None


def readme_section_commands(readme: str, heading: str) -> List[str]:
    """The commands of the first C{sh} block after C{heading}: continuation lines joined, comments dropped."""
    start = readme.index(heading)
    block = re.search(r"```sh\n(.*?)```", readme[start:], re.S)
    assert block is not None, f"no sh block after {heading!r}"
    commands: List[str] = []
    pending = ""
    for line in block.group(1).splitlines():
        text = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not text and not pending:
            continue
        pending += " " + text.strip() if pending else text.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            commands.append(pending)
            pending = ""
    return commands


def _one(commands: List[str], pattern: str) -> str:
    found = [c for c in commands if re.search(pattern, c)]
    assert len(found) == 1, f"expected one README command matching {pattern!r}, found {found}"
    return found[0]


class FreshMachineTests(unittest.TestCase):
    """The README's quick start and walk-through in a fresh virtual environment."""

    def setUp(self) -> None:
        reason = _can_make_venv()
        if reason:
            raise unittest.SkipTest(reason)
        self.h = Harness(self)
        self.checkout = os.path.join(self.h.root, "tunnelkit")
        shutil.copytree(REPOSITORY_TOP, self.checkout, ignore=_NOT_COPIED)
        with open(os.path.join(REPOSITORY_TOP, "README.md"), encoding="utf-8") as f:
            self.readme = f.read()
        self.venv_bin = os.path.join(self.checkout, ".venv", "bin")

    def environment(self, **extra: str) -> Dict[str, str]:
        """A fresh user's environment: the distribution's PATH (after .venv/bin), no Python settings."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYENV", "AWSIOT_TUNNEL_", "TUNNELKIT_"))
               and k.lower() != "https_proxy"}
        env["PATH"] = f"{self.venv_bin}:{SYSTEM_PATH}"
        env["PYTHONPATH"] = ""  # the harness adds the checkout: here the installed copy must run
        env.update(extra)
        return env

    def shell(self, command: str, cwd: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=cwd, env=self.environment(**env),
                              capture_output=True, text=True, timeout=timeout)

    def install(self) -> None:
        """The quick start's first half, as written; the distribution's Python stays as it was."""
        quick = readme_section_commands(self.readme, "## Quick start")
        line = _one(quick, r"tools/install\.sh")
        install, _, run = line.partition(" && ")
        self.assertEqual(install, "bash tools/install.sh")
        self.assertEqual(run, ".venv/bin/twistd -n tunnelkit --mode service")
        self.assertIn("```sh\nbash tools/test.sh\n```", self.readme)
        before = subprocess.run([SYSTEM_PYTHON, "-m", "pip", "list"], capture_output=True, text=True).stdout
        done = self.shell(install, self.checkout, timeout=INSTALL_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        with open(os.path.join(self.checkout, ".venv", "pyvenv.cfg")) as f:
            self.assertIn("home = /usr/bin", f.read())
        after = subprocess.run([SYSTEM_PYTHON, "-m", "pip", "list"], capture_output=True, text=True).stdout
        self.assertEqual(before, after, "tools/install.sh changed the distribution's Python")

    def test_readme_commands_side_by_side(self) -> None:
        """
        Quick start, then the walk-through's commands and the agent, all in one directory: each runs
        (no "Another twistd server is running"), ssh gets through, close-tunnel ends both proxies
        with status 0.
        """
        self.install()
        work = self.checkout  # the README's commands run in the checkout, where the quick start left .venv
        commands = readme_section_commands(self.readme, "## Using it")
        service_command = _one(commands, r"--mode service")
        self.assertIn("--listen ssl:8443:interface=127.0.0.1", service_command)
        service = self.h.spawn("service", ["bash", "-c", service_command.replace("ssl:8443:", "ssl:0:")], work,
                               self.environment())
        port = int(service.wait_for_log(r"API listening on https://127\.0\.0\.1:(\d+)/", 60).group(1))

        def run(command: str) -> str:
            command = command.replace("8443", str(port))
            done = self.shell(command, work, TUNNELKIT_ENDPOINT_URL=f"https://127.0.0.1:{port}")
            self.assertEqual(done.returncode, 0, f"{command}\n{done.stdout}{done.stderr}")
            return done.stdout

        example = self.shell("tunnelkit example-config", work)  # the installed copy of tap.yml
        with open(os.path.join(self.checkout, "tunnelkit", "tap.yml"), encoding="utf-8") as f:
            self.assertEqual(example.stdout, f.read())
        self.assertEqual(self.shell("tunnelkit-localproxy --help", work).returncode, 0)

        opened = run(_one(commands, r"^tunnelkit open-tunnel"))
        tunnel_id = re.search(r'"tunnelId": "([^"]+)"', opened)
        self.assertIsNotNone(tunnel_id, opened)

        sshd = self.h.start_sshd()
        destination_command = _one(commands, r"--mode destination").replace("8443", str(port))
        self.assertIn("-d SSH1=22", destination_command)
        destination = self.h.spawn(
            "destination", ["bash", "-c", destination_command.replace("-d SSH1=22", f"-d SSH1={sshd.port}")],
            work, self.environment())
        source_command = _one(commands, r"--mode source").replace("8443", str(port))
        self.assertIn("-s SSH1=5555", source_command)
        source = self.h.spawn("source", ["bash", "-c", source_command.replace("-s SSH1=5555", "-s SSH1=0")],
                              work, self.environment())
        listening = source.wait_for_log(r"Listening for new connection on port (\d+)", 60)
        destination.wait_for_log(r"Successfully established websocket connection", 60)
        source.wait_for_log(r"The tunnel is ready", 60)

        agent_command = _one(readme_section_commands(self.readme, "### Token delivery"), r"--mode agent")
        mqtt_port = self.h.start_echo("not-a-broker")  # the agent keeps retrying: it just has to run
        agent = self.h.spawn(
            "agent", ["bash", "-c", agent_command.replace("8443", str(port)).replace("port=1883", f"port={mqtt_port}")],
            work, self.environment())
        agent.wait_for_log(r"Running tunnelkit agent", 60)

        self.assertIn("ssh -p 5555 user@localhost", commands)
        out = sshd.run("echo through-the-tunnel", port=int(listening.group(1)))
        self.assertEqual(out.stdout.strip(), b"through-the-tunnel", out.stderr)
        for process in (service, destination, source, agent):
            self.assertTrue(process.running(), f"{process.name} stopped:\n{process.tail()}")
            self.assertNotIn("Another twistd server is running", process.log())
            self.assertNotIn("Starting factory", process.log())  # twistd's noise, at the default -v
            self.assertNotIn("#debug]", process.log())
        self.assertFalse([name for name in os.listdir(work) if name.endswith(".pid")])

        close = _one(commands, r"^tunnelkit close-tunnel")
        run(close.replace("<id>", tunnel_id.group(1)).replace(" [--delete]", ""))
        self.assertEqual(source.wait_exit(30), 0, source.tail())
        self.assertEqual(destination.wait_exit(30), 0, destination.tail())

    def test_device_install(self) -> None:
        """C{tools/install.sh --device}: the local proxy and the agent, without the service's libraries."""
        done = self.shell("bash tools/install.sh --device", self.checkout, timeout=INSTALL_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        for module in ("botocore", "prometheus_client"):
            self.assertNotEqual(self.shell(f".venv/bin/python -c 'import {module}'", self.checkout).returncode, 0)
        for mode in ("source", "destination", "agent"):
            shown = self.shell(f".venv/bin/twistd -n tunnelkit --mode {mode} --help", self.checkout)
            self.assertEqual(shown.returncode, 0, shown.stdout + shown.stderr)
        service = self.shell(".venv/bin/twistd -n tunnelkit --mode service", self.checkout)
        self.assertEqual(service.returncode, 1)
        self.assertIn('install "tunnelkit[service]"', service.stderr)

    def test_editable_install_finds_the_plugin(self) -> None:
        """C{pip install -e .}: twistd lists the tunnelkit plugin, and it runs the checkout's files."""
        self.install()
        pip = self.shell(".venv/bin/python -m pip install -q -e .", self.checkout, timeout=INSTALL_TIMEOUT)
        self.assertEqual(pip.returncode, 0, pip.stdout + pip.stderr)
        elsewhere = self.h.directory("elsewhere")
        shown = self.shell(f"{self.venv_bin}/twistd tunnelkit --help", elsewhere)
        self.assertEqual(shown.returncode, 0, shown.stdout + shown.stderr)
        self.assertIn("tunnelkit --mode MODE", shown.stdout)
        where = self.shell(f"{self.venv_bin}/python -c 'import tunnelkit; print(tunnelkit.__file__)'", elsewhere)
        self.assertEqual(where.stdout.strip(), os.path.join(self.checkout, "tunnelkit", "__init__.py"))
