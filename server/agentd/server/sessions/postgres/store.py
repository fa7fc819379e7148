"""``PostgresSessionStore``: sessions in a Postgres schema (see the package docstring)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any, Awaitable, Callable, NoReturn, Sequence, TypeVar

import asyncpg

from agentd.server.postgres_common import PING_TIMEOUT_S, PostgresEngine, location
from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError, StoreUnavailableError
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.sessions.base import (
    History,
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
from agentd.server.sessions.postgres.schema import EXISTS, LATEST_VERSION, MIGRATIONS, NOT_FOUND
from agentd.server.sessions.postgres.statements import Statements
from agentd.server.tenancy import DEFAULT_TENANT

__all__ = ["PostgresSessionStore"]

T = TypeVar("T")

_SWEEP_BATCH = 1000
_MAX_SEQ = 2**63 - 1  # sequences are bigint


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


class PostgresSessionStore(PostgresEngine, SessionStore):
    """Sessions in a Postgres schema, shared by every replica that points at it.

    Pool, open, close, migrations: ``PostgresEngine``'s. Data calls go through ``_run``,
    which also maps the session errors, and retries only connections that were dead
    before use.
    """

    backend = "postgres"
    _tables = "session tables"
    _migrations = MIGRATIONS
    # The session tables came first, and keep their wording.
    _too_old = (
        "postgres schema {schema} at {location} is at version {current}, this agentd needs {latest}:"
        " run `agentd db migrate`"
    )
    _newer = "postgres schema {schema} is at version {current}, newer than this agentd's {latest}; continuing"

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
        super().__init__(
            url=url, schema=schema, min_size=min_size, max_size=max_size, statement_cache_size=statement_cache_size,
            connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s, auto_migrate=auto_migrate,
        )
        self._where = f"postgres store at {location(url)}"  # the session store's messages name no schema
        self._default_ttl_s = resolve_ttl(default_ttl_s, None)
        self._sql = Statements().for_schema(self._quoted)

    # --- plumbing -------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self._where}: {self._error_text(exc)}")

    def _raise(self, exc: asyncpg.PostgresError, session_id: str) -> NoReturn:
        """Raise what a statement's error means for the caller (called while handling it)."""
        if exc.sqlstate == NOT_FOUND:
            raise SessionNotFoundError(session_id) from None
        if exc.sqlstate == EXISTS:
            raise SessionExistsError(session_id) from None
        if isinstance(exc, asyncpg.DataError):  # a value Postgres cannot hold, e.g. \u0000 in jsonb
            raise ValueError(f"postgres cannot store this value: {exc}") from exc
        raise self._unavailable(exc) from exc

    async def _run(self, op: Callable[[asyncpg.Connection], Awaitable[T]], session_id: str = "") -> T:
        """Run ``op`` (one statement) on a pooled connection: every data call goes here.

        A connection that turns out to be dead before the statement was sent (its backend
        was killed and asyncpg has not noticed the close yet) is replaced and the
        statement sent again: safe, as it never ran. Any other failure is reported, not
        retried: a write may have committed just before its connection was lost.
        """
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError(f"{self._where}: not open")
        try:
            for _ in range(self._max_size):  # each dead connection fails once, instantly
                try:
                    return await pool.run(op)
                except asyncpg.InternalClientError:
                    continue  # refused before anything was sent: the pool has cut it off
            return await pool.run(op)
        except asyncpg.PostgresError as exc:
            self._raise(exc, session_id)
        except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, asyncio.TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def ping(self) -> None:
        await self._run(lambda conn: conn.fetchval("SELECT 1", timeout=min(PING_TIMEOUT_S, self._command_timeout_s)))

    # --- schema ---------------------------------------------------------------------

    def _status(self, current: int) -> SchemaStatus:
        return SchemaStatus(
            backend=self.backend,
            location=f"{location(self._url)} schema {self._schema}",
            current=current,
            latest=LATEST_VERSION,
        )

    async def schema_status(self) -> SchemaStatus:
        return self._status(await self._table_version())

    async def migrate(self) -> SchemaStatus:
        """Bring the schema to ``LATEST_VERSION`` (see ``postgres_common.apply_migrations``)."""
        return self._status(await self._migrate())

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

    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> SessionPage:
        check_limit(limit)
        after = decode_cursor(cursor) if cursor is not None else None
        now = _now()
        if after is None:
            rows = await self._run(lambda conn: conn.fetch(self._sql.list_first, now, limit + 1, tenant))
        else:
            rows = await self._run(lambda conn: conn.fetch(self._sql.list_after, now, *after, limit + 1, tenant))
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
        now = _now()
        if request_id is None:
            if len(dicts) == 1:
                d = dicts[0]
                args: tuple[Any, ...] = (session_id, now, d["type"], d.get("role"), _dumps(d))
                sql = self._sql.append_one
            else:
                args = (session_id, now, [d["type"] for d in dicts], [d.get("role") for d in dicts],
                        [_dumps(d) for d in dicts])
                sql = self._sql.append_new
            rows = await self._run(lambda conn: conn.fetch(sql, *args), session_id)
            if not rows:
                raise SessionNotFoundError(session_id)
            first, created_at = min(row[0] for row in rows), rows[0][1]  # every item has the same time
            return [
                StoredItem(session_id=session_id, sequence=first + i, created_at=created_at, item=item)
                for i, item in enumerate(normalised)
            ]
        args = (session_id, request_id, now, [d["type"] for d in dicts], [d.get("role") for d in dicts],
                [_dumps(d) for d in dicts])
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

    async def read_history(self, session_id: str, *, create: bool = False, limit: int | None = None) -> History:
        if limit is not None:
            check_limit(limit)
            return await self._read_window(session_id, create, limit)
        if create:
            sql, args = self._sql.history_create, (session_id, _now(), self._default_ttl_s)
        else:
            sql, args = self._sql.history, (session_id, _now())
        rows = await self._run(lambda conn: conn.fetch(sql, *args), session_id)
        return History(item_from_dict(json.loads(data)) for (data,) in rows if data is not None)

    async def _read_window(self, session_id: str, create: bool, limit: int) -> History:
        args: tuple[Any, ...]
        if create:
            sql, args = self._sql.history_window_create, (session_id, _now(), self._default_ttl_s, limit)
        else:
            sql, args = self._sql.history_window, (session_id, limit, _now())
        rows = await self._run(lambda conn: conn.fetch(sql, *args), session_id)
        if not rows:  # missing (or just created): nothing to read
            return History()
        items = [item_from_dict(json.loads(data)) for (_, data) in rows if data is not None]
        return History(items, max(0, rows[0][0] - len(items)))

    async def pop_item(self, session_id: str) -> StoredItem | None:
        now = _now()
        row = await self._run(lambda conn: conn.fetchrow(self._sql.pop, session_id, now), session_id)
        return _stored(session_id, row) if row is not None else None

    async def clear_items(self, session_id: str) -> int:
        now = _now()
        removed: int = await self._run(lambda conn: conn.fetchval(self._sql.clear, session_id, now), session_id)
        return removed

    async def drop_items_through(self, session_id: str, sequence: int) -> int:
        through = max(0, min(int(sequence), _MAX_SEQ))  # a bigint; beyond it there are no items
        now = _now()
        removed: int = await self._run(
            lambda conn: conn.fetchval(self._sql.drop_through, session_id, now, through), session_id
        )
        return removed
