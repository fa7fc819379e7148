"""Agent store on SQLite, in the session store's file (``AGENTD_SQLITE_PATH``).

All database work runs on one dedicated worker thread (``agentd.server.sqlite_worker``):
each public method is one synchronous function run there inside its own transaction,
so it is atomic, and writes take the file's write lock up front (``BEGIN IMMEDIATE``).
That lock also serialises writers of other store objects and processes on the same file
(replicas on one host), so version numbers and the store-wide revision are assigned one
writer at a time: never twice, never with a gap.

The package: ``store.py`` (``SqliteAgentStore``) and ``schema.py``, loading
``migrations/NNNN_*.sql`` (recorded in ``agent_schema_version``).
"""

from agentd.server.agents.store.sqlite.schema import LATEST_VERSION, MIGRATIONS
from agentd.server.agents.store.sqlite.store import SqliteAgentStore

__all__ = ["LATEST_VERSION", "MIGRATIONS", "SqliteAgentStore"]
