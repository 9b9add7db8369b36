"""
Console users and remembered host keys in the service's database (L{tunnelkit.service.console.users}).
"""

from __future__ import annotations

import os
from typing import Any
import sqlite3

from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tunnelkit.service.console import users
from tunnelkit.service.dbrunner import Blocking
from tunnelkit.service.store_sqlite import open_store


class UserTests(TestCase):
    def setUp(self) -> None:
        self.state = self.mktemp()
        os.makedirs(self.state)
        self.store = open_store(self.state)  # the control plane's tables in the same file
        self.addCleanup(self.store.close)
        self.db: Any = Blocking(users.open_console_database(self.state))
        self.addCleanup(self.db.close)

    def test_interface(self) -> None:
        verifyObject(users.IConsoleUsers, self.db.store)

    def test_create_check_reset_delete(self) -> None:
        created = self.db.create_user("111111111111", "alice", "password-1", 10.0)
        self.assertEqual(created.name, "alice")
        self.assertEqual(self.db.check_password("111111111111", "alice", "password-1"), created)
        self.assertIsNone(self.db.check_password("111111111111", "alice", "password-2"))
        self.assertIsNone(self.db.check_password("222222222222", "alice", "password-1"))  # another account
        self.assertIsNone(self.db.check_password("111111111111", "bob", "password-1"))
        self.assertRaises(users.UserExists, self.db.create_user, "111111111111", "alice", "password-9", 11.0)
        self.db.create_user("222222222222", "alice", "password-3", 12.0)  # same name, other account
        self.db.set_password("111111111111", "alice", "password-4", 13.0)
        self.assertIsNone(self.db.check_password("111111111111", "alice", "password-1"))
        self.assertIsNotNone(self.db.check_password("111111111111", "alice", "password-4"))
        self.assertEqual([u.account_id for u in self.db.list_users()], ["111111111111", "222222222222"])
        self.assertEqual(len(self.db.list_users("222222222222")), 1)
        self.assertTrue(self.db.still_valid("111111111111", "alice", 13.0))
        self.assertFalse(self.db.still_valid("111111111111", "alice", 12.5))  # signed in before the reset
        self.db.delete_user("111111111111", "alice")
        self.assertFalse(self.db.still_valid("111111111111", "alice", 20.0))
        self.assertRaises(users.NoSuchUser, self.db.delete_user, "111111111111", "alice")
        self.assertRaises(users.NoSuchUser, self.db.set_password, "111111111111", "alice", "password-5", 1.0)

    def test_password_is_hashed(self) -> None:
        self.db.create_user("111111111111", "alice", "very-secret-password", 1.0)
        with open(os.path.join(self.state, users.DATABASE_NAME), "rb") as f:
            self.assertNotIn(b"very-secret-password", f.read())
        digest = self.db.password_hash("111111111111", "alice")
        self.assertTrue(digest.startswith("$argon2id$"))
        self.assertTrue(users.password_matches(digest, "very-secret-password"))
        self.assertFalse(users.password_matches("not a hash", "x"))

    def test_bad_names_and_passwords(self) -> None:
        self.assertRaises(users.UserError, self.db.create_user, "1", "a b", "password-1", 1.0)
        self.assertRaises(users.UserError, self.db.create_user, "1", "", "password-1", 1.0)
        self.assertRaises(users.UserError, self.db.create_user, "1", "alice", "short", 1.0)

    def test_host_keys(self) -> None:
        self.assertIsNone(self.db.get_host_key("1", "thing1"))
        self.db.remember_host_key("1", "thing1", "ssh-ed25519", "SHA256:abc", 5.0)
        self.assertEqual(self.db.get_host_key("1", "thing1"), users.HostKey("thing1", "ssh-ed25519", "SHA256:abc", 5.0))
        self.assertIsNone(self.db.get_host_key("2", "thing1"))
        self.db.remember_host_key("1", "thing1", "ssh-rsa", "SHA256:def", 6.0)
        self.assertEqual(self.db.get_host_key("1", "thing1").fingerprint, "SHA256:def")
        self.assertTrue(self.db.forget_host_key("1", "thing1"))
        self.assertFalse(self.db.forget_host_key("1", "thing1"))

    def test_migration_is_versioned(self) -> None:
        self.assertEqual(self.db.schema_version, len(users.MIGRATIONS))
        self.db.create_user("1", "alice", "password-1", 1.0)
        again = Blocking(users.open_console_database(self.state))  # applies nothing twice, keeps the rows
        self.addCleanup(again.close)
        self.assertEqual(len(again.list_users()), 1)
        connection = sqlite3.connect(os.path.join(self.state, users.DATABASE_NAME))
        connection.execute("UPDATE console_schema SET version = 99")
        connection.commit()
        connection.close()
        error = self.assertRaises(Exception, users.open_console_database, self.state)
        self.assertIn("upgrade tunnelkit", str(error))
