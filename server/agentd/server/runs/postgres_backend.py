"""Runs on PostgreSQL: records, event logs, the work queue and leases, shared by every replica.

Every public operation is one round trip: a single statement, or a PL/pgSQL function
(created by the migrations below) that checks and writes in one transaction. Claims
take rows with ``FOR UPDATE SKIP LOCKED``, so claimers on any number of replicas never
wait for each other and never take the same run. The session gate (REJECT/ENQUEUE and
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

The caller's answers (``submit_action``) are rows of ``run_actions`` (migration 2), one
per action key, inserted ``ON CONFLICT DO NOTHING`` (the first answer wins) by a function
that holds the run's row lock; every record read returns them as one JSON object, and
they are deleted with their run (``ON DELETE CASCADE``).

The migrations have their own version table (``run_schema_version``) in the session
store's schema and run under the same advisory lock as every other migration there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from contextlib import suppress
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import asyncpg

from agentd.server.postgres_common import ErrorText, apply_migrations, check_schema, location, schema_version
from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.codec import (
    decode_action,
    decode_checkpoint,
    decode_event,
    decode_payload,
    decode_spec,
    encode_action,
    encode_checkpoint,
    encode_event,
    encode_payload,
    encode_spec,
)
from agentd.server.runs.records import (
    Control,
    CreatedRun,
    LeaseLostError,
    QueueFullError,
    RenewOutcome,
    RunRecord,
    RunStatus,
    SessionBusyError,
    SessionPolicy,
    terminal_status,
)
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.runtime.events import RunEvent
from agentd.server.runtime.run_loop import RunInput
from agentd.server.settings import Settings

__all__ = [
    "MIGRATIONS",
    "LATEST_VERSION",
    "PostgresRunStore",
    "PostgresControlBus",
    "build_postgres_runs",
    "channel_name",
]

log = logging.getLogger("agentd.runs")

T = TypeVar("T")

# Raised by the functions below (class "AG", like the session store's codes).
_LEASE_LOST = "AGR01"
_SEQUENCE_GAP = "AGR02"
_SESSION_BUSY = "AGR03"
_QUEUE_FULL = "AGR04"
_RUN_EXISTS = "AGR05"

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released entry;
# add a new one. Each runs with ``search_path`` set to the schema, in the transaction
# that records it in ``run_schema_version``, so names are unqualified here; functions
# pin that path (``SET search_path FROM CURRENT``), so current_schema() is the store's.
MIGRATIONS: tuple[str, ...] = (
    # 1: runs, their event logs, and every multi-step operation as a function
    r"""
    -- Creation order across all replicas: the session gate and the queue both follow it.
    CREATE SEQUENCE run_pos;

    CREATE TABLE runs (
        run_id text COLLATE "C" PRIMARY KEY,
        session_id text COLLATE "C",
        request_id text COLLATE "C",  -- NULL without one
        status text NOT NULL
            CHECK (status IN ('queued', 'running', 'requires_action', 'completed', 'failed', 'cancelled')),
        spec json NOT NULL,
        owner text NOT NULL DEFAULT '',  -- RUNNING only
        attempt integer NOT NULL DEFAULT 0,  -- the fencing token
        lease_expires double precision NOT NULL DEFAULT 0,  -- unix seconds; RUNNING only
        last_sequence bigint NOT NULL DEFAULT 0,
        checkpoint json,
        result json,  -- the terminal payload
        cancel_reason text NOT NULL DEFAULT '',
        trace_id text NOT NULL DEFAULT '',
        create_time double precision NOT NULL,
        update_time double precision NOT NULL,
        expire_time double precision,  -- set when the run ends: retention
        claimable boolean NOT NULL DEFAULT false,  -- QUEUED and not behind its session's earlier runs
        pos bigint NOT NULL DEFAULT nextval('run_pos')
    ) WITH (fillfactor = 80);  -- room for HOT updates: every step rewrites the row
    ALTER SEQUENCE run_pos OWNED BY runs.pos;

    CREATE INDEX runs_claimable ON runs (pos) WHERE claimable;
    CREATE INDEX runs_leases ON runs (lease_expires) WHERE status = 'running';
    CREATE INDEX runs_by_session ON runs (session_id, create_time, run_id) WHERE session_id IS NOT NULL;
    CREATE INDEX runs_active_by_session ON runs (session_id, pos)
        WHERE session_id IS NOT NULL AND status IN ('queued', 'running', 'requires_action');
    CREATE UNIQUE INDEX runs_by_request ON runs (request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX runs_by_expiry ON runs (expire_time) WHERE expire_time IS NOT NULL;

    CREATE TABLE run_events (
        run_id text COLLATE "C" NOT NULL,  -- no foreign key: deleted with the run by sweep
        seq bigint NOT NULL,
        data json NOT NULL,  -- the codec's event text
        PRIMARY KEY (run_id, seq)
    );

    -- The NOTIFY channel of a kind ('run_work', 'run_events', 'run_control'); mirrored by
    -- channel_name() in Python. Names over 63 bytes would be refused, so long schemas hash.
    CREATE FUNCTION agentd_run_channel(p_kind text) RETURNS text
    LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
        SELECT CASE WHEN octet_length(current_schema()) + 1 + octet_length(p_kind) <= 63
                    THEN current_schema() || '_' || p_kind
                    ELSE 'agentd_' || left(md5(current_schema()), 16) || '_' || p_kind END
    $$;

    -- Serialises the session gate of one session on every replica, until commit. Always
    -- taken before any row lock, so it cannot take part in a deadlock.
    CREATE FUNCTION agentd_run_lock_session(p_session text) RETURNS void
    LANGUAGE sql SET search_path FROM CURRENT AS $$
        SELECT pg_advisory_xact_lock(hashtextextended('agentd.runs/' || current_schema() || '/' || p_session, 0))
    $$;

    -- Make the session's oldest active run claimable when it is a queued one waiting.
    CREATE FUNCTION agentd_run_promote(p_session text) RETURNS void
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    BEGIN
        UPDATE runs r SET claimable = true
        WHERE r.run_id = (
                SELECT a.run_id FROM runs a
                WHERE a.session_id = p_session AND a.status IN ('queued', 'running', 'requires_action')
                ORDER BY a.pos LIMIT 1)
          AND r.status = 'queued' AND NOT r.claimable;
        IF FOUND THEN
            PERFORM pg_notify(agentd_run_channel('run_work'), '');
        END IF;
    END $$;

    -- create_run: request id, session gate, owner, queue limit, in that order. Returns the
    -- run (spec NULL when created: the caller has it). AGR03 busy (DETAIL: the active run),
    -- AGR04 queue full, AGR05 the run id is taken.
    CREATE FUNCTION agentd_run_create(
        p_run text, p_session text, p_request text, p_spec text, p_reject boolean,
        p_owner text, p_lease_until double precision, p_max_queued integer, p_now double precision
    ) RETURNS TABLE (
        o_created boolean, o_run_id text, o_status text, o_spec json, o_owner text, o_attempt integer,
        o_lease double precision, o_last bigint, o_checkpoint json, o_result json, o_cancel text,
        o_trace text, o_create double precision, o_update double precision
    ) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_found text;
        v_expire double precision;
        v_behind boolean := false;
        v_status text;
        v_claimable boolean;
    BEGIN
        IF p_session IS NOT NULL THEN
            PERFORM agentd_run_lock_session(p_session);
        END IF;
        IF p_request IS NOT NULL THEN
            SELECT r.run_id, r.expire_time INTO v_found, v_expire FROM runs r WHERE r.request_id = p_request;
            IF FOUND THEN
                IF v_expire IS NOT NULL AND v_expire <= p_now THEN
                    -- Past retention: forgotten with its run, as if swept already.
                    DELETE FROM runs r WHERE r.run_id = v_found;
                    DELETE FROM run_events e WHERE e.run_id = v_found;
                ELSE
                    RETURN QUERY
                        SELECT false, r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires,
                               r.last_sequence, r.checkpoint, r.result, r.cancel_reason, r.trace_id,
                               r.create_time, r.update_time
                        FROM runs r WHERE r.run_id = v_found;
                    RETURN;
                END IF;
            END IF;
        END IF;
        IF p_session IS NOT NULL THEN
            SELECT a.run_id INTO v_found FROM runs a
            WHERE a.session_id = p_session AND a.status IN ('queued', 'running', 'requires_action')
            ORDER BY a.pos LIMIT 1;
            IF FOUND THEN
                IF p_reject THEN
                    RAISE EXCEPTION 'session % already has an active run', p_session
                        USING ERRCODE = 'AGR03', DETAIL = v_found;
                END IF;
                v_behind := true;
            END IF;
        END IF;
        IF p_owner IS NOT NULL AND NOT v_behind THEN
            v_status := 'running';
            v_claimable := false;
        ELSE
            v_status := 'queued';
            v_claimable := NOT v_behind;
            IF v_claimable
               AND (SELECT count(*) FROM (SELECT 1 FROM runs q WHERE q.claimable LIMIT p_max_queued) n)
                   >= p_max_queued THEN
                RAISE EXCEPTION '% runs are already queued', p_max_queued USING ERRCODE = 'AGR04';
            END IF;
        END IF;
        RETURN QUERY
            INSERT INTO runs AS r (run_id, session_id, request_id, status, spec, owner, attempt, lease_expires,
                                   claimable, create_time, update_time)
            VALUES (p_run, p_session, p_request, v_status, p_spec::json,
                    CASE WHEN v_status = 'running' THEN p_owner ELSE '' END,
                    CASE WHEN v_status = 'running' THEN 1 ELSE 0 END,
                    CASE WHEN v_status = 'running' THEN p_lease_until ELSE 0 END,
                    v_claimable, p_now, p_now)
            ON CONFLICT DO NOTHING
            RETURNING true, r.run_id, r.status, NULL::json, r.owner, r.attempt, r.lease_expires,
                      r.last_sequence, r.checkpoint, r.result, r.cancel_reason, r.trace_id,
                      r.create_time, r.update_time;
        IF FOUND THEN
            IF v_claimable THEN
                PERFORM pg_notify(agentd_run_channel('run_work'), '');
            END IF;
            RETURN;
        END IF;
        -- Another replica committed a run with this request id meanwhile (this statement
        -- sees it now): that one is the run.
        RETURN QUERY
            SELECT false, r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires,
                   r.last_sequence, r.checkpoint, r.result, r.cancel_reason, r.trace_id,
                   r.create_time, r.update_time
            FROM runs r WHERE r.request_id = p_request;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'run % already exists', p_run USING ERRCODE = 'AGR05';
        END IF;
    END $$;

    -- record_progress: fenced append (numbered from p_first, which must follow the log)
    -- and, when given, the new checkpoint. AGR01 lease lost, AGR02 sequence gap.
    CREATE FUNCTION agentd_run_progress(
        p_run text, p_attempt integer, p_first bigint, p_events text[], p_trace text, p_checkpoint text,
        p_now double precision
    ) RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_count integer := coalesce(cardinality(p_events), 0);
        v_last bigint;
    BEGIN
        UPDATE runs r
        SET last_sequence = r.last_sequence + v_count,
            checkpoint = coalesce(p_checkpoint::json, r.checkpoint),
            trace_id = CASE WHEN r.trace_id = '' AND v_count > 0 THEN p_trace ELSE r.trace_id END,
            update_time = p_now
        WHERE r.run_id = p_run AND r.status = 'running' AND r.attempt = p_attempt
        RETURNING r.last_sequence - v_count INTO v_last;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'run % is no longer executed by attempt %', p_run, p_attempt USING ERRCODE = 'AGR01';
        END IF;
        IF v_count > 0 THEN
            IF p_first <> v_last + 1 THEN
                RAISE EXCEPTION 'run %: event % does not follow %', p_run, p_first, v_last USING ERRCODE = 'AGR02';
            END IF;
            INSERT INTO run_events (run_id, seq, data)
            SELECT p_run, v_last + t.n, t.data::json FROM unnest(p_events) WITH ORDINALITY AS t (data, n);
            PERFORM pg_notify(agentd_run_channel('run_events'), p_run);
        END IF;
    END $$;

    -- finish: the final events, the terminal status and result, retention, and the
    -- session's next run made claimable. AGR01 / AGR02 as for progress.
    CREATE FUNCTION agentd_run_finish(
        p_run text, p_attempt integer, p_first bigint, p_events text[], p_trace text, p_status text,
        p_result text, p_expire double precision, p_now double precision
    ) RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_count integer := coalesce(cardinality(p_events), 0);
        v_session text;
        v_last bigint;
    BEGIN
        SELECT r.session_id INTO v_session FROM runs r WHERE r.run_id = p_run;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'run % is no longer executed by attempt %', p_run, p_attempt USING ERRCODE = 'AGR01';
        END IF;
        IF v_session IS NOT NULL THEN
            PERFORM agentd_run_lock_session(v_session);
        END IF;
        UPDATE runs r
        SET status = p_status, result = p_result::json, owner = '', lease_expires = 0, claimable = false,
            last_sequence = r.last_sequence + v_count,
            trace_id = CASE WHEN r.trace_id = '' AND v_count > 0 THEN p_trace ELSE r.trace_id END,
            update_time = p_now, expire_time = p_expire
        WHERE r.run_id = p_run AND r.status = 'running' AND r.attempt = p_attempt
        RETURNING r.last_sequence - v_count INTO v_last;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'run % is no longer executed by attempt %', p_run, p_attempt USING ERRCODE = 'AGR01';
        END IF;
        IF v_count > 0 THEN
            IF p_first <> v_last + 1 THEN
                RAISE EXCEPTION 'run %: event % does not follow %', p_run, p_first, v_last USING ERRCODE = 'AGR02';
            END IF;
            INSERT INTO run_events (run_id, seq, data)
            SELECT p_run, v_last + t.n, t.data::json FROM unnest(p_events) WITH ORDINALITY AS t (data, n);
            PERFORM pg_notify(agentd_run_channel('run_events'), p_run);
        END IF;
        IF v_session IS NOT NULL THEN
            PERFORM agentd_run_promote(v_session);
        END IF;
    END $$;

    -- release (drain): RUNNING with this attempt -> QUEUED and claimable, checkpoint kept.
    CREATE FUNCTION agentd_run_release(p_run text, p_attempt integer, p_now double precision)
    RETURNS boolean LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    BEGIN
        UPDATE runs r SET status = 'queued', owner = '', lease_expires = 0, claimable = true, update_time = p_now
        WHERE r.run_id = p_run AND r.status = 'running' AND r.attempt = p_attempt;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        PERFORM pg_notify(agentd_run_channel('run_work'), '');
        RETURN true;
    END $$;

    -- Requeue every RUNNING run whose lease ended before p_now. Rows another transaction
    -- holds (a renewal, a finish) are skipped, never waited for: the next call sees them.
    CREATE FUNCTION agentd_run_requeue_expired(p_now double precision)
    RETURNS SETOF text LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    BEGIN
        RETURN QUERY
            UPDATE runs r SET status = 'queued', owner = '', lease_expires = 0, claimable = true, update_time = p_now
            WHERE r.run_id = ANY (ARRAY(
                    SELECT x.run_id FROM runs x WHERE x.status = 'running' AND x.lease_expires < p_now
                    ORDER BY x.lease_expires FOR UPDATE SKIP LOCKED))
              AND r.status = 'running' AND r.lease_expires < p_now
            RETURNING r.run_id;
        IF FOUND THEN
            PERFORM pg_notify(agentd_run_channel('run_work'), '');
        END IF;
    END $$;

    -- cancel: a QUEUED run ends here with a RunCancelled event (the codec's shape); an
    -- executing one records the first reason. Returns the run afterwards (no row: unknown).
    CREATE FUNCTION agentd_run_cancel(
        p_run text, p_reason text, p_event_ns bigint, p_expire double precision, p_now double precision
    ) RETURNS TABLE (
        o_run_id text, o_status text, o_spec json, o_owner text, o_attempt integer,
        o_lease double precision, o_last bigint, o_checkpoint json, o_result json, o_cancel text,
        o_trace text, o_create double precision, o_update double precision
    ) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_session text;
        v_run runs%ROWTYPE;
        v_seq bigint;
        v_payload jsonb;
    BEGIN
        SELECT r.session_id INTO v_session FROM runs r
        WHERE r.run_id = p_run AND (r.expire_time IS NULL OR r.expire_time > p_now);
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF v_session IS NOT NULL THEN
            PERFORM agentd_run_lock_session(v_session);
        END IF;
        SELECT * INTO v_run FROM runs r WHERE r.run_id = p_run FOR UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF v_run.status = 'queued' THEN
            v_seq := v_run.last_sequence + 1;
            v_payload := jsonb_build_object(
                't', 'run_cancelled', 'reason', p_reason,
                'usage', coalesce(v_run.checkpoint -> 'usage', '[0, 0, 0]'::json),
                'turns', coalesce((v_run.checkpoint ->> 'turns')::bigint, 0));
            INSERT INTO run_events (run_id, seq, data)
            VALUES (p_run, v_seq, (v_payload || jsonb_build_object(
                'seq', v_seq, 'ts', p_event_ns, 'trace', v_run.trace_id))::json);
            UPDATE runs r
            SET status = 'cancelled', result = v_payload::json, owner = '', lease_expires = 0, claimable = false,
                last_sequence = v_seq, update_time = p_now, expire_time = p_expire
            WHERE r.run_id = p_run;
            PERFORM pg_notify(agentd_run_channel('run_events'), p_run);
            IF v_session IS NOT NULL THEN
                PERFORM agentd_run_promote(v_session);
            END IF;
        ELSIF v_run.status IN ('running', 'requires_action') AND v_run.cancel_reason = '' THEN
            UPDATE runs r SET cancel_reason = p_reason, update_time = p_now WHERE r.run_id = p_run;
        END IF;
        RETURN QUERY
            SELECT r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires, r.last_sequence,
                   r.checkpoint, r.result, r.cancel_reason, r.trace_id, r.create_time, r.update_time
            FROM runs r WHERE r.run_id = p_run;
    END $$;
    """,
    # 2: the caller's answers (caller-executed tool outputs, approvals), first answer per key
    r"""
    CREATE TABLE run_actions (
        -- Deleted with its run (sweep, a request id past retention), by any agentd version.
        run_id text COLLATE "C" NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
        key text COLLATE "C" NOT NULL,
        data json NOT NULL,  -- the codec's action text (json: a tool output may hold \u0000)
        PRIMARY KEY (run_id, key)
    );

    -- The run's answers as one JSON object (NULL: none). VOLATILE: it reads with its own
    -- snapshot, so after a statement that locked or wrote the run it sees every answer
    -- committed before that (the statement's snapshot may be older).
    CREATE FUNCTION agentd_run_actions(p_run text) RETURNS json
    LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
    BEGIN
        RETURN (SELECT json_object_agg(a.key, a.data ORDER BY a.key) FROM run_actions a WHERE a.run_id = p_run);
    END $$;

    -- submit_action: record the answer when the run is active and the key unanswered
    -- (the row lock orders it against finish and cancel). Returns the run afterwards
    -- (no row: unknown or past retention).
    CREATE FUNCTION agentd_run_submit_action(p_run text, p_key text, p_data text, p_now double precision)
    RETURNS TABLE (
        o_run_id text, o_status text, o_spec json, o_owner text, o_attempt integer,
        o_lease double precision, o_last bigint, o_checkpoint json, o_result json, o_cancel text,
        o_trace text, o_create double precision, o_update double precision, o_actions json
    ) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_status text;
    BEGIN
        SELECT r.status INTO v_status FROM runs r
        WHERE r.run_id = p_run AND (r.expire_time IS NULL OR r.expire_time > p_now)
        FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF v_status IN ('queued', 'running', 'requires_action') THEN
            INSERT INTO run_actions (run_id, key, data) VALUES (p_run, p_key, p_data::json)
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                UPDATE runs r SET update_time = p_now WHERE r.run_id = p_run;
            END IF;
        END IF;
        RETURN QUERY
            SELECT r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires, r.last_sequence,
                   r.checkpoint, r.result, r.cancel_reason, r.trace_id, r.create_time, r.update_time,
                   agentd_run_actions(p_run)
            FROM runs r WHERE r.run_id = p_run;
    END $$;
    """,
)
LATEST_VERSION = len(MIGRATIONS)

# A run row as RunRecord fields, in the order _record() reads them (then its actions).
_COLUMNS = (
    "r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires, r.last_sequence, r.checkpoint,"
    " r.result, r.cancel_reason, r.trace_id, r.create_time, r.update_time"
)
_LIVE = "(r.expire_time IS NULL OR r.expire_time > $2)"

# The connection died under the operation (OSError includes TimeoutError: checked apart).
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    # The server shut the session down or is restarting (not a cancelled statement).
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    OSError,
)
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, asyncio.TimeoutError)
_SWEEP_BATCH = 1000
_PING_TIMEOUT_S = 2.0
_FALLBACK_POLL_S = 1.0  # a missed notification costs at most this much
_KEEPALIVE_S = 5.0  # how often a quiet LISTEN connection is checked (a silent partition)
_RECONNECT_MAX_S = 2.0
_NOTIFY_MAX_BYTES = 7900  # the server's limit is 8000


def channel_name(schema: str, kind: str) -> str:
    """The NOTIFY channel of ``kind`` for ``schema``; agrees with agentd_run_channel() in SQL."""
    if len(schema.encode()) + 1 + len(kind.encode()) <= 63:
        return f"{schema}_{kind}"
    return f"agentd_{hashlib.md5(schema.encode()).hexdigest()[:16]}_{kind}"


def _statements(q: str) -> dict[str, str]:
    """Every statement the store sends, for schema ``q`` (quoted): constant per store, so
    asyncpg prepares each once per connection.

    Every record read ends with the run's actions: in a plain read from the same snapshot
    as the row; after a write (claim, and the functions' results) by agentd_run_actions(),
    which reads with a fresh snapshot, once the run's row is locked or written."""
    # The run ``r``'s actions, as of the statement's snapshot (consistent with the row).
    actions = (
        f"(SELECT json_object_agg(a.key, a.data ORDER BY a.key) FROM {q}.run_actions a WHERE a.run_id = r.run_id)"
    )
    return {
        "create": (
            f"SELECT c.*, CASE WHEN c.o_created THEN NULL ELSE {q}.agentd_run_actions(c.o_run_id) END"
            f" FROM {q}.agentd_run_create($1, $2, $3, $4, $5, $6, $7, $8, $9) c"
        ),
        "get": f"SELECT {_COLUMNS}, {actions} FROM {q}.runs r WHERE r.run_id = $1 AND {_LIVE}",
        "list_first": (
            f"SELECT {_COLUMNS}, {actions} FROM {q}.runs r WHERE r.session_id = $1 AND {_LIVE}"
            " ORDER BY r.create_time DESC, r.run_id DESC LIMIT $3"
        ),
        # A cursor naming no run of the session (swept) gives an empty page, as in memory.
        "list_after": (
            f"SELECT {_COLUMNS}, {actions} FROM {q}.runs r WHERE r.session_id = $1 AND {_LIVE}"
            f" AND (r.create_time, r.run_id) < (SELECT c.create_time, c.run_id FROM {q}.runs c"
            " WHERE c.run_id = $4 AND c.session_id = $1)"
            " ORDER BY r.create_time DESC, r.run_id DESC LIMIT $3"
        ),
        "active": (
            f"SELECT r.run_id FROM {q}.runs r WHERE r.session_id = $1"
            " AND r.status IN ('queued', 'running', 'requires_action') ORDER BY r.pos LIMIT 1"
        ),
        # ANY(ARRAY(...)): the locked picks are computed once, then found by primary key.
        "claim": (
            f"UPDATE {q}.runs r SET status = 'running', claimable = false, owner = $1, attempt = r.attempt + 1,"
            " lease_expires = $3, update_time = $4"
            f" WHERE r.run_id = ANY (ARRAY(SELECT c.run_id FROM {q}.runs c WHERE c.claimable"
            " ORDER BY c.pos LIMIT $2 FOR UPDATE SKIP LOCKED)) AND r.claimable"
            f" RETURNING r.pos, {_COLUMNS}, {q}.agentd_run_actions(r.run_id)"
        ),
        "renew": (
            f"UPDATE {q}.runs r SET lease_expires = $4"
            " FROM unnest($2::text[], $3::integer[]) AS w (run_id, attempt)"
            " WHERE r.run_id = w.run_id AND r.attempt = w.attempt AND r.owner = $1 AND r.status = 'running'"
            " RETURNING r.run_id, r.cancel_reason"
        ),
        "progress": f"SELECT {q}.agentd_run_progress($1, $2, $3, $4, $5, $6, $7)",
        "finish": f"SELECT {q}.agentd_run_finish($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        "release": f"SELECT {q}.agentd_run_release($1, $2, $3)",
        "requeue": f"SELECT * FROM {q}.agentd_run_requeue_expired($1)",
        "cancel": f"SELECT c.*, {q}.agentd_run_actions(c.o_run_id) FROM {q}.agentd_run_cancel($1, $2, $3, $4, $5) c",
        "submit_action": f"SELECT * FROM {q}.agentd_run_submit_action($1, $2, $3, $4)",
        # SKIP LOCKED: a run some write holds is left for the next batch, never waited on.
        # A run's actions go with it (ON DELETE CASCADE).
        "sweep": (
            f"WITH gone AS (DELETE FROM {q}.runs r WHERE r.run_id = ANY (ARRAY("
            f"SELECT x.run_id FROM {q}.runs x WHERE x.expire_time <= $1"
            " ORDER BY x.expire_time LIMIT $2 FOR UPDATE SKIP LOCKED)) AND r.expire_time <= $1"
            " RETURNING r.run_id),"
            f" events AS (DELETE FROM {q}.run_events e WHERE e.run_id IN (SELECT run_id FROM gone))"
            " SELECT count(*) FROM gone"
        ),
        # The run's liveness is a one-time filter; the events come from the primary key.
        "read": (
            f"SELECT e.data FROM {q}.run_events e WHERE e.run_id = $1 AND e.seq > $2"
            f" AND EXISTS (SELECT 1 FROM {q}.runs r WHERE r.run_id = $1"
            " AND (r.expire_time IS NULL OR r.expire_time > $4))"
            " ORDER BY e.seq LIMIT $3"
        ),
    }


def _record(row: Sequence[Any], spec: RunInput | None = None) -> RunRecord:
    (run_id, status, spec_text, owner, attempt, lease, last, checkpoint, result, cancel, trace, created, updated,
     actions) = row
    return RunRecord(
        run_id=run_id,
        spec=spec if spec is not None else decode_spec(spec_text),
        status=RunStatus(status),
        create_time=created,
        update_time=updated,
        owner=owner,
        attempt=attempt,
        lease_expires=lease,
        last_sequence=last,
        checkpoint=decode_checkpoint(checkpoint) if checkpoint is not None else None,
        result=decode_payload(result) if result is not None else None,
        cancel_reason=cancel,
        trace_id=trace,
        # {key: action}: each value is the codec's action text, so the object decodes as one.
        actions=decode_action(actions) if actions is not None else {},
    )


def _encoded_events(run_id: str, events: Sequence[RunEvent]) -> tuple[int, list[str], str]:
    """(first sequence, event texts, first trace id), checked before any round trip."""
    if not events:
        return 0, [], ""
    first = events[0].sequence
    for offset, event in enumerate(events):
        if event.run_id != run_id:
            raise ValueError(f"event of run {event.run_id} recorded on run {run_id}")
        if event.sequence != first + offset:
            raise ValueError(f"run {run_id}: event sequences must be consecutive, got {event.sequence} after "
                             f"{first + offset - 1}")
    return first, [encode_event(e) for e in events], events[0].trace_id


class _Signal:
    """Wakes every waiter at once; a waiter passing the generation it saw before its
    check cannot miss a wake-up that came in between."""

    __slots__ = ("gen", "users", "_waiters")

    def __init__(self) -> None:
        self.gen = 0
        self.users = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def fire(self) -> None:
        self.gen += 1
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, seen: int, timeout_s: float) -> None:
        if self.gen != seen or timeout_s <= 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait((waiter,), timeout=timeout_s)
        finally:
            self._waiters.discard(waiter)
            waiter.cancel()


class _Listener:
    """One dedicated LISTEN connection, kept alive: reconnected (with backoff) after it
    drops or stops answering a periodic ping. ``on_gap`` runs after every reconnect, as
    notifications sent meanwhile are lost. Also usable for the odd statement (NOTIFY)."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        channels: dict[str, Callable[[str], None]],
        on_gap: Callable[[], None],
        what: str,
        ping_timeout_s: float,
    ) -> None:
        self._connect = connect
        self._channels = channels
        self._on_gap = on_gap
        self._what = what
        self._ping_timeout_s = ping_timeout_s
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Connect and listen (driver errors propagate), then keep it so in the background."""
        self._conn = await self._open_connection()
        self._task = asyncio.create_task(self._supervise(), name=f"agentd {self._what} listener")

    async def _open_connection(self) -> asyncpg.Connection:
        conn = await self._connect()
        try:
            for channel, handler in self._channels.items():
                await conn.add_listener(channel, self._dispatcher(handler))
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        conn.add_termination_listener(self._terminated)
        return conn

    @staticmethod
    def _dispatcher(handler: Callable[[str], None]) -> Callable[[Any, int, str, str], None]:
        def dispatch(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            try:
                handler(payload)
            except Exception:  # one bad message must not silence the channel
                log.exception("postgres notification handler failed")

        return dispatch

    def _terminated(self, conn: asyncpg.Connection) -> None:
        if conn is self._conn:
            self._lost.set()

    async def _supervise(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._lost.wait(), _KEEPALIVE_S)
            except asyncio.TimeoutError:
                try:
                    await self.execute("SELECT 1", timeout_s=self._ping_timeout_s)
                    continue
                except Exception as exc:  # noqa: BLE001 - any failure means reconnect
                    log.warning("%s: LISTEN connection stopped answering (%s); reconnecting", self._what, exc)
            if self._closed:
                return
            old, self._conn = self._conn, None
            if old is not None:
                with suppress(Exception):
                    old.terminate()
            delay = 0.05
            while not self._closed:
                try:
                    self._conn = await self._open_connection()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried until it works or we close
                    log.debug("%s: LISTEN reconnect failed (%s); retrying in %.2fs", self._what, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX_S)
            if self._conn is not None:
                log.info("%s: LISTEN connection re-established", self._what)
                self._on_gap()

    async def execute(self, sql: str, *args: Any, timeout_s: float) -> None:
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                raise asyncpg.InterfaceError("the LISTEN connection is reconnecting")
            await conn.execute(sql, *args, timeout=timeout_s)

    async def close(self, timeout_s: float) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout_s)
            except Exception:  # noqa: BLE001 - a stuck connection is cut off
                conn.terminate()


class _Common:
    """Connection settings, error mapping and migrations shared by the store and the bus."""

    def __init__(
        self,
        *,
        url: str,
        schema: str,
        connect_timeout_s: float,
        command_timeout_s: float,
        statement_cache_size: int = 256,
        what: str,
    ) -> None:
        self._quoted = check_schema(schema)
        self._url = url
        self._schema = schema
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._statement_cache_size = statement_cache_size
        self._error_text = ErrorText(url)
        self._where = f"postgres {what} at {location(url)} schema {schema}"

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def location(self) -> str:
        return self._where

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        if isinstance(exc, asyncio.TimeoutError) and not str(exc):
            return StoreUnavailableError(f"{self._where}: no answer within the timeout (TimeoutError)")
        return StoreUnavailableError(f"{self._where}: {self._error_text(exc)}")

    def _cannot_connect(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"{self._where}: cannot connect ({self._error_text(exc)}); check that the server is running"
            " and reachable from here, and that the URL's user, password and database are right"
        )

    def _connect_kwargs(self, application: str) -> dict[str, Any]:
        return {
            "statement_cache_size": self._statement_cache_size,
            "timeout": self._connect_timeout_s,
            "command_timeout": self._command_timeout_s,
            "server_settings": {"application_name": application},
        }

    async def _connect(self, application: str) -> asyncpg.Connection:
        return await asyncpg.connect(self._url, **self._connect_kwargs(application))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to reset (no SET, LISTEN or session-level locks on pooled
    connections; advisory locks are transaction-scoped), so no extra round trip per call."""


class PostgresRunStore(_Common, RunStore):
    """Runs in a Postgres schema, shared by every replica that points at it."""

    shared = True

    def __init__(
        self,
        *,
        url: str,
        schema: str = "agentd",
        min_size: int = 2,
        max_size: int = 10,
        statement_cache_size: int = 256,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        auto_migrate: bool = True,
    ) -> None:
        super().__init__(
            url=url, schema=schema, connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s,
            statement_cache_size=statement_cache_size, what="run store",
        )
        self._min_size = min_size
        self._max_size = max_size
        self._auto_migrate = auto_migrate
        self._acquire_timeout_s = connect_timeout_s + command_timeout_s
        self._sql = _statements(self._quoted)
        self._pool: asyncpg.Pool | None = None
        self._listener: _Listener | None = None
        self._closed = False
        self._work = _Signal()
        self._appended: dict[str, _Signal] = {}
        self._work_channel = channel_name(schema, "run_work")
        self._events_channel = channel_name(schema, "run_events")

    # --- plumbing -------------------------------------------------------------------

    async def _call(self, op: Callable[[asyncpg.Connection], Awaitable[T]], *, idempotent: bool = False) -> T:
        """Run ``op`` (one statement) on a pooled connection, mapping driver failures.

        Retried once on a fresh connection when the first one turned out dead: always if
        nothing was sent on it (asyncpg refused it up front), and for ``idempotent``
        operations (reads, renewals, sweeps) whatever happened. A write whose connection
        died may have committed, so it is reported, not repeated. Timeouts are never
        retried: the server may still be working on the statement.
        Errors the functions raise on purpose come out as ``asyncpg.PostgresError``.
        """
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError(f"{self._where}: not open")
        for attempt in (1, 2):
            try:
                async with pool.acquire(timeout=self._acquire_timeout_s) as conn:
                    try:
                        return await op(conn)
                    except _CONNECTION_LOST as exc:
                        if not isinstance(exc, TimeoutError):
                            # Possibly half-dead: never hand it out again.
                            with suppress(asyncpg.InterfaceError):
                                conn.terminate()
                        raise
            except asyncio.TimeoutError as exc:
                raise self._unavailable(exc) from exc
            except _CONNECTION_LOST as exc:
                if attempt == 2 or not (idempotent or isinstance(exc, asyncpg.InternalClientError)):
                    raise self._unavailable(exc) from exc
                log.debug("%s: retrying on a fresh connection after %s", self._where, self._error_text(exc))
            except asyncpg.PostgresError as exc:
                if exc.sqlstate and exc.sqlstate.startswith("AGR"):
                    raise
                if isinstance(exc, asyncpg.DataError):  # a value Postgres cannot hold (NUL in text, NaN)
                    raise ValueError(f"postgres cannot store this value: {exc}") from exc
                raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._closed = False
        try:
            pool = await asyncpg.create_pool(
                self._url,
                min_size=self._min_size,
                max_size=self._max_size,
                reset=_keep_session,
                **self._connect_kwargs("agentd-runs"),
            )
        except (*_DRIVER_ERRORS,) as exc:
            raise self._cannot_connect(exc) from exc
        try:
            current = await (self.migrate() if self._auto_migrate else self.schema_version())
            if current < LATEST_VERSION:
                raise StoreUnavailableError(
                    f"{self._where}: run tables are at version {current}, this agentd needs {LATEST_VERSION}:"
                    " run `agentd db migrate`"
                )
            if current > LATEST_VERSION:
                # Migrations are additive, so older code keeps working during a rolling deploy.
                log.warning("postgres schema %s: run tables at version %d, newer than this agentd's %d; continuing",
                            self._schema, current, LATEST_VERSION)
            listener = _Listener(
                lambda: self._connect("agentd-runs-listen"),
                {self._work_channel: self._on_work, self._events_channel: self._on_appended},
                self._on_gap,
                self._where,
                min(_PING_TIMEOUT_S, self._command_timeout_s),
            )
            try:
                await listener.start()
            except _DRIVER_ERRORS as exc:
                raise self._cannot_connect(exc) from exc
        except BaseException:
            pool.terminate()
            raise
        self._pool, self._listener = pool, listener

    async def close(self) -> None:
        self._closed = True
        listener, self._listener = self._listener, None
        pool, self._pool = self._pool, None
        self._on_gap()  # pending waits see _closed and end
        if listener is not None:
            await listener.close(self._command_timeout_s)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=self._command_timeout_s)
            except (asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                pool.terminate()

    async def ping(self) -> None:
        timeout = min(_PING_TIMEOUT_S, self._command_timeout_s)
        await self._call(lambda conn: conn.fetchval("SELECT 1", timeout=timeout), idempotent=True)

    # --- notifications --------------------------------------------------------------

    def _on_work(self, _payload: str) -> None:
        self._work.fire()

    def _on_appended(self, run_id: str) -> None:
        signal = self._appended.get(run_id)
        if signal is not None:
            signal.fire()

    def _on_gap(self) -> None:
        """Notifications may have been lost: every waiter checks again."""
        self._work.fire()
        for signal in list(self._appended.values()):
            signal.fire()

    # --- schema ---------------------------------------------------------------------

    async def _admin(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``op`` on a pooled connection, or a one-off one when not open (``agentd db``)."""
        try:
            if self._pool is not None:
                async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                    return await op(conn)
            try:
                conn = await self._connect("agentd-runs")
            except _DRIVER_ERRORS as exc:
                raise self._cannot_connect(exc) from exc
            try:
                return await op(conn)
            finally:
                with suppress(*_DRIVER_ERRORS):
                    await conn.close(timeout=self._connect_timeout_s)
        except _DRIVER_ERRORS as exc:
            raise self._unavailable(exc) from exc

    async def schema_version(self) -> int:
        """The run tables' version in the schema (0: none yet)."""
        return await self._admin(lambda conn: schema_version(conn, self._quoted, "run_schema_version"))

    async def migrate(self) -> int:
        """Bring the run tables to ``LATEST_VERSION`` and return the version."""
        return await self._admin(
            lambda conn: apply_migrations(conn, self._schema, "run_schema_version", MIGRATIONS, "run tables")
        )

    # --- records --------------------------------------------------------------------

    async def create_run(
        self,
        spec: RunInput,
        *,
        policy: SessionPolicy,
        owner: str | None,
        lease_s: float,
        max_queued: int,
        now: float,
    ) -> CreatedRun:
        args = (
            spec.run_id,
            spec.session_id,
            spec.request_id or None,
            encode_spec(spec),
            policy is SessionPolicy.REJECT,
            owner,
            now + lease_s,
            max_queued,
            now,
        )
        try:
            row = await self._call(lambda conn: conn.fetchrow(self._sql["create"], *args))
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == _SESSION_BUSY:
                raise SessionBusyError(spec.session_id or "", exc.detail or "") from None
            if exc.sqlstate == _QUEUE_FULL:
                raise QueueFullError(max_queued) from None
            if exc.sqlstate == _RUN_EXISTS:
                raise ValueError(f"run id {spec.run_id!r} is already taken") from None
            raise self._unavailable(exc) from exc
        assert row is not None
        created = bool(row[0])
        record = _record(row[1:], spec if created else None)
        if created and record.status is RunStatus.QUEUED:
            self._work.fire()  # a claimer of this replica need not wait for the notification
        return CreatedRun(record, created)

    async def get_run(self, run_id: str) -> RunRecord | None:
        now = time.time()
        row = await self._call(lambda conn: conn.fetchrow(self._sql["get"], run_id, now), idempotent=True)
        return _record(row) if row is not None else None

    async def list_runs(self, session_id: str, limit: int, cursor: str | None = None) -> tuple[list[RunRecord], str | None]:
        if limit <= 0:
            return [], None
        now = time.time()
        if cursor is None:
            sql, args = self._sql["list_first"], (session_id, now, limit + 1)
        else:
            sql, args = self._sql["list_after"], (session_id, now, limit + 1, cursor)
        rows = await self._call(lambda conn: conn.fetch(sql, *args), idempotent=True)
        page = [_record(row) for row in rows[:limit]]
        return page, (page[-1].run_id if len(rows) > limit else None)

    async def active_run(self, session_id: str) -> str | None:
        run_id: str | None = await self._call(
            lambda conn: conn.fetchval(self._sql["active"], session_id), idempotent=True
        )
        return run_id

    # --- execution ------------------------------------------------------------------

    async def claim(self, owner: str, max_runs: int, *, lease_s: float, now: float, wait_s: float) -> list[RunRecord]:
        if max_runs <= 0:
            return []
        started = time.monotonic()
        while True:
            seen = self._work.gen
            # A claim made after waiting leases from when it is made, not from ``now``.
            at = now + (time.monotonic() - started)
            args = (owner, max_runs, at + lease_s, at)
            rows = await self._call(lambda conn: conn.fetch(self._sql["claim"], *args))
            if rows:
                return [_record(row[1:]) for row in sorted(rows, key=lambda r: r[0])]
            remaining = wait_s - (time.monotonic() - started)
            if remaining <= 0 or self._closed:
                return []
            await self._work.wait(seen, min(remaining, _FALLBACK_POLL_S))
            if self._closed:
                return []

    async def renew(self, owner: str, leases: dict[str, int], *, lease_s: float, now: float) -> RenewOutcome:
        if not leases:
            return RenewOutcome(frozenset(), {})
        ids = sorted(leases)  # one lock order for every renewal
        args = (owner, ids, [leases[i] for i in ids], now + lease_s)
        rows = await self._call(lambda conn: conn.fetch(self._sql["renew"], *args), idempotent=True)
        held = {run_id for run_id, _ in rows}
        return RenewOutcome(frozenset(set(leases) - held), {run_id: reason for run_id, reason in rows if reason})

    async def record_progress(
        self, run_id: str, attempt: int, events: Sequence[RunEvent], checkpoint: Checkpoint | None, *, now: float
    ) -> None:
        first, texts, trace = _encoded_events(run_id, events)
        cp = encode_checkpoint(checkpoint) if checkpoint is not None else None
        args = (run_id, attempt, first, texts, trace, cp, now)
        await self._fenced(lambda conn: conn.execute(self._sql["progress"], *args), run_id, attempt)
        if texts:
            self._on_appended(run_id)

    async def finish(self, run_id: str, attempt: int, events: Sequence[RunEvent], *, retention_s: float, now: float) -> None:
        if not events or not events[-1].is_terminal:
            raise ValueError("finish needs the run's terminal event last")
        final = events[-1].payload
        first, texts, trace = _encoded_events(run_id, events)
        args = (run_id, attempt, first, texts, trace, terminal_status(final).value, encode_payload(final),
                now + retention_s, now)
        await self._fenced(lambda conn: conn.execute(self._sql["finish"], *args), run_id, attempt)
        self._on_appended(run_id)
        self._work.fire()  # the session's next run may have become claimable

    async def _fenced(self, op: Callable[[asyncpg.Connection], Awaitable[Any]], run_id: str, attempt: int) -> None:
        try:
            await self._call(op)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == _LEASE_LOST:
                raise LeaseLostError(f"run {run_id} is no longer executed by attempt {attempt}") from None
            if exc.sqlstate == _SEQUENCE_GAP:
                raise ValueError(exc.args[0] if exc.args else str(exc)) from None
            raise self._unavailable(exc) from exc

    async def release(self, run_id: str, attempt: int, *, now: float) -> bool:
        released = bool(await self._call(lambda conn: conn.fetchval(self._sql["release"], run_id, attempt, now)))
        if released:
            self._work.fire()
        return released

    async def requeue_expired(self, *, now: float) -> list[str]:
        rows = await self._call(lambda conn: conn.fetch(self._sql["requeue"], now))
        if rows:
            self._work.fire()
        return [run_id for (run_id,) in rows]

    async def cancel(self, run_id: str, reason: str, *, event_time_ns: int, retention_s: float, now: float) -> RunRecord | None:
        args = (run_id, reason, event_time_ns, now + retention_s, now)
        row = await self._call(lambda conn: conn.fetchrow(self._sql["cancel"], *args))
        if row is None:
            return None
        record = _record(row)
        if record.status is RunStatus.CANCELLED:
            self._on_appended(run_id)
            self._work.fire()
        return record

    async def submit_action(self, run_id: str, key: str, action: dict[str, Any], *, now: float) -> RunRecord | None:
        args = (run_id, key, encode_action(action), now)
        # A repeat (the connection died after the commit) changes nothing: the first answer stays.
        row = await self._call(lambda conn: conn.fetchrow(self._sql["submit_action"], *args), idempotent=True)
        return _record(row) if row is not None else None

    async def sweep(self, *, now: float) -> int:
        removed = 0
        while True:
            # One batch per statement (and transaction): short locks, bounded deletes.
            batch: int = await self._call(
                lambda conn: conn.fetchval(self._sql["sweep"], now, _SWEEP_BATCH), idempotent=True
            )
            removed += batch
            if batch < _SWEEP_BATCH:
                return removed

    # --- event log ------------------------------------------------------------------

    async def read_events(self, run_id: str, after_sequence: int, limit: int) -> list[RunEvent]:
        if limit <= 0:
            return []
        args = (run_id, max(after_sequence, 0), limit, time.time())
        rows = await self._call(lambda conn: conn.fetch(self._sql["read"], *args), idempotent=True)
        return [decode_event(run_id, data) for (data,) in rows]

    async def wait_events(self, run_id: str, after_sequence: int, *, limit: int, timeout_s: float) -> list[RunEvent]:
        signal = self._appended.get(run_id)
        if signal is None:
            signal = self._appended[run_id] = _Signal()
        signal.users += 1
        try:
            started = time.monotonic()
            while True:
                seen = signal.gen
                events = await self.read_events(run_id, after_sequence, limit)
                remaining = timeout_s - (time.monotonic() - started)
                if events or remaining <= 0 or self._closed:
                    return events
                await signal.wait(seen, min(remaining, _FALLBACK_POLL_S))
                if self._closed:
                    return []
        finally:
            signal.users -= 1
            if signal.users == 0 and self._appended.get(run_id) is signal:
                del self._appended[run_id]


class PostgresControlBus(_Common, ControlBus):
    """``Control`` messages over NOTIFY on ``<schema>_run_control``, to every replica's
    subscribers. One LISTEN connection per bus (reconnected after failures); publishing
    goes over it too, so a bus costs a single connection."""

    def __init__(
        self,
        *,
        url: str,
        schema: str = "agentd",
        statement_cache_size: int = 256,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            url=url, schema=schema, connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s,
            statement_cache_size=statement_cache_size, what="control bus",
        )
        self._channel = channel_name(schema, "run_control")
        self._listener: _Listener | None = None
        self._subscribers: set[asyncio.Queue[Control | None]] = set()
        self._opening: asyncio.Lock | None = None

    async def open(self) -> None:
        if self._listener is not None:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._listener is not None:
                return
            listener = _Listener(
                lambda: self._connect("agentd-runs-control"),
                {self._channel: self._on_message},
                lambda: None,  # messages sent during a gap are lost, as the interface says
                self._where,
                min(_PING_TIMEOUT_S, self._command_timeout_s),
            )
            try:
                await listener.start()
            except _DRIVER_ERRORS as exc:
                raise self._cannot_connect(exc) from exc
            self._listener = listener

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        if listener is not None:
            await listener.close(self._command_timeout_s)

    def _on_message(self, payload: str) -> None:
        try:
            data = json.loads(payload)
            message = Control(str(data["run_id"]), str(data["kind"]), str(data.get("reason", "")))
        except (ValueError, KeyError, TypeError):
            log.warning("%s: ignoring a malformed control message %r", self._where, payload[:200])
            return
        for queue in self._subscribers:
            queue.put_nowait(message)

    async def publish(self, message: Control) -> None:
        listener = self._listener
        if listener is None:
            raise StoreUnavailableError(f"{self._where}: not open")
        payload = _control_payload(message)
        try:
            await listener.execute("SELECT pg_notify($1, $2)", self._channel, payload, timeout_s=self._command_timeout_s)
        except _DRIVER_ERRORS as exc:
            raise self._unavailable(exc) from exc

    async def subscribe(self) -> AsyncIterator[Control]:  # type: ignore[override]
        if self._listener is None:
            await self.open()
        queue: asyncio.Queue[Control | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            self._subscribers.discard(queue)


def _control_payload(message: Control) -> str:
    """The message as JSON under NOTIFY's size limit (a very long reason is shortened)."""
    data = {"run_id": message.run_id, "kind": message.kind, "reason": message.reason}
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    while len(text.encode()) > _NOTIFY_MAX_BYTES and data["reason"]:
        data["reason"] = data["reason"][: len(data["reason"]) // 2]
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text


def build_postgres_runs(settings: Settings) -> tuple[RunStore, ControlBus]:
    """The run store and control bus of ``AGENTD_RUN_STORE=postgres`` (unopened), on the
    session store's database and schema (``AGENTD_POSTGRES_*``)."""
    store = PostgresRunStore(
        url=settings.postgres_url,
        schema=settings.postgres_schema,
        min_size=settings.postgres_min_pool,
        max_size=settings.postgres_max_pool,
        statement_cache_size=settings.postgres_statement_cache,
        connect_timeout_s=settings.postgres_connect_timeout_s,
        command_timeout_s=settings.postgres_command_timeout_s,
        auto_migrate=settings.auto_migrate,
    )
    bus = PostgresControlBus(
        url=settings.postgres_url,
        schema=settings.postgres_schema,
        statement_cache_size=settings.postgres_statement_cache,
        connect_timeout_s=settings.postgres_connect_timeout_s,
        command_timeout_s=settings.postgres_command_timeout_s,
    )
    return store, bus
