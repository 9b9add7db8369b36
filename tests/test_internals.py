"""Tests for L{tunnelkit.internals}: the list of dependencies' private internals, checked at start."""

from __future__ import annotations

from twisted.trial import unittest

from tunnelkit.internals import (
    INTERNALS,
    Internal,
    MissingInternals,
    check_internals,
    missing_internals,
    parse_endpoint_description,
)


class InternalsTests(unittest.TestCase):
    def test_installed_dependencies_have_every_listed_internal(self) -> None:
        """The versions setup.cfg installs have everything listed: nothing is reported missing."""
        self.assertEqual(missing_internals(), [])
        check_internals()

    def test_missing_required_internal_is_named(self) -> None:
        gone = Internal("twisted.internet.endpoints", "_no_such_parser", "parsing endpoint strings")
        with self.assertRaises(MissingInternals) as caught:
            check_internals((gone,) + INTERNALS)
        text = str(caught.exception)
        self.assertIn("twisted.internet.endpoints._no_such_parser", text)
        self.assertIn("parsing endpoint strings", text)
        self.assertIn("setup.cfg", text)

    def test_missing_module_counts_as_missing(self) -> None:
        self.assertFalse(Internal("tunnelkit_no_such_module", "x", "nothing").present())

    def test_missing_optional_internal_only_warns(self) -> None:
        warnings = []
        optional = Internal("autobahn.websocket.protocol", "WebSocketProtocol._no_such", "the fast path", False)
        check_internals((optional,), warn=warnings.append)
        self.assertEqual(len(warnings), 1)
        self.assertIn("the fast path is off", warnings[0])

    def test_parse_endpoint_description(self) -> None:
        self.assertEqual(
            parse_endpoint_description("tcp:host=127.0.0.1:port=1883"),
            (["tcp"], {"host": "127.0.0.1", "port": "1883"}),
        )


class NoPrivateModulesTests(unittest.SynchronousTestCase):
    """
    No tunnelkit module but the fast path (tunnelkit.transport.fastpath, listed in
    tunnelkit.internals) imports a dependency's private module (a name starting with "_").
    """

    def test_no_private_module_imports(self) -> None:
        import ast
        import pathlib

        top = pathlib.Path(__file__).resolve().parent.parent
        found = []
        for path in [*(top / "tunnelkit").rglob("*.py"), *(top / "services").rglob("*.py")]:
            if "node_modules" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                for name in names:
                    parts = name.split(".")
                    if parts[0] != "tunnelkit" and any(p.startswith("_") and p != "__future__" for p in parts):
                        found.append(f"{path.relative_to(top)}: {name}")
        # the one place for them: the fast path module (its uses are listed in tunnelkit.internals)
        found = [f for f in found if not f.startswith("tunnelkit/transport/fastpath.py:")]
        self.assertEqual(found, [])
