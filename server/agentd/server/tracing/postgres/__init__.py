"""Ended traces in Postgres: the session store's database and schema, shared by every replica.

Its own small pool and its own migration list (recorded in ``trace_schema_version``),
applied under the same advisory lock as the session store's migrations, so replicas
starting together (and the session store's migrations) never collide.

The package: ``archive.py`` (``PostgresTraceArchive``) and ``schema.py``, loading
``migrations/NNNN_*.sql``.
"""

from agentd.server.tracing.postgres.archive import PostgresTraceArchive
from agentd.server.tracing.postgres.schema import LATEST_VERSION, MIGRATIONS

__all__ = ["LATEST_VERSION", "MIGRATIONS", "PostgresTraceArchive"]
