# -*- test-case-name: tests.test_store -*-
"""
The control plane's store: tunnels, tokens, tags, accounts and access keys.

L{IControlStore} extends the data plane's L{ITunnelStore}; the API code (L{tunnelkit.service.operations},
L{tunnelkit.service.auth}) uses only this interface.  L{tunnelkit.service.store_sqlite} is the default
implementation, L{tunnelkit.service.store_postgres} the one several service nodes share; both are the
queries of L{tunnelkit.service.store_sql}.  C{--store} chooses (L{tunnelkit.service.stores}).

Every method but C{close} returns a L{Deferred} of the result documented here (or fails with the
exception documented), fired once the change is durable: no database call blocks the reactor
(L{tunnelkit.service.dbrunner}).  On a L{SynchronousRunner} the Deferred has fired on return, and
L{tunnelkit.service.dbrunner.Blocking} gives synchronous code (the admin commands, tests) the results.
Account isolation is part of the contract: every tunnel method takes the caller's account id and never
sees another account's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred

from tunnelkit.errors import TunnelkitError
from tunnelkit.service.interfaces import ITunnelStore

OPEN = "OPEN"
CLOSED = "CLOSED"
CONNECTED = "CONNECTED"
DISCONNECTED = "DISCONNECTED"


class StoreError(TunnelkitError):
    """The store cannot do what was asked (the message says why)."""


class NoSuchAccount(StoreError):
    """An account named by an operator command does not exist."""


class NoSuchKey(StoreError):
    """An access key named by an operator command does not exist."""


class AccountExists(StoreError):
    """An account with that name or id exists already."""


@dataclass(frozen=True)
class Account:
    """A tenant: owns access keys and tunnels; C{account_id} is the 12 digits in ARNs."""

    account_id: str
    name: str
    created_at: float


@dataclass(frozen=True)
class AccessKey:
    """An API credential.  C{secret_access_key} is needed to verify SigV4 signatures."""

    access_key_id: str
    account_id: str
    secret_access_key: str
    created_at: float
    revoked_at: Optional[float] = None


@dataclass(frozen=True)
class ConnectionState:
    """One side's state as DescribeTunnel shows it."""

    status: str  # CONNECTED | DISCONNECTED
    last_updated_at: float


@dataclass(frozen=True)
class Tunnel:
    """A tunnel as stored (no tokens: only their hashes are kept, in a separate table)."""

    tunnel_id: str
    account_id: str
    status: str
    description: Optional[str]
    thing_name: Optional[str]
    services: Optional[Tuple[str, ...]]  # None: opened without destinationConfig
    max_lifetime_minutes: int
    created_at: float
    last_updated_at: float
    expires_at: float
    closed_at: Optional[float]
    source: ConnectionState
    destination: ConnectionState
    tags: Tuple[Tuple[str, str], ...] = field(default=())


@dataclass(frozen=True)
class NewTunnel:
    """What OpenTunnel asks the store to create (tokens are given as hashes)."""

    tunnel_id: str
    account_id: str
    description: Optional[str]
    thing_name: Optional[str]
    services: Optional[Tuple[str, ...]]
    max_lifetime_minutes: int
    tags: Tuple[Tuple[str, str], ...]
    source_token_hash: str
    destination_token_hash: str
    created_at: float


class IControlStore(ITunnelStore):
    """Everything the control plane stores."""

    # --- accounts and keys ---

    def create_account(name: str, account_id: str, now: float) -> "Deferred[Account]":
        """Create an account. @raise AccountExists: if the name or id is taken."""

    def get_account(name_or_id: str) -> "Deferred[Account]":
        """The account with this name or id. @raise NoSuchAccount: if none."""

    def list_accounts() -> "Deferred[List[Account]]":
        """Every account, oldest first."""

    def add_access_key(key: AccessKey) -> "Deferred[None]":
        """Store a new access key of an existing account."""

    def revoke_access_key(access_key_id: str, now: float) -> "Deferred[AccessKey]":
        """Revoke a key (kept for the record, never accepted again). @raise NoSuchKey: if unknown."""

    def get_access_key(access_key_id: str) -> "Deferred[Optional[AccessKey]]":
        """The key with this id, revoked or not, or None."""

    def list_access_keys() -> "Deferred[List[AccessKey]]":
        """Every key, oldest first."""

    # --- tunnels ---

    def count_open_tunnels(account_id: str) -> "Deferred[int]":
        """How many OPEN tunnels C{account_id} has."""

    def create_tunnel(new: NewTunnel, max_open: Optional[int]) -> "Deferred[bool]":
        """
        Insert an OPEN tunnel and its two token hashes, atomically checking the quota: returns False
        (creating nothing) when C{account_id} already has C{max_open} OPEN tunnels.
        """

    def get_tunnel(account_id: str, tunnel_id: str) -> "Deferred[Optional[Tunnel]]":
        """The tunnel, with its tags, or None (also for another account's tunnel)."""

    def list_tunnels(
        account_id: str, thing_name: Optional[str], limit: int, after: Optional[int]
    ) -> "Deferred[Tuple[List[Tunnel], Optional[int]]]":
        """
        A page of tunnels, newest first (without tags).  C{after} is the cursor a previous page
        returned; the returned cursor is None on the last page.
        """

    def close_tunnel(account_id: str, tunnel_id: str, now: float) -> "Deferred[Optional[bool]]":
        """
        Mark the tunnel CLOSED.  Returns True if it was OPEN, False if already CLOSED, None if no such
        tunnel (for this account).
        """

    def delete_tunnel(account_id: str, tunnel_id: str) -> "Deferred[bool]":
        """Purge the tunnel, its tokens and tags at once.  False if there was no such tunnel."""

    def rotate_tokens(
        account_id: str,
        tunnel_id: str,
        new_hashes: Sequence[Tuple[str, str]],
        destination: Optional[Tuple[Optional[str], Tuple[str, ...]]],
        now: float,
    ) -> "Deferred[Optional[Tunnel]]":
        """
        Revoke the current token of each side in C{new_hashes} (pairs of side and new token hash) and
        record the new ones; with C{destination} (thing name, services) also record the tunnel's
        destination config (the control plane only gives one whose services are the tunnel's, or
        for a tunnel opened without one).  Returns the tunnel, or None if no OPEN tunnel has this id.
        """

    def tag_tunnel(account_id: str, tunnel_id: str, tags: Sequence[Tuple[str, str]], now: float) -> "Deferred[bool]":
        """Add or overwrite tags.  False if no such tunnel."""

    def untag_tunnel(account_id: str, tunnel_id: str, keys: Sequence[str], now: float) -> "Deferred[bool]":
        """Remove tags (absent keys are ignored).  False if no such tunnel."""

    def reset_connection_states(now: float) -> "Deferred[int]":
        """
        At start-up: mark every side DISCONNECTED, since no WebSocket survives a restart (a store shared
        by several service nodes would scope this to the node's own peers).  Returns how many changed.
        """

    # --- lifecycle ---

    def open_deadlines() -> "Deferred[List[Tuple[str, float]]]":
        """(tunnel id, expires_at) of every OPEN tunnel, in any account."""

    def expire_due(now: float) -> "Deferred[List[str]]":
        """Mark CLOSED every OPEN tunnel whose lifetime has ended; return their ids."""

    def purge_closed(closed_before: float) -> "Deferred[int]":
        """Delete every CLOSED tunnel closed before C{closed_before}; return how many."""

    def close() -> None:
        """Release the database."""
