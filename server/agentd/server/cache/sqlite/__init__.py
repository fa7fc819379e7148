"""Result cache on SQLite, in the session store's file (``AGENTD_SQLITE_PATH``).

All database work runs on one dedicated worker thread (``agentd.server.sqlite_worker``),
each call one transaction: a lookup is one indexed read, a store one upsert, a sweep deletes
expired rows in batches (each its own short write transaction, so session writes in the same
file wait for at most one batch).

The package: ``store.py`` (``SqliteResultCache``) and ``schema.py``, loading
``migrations/NNNN_*.sql`` (recorded in ``result_cache_schema_version``).
"""

from agentd.server.cache.sqlite.schema import LATEST_VERSION, MIGRATIONS
from agentd.server.cache.sqlite.store import SqliteResultCache

__all__ = ["LATEST_VERSION", "MIGRATIONS", "SqliteResultCache"]
