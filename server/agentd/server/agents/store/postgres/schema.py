"""The agent tables' schema, ``migrations/NNNN_*.sql``, and the error codes its functions raise.

The migrations have their own version table, ``agent_schema_version``, in the session
store's schema, and run under the same advisory lock as every other migration there
(``postgres_common.apply_migrations``). Each runs with ``search_path`` set to the schema,
in the transaction that records it, so names are unqualified in them; the functions pin
that path (``SET search_path FROM CURRENT``).
"""

from __future__ import annotations

from agentd.server.migrations import load_migrations

__all__ = [
    "AGENT_EXISTS", "AGENT_NOT_FOUND", "ALIAS_NOT_FOUND", "LATEST_VERSION", "MIGRATIONS", "VERSION_CONFLICT",
    "VERSION_NOT_FOUND", "VERSION_TABLE",
]

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released file; add one.
MIGRATIONS: tuple[str, ...] = load_migrations(__package__)
LATEST_VERSION = len(MIGRATIONS)
VERSION_TABLE = "agent_schema_version"

# Raised by the functions (class "AG", like the session and run stores' codes).
AGENT_NOT_FOUND = "AGA01"
AGENT_EXISTS = "AGA02"
VERSION_NOT_FOUND = "AGA03"  # DETAIL: the version
VERSION_CONFLICT = "AGA04"  # DETAIL: the latest version
ALIAS_NOT_FOUND = "AGA05"
