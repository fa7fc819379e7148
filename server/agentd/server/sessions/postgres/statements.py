"""The statements the Postgres session store sends."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ["Statements"]

# A session row as SessionRecord fields, epoch seconds read back from the stored values.
_RECORD = (
    "id, extract(epoch FROM created_at)::float8, extract(epoch FROM updated_at)::float8,"
    " metadata, state, item_count, ttl_s, extract(epoch FROM expires_at)::float8"
)
_ITEM = "i.seq, extract(epoch FROM i.created_at)::float8, i.data"


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement the store sends: constant per store, so asyncpg prepares each once
    per connection. ``{s}`` is the quoted schema; ``$now`` parameters are unix seconds."""

    get: str = (
        f"SELECT {_RECORD} FROM {{s}}.sessions"
        " WHERE id = $1 AND (expires_at IS NULL OR expires_at > to_timestamp($2))"
    )
    exists: str = "SELECT 1 FROM {s}.sessions WHERE id = $1 AND (expires_at IS NULL OR expires_at > to_timestamp($2))"
    create: str = f"SELECT {_RECORD} FROM {{s}}.agentd_create($1, $2, $3::jsonb, $4::jsonb, $5)"
    # $5 / $3: the tenant (its sessions only, from the sessions_by_tenant index).
    list_first: str = (
        f"SELECT {_RECORD} FROM {{s}}.sessions WHERE tenant = $3"
        " AND (expires_at IS NULL OR expires_at > to_timestamp($1))"
        " ORDER BY created_at DESC, id DESC LIMIT $2"
    )
    list_after: str = (
        f"SELECT {_RECORD} FROM {{s}}.sessions"
        " WHERE tenant = $5 AND (created_at, id) < (to_timestamp($2), $3::text)"
        " AND (expires_at IS NULL OR expires_at > to_timestamp($1))"
        " ORDER BY created_at DESC, id DESC LIMIT $4"
    )
    # $4: NULL keeps the TTL, 0 removes it, > 0 sets it; expiry restarts from $5 either way.
    update: str = (
        "UPDATE {s}.sessions SET metadata = coalesce($2::jsonb, metadata), state = coalesce($3::jsonb, state),"
        " ttl_s = CASE WHEN $4::float8 IS NULL THEN ttl_s ELSE nullif($4, 0) END,"
        " updated_at = to_timestamp($5),"
        " expires_at = to_timestamp($5)"
        " + make_interval(secs => CASE WHEN $4 IS NULL THEN ttl_s ELSE nullif($4, 0) END)"
        " WHERE id = $1 AND (expires_at IS NULL OR expires_at > to_timestamp($5))"
        f" RETURNING {_RECORD}"
    )
    # Deletes an expired session's rows too, but reports it as missing.
    delete: str = "DELETE FROM {s}.sessions WHERE id = $1 RETURNING expires_at IS NULL OR expires_at > to_timestamp($2)"
    append: str = "SELECT seq, created_at, data FROM {s}.agentd_append($1, $2, $3, $4, $5, $6)"
    # An append without a request id is one plain statement (no function call: cheaper):
    # numbering and locking are the session row's update, whose row lock serialises
    # appends to the session on every replica (a waiting one numbers from the row it
    # waited for), and the items are inserted from its result. It returns each item's
    # sequence and stored time; no row when no live session was updated (nothing inserted).
    # $3..$5: the items' types, roles and JSON texts (append_one: of its one item).
    append_new: str = (
        "WITH s AS (UPDATE {s}.sessions s SET last_seq = s.last_seq + cardinality($5::text[]),"
        " item_count = s.item_count + cardinality($5::text[]), updated_at = to_timestamp($2),"
        " expires_at = to_timestamp($2) + make_interval(secs => s.ttl_s)"
        " WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > to_timestamp($2))"
        " RETURNING s.last_seq - cardinality($5::text[]) AS last)"
        " INSERT INTO {s}.items AS i (session_id, seq, created_at, type, role, data)"
        " SELECT $1, s.last + t.n, to_timestamp($2), t.type, t.role, t.data::json"
        " FROM s, unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS t (type, role, data, n)"
        " RETURNING i.seq, extract(epoch FROM i.created_at)::float8"
    )
    append_one: str = (
        "WITH s AS (UPDATE {s}.sessions s SET last_seq = s.last_seq + 1, item_count = s.item_count + 1,"
        " updated_at = to_timestamp($2), expires_at = to_timestamp($2) + make_interval(secs => s.ttl_s)"
        " WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > to_timestamp($2))"
        " RETURNING s.last_seq)"
        " INSERT INTO {s}.items AS i (session_id, seq, created_at, type, role, data)"
        " SELECT $1, s.last_seq, to_timestamp($2), $3, $4, $5::json FROM s"
        " RETURNING i.seq, extract(epoch FROM i.created_at)::float8"
    )
    # A live session with no items in range gives one row of NULLs; a missing one, no row.
    list_oldest: str = (
        f"SELECT {_ITEM} FROM {{s}}.sessions s LEFT JOIN LATERAL ("
        " SELECT seq, created_at, data FROM {s}.items"
        " WHERE session_id = s.id AND seq > $2 ORDER BY seq LIMIT $3) i ON true"
        " WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > to_timestamp($4)) ORDER BY i.seq"
    )
    list_newest: str = (
        f"SELECT {_ITEM} FROM {{s}}.sessions s LEFT JOIN LATERAL ("
        " SELECT seq, created_at, data FROM {s}.items"
        " WHERE session_id = s.id AND seq < $2 ORDER BY seq DESC LIMIT $3) i ON true"
        " WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > to_timestamp($4)) ORDER BY i.seq DESC"
    )
    history: str = (
        "SELECT i.data FROM {s}.sessions s JOIN {s}.items i ON i.session_id = s.id"
        " WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > to_timestamp($2)) ORDER BY i.seq"
    )
    history_create: str = "SELECT data FROM {s}.agentd_read_history_create($1, $2, $3)"
    # The history window: the newest $2 items, oldest first, each row with the session's
    # item_count; a live session without items gives one row (item_count, NULL), a missing one none.
    history_window: str = (
        "SELECT s.item_count, i.data FROM {s}.sessions s LEFT JOIN LATERAL ("
        " SELECT seq, data FROM {s}.items WHERE session_id = s.id ORDER BY seq DESC LIMIT $2) i ON true"
        " WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > to_timestamp($3)) ORDER BY i.seq"
    )
    history_window_create: str = "SELECT total, data FROM {s}.agentd_read_history_create($1, $2, $3, $4)"
    pop: str = "SELECT seq, created_at, data FROM {s}.agentd_pop($1, $2)"
    clear: str = "SELECT {s}.agentd_clear($1, $2)"
    # $3: the last sequence to remove, clamped by the caller to [0, 2**63 - 1].
    drop_through: str = "SELECT {s}.agentd_drop_through($1, $2, $3)"
    # SKIP LOCKED: a session some write holds is left for the next sweep, never waited on.
    # ANY(ARRAY(...)): the delete then finds each row through the primary key.
    sweep: str = (
        "WITH gone AS (DELETE FROM {s}.sessions WHERE id = ANY (ARRAY("
        "SELECT id FROM {s}.sessions WHERE expires_at <= to_timestamp($1)"
        " ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)) RETURNING 1)"
        " SELECT count(*) FROM gone"
    )

    def for_schema(self, quoted_schema: str) -> Statements:
        return replace(self, **{f.name: getattr(self, f.name).format(s=quoted_schema) for f in fields(self)})
