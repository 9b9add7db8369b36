"""
Dependencies point one way: protocol <- transport <- (service | localproxy <- agent).  A device
install (no service extra) runs the local proxy and the agent, so they must not load the service.

Two checks: the modules a client really loads (a fresh interpreter imports them), and the import
graph read from the source (every C{import}, those inside functions too, followed transitively),
against the rules in L{RULES}.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, List, Optional, Set, Tuple

from twisted.trial.unittest import SynchronousTestCase, TestCase

import tunnelkit

_PROBE = """
import sys
import tunnelkit.localproxy.tap, tunnelkit.localproxy.aws_command, tunnelkit.agent, tunnelkit.agent.tap
import tunnelkit.protocol.session, tunnelkit.transport.websocket
print(" ".join(sorted(m for m in sys.modules if m.startswith("tunnelkit.service"))))
"""

#: (modules, what they must not import, even through others, why).  A prefix names a package and
#: every module under it.
RULES: List[Tuple[str, str, str]] = [
    ("tunnelkit.protocol", "tunnelkit.transport", "the sans-IO core is below the transports"),
    ("tunnelkit.protocol", "tunnelkit.service", "the protocol core serves both sides"),
    ("tunnelkit.protocol", "tunnelkit.localproxy", "the protocol core serves both sides"),
    ("tunnelkit.transport", "tunnelkit.service", "the transports serve both sides"),
    ("tunnelkit.transport", "tunnelkit.localproxy", "the transports serve both sides"),
    ("tunnelkit.localproxy", "tunnelkit.service", "a device install has no service"),
    ("tunnelkit.localproxy", "tunnelkit.agent", "the agent uses the local proxy, not the other way"),
    ("tunnelkit.agent", "tunnelkit.service", "a device install has no service"),
    ("tunnelkit.agent", "tunnelkit.localproxy.tap", "modes share tunnelkit.localproxy.client_options, not a tap"),
    ("tunnelkit.localproxy.tap", "tunnelkit.agent.tap", "one tap never imports another"),
    ("tunnelkit.localproxy.tap", "tunnelkit.service.tap", "one tap never imports another"),
    ("tunnelkit.agent.tap", "tunnelkit.service.tap", "one tap never imports another"),
    ("tunnelkit.service.tap", "tunnelkit.localproxy.tap", "one tap never imports another"),
    ("tunnelkit.service.tap", "tunnelkit.agent", "the service does not run the agent"),
    ("tunnelkit.service.auth", "tunnelkit.service.operations", "both use tunnelkit.service.errors"),
    ("tunnelkit.service.errors", "tunnelkit.service.", "the API errors depend on no other service module"),
    ("tunnelkit.process", "tunnelkit.service", "the process module serves every mode and depends on none"),
    ("tunnelkit.process", "tunnelkit.localproxy", "the process module serves every mode and depends on none"),
    ("tunnelkit.process", "tunnelkit.agent", "the process module serves every mode and depends on none"),
]


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(tunnelkit.__file__)))


def source_modules() -> Dict[str, str]:
    """Every module of the C{tunnelkit} package: dotted name -> path."""
    top = os.path.dirname(os.path.abspath(tunnelkit.__file__))
    found: Dict[str, str] = {}
    for directory, _, files in os.walk(top):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path[:-3], _root()).replace(os.sep, ".")
                found[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def import_graph(modules: Dict[str, str]) -> Dict[str, Set[str]]:
    """Module -> the C{tunnelkit} modules it imports (anywhere in its source) and its parent packages."""
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        names: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        edges = {name for name in names if name in modules}
        for name in list(edges) + [module]:  # importing a.b.c runs a and a.b first
            parts = name.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts)))
        edges.discard(module)
        graph[module] = edges
    return graph


def _matches(module: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return module.startswith(prefix)
    return module == prefix or module.startswith(prefix + ".")


def forbidden_path(graph: Dict[str, Set[str]], start: str, forbidden: str) -> Optional[List[str]]:
    """The import chain from C{start} to a module under C{forbidden}, or None."""
    seen = {start}  # a module may import its own package's other modules only if the rule allows
    queue: List[List[str]] = [[start]]
    while queue:
        chain = queue.pop(0)
        for name in sorted(graph.get(chain[-1], ())):
            if name in seen:
                continue
            seen.add(name)
            if _matches(name, forbidden):
                return chain + [name]
            queue.append(chain + [name])
    return None


class ClientLayeringTests(TestCase):
    def test_clients_do_not_import_the_service(self) -> None:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "", "client modules load service modules: " + out.stdout)


class ImportRuleTests(SynchronousTestCase):
    def test_rules(self) -> None:
        """No module imports, even through others or inside a function, what L{RULES} forbids it."""
        modules = source_modules()
        graph = import_graph(modules)
        broken = []
        for importers, forbidden, why in RULES:
            starts = [m for m in modules if _matches(m, importers)]
            self.assertTrue(starts, f"rule names no module: {importers}")
            for start in sorted(starts):
                chain = forbidden_path(graph, start, forbidden)
                if chain is not None:
                    broken.append(f"{' -> '.join(chain)} ({why})")
        self.assertEqual(broken, [])

    def test_graph_follows_imports(self) -> None:
        """The graph sees a plain import, a from-import of a module, and parent packages."""
        graph = import_graph(source_modules())
        self.assertIn("tunnelkit.agent.core", graph["tunnelkit.agent.tap"])
        self.assertIn("tunnelkit.agent", graph["tunnelkit.agent.tap"])
        self.assertIn("tunnelkit.service.errors", graph["tunnelkit.service.auth"])
        chain = forbidden_path(graph, "tunnelkit.agent.tap", "tunnelkit.localproxy.session_service")
        self.assertIsNotNone(chain)
