"""Result cache on PostgreSQL, in the session store's schema, through a small asyncpg pool.

One table, ``result_cache``, UNLOGGED (a cache needs no write-ahead log: cheaper writes, not
on standbys, emptied after a crash). Every call is one statement: a lookup is one primary-key
read (the expiry checked in it), a store one upsert, a sweep deletes a batch of expired rows
(``FOR UPDATE SKIP LOCKED``: replicas sweeping at once share the work). Lookups and stores are
idempotent, so a call whose connection died is retried once on a fresh one.

The package: ``store.py`` (``PostgresResultCache``), ``statements.py`` (every statement it
sends), ``schema.py`` loading ``migrations/NNNN_*.sql`` (recorded in
``result_cache_schema_version``, under the schema's migration lock like every other table).
"""

from agentd.server.cache.postgres.schema import LATEST_VERSION, MIGRATIONS
from agentd.server.cache.postgres.store import PostgresResultCache

__all__ = ["LATEST_VERSION", "MIGRATIONS", "PostgresResultCache"]
