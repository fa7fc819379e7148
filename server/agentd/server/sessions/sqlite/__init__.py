"""Embedded persistent session store on SQLite.

All database work runs on one dedicated worker thread: the event loop never blocks
on disk, and because each public method is one synchronous function executed there
inside its own transaction, every operation is atomic and operations of this store
object are serialised. Other store objects or processes on the same file are kept
consistent by SQLite's locking (WAL, ``BEGIN IMMEDIATE`` for writes, busy timeout).

The package: ``store.py`` (``SqliteSessionStore``) and ``schema.py``, loading
``migrations/NNNN_*.sql``.
"""

from agentd.server.sessions.sqlite.schema import LATEST_VERSION, MIGRATIONS
from agentd.server.sessions.sqlite.store import SqliteSessionStore

__all__ = ["LATEST_VERSION", "MIGRATIONS", "SqliteSessionStore"]
