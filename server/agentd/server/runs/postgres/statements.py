"""The statements the Postgres run store sends, and the rows they return as records."""

from __future__ import annotations

from typing import Any, Sequence

from agentd.server.runs.codec import decode_action, decode_checkpoint, decode_payload, decode_spec, encode_event
from agentd.server.runs.records import RunRecord, RunStatus
from agentd.server.runtime.events import RunEvent
from agentd.server.runtime.run_loop import RunInput

__all__ = ["encoded_events", "run_record", "statements"]

# A run row as RunRecord fields, in the order run_record() reads them (then its actions).
_COLUMNS = (
    "r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires, r.last_sequence, r.checkpoint,"
    " r.result, r.cancel_reason, r.trace_id, r.create_time, r.update_time"
)
_LIVE = "(r.expire_time IS NULL OR r.expire_time > $2)"


def statements(q: str) -> dict[str, str]:
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
        # Waits for the disk like every write: the reply to a detached start names the run,
        # so the run must exist after a database crash once the caller has its id.
        "create": (
            f"SELECT c.*, CASE WHEN c.o_created THEN NULL ELSE {q}.agentd_run_actions(c.o_run_id) END"
            f" FROM {q}.agentd_run_create($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) c"
        ),
        "get": f"SELECT {_COLUMNS}, {actions}, r.requeue_reason FROM {q}.runs r WHERE r.run_id = $1 AND {_LIVE}",
        "list_first": (
            f"SELECT {_COLUMNS}, {actions}, r.requeue_reason FROM {q}.runs r WHERE r.session_id = $1 AND {_LIVE}"
            " ORDER BY r.create_time DESC, r.run_id DESC LIMIT $3"
        ),
        # A cursor naming no run of the session (swept) gives an empty page, as in memory.
        "list_after": (
            f"SELECT {_COLUMNS}, {actions}, r.requeue_reason FROM {q}.runs r WHERE r.session_id = $1 AND {_LIVE}"
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
            f" RETURNING r.pos, {_COLUMNS}, {q}.agentd_run_actions(r.run_id), r.requeue_reason"
        ),
        "renew": (
            f"UPDATE {q}.runs r SET lease_expires = $4"
            " FROM unnest($2::text[], $3::integer[]) AS w (run_id, attempt)"
            " WHERE r.run_id = w.run_id AND r.attempt = w.attempt AND r.owner = $1 AND r.status = 'running'"
            " RETURNING r.run_id, r.cancel_reason"
        ),
        # record_progress as one plain statement (what agentd_run_progress does, without a
        # function call: cheaper): the fenced row update appends the events ($4, numbered
        # from $3, which must follow the log) and sets the checkpoint ($6); the row lock
        # orders it with every other write of the run. One row (the cancel reason) when
        # written; none when refused, and "progress_refused" then says why. $8: the
        # run_events channel, notified only when there are events.
        "progress": (
            f"WITH r AS (UPDATE {q}.runs r SET last_sequence = r.last_sequence + cardinality($4::text[]),"
            " checkpoint = coalesce($6::json, r.checkpoint),"
            " trace_id = CASE WHEN r.trace_id = '' AND cardinality($4::text[]) > 0 THEN $5 ELSE r.trace_id END,"
            " update_time = $7"
            " WHERE r.run_id = $1 AND r.status = 'running' AND r.attempt = $2"
            " AND (cardinality($4::text[]) = 0 OR r.last_sequence = $3 - 1)"
            " RETURNING r.last_sequence - cardinality($4::text[]) AS last, r.cancel_reason),"
            f" e AS (INSERT INTO {q}.run_events (run_id, seq, data)"
            " SELECT $1, r.last + t.n, t.data::json FROM r, unnest($4::text[]) WITH ORDINALITY AS t (data, n))"
            " SELECT r.cancel_reason, CASE WHEN cardinality($4::text[]) > 0 THEN pg_notify($8, $1) END FROM r"
        ),
        # Why a progress write was refused: (this attempt executes the run, its last sequence).
        "progress_refused": (
            "SELECT r.status = 'running' AND r.attempt = $2, r.last_sequence"
            f" FROM {q}.runs r WHERE r.run_id = $1"
        ),
        # Then whether the run's session had a queued run (as of the statement's start), which
        # the finish may have made claimable: a claimer here looks at once. One queued later
        # is announced by its promotion's notification, like any other.
        "finish": (
            f"SELECT {q}.agentd_run_finish($1, $2, $3, $4, $5, $6, $7, $8, $9),"
            f" EXISTS (SELECT FROM {q}.runs r JOIN {q}.runs a ON a.session_id = r.session_id"
            " WHERE r.run_id = $1 AND a.status = 'queued')"
        ),
        "release": f"SELECT {q}.agentd_run_release($1, $2, $3)",
        "requeue": f"SELECT * FROM {q}.agentd_run_requeue_expired($1)",
        "cancel": f"SELECT c.*, {q}.agentd_run_actions(c.o_run_id) FROM {q}.agentd_run_cancel($1, $2, $3, $4, $5) c",
        "submit_action": f"SELECT * FROM {q}.agentd_run_submit_action($1, $2, $3, $4)",
        # (code, refused position, recorded positions), then the run as run_record() reads it.
        "submit_answers": f"SELECT * FROM {q}.agentd_run_submit_answers($1, $2, $3, $4, $5)",
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
        # A start bucket full again is as good as none.
        "sweep_buckets": f"DELETE FROM {q}.run_tenant_buckets b WHERE b.full_at <= $1",
        # The run's liveness is a one-time filter; the events come from the primary key.
        "read": (
            f"SELECT e.data FROM {q}.run_events e WHERE e.run_id = $1 AND e.seq > $2"
            f" AND EXISTS (SELECT 1 FROM {q}.runs r WHERE r.run_id = $1"
            " AND (r.expire_time IS NULL OR r.expire_time > $4))"
            " ORDER BY e.seq LIMIT $3"
        ),
    }


def run_record(row: Sequence[Any], spec: RunInput | None = None) -> RunRecord:
    """A record from the row of ``_COLUMNS`` and the actions, then (reads and claims) the requeue reason."""
    (run_id, status, spec_text, owner, attempt, lease, last, checkpoint, result, cancel, trace, created, updated,
     actions) = row[:14]
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
        requeue_reason=row[14] if len(row) > 14 else "",
    )


def encoded_events(run_id: str, events: Sequence[RunEvent]) -> tuple[int, list[str], str]:
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
