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
        "progress": f"SELECT {q}.agentd_run_progress($1, $2, $3, $4, $5, $6, $7)",
        "finish": f"SELECT {q}.agentd_run_finish($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
