"""The session tables' schema, ``migrations/NNNN_*.sql``.

Each migration runs inside the same transaction as its ``schema_version`` row, one
statement at a time: split on ";", so no ";" in comments.
"""

from __future__ import annotations

from agentd.server.migrations import load_migrations

__all__ = ["LATEST_VERSION", "MIGRATIONS"]

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released file; add one.
MIGRATIONS: tuple[str, ...] = load_migrations(__package__)
LATEST_VERSION = len(MIGRATIONS)
