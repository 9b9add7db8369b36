# -*- test-case-name: tests.test_cluster_postgres -*-
"""The cluster directory and event carrier on the service's PostgreSQL database."""

from __future__ import annotations

from typing import Any, Tuple

from tunnelkit.errors import ConfigError


def backends_for_store(store: Any, reactor: Any) -> Tuple[Any, Any]:
    """The directory and carrier for C{store}'s database."""
    raise ConfigError(
        "--cluster-listen needs the nodes to share one PostgreSQL store (--store postgresql://...); "
        "this store is a local file"
    )
