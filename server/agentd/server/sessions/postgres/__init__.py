"""Shared session store on PostgreSQL, through an asyncpg connection pool.

Several agentd replicas can serve the same sessions: every public method is one
statement, so one round trip and one transaction. The writes that need several steps
(an append with a request id, pop, clear, drop, create, read-and-create) are PL/pgSQL
functions created by the migrations; each starts by locking the session row, which
serialises writers of one session across all replicas and makes sequence numbers
gap-free and unique. An append without a request id is a plain statement whose session
row update takes that lock and numbers the items. A cancelled caller cannot leave
anything half-written: a statement commits or rolls back as a whole.

Every write waits for the disk (``synchronous_commit``) but one: the empty session a
run's history read creates (migration 5), made durable by the next write that waits.

"Now" is the caller's ``time.time()`` passed as a parameter (never the database's
``now()``), so expiry and ordering agree with the other stores and with tests that
control the clock; timestamps returned to callers are always read back from the
database, so two reads of one record are equal despite ``timestamptz`` rounding.

Item payloads are stored as ``json`` (validated, kept verbatim), not ``jsonb``: they are
written once and read whole, never queried inside (``type``/``role`` have columns),
verbatim is cheaper both ways, and ``json`` accepts ``\\u0000``, which ``jsonb`` rejects
and a tool's output may well contain. Metadata and state are ``jsonb``.

Every table and function lives in one schema (``agentd`` by default). All SQL names it
explicitly and the functions pin their ``search_path``, so nothing depends on the
connection's ``search_path`` (which a pooler such as PgBouncer may not carry).

The package: ``store.py`` (``PostgresSessionStore``), ``statements.py`` (every statement
it sends), ``schema.py`` loading ``migrations/NNNN_*.sql`` (the tables and the PL/pgSQL
functions).
"""

from agentd.server.sessions.postgres.schema import LATEST_VERSION, MIGRATIONS
from agentd.server.sessions.postgres.store import PostgresSessionStore

__all__ = ["MIGRATIONS", "LATEST_VERSION", "PostgresSessionStore"]
