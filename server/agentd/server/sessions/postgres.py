"""Shared session store on PostgreSQL, through an asyncpg connection pool.

Several agentd replicas can serve the same sessions: every public method is one
statement, so one round trip and one transaction. The writes that need several steps
(append, pop, clear, create, read-and-create) are PL/pgSQL functions created by the
migrations; each starts by locking the session row, which serialises writers of one
session across all replicas and makes sequence numbers gap-free and unique. A
cancelled caller cannot leave anything half-written: a statement commits or rolls back
as a whole.

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
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, fields, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import asyncpg

from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError, StoreUnavailableError
from agentd.server.postgres_common import ErrorText, apply_migrations, check_schema, location, schema_version
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.sessions.base import (
    SchemaStatus,
    SessionPage,
    SessionRecord,
    SessionStore,
    StoredItem,
    check_limit,
    decode_cursor,
    encode_cursor,
    resolve_ttl,
)

__all__ = ["MIGRATIONS", "LATEST_VERSION", "PostgresSessionStore"]

log = logging.getLogger("agentd.store")

T = TypeVar("T")

# Raised by the functions below; translated to SessionNotFoundError / SessionExistsError.
_NOT_FOUND = "AG404"
_EXISTS = "AG409"

# Versioned, append-only: version N is MIGRATIONS[N - 1]. Never edit a released entry;
# add a new one. ``migrate`` runs each with ``search_path`` set to the store's schema,
# inside the same transaction as its schema_version row, so names are unqualified here.
MIGRATIONS: tuple[str, ...] = (
    # 1: sessions, items, request ids, and the multi-step writes as functions
    r"""
    CREATE TABLE sessions (
        id text COLLATE "C" PRIMARY KEY,  -- "C": ids order by code point, like every other store
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        metadata jsonb NOT NULL,
        state jsonb NOT NULL,
        last_seq bigint NOT NULL DEFAULT 0,  -- never rewinds: sequences are not reused
        item_count bigint NOT NULL DEFAULT 0,
        ttl_s double precision CHECK (ttl_s > 0),  -- NULL: never expires
        expires_at timestamptz  -- last write + ttl_s; NULL without a TTL
    ) WITH (fillfactor = 90);  -- room for HOT updates: every append rewrites the row
    CREATE INDEX sessions_by_created ON sessions (created_at DESC, id DESC);
    CREATE INDEX sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;

    CREATE TABLE items (
        session_id text COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        seq bigint NOT NULL,
        created_at timestamptz NOT NULL,
        type text NOT NULL,
        role text,  -- messages only
        data json NOT NULL,
        PRIMARY KEY (session_id, seq)  -- serves history, paging both ways, pop and cascades
    );

    CREATE TABLE append_requests (
        session_id text COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        request_id text NOT NULL,
        first_seq bigint NOT NULL,
        last_seq bigint NOT NULL,
        PRIMARY KEY (session_id, request_id)
    );

    -- Create a session; an expired one holding the id is replaced (its rows cascade).
    -- AG409 when a live session has the id.
    CREATE FUNCTION agentd_create(
        p_id text, p_now double precision, p_metadata jsonb, p_state jsonb, p_ttl double precision
    ) RETURNS SETOF sessions LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_now timestamptz := to_timestamp(p_now);
    BEGIN
        DELETE FROM sessions s WHERE s.id = p_id AND s.expires_at <= v_now;
        RETURN QUERY
            INSERT INTO sessions AS s (id, created_at, updated_at, metadata, state, ttl_s, expires_at)
            VALUES (p_id, v_now, v_now, p_metadata, p_state, p_ttl, v_now + make_interval(secs => p_ttl))
            ON CONFLICT (id) DO NOTHING
            RETURNING s.*;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'session % already exists', p_id USING ERRCODE = 'AG409';
        END IF;
    END $$;

    -- A run's history, creating the session (over an expired one) when it is missing.
    -- One row per item in order; a live session without items gives one NULL row.
    CREATE FUNCTION agentd_read_history_create(p_id text, p_now double precision, p_ttl double precision)
    RETURNS TABLE (data json) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_now timestamptz := to_timestamp(p_now);
    BEGIN
        -- Loops only if a concurrent delete removes the session between two statements.
        FOR attempt IN 1..3 LOOP
            DELETE FROM sessions s WHERE s.id = p_id AND s.expires_at <= v_now;
            INSERT INTO sessions (id, created_at, updated_at, metadata, state, ttl_s, expires_at)
            VALUES (p_id, v_now, v_now, '{}', '{}', p_ttl, v_now + make_interval(secs => p_ttl))
            ON CONFLICT (id) DO NOTHING;
            IF FOUND THEN
                RETURN;  -- new: no items
            END IF;
            -- One snapshot for the session and its items: a consistent history.
            RETURN QUERY
                SELECT i.data FROM sessions s LEFT JOIN items i ON i.session_id = s.id
                WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
                ORDER BY i.seq;
            IF FOUND THEN
                RETURN;
            END IF;
        END LOOP;
        RAISE EXCEPTION 'session % keeps disappearing', p_id USING ERRCODE = '40001';
    END $$;

    -- Append a run's items, numbered after last_seq, all or nothing. With a request id
    -- already used on the session: append nothing and return the stored items of that
    -- request that still exist. Otherwise return one row: the first new sequence, the
    -- stored created_at and a NULL payload (the caller has the items). AG404: no session.
    CREATE FUNCTION agentd_append(
        p_id text, p_request text, p_now double precision, p_types text[], p_roles text[], p_data text[]
    ) RETURNS TABLE (seq bigint, created_at double precision, data json)
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_now timestamptz := to_timestamp(p_now);
        v_count bigint := cardinality(p_data);
        v_last bigint;
        v_first bigint;
        v_final bigint;
    BEGIN
        IF p_request IS NULL THEN
            -- Without a request id, numbering and locking are one row update: the row
            -- lock it takes serialises appends to this session on every replica.
            UPDATE sessions s
            SET last_seq = s.last_seq + v_count, item_count = s.item_count + v_count, updated_at = v_now,
                expires_at = v_now + make_interval(secs => s.ttl_s)
            WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
            RETURNING s.last_seq - v_count INTO v_last;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
            END IF;
            INSERT INTO items (session_id, seq, created_at, type, role, data)
            SELECT p_id, v_last + t.n, v_now, t.type, t.role, t.data::json
            FROM unnest(p_types, p_roles, p_data) WITH ORDINALITY AS t (type, role, data, n);
            RETURN QUERY SELECT v_last + 1, extract(epoch FROM v_now)::float8, NULL::json;
            RETURN;
        END IF;
        -- The row lock serialises appends to this session on every replica.
        SELECT s.last_seq INTO v_last FROM sessions s
        WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
        FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
        END IF;
        IF p_request IS NOT NULL THEN
            SELECT r.first_seq, r.last_seq INTO v_first, v_final FROM append_requests r
            WHERE r.session_id = p_id AND r.request_id = p_request;
            IF FOUND THEN
                RETURN QUERY
                    SELECT i.seq, extract(epoch FROM i.created_at)::float8, i.data FROM items i
                    WHERE i.session_id = p_id AND i.seq BETWEEN v_first AND v_final ORDER BY i.seq;
                RETURN;
            END IF;
        END IF;
        INSERT INTO items (session_id, seq, created_at, type, role, data)
        SELECT p_id, v_last + t.n, v_now, t.type, t.role, t.data::json
        FROM unnest(p_types, p_roles, p_data) WITH ORDINALITY AS t (type, role, data, n);
        UPDATE sessions s
        SET last_seq = v_last + v_count, item_count = s.item_count + v_count, updated_at = v_now,
            expires_at = v_now + make_interval(secs => s.ttl_s)
        WHERE s.id = p_id;
        INSERT INTO append_requests (session_id, request_id, first_seq, last_seq)
        VALUES (p_id, p_request, v_last + 1, v_last + v_count);
        RETURN QUERY SELECT v_last + 1, extract(epoch FROM v_now)::float8, NULL::json;
    END $$;

    -- Remove and return the newest item (no row when there is none). AG404: no session.
    CREATE FUNCTION agentd_pop(p_id text, p_now double precision)
    RETURNS TABLE (seq bigint, created_at double precision, data json)
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_now timestamptz := to_timestamp(p_now);
    BEGIN
        PERFORM FROM sessions s
        WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
        FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
        END IF;
        RETURN QUERY
            DELETE FROM items i
            WHERE i.session_id = p_id
              AND i.seq = (SELECT max(i2.seq) FROM items i2 WHERE i2.session_id = p_id)
            RETURNING i.seq, extract(epoch FROM i.created_at)::float8, i.data;
        IF FOUND THEN
            UPDATE sessions s
            SET item_count = s.item_count - 1, updated_at = v_now,
                expires_at = v_now + make_interval(secs => s.ttl_s)
            WHERE s.id = p_id;
        END IF;
    END $$;

    -- Remove all items, keeping the session; returns how many. AG404: no session.
    CREATE FUNCTION agentd_clear(p_id text, p_now double precision)
    RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        v_now timestamptz := to_timestamp(p_now);
        v_removed bigint;
    BEGIN
        PERFORM FROM sessions s
        WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
        FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
        END IF;
        DELETE FROM items i WHERE i.session_id = p_id;
        GET DIAGNOSTICS v_removed = ROW_COUNT;
        IF v_removed > 0 THEN
            UPDATE sessions s
            SET item_count = 0, updated_at = v_now, expires_at = v_now + make_interval(secs => s.ttl_s)
            WHERE s.id = p_id;
        END IF;
        RETURN v_removed;
    END $$;
    """,
)
LATEST_VERSION = len(MIGRATIONS)

# Failures that say nothing about the statement but much about the connection.
_CONNECTION_IN_DOUBT = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
_SWEEP_BATCH = 1000
_PING_TIMEOUT_S = 2.0

# A session row as SessionRecord fields, epoch seconds read back from the stored values.
_RECORD = (
    "id, extract(epoch FROM created_at)::float8, extract(epoch FROM updated_at)::float8,"
    " metadata, state, item_count, ttl_s, extract(epoch FROM expires_at)::float8"
)
_ITEM = "i.seq, extract(epoch FROM i.created_at)::float8, i.data"


@dataclass(frozen=True, slots=True)
class _Statements:
    """Every statement the store sends: constant per store, so asyncpg prepares each once
    per connection. ``{s}`` is the quoted schema; ``$now`` parameters are unix seconds."""

    get: str = (
        f"SELECT {_RECORD} FROM {{s}}.sessions"
        " WHERE id = $1 AND (expires_at IS NULL OR expires_at > to_timestamp($2))"
    )
    exists: str = "SELECT 1 FROM {s}.sessions WHERE id = $1 AND (expires_at IS NULL OR expires_at > to_timestamp($2))"
    create: str = f"SELECT {_RECORD} FROM {{s}}.agentd_create($1, $2, $3::jsonb, $4::jsonb, $5)"
    list_first: str = (
        f"SELECT {_RECORD} FROM {{s}}.sessions WHERE expires_at IS NULL OR expires_at > to_timestamp($1)"
        " ORDER BY created_at DESC, id DESC LIMIT $2"
    )
    list_after: str = (
        f"SELECT {_RECORD} FROM {{s}}.sessions"
        " WHERE (created_at, id) < (to_timestamp($2), $3::text)"
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
    pop: str = "SELECT seq, created_at, data FROM {s}.agentd_pop($1, $2)"
    clear: str = "SELECT {s}.agentd_clear($1, $2)"
    # SKIP LOCKED: a session some write holds is left for the next sweep, never waited on.
    # ANY(ARRAY(...)): the delete then finds each row through the primary key.
    sweep: str = (
        "WITH gone AS (DELETE FROM {s}.sessions WHERE id = ANY (ARRAY("
        "SELECT id FROM {s}.sessions WHERE expires_at <= to_timestamp($1)"
        " ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)) RETURNING 1)"
        " SELECT count(*) FROM gone"
    )

    def for_schema(self, quoted_schema: str) -> _Statements:
        return replace(self, **{f.name: getattr(self, f.name).format(s=quoted_schema) for f in fields(self)})


class _StaleConnection(Exception):
    """asyncpg refused to use a pooled connection that had already failed: nothing was sent."""


def _now() -> float:
    """``time.time()`` rounded up to the microsecond ``timestamptz`` keeps: a stored time
    is never earlier than the call that wrote it, and reads back as exactly this float."""
    return math.ceil(time.time() * 1_000_000) / 1_000_000


# NaN/Infinity are not JSON and Postgres refuses them: fail here, as a ValueError. One
# encoder for the process: json.dumps with options builds a new one on every call.
_dumps: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _record(row: asyncpg.Record) -> SessionRecord:
    session_id, created_at, updated_at, metadata, state, item_count, ttl_s, expires_at = row
    return SessionRecord(
        session_id=session_id,
        created_at=created_at,
        updated_at=updated_at,
        metadata=json.loads(metadata),
        state=json.loads(state),
        item_count=item_count,
        ttl_s=ttl_s,
        expires_at=expires_at,
    )


def _stored(session_id: str, row: asyncpg.Record) -> StoredItem:
    seq, created_at, data = row
    return StoredItem(session_id=session_id, sequence=seq, created_at=created_at, item=item_from_dict(json.loads(data)))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to reset. The store leaves no session state behind (no
    SET, LISTEN, cursors or session advisory locks; an open transaction is still rolled
    back by the pool), so the default reset query would only add a round trip per call."""


class PostgresSessionStore(SessionStore):
    """Sessions in a Postgres schema, shared by every replica that points at it."""

    backend = "postgres"

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
        default_ttl_s: float | None = None,
        auto_migrate: bool = True,
    ) -> None:
        self._quoted = check_schema(schema)
        self._url = url
        self._error_text = ErrorText(url)
        self._schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._statement_cache_size = statement_cache_size
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        # Waiting for a pooled connection covers a busy pool and a reconnect, not forever.
        self._acquire_timeout_s = connect_timeout_s + command_timeout_s
        self._default_ttl_s = resolve_ttl(default_ttl_s, None)
        self._auto_migrate = auto_migrate
        self._where = f"postgres store at {location(url)}"
        self._sql = _Statements().for_schema(self._quoted)
        self._pool: asyncpg.Pool | None = None

    @property
    def schema(self) -> str:
        return self._schema

    # --- plumbing -------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self._where}: {self._error_text(exc)}")

    def _cannot_connect(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"{self._where}: cannot connect ({self._error_text(exc)}); check that the server is running"
            " and reachable from here, and that the URL's user, password and database are right"
        )

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "statement_cache_size": self._statement_cache_size,
            "timeout": self._connect_timeout_s,
            "command_timeout": self._command_timeout_s,
            # Lets an operator find (or terminate) agentd's connections in pg_stat_activity.
            "server_settings": {"application_name": "agentd"},
        }

    @asynccontextmanager
    async def _connection(
        self, session_id: str = "", *, admin: bool = False, retryable: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection, with every driver failure inside the block mapped to store errors.

        From the pool; or, for ``admin`` work (status, migrate) on a store that is not
        open, a one-off connection: ``agentd db`` commands need no pool. ``retryable``:
        raise ``_StaleConnection`` when the pooled connection turns out to be dead
        before anything was sent on it.
        """
        pool = self._pool
        if pool is None and not admin:
            raise StoreUnavailableError(f"{self._where}: not open")
        try:
            if pool is not None:
                async with pool.acquire(timeout=self._acquire_timeout_s) as conn:
                    try:
                        yield conn
                    except _CONNECTION_IN_DOUBT as exc:
                        # Not after a timeout: asyncpg has asked the server to cancel the
                        # statement and the pool waits for that; cutting the connection
                        # instead would leave the statement running, and maybe committing.
                        if not isinstance(exc, TimeoutError):
                            # Possibly half-dead (a killed backend whose close is still in
                            # flight): never hand it out again; the pool opens a fresh one.
                            with suppress(asyncpg.InterfaceError):  # already closed and detached
                                conn.terminate()
                        if retryable and isinstance(exc, asyncpg.InternalClientError):
                            raise _StaleConnection() from exc
                        raise
            else:
                try:
                    conn = await asyncpg.connect(self._url, **self._connect_kwargs())
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    raise self._cannot_connect(exc) from exc
                try:
                    yield conn
                finally:
                    with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):  # a broken one is cut off
                        await conn.close(timeout=self._connect_timeout_s)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == _NOT_FOUND:
                raise SessionNotFoundError(session_id) from None
            if exc.sqlstate == _EXISTS:
                raise SessionExistsError(session_id) from None
            if isinstance(exc, asyncpg.DataError):  # a value Postgres cannot hold, e.g. \u0000 in jsonb
                raise ValueError(f"postgres cannot store this value: {exc}") from exc
            raise self._unavailable(exc) from exc
        except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, asyncio.TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def _run(self, op: Callable[[asyncpg.Connection], Awaitable[T]], session_id: str = "") -> T:
        """Run ``op`` (one statement) on a pooled connection: every data call goes here.

        A connection that turns out to be dead before the statement was sent (its backend
        was killed and asyncpg has not noticed the close yet) is replaced and the
        statement sent again: safe, as it never ran. Any other failure is reported, not
        retried: a write may have committed just before its connection was lost.
        """
        for _ in range(self._max_size):  # each dead connection fails once, instantly
            try:
                async with self._connection(session_id, retryable=True) as conn:
                    return await op(conn)
            except _StaleConnection:
                continue
        async with self._connection(session_id) as conn:
            return await op(conn)

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._url,
                min_size=self._min_size,
                max_size=self._max_size,
                reset=_keep_session,
                **self._connect_kwargs(),
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise self._cannot_connect(exc) from exc
        self._pool = pool
        try:
            status = await (self.migrate() if self._auto_migrate else self.schema_status())
            if status.current < status.latest:
                raise StoreUnavailableError(
                    f"postgres schema {self._schema} at {location(self._url)} is at version {status.current},"
                    f" this agentd needs {status.latest}: run `agentd db migrate`"
                )
            if status.current > status.latest:
                # Migrations are additive, so older code keeps working during a rolling deploy.
                log.warning(
                    "postgres schema %s is at version %d, newer than this agentd's %d; continuing",
                    self._schema,
                    status.current,
                    status.latest,
                )
        except BaseException:
            self._pool = None
            pool.terminate()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # Lets in-flight calls finish; a stuck connection is cut off after the timeout.
            await asyncio.wait_for(pool.close(), timeout=self._command_timeout_s)
        except (asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            pool.terminate()

    async def ping(self) -> None:
        await self._run(lambda conn: conn.fetchval("SELECT 1", timeout=min(_PING_TIMEOUT_S, self._command_timeout_s)))

    # --- schema ---------------------------------------------------------------------

    def _status(self, current: int) -> SchemaStatus:
        return SchemaStatus(
            backend=self.backend,
            location=f"{location(self._url)} schema {self._schema}",
            current=current,
            latest=LATEST_VERSION,
        )

    async def schema_status(self) -> SchemaStatus:
        async with self._connection(admin=True) as conn:
            current = await schema_version(conn, self._quoted, "schema_version")
        return self._status(current)

    async def migrate(self) -> SchemaStatus:
        """Bring the schema to ``LATEST_VERSION`` (see ``postgres_common.apply_migrations``)."""
        async with self._connection(admin=True) as conn:
            current = await apply_migrations(conn, self._schema, "schema_version", MIGRATIONS, "session tables")
        return self._status(current)

    async def sweep_expired(self) -> int:
        removed = 0
        while True:
            # One batch per statement (and transaction): short locks, bounded cascades.
            now = _now()
            batch: int = await self._run(lambda conn: conn.fetchval(self._sql.sweep, now, _SWEEP_BATCH))
            removed += batch
            if batch < _SWEEP_BATCH:
                return removed

    # --- sessions -------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        ttl = resolve_ttl(ttl_s, self._default_ttl_s)
        args = (session_id, _now(), _dumps(metadata or {}), _dumps(state or {}), ttl)
        row = await self._run(lambda conn: conn.fetchrow(self._sql.create, *args), session_id)
        return _record(row)

    async def get_session(self, session_id: str) -> SessionRecord:
        now = _now()
        row = await self._run(lambda conn: conn.fetchrow(self._sql.get, session_id, now), session_id)
        if row is None:
            raise SessionNotFoundError(session_id)
        return _record(row)

    async def list_sessions(self, limit: int, cursor: str | None = None) -> SessionPage:
        check_limit(limit)
        after = decode_cursor(cursor) if cursor is not None else None
        now = _now()
        if after is None:
            rows = await self._run(lambda conn: conn.fetch(self._sql.list_first, now, limit + 1))
        else:
            rows = await self._run(lambda conn: conn.fetch(self._sql.list_after, now, *after, limit + 1))
        records = [_record(row) for row in rows[:limit]]
        last = records[-1] if len(rows) > limit else None
        return SessionPage(
            sessions=records,
            next_cursor=encode_cursor(last.created_at, last.session_id) if last else None,
        )

    async def update_session(
        self,
        session_id: str,
        *,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        # None keeps the TTL; 0 (sent as 0.0) removes it.
        ttl = None if ttl_s is None else resolve_ttl(ttl_s, None) or 0.0
        args = (
            session_id,
            _dumps(metadata) if metadata is not None else None,
            _dumps(state) if state is not None else None,
            ttl,
            _now(),
        )
        row = await self._run(lambda conn: conn.fetchrow(self._sql.update, *args), session_id)
        if row is None:
            raise SessionNotFoundError(session_id)
        return _record(row)

    async def delete_session(self, session_id: str) -> None:
        # Items and request ids go with it through ON DELETE CASCADE.
        now = _now()
        live = await self._run(lambda conn: conn.fetchval(self._sql.delete, session_id, now), session_id)
        if not live:
            raise SessionNotFoundError(session_id)

    # --- items ----------------------------------------------------------------------

    async def append_items(
        self, session_id: str, items: Sequence[Item], request_id: str | None = None
    ) -> list[StoredItem]:
        # Serialise and validate everything before the round trip: all or nothing.
        dicts = [item.to_dict() for item in items]
        normalised = [item_from_dict(d) for d in dicts]
        if not normalised:
            now = _now()
            if await self._run(lambda conn: conn.fetchval(self._sql.exists, session_id, now), session_id) is None:
                raise SessionNotFoundError(session_id)
            return []
        args = (
            session_id,
            request_id,
            _now(),
            [d["type"] for d in dicts],
            [d.get("role") for d in dicts],
            [_dumps(d) for d in dicts],
        )
        rows = await self._run(lambda conn: conn.fetch(self._sql.append, *args), session_id)
        if len(rows) == 1 and rows[0][2] is None:  # appended now: the first sequence and the time
            first, created_at = rows[0][0], rows[0][1]
            return [
                StoredItem(session_id=session_id, sequence=first + i, created_at=created_at, item=item)
                for i, item in enumerate(normalised)
            ]
        return [_stored(session_id, row) for row in rows]  # a replayed request

    async def list_items(
        self,
        session_id: str,
        limit: int,
        *,
        newest_first: bool = False,
        after_sequence: int = 0,
        before_sequence: int | None = None,
    ) -> list[StoredItem]:
        check_limit(limit)
        if newest_first:
            bound = before_sequence if before_sequence is not None else 2**63 - 1
            sql, args = self._sql.list_newest, (session_id, bound, limit, _now())
        else:
            sql, args = self._sql.list_oldest, (session_id, after_sequence, limit, _now())
        rows = await self._run(lambda conn: conn.fetch(sql, *args), session_id)
        if not rows:
            raise SessionNotFoundError(session_id)
        return [_stored(session_id, row) for row in rows if row[0] is not None]

    async def read_history(self, session_id: str, *, create: bool = False) -> list[Item]:
        if create:
            sql, args = self._sql.history_create, (session_id, _now(), self._default_ttl_s)
        else:
            sql, args = self._sql.history, (session_id, _now())
        rows = await self._run(lambda conn: conn.fetch(sql, *args), session_id)
        return [item_from_dict(json.loads(data)) for (data,) in rows if data is not None]

    async def pop_item(self, session_id: str) -> StoredItem | None:
        now = _now()
        row = await self._run(lambda conn: conn.fetchrow(self._sql.pop, session_id, now), session_id)
        return _stored(session_id, row) if row is not None else None

    async def clear_items(self, session_id: str) -> int:
        now = _now()
        removed: int = await self._run(lambda conn: conn.fetchval(self._sql.clear, session_id, now), session_id)
        return removed
