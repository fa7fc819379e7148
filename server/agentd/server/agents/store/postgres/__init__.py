"""Agent store on PostgreSQL, in the session store's schema, through an asyncpg pool.

Every public method is one statement: one round trip, one transaction, one snapshot.
The writes are PL/pgSQL functions created by the migrations; each starts by bumping the
store-wide revision (``agent_revision``, one row), whose row lock serialises every agent
write of the schema on every replica. So versions are assigned one writer at a time
(never twice, never with a gap), revisions are consecutive, and a reader that sees
revision N sees all writes up to N together with their change-log entries. Agent writes
are rare (people and deploy tools make them), so one lock costs nothing that matters.

Times are the caller's ``time.time()`` stored as ``double precision`` (they read back
exactly). Definitions and alias routes are ``json`` kept verbatim: the store sends ASCII
JSON, which ``json`` takes whatever it holds (``\\u0000`` too, unlike ``jsonb``).

The migrations have their own version table (``agent_schema_version``) in the session
store's schema and run under the same advisory lock as every other migration there.

The package: ``store.py`` (``PostgresAgentStore``), ``statements.py`` (every statement it
sends), ``schema.py`` loading ``migrations/NNNN_*.sql`` (the tables and functions) and
naming the error codes the functions raise.
"""

from agentd.server.agents.store.postgres.schema import LATEST_VERSION, MIGRATIONS
from agentd.server.agents.store.postgres.store import PostgresAgentStore

__all__ = ["LATEST_VERSION", "MIGRATIONS", "PostgresAgentStore"]
