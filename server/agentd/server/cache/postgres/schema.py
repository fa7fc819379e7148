"""The result cache table's schema, ``migrations/NNNN_*.sql``.

Its own version table, ``result_cache_schema_version``, in the session store's schema; the
migrations run under the same advisory lock as every other migration there
(``postgres_common.apply_migrations``), with ``search_path`` set to the schema.
"""

from __future__ import annotations

from agentd.server.migrations import load_migrations

__all__ = ["LATEST_VERSION", "MIGRATIONS", "VERSION_TABLE"]

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released file; add one.
MIGRATIONS: tuple[str, ...] = load_migrations(__package__)
LATEST_VERSION = len(MIGRATIONS)
VERSION_TABLE = "result_cache_schema_version"
