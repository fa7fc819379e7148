"""Ended traces in their own SQLite file (by default next to the session database).

Like the SQLite session store, all database work runs on one dedicated worker thread,
each public method being one transaction there: the event loop never blocks on disk.

The package: ``archive.py`` (``SqliteTraceArchive``) and ``schema.py``, loading
``migrations/NNNN_*.sql``.
"""

from agentd.server.tracing.sqlite.archive import SqliteTraceArchive
from agentd.server.tracing.sqlite.schema import LATEST_VERSION, MIGRATIONS

__all__ = ["LATEST_VERSION", "MIGRATIONS", "SqliteTraceArchive"]
