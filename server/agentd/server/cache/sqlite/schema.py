"""The result cache table's schema, ``migrations/NNNN_*.sql``.

Its own version table, ``result_cache_schema_version``, in the session store's file. Each
migration runs inside the same transaction as its version row, one statement at a time:
split on ";", so no ";" in comments.
"""

from __future__ import annotations

from agentd.server.migrations import load_migrations

__all__ = ["LATEST_VERSION", "MIGRATIONS", "VERSION_TABLE"]

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released file; add one.
MIGRATIONS: tuple[str, ...] = load_migrations(__package__)
LATEST_VERSION = len(MIGRATIONS)
VERSION_TABLE = "result_cache_schema_version"
