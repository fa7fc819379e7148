"""Runs on PostgreSQL: records, event logs, the work queue and leases, shared by every replica.

Every public operation is one round trip: a single statement, or a PL/pgSQL function
(created by the migrations) that checks and writes in one transaction (a refused
progress write takes a second, to say why). Every write waits for the disk
(``synchronous_commit``). Claims take rows with ``FOR UPDATE SKIP LOCKED``, so claimers on any number of
replicas never wait for each other and never take the same run. The session gate (REJECT/ENQUEUE and
the promotion of a session's next run) serialises on a transaction-scoped advisory
lock on the session id, taken before any row lock, so two replicas creating runs for
one session at once (or one creating while another finishes) always agree.

Wake-ups use LISTEN/NOTIFY: the functions notify ``<schema>_run_work`` when a run
becomes claimable and ``<schema>_run_events`` (payload: the run id) when events are
appended. Each store holds one dedicated LISTEN connection (reconnected after failures)
that wakes its local ``claim``/``wait_events`` waiters, which then re-check with a
query; a one-second fallback poll covers a notification lost while reconnecting.

Times are the caller's unix seconds stored as ``double precision``, so they read back
exactly as written. Specs, checkpoints, results and events are the codec's JSON stored
as ``json`` (verbatim, and unlike ``jsonb`` it accepts ``\\u0000``).

The caller's answers are rows of ``run_actions`` (migration 2), one per action key; every
record read returns them as one JSON object, and they are deleted with their run (``ON
DELETE CASCADE``). ``submit_answers`` (migration 6) decides every answer of a call under
the run's row lock and inserts them only when all are taken: a key with a row is a repeat
when its ``ident`` (``records.answer_identity``, the JSON text of the fields that make the
answer what it is: Postgres cannot read fields out of a json value holding ``\\u0000``)
equals the answer's, else the call is refused; a new key is taken when the run is active
and its checkpoint's ``awaiting`` holds it. Rows without an ident (written by
``submit_action``, the bare ``ON CONFLICT DO NOTHING`` insert, or by a replica before
migration 6) compare by their whole JSON text.

Per-tenant limits (migration 3): ``runs.tenant`` is a column generated from the spec's
principal, so every row has it whoever inserted it; partial indexes count a tenant's
unfinished and claimable runs. ``agentd_run_create`` takes the limits: after the session
gate it takes a transaction-scoped advisory lock on the tenant (after the session's,
before any row lock), counts, and takes a token from the tenant's row of
``run_tenant_buckets`` only once the run is inserted; a refusal (``AGR06``) rolls back
everything. ``sweep`` also deletes buckets full again. The version-1 signature stays, as
the same function with no limits, for older replicas during an upgrade.

The migrations have their own version table (``run_schema_version``) in the session
store's schema and run under the same advisory lock as every other migration there.

The package: ``store.py`` (``PostgresRunStore``), ``bus.py`` (``PostgresControlBus``),
``build.py`` (both, from the settings); ``schema.py`` loads the migrations,
``migrations/NNNN_*.sql`` (tables and functions), and names what they define for
Python (error codes, NOTIFY channels); ``statements.py`` holds the statements the store
sends and reads their rows; ``listen.py`` the LISTEN connection and the wake-ups it
drives. The connection settings, error mapping and pool lifecycle the store and the bus
share with the other Postgres engines are ``postgres_common``'s (``PostgresConnector``,
``PostgresEngine``).
"""

from agentd.server.runs.postgres.build import build_postgres_runs
from agentd.server.runs.postgres.bus import PostgresControlBus
from agentd.server.runs.postgres.schema import LATEST_VERSION, MIGRATIONS, channel_name
from agentd.server.runs.postgres.store import PostgresRunStore

__all__ = [
    "MIGRATIONS",
    "LATEST_VERSION",
    "PostgresRunStore",
    "PostgresControlBus",
    "build_postgres_runs",
    "channel_name",
]
