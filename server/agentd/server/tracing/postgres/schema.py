"""The trace tables' schema, ``migrations/NNNN_*.sql``.

Each migration runs with ``search_path`` set to the schema, inside the same transaction as
its ``trace_schema_version`` row, so names are unqualified in them.
"""

from __future__ import annotations

from agentd.server.migrations import load_migrations

__all__ = ["LATEST_VERSION", "MIGRATIONS"]

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released file; add one.
MIGRATIONS: tuple[str, ...] = load_migrations(__package__)
LATEST_VERSION = len(MIGRATIONS)
