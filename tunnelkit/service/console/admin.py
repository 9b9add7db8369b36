# -*- test-case-name: tests.test_console_admin -*-
"""
C{tunnelkit admin create-user|list-users|reset-password|delete-user}: console users, on the state
directory's database (see L{tunnelkit.service.console.users}); L{tunnelkit.cli} defines their arguments.

The password is asked twice on a terminal, or read from the first line of standard input otherwise
(C{echo "$PW" | tunnelkit admin create-user default alice}); it never appears on the command line.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any, Callable, Dict, Optional, TextIO

def read_password(stdin: TextIO, prompt: Callable[[str], str] = getpass.getpass) -> str:
    """The new password: asked twice on a terminal, else the first line of C{stdin}."""
    from tunnelkit.service.console.users import UserError

    if stdin.isatty():
        first = prompt("New console password: ")
        if first != prompt("Again: "):
            raise UserError("the two passwords differ")
        return first
    line = stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def run_user_command(
    args: argparse.Namespace, store: Any, state_dir: str, now: float, stdin: Optional[TextIO] = None
) -> Dict[str, Any]:
    """Run one console-user command; the JSON result to print. Raises StoreError subclasses."""
    from tunnelkit.service.console.users import open_console_users
    from tunnelkit.service.dbrunner import Blocking

    stdin = stdin if stdin is not None else sys.stdin
    if not isinstance(store, Blocking):
        store = Blocking(store)
    real = store.store
    database = open_console_users(real, state_dir)
    users: Any = Blocking(database)
    try:
        if args.admin_command == "list-users":
            account_id = store.get_account(args.account).account_id if args.account else None
            names = {a.account_id: a.name for a in store.list_accounts()}
            return {
                "Users": [
                    {"AccountId": u.account_id, "AccountName": names.get(u.account_id, ""), "UserName": u.name,
                     "CreateDate": _iso(u.created_at), "PasswordChanged": _iso(u.password_changed_at)}
                    for u in users.list_users(account_id)
                ]
            }
        account = store.get_account(args.account)
        if args.admin_command == "create-user":
            user = users.create_user(account.account_id, args.name, read_password(stdin), now)
        elif args.admin_command == "reset-password":
            user = users.set_password(account.account_id, args.name, read_password(stdin), now)
        else:
            users.delete_user(account.account_id, args.name)
            return {"AccountId": account.account_id, "UserName": args.name, "Status": "Deleted"}
        return {"User": {"AccountId": user.account_id, "AccountName": account.name, "UserName": user.name,
                         "CreateDate": _iso(user.created_at), "PasswordChanged": _iso(user.password_changed_at)}}
    finally:
        database.close()


def _iso(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
