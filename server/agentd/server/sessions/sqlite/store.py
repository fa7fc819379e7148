"""``SqliteSessionStore``: sessions in one SQLite file (see the package docstring)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any, Callable, Sequence

from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.sqlite_worker import SqliteEngine
from agentd.server.sessions.base import (
    History,
    SessionPage,
    SessionRecord,
    SessionStore,
    StoredItem,
    check_limit,
    decode_cursor,
    encode_cursor,
    expiry,
    resolve_ttl,
)
from agentd.server.sessions.sqlite.schema import MIGRATIONS
from agentd.server.tenancy import DEFAULT_TENANT

__all__ = ["SqliteSessionStore"]

_SESSION_COLUMNS = "id, created_at, updated_at, metadata, state, item_count, ttl_s, expires_at"
# A session is visible while it has no expiry or its expiry is still ahead of ?now.
_LIVE = "(expires_at IS NULL OR expires_at > ?)"

_MAX_SEQ = 2**63 - 1


# One encoder for the process: json.dumps with options builds a new one on every call.
_dumps: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _record(row: tuple[Any, ...]) -> SessionRecord:
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


def _stored(session_id: str, row: tuple[Any, ...]) -> StoredItem:
    seq, created_at, data = row
    return StoredItem(session_id=session_id, sequence=seq, created_at=created_at, item=item_from_dict(json.loads(data)))


def _select_session(conn: sqlite3.Connection, session_id: str, now: float) -> SessionRecord:
    row = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ? AND {_LIVE}", (session_id, now)
    ).fetchone()
    if row is None:
        raise SessionNotFoundError(session_id)
    return _record(row)


def _require_session(conn: sqlite3.Connection, session_id: str, now: float) -> int:
    """The live session's last sequence; raises when it does not exist or has expired."""
    row = conn.execute(f"SELECT last_seq FROM sessions WHERE id = ? AND {_LIVE}", (session_id, now)).fetchone()
    if row is None:
        raise SessionNotFoundError(session_id)
    last_seq: int = row[0]
    return last_seq


def _touch(conn: sqlite3.Connection, session_id: str, now: float, extra: str = "", params: tuple[Any, ...] = ()) -> None:
    """Record a write: bump updated_at and restart the idle clock, plus the ``extra`` assignments.

    ``extra`` may assign expires_at itself (a TTL change); then the idle-clock default is skipped.
    """
    idle = "" if "expires_at" in extra else ", expires_at = CASE WHEN ttl_s IS NULL THEN NULL ELSE ? + ttl_s END"
    conn.execute(
        f"UPDATE sessions SET {extra}updated_at = ?{idle} WHERE id = ?",
        (*params, now, *((now,) if idle else ()), session_id),
    )


def _insert_session(
    conn: sqlite3.Connection,
    session_id: str,
    metadata: dict[str, str] | None,
    state: dict[str, Any] | None,
    ttl_s: float | None,
    now: float,
) -> None:
    """Insert a new session, first dropping an expired one that holds the id."""
    conn.execute("DELETE FROM sessions WHERE id = ? AND expires_at <= ?", (session_id, now))
    conn.execute(
        "INSERT INTO sessions (id, created_at, updated_at, metadata, state, ttl_s, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (session_id, now, now, _dumps(metadata or {}), _dumps(state or {}), ttl_s, expiry(now, ttl_s)),
    )


class SqliteSessionStore(SqliteEngine, SessionStore):
    """Sessions in one SQLite file (or ``":memory:"``), driven from a single worker thread.

    Open, close, ping, schema status and migrations: ``SqliteEngine``'s.
    """

    backend = "sqlite"
    _migrations = MIGRATIONS

    def __init__(
        self, path: str | os.PathLike[str], *, default_ttl_s: float | None = None, auto_migrate: bool = True
    ) -> None:
        path = os.fspath(path)
        super().__init__(path, auto_migrate=auto_migrate, location=f"sqlite store at {path}",
                         thread_name="agentd-sqlite")
        self._default_ttl_s = resolve_ttl(default_ttl_s, None)

    async def sweep_expired(self) -> int:
        now = time.time()

        def op(conn: sqlite3.Connection) -> int:
            deleted: int = conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount
            return deleted

        return await self._run(True, op)

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

        def op(conn: sqlite3.Connection) -> SessionRecord:
            now = time.time()
            if conn.execute(f"SELECT 1 FROM sessions WHERE id = ? AND {_LIVE}", (session_id, now)).fetchone():
                raise SessionExistsError(session_id)
            _insert_session(conn, session_id, metadata, state, ttl, now)
            return _select_session(conn, session_id, now)

        return await self._run(True, op)

    async def get_session(self, session_id: str) -> SessionRecord:
        now = time.time()
        return await self._run(False, lambda conn: _select_session(conn, session_id, now))

    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> SessionPage:
        check_limit(limit)
        after = decode_cursor(cursor) if cursor is not None else None
        now = time.time()

        def op(conn: sqlite3.Connection) -> SessionPage:
            if after is None:
                rows = conn.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE tenant = ? AND {_LIVE}"
                    " ORDER BY created_at DESC, id DESC LIMIT ?",
                    (tenant, now, limit + 1),
                ).fetchall()
            else:
                created_at, session_id = after
                rows = conn.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions"
                    f" WHERE tenant = ? AND (created_at < ? OR (created_at = ? AND id < ?)) AND {_LIVE}"
                    " ORDER BY created_at DESC, id DESC LIMIT ?",
                    (tenant, created_at, created_at, session_id, now, limit + 1),
                ).fetchall()
            records = [_record(row) for row in rows[:limit]]
            last = records[-1] if len(rows) > limit else None
            return SessionPage(
                sessions=records,
                next_cursor=encode_cursor(last.created_at, last.session_id) if last else None,
            )

        return await self._run(False, op)

    async def update_session(
        self,
        session_id: str,
        *,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        new_ttl = resolve_ttl(ttl_s, None) if ttl_s is not None else None
        new_metadata = _dumps(metadata) if metadata is not None else None
        new_state = _dumps(state) if state is not None else None

        def op(conn: sqlite3.Connection) -> SessionRecord:
            now = time.time()
            _require_session(conn, session_id, now)
            extra, params = "metadata = coalesce(?, metadata), state = coalesce(?, state), ", (new_metadata, new_state)
            if ttl_s is not None:
                # SET sees the old ttl_s, so the new expiry is computed here rather than by _touch.
                extra += "ttl_s = ?, expires_at = ?, "
                params += (new_ttl, expiry(now, new_ttl))
            _touch(conn, session_id, now, extra, params)
            return _select_session(conn, session_id, now)

        return await self._run(True, op)

    async def delete_session(self, session_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # Items and request ids go with it through ON DELETE CASCADE.
            deleted = conn.execute(f"DELETE FROM sessions WHERE id = ? AND {_LIVE}", (session_id, time.time()))
            if deleted.rowcount == 0:
                raise SessionNotFoundError(session_id)

        await self._run(True, op)

    # --- items ----------------------------------------------------------------------

    async def append_items(
        self, session_id: str, items: Sequence[Item], request_id: str | None = None
    ) -> list[StoredItem]:
        items = list(items)

        def op(conn: sqlite3.Connection) -> list[StoredItem]:
            now = time.time()
            last_seq = _require_session(conn, session_id, now)
            if not items:
                return []
            if request_id is not None:
                done = conn.execute(
                    "SELECT first_seq, last_seq FROM append_requests WHERE session_id = ? AND request_id = ?",
                    (session_id, request_id),
                ).fetchone()
                if done is not None:
                    return _items_between(conn, session_id, done[0], done[1])
            dicts = [item.to_dict() for item in items]
            first = last_seq + 1
            conn.executemany(
                "INSERT INTO items (session_id, seq, created_at, type, data) VALUES (?, ?, ?, ?, ?)",
                [(session_id, first + i, now, d["type"], _dumps(d)) for i, d in enumerate(dicts)],
            )
            last = first + len(dicts) - 1
            _touch(conn, session_id, now, "last_seq = ?, item_count = item_count + ?, ", (last, len(dicts)))
            if request_id is not None:
                conn.execute(
                    "INSERT INTO append_requests (session_id, request_id, first_seq, last_seq) VALUES (?, ?, ?, ?)",
                    (session_id, request_id, first, last),
                )
            return [
                StoredItem(session_id=session_id, sequence=first + i, created_at=now, item=item_from_dict(d))
                for i, d in enumerate(dicts)
            ]

        return await self._run(True, op)

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
        now = time.time()

        def op(conn: sqlite3.Connection) -> list[StoredItem]:
            _require_session(conn, session_id, now)
            if newest_first:
                bound = " AND seq < ?" if before_sequence is not None else ""
                params: tuple[Any, ...] = (session_id,) + ((before_sequence,) if before_sequence is not None else ())
                sql = f"SELECT seq, created_at, data FROM items WHERE session_id = ?{bound} ORDER BY seq DESC LIMIT ?"
            else:
                params = (session_id, after_sequence)
                sql = "SELECT seq, created_at, data FROM items WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"
            rows = conn.execute(sql, params + (limit,)).fetchall()
            return [_stored(session_id, row) for row in rows]

        return await self._run(False, op)

    async def read_history(self, session_id: str, *, create: bool = False, limit: int | None = None) -> History:
        if limit is not None:
            check_limit(limit)

        def op(conn: sqlite3.Connection) -> History:
            now = time.time()
            live = conn.execute(
                f"SELECT item_count FROM sessions WHERE id = ? AND {_LIVE}", (session_id, now)
            ).fetchone()
            if not live:
                if create:
                    _insert_session(conn, session_id, None, None, self._default_ttl_s, now)
                return History()
            if limit is None:
                cursor = conn.execute("SELECT data FROM items WHERE session_id = ? ORDER BY seq", (session_id,))
                return History(item_from_dict(json.loads(data)) for (data,) in cursor)
            # The newest ``limit`` through the primary key, backwards; the count is kept on the session.
            newest = conn.execute(
                "SELECT data FROM items WHERE session_id = ? ORDER BY seq DESC LIMIT ?", (session_id, limit)
            ).fetchall()
            newest.reverse()
            return History((item_from_dict(json.loads(data)) for (data,) in newest), max(0, live[0] - len(newest)))

        return await self._run(create, op)

    async def pop_item(self, session_id: str) -> StoredItem | None:
        def op(conn: sqlite3.Connection) -> StoredItem | None:
            now = time.time()
            _require_session(conn, session_id, now)
            row = conn.execute(
                "SELECT seq, created_at, data FROM items WHERE session_id = ? ORDER BY seq DESC LIMIT 1",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM items WHERE session_id = ? AND seq = ?", (session_id, row[0]))
            _touch(conn, session_id, now, "item_count = item_count - 1, ")
            return _stored(session_id, row)

        return await self._run(True, op)

    async def clear_items(self, session_id: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            now = time.time()
            _require_session(conn, session_id, now)
            removed: int = conn.execute("DELETE FROM items WHERE session_id = ?", (session_id,)).rowcount
            if removed:
                _touch(conn, session_id, now, "item_count = 0, ")
            return removed

        return await self._run(True, op)

    async def drop_items_through(self, session_id: str, sequence: int) -> int:
        through = max(0, min(int(sequence), _MAX_SEQ))  # SQLite integers are 64-bit

        def op(conn: sqlite3.Connection) -> int:
            now = time.time()
            _require_session(conn, session_id, now)
            # A range of the primary key; last_seq and append_requests stay as they are.
            removed: int = conn.execute(
                "DELETE FROM items WHERE session_id = ? AND seq <= ?", (session_id, through)
            ).rowcount
            if removed:
                _touch(conn, session_id, now, "item_count = item_count - ?, ", (removed,))
            return removed

        return await self._run(True, op)


def _items_between(conn: sqlite3.Connection, session_id: str, first: int, last: int) -> list[StoredItem]:
    """What an earlier request stored and still exists (some may since have been popped or dropped)."""
    rows = conn.execute(
        "SELECT seq, created_at, data FROM items WHERE session_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
        (session_id, first, last),
    ).fetchall()
    return [_stored(session_id, row) for row in rows]
