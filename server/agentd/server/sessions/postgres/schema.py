"""The session tables' schema, ``migrations/NNNN_*.sql``, and the error codes its functions
raise.

``migrate`` runs each migration with ``search_path`` set to the store's schema, inside the
same transaction as its ``schema_version`` row, so names are unqualified in them.
"""

from __future__ import annotations

from agentd.server.migrations import load_migrations

__all__ = ["EXISTS", "LATEST_VERSION", "MIGRATIONS", "NOT_FOUND"]

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released file; add one.
MIGRATIONS: tuple[str, ...] = load_migrations(__package__)
LATEST_VERSION = len(MIGRATIONS)

# Raised by the functions; translated to SessionNotFoundError / SessionExistsError.
NOT_FOUND = "AG404"
EXISTS = "AG409"
