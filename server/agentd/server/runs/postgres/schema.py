"""The run tables' schema, ``migrations/NNNN_*.sql``, and what Python must know of it:
the error codes its functions raise and the names of its NOTIFY channels.

The migrations have their own version table, ``run_schema_version``. Each runs with
``search_path`` set to the schema, in the transaction that records it there, so names
are unqualified in them; functions pin that path (``SET search_path FROM CURRENT``),
so current_schema() is the store's.
"""

from __future__ import annotations

import hashlib

from agentd.server.migrations import load_migrations

__all__ = [
    "LATEST_VERSION",
    "LEASE_LOST",
    "MIGRATIONS",
    "QUEUE_FULL",
    "RUN_EXISTS",
    "SEQUENCE_GAP",
    "SESSION_BUSY",
    "TENANT_LIMIT",
    "channel_name",
]

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released file; add one.
MIGRATIONS: tuple[str, ...] = load_migrations(__package__)
LATEST_VERSION = len(MIGRATIONS)

# Raised by the functions (class "AG", like the session store's codes).
LEASE_LOST = "AGR01"
SEQUENCE_GAP = "AGR02"
SESSION_BUSY = "AGR03"
QUEUE_FULL = "AGR04"
RUN_EXISTS = "AGR05"
TENANT_LIMIT = "AGR06"  # DETAIL: 'active', 'queued' or 'rate:<seconds until a token>'


def channel_name(schema: str, kind: str) -> str:
    """The NOTIFY channel of ``kind`` for ``schema``; agrees with agentd_run_channel() in SQL."""
    if len(schema.encode()) + 1 + len(kind.encode()) <= 63:
        return f"{schema}_{kind}"
    return f"agentd_{hashlib.md5(schema.encode()).hexdigest()[:16]}_{kind}"
