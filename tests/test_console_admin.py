"""
C{tunnelkit admin create-user|list-users|reset-password|delete-user} (L{tunnelkit.service.console.admin}).
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.trial.unittest import TestCase

from tests.test_cli import run
from tunnelkit.service.console.users import open_console_database
from tunnelkit.service.dbrunner import Blocking
from tunnelkit.service.store_sqlite import open_store


class UserCommandTests(TestCase):
    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        os.makedirs(self.state)
        store = Blocking(open_store(self.state))
        self.account = store.create_account("default", "123456789012", 1.0)
        store.close()

    def admin(self, *args: str, stdin: str = ""):
        self.patch(sys, "stdin", io.StringIO(stdin))
        return run("admin", *args, "--state-dir", self.state)

    def check(self, name: str, password: str) -> bool:
        db = Blocking(open_console_database(self.state))
        try:
            return db.check_password("123456789012", name, password) is not None
        finally:
            db.close()

    def test_user_lifecycle(self) -> None:
        status, out, err = self.admin("create-user", "default", "alice", stdin="first-password\n")
        self.assertEqual(status, 0, err)
        self.assertEqual(json.loads(out)["User"]["UserName"], "alice")
        self.assertNotIn("first-password", out)
        self.assertTrue(self.check("alice", "first-password"))
        status, out, err = self.admin("create-user", "123456789012", "alice", stdin="other-password\n")
        self.assertEqual(status, 1)
        self.assertIn("already", err)
        status, out, _ = self.admin("list-users")
        self.assertEqual([u["UserName"] for u in json.loads(out)["Users"]], ["alice"])
        status, _, err = self.admin("reset-password", "default", "alice", stdin="second-password\n")
        self.assertEqual(status, 0, err)
        self.assertFalse(self.check("alice", "first-password"))
        self.assertTrue(self.check("alice", "second-password"))
        self.assertEqual(self.admin("delete-user", "default", "alice")[0], 0)
        status, _, err = self.admin("delete-user", "default", "alice")
        self.assertEqual(status, 1)
        self.assertIn("no console user named 'alice'", err)

    def test_errors(self) -> None:
        status, _, err = self.admin("create-user", "nobody", "alice", stdin="first-password\n")
        self.assertEqual(status, 1)
        self.assertIn("no account", err)
        status, _, err = self.admin("create-user", "default", "alice", stdin="short\n")
        self.assertEqual(status, 1)
        self.assertIn("at least 8", err)
        status, _, err = self.admin("create-user", "default", "bad name", stdin="long-enough\n")
        self.assertEqual(status, 1)
        self.assertIn("user name", err)
