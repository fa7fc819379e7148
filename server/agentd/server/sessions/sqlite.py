"""Embedded persistent session store on SQLite.

All database work runs on one dedicated worker thread: the event loop never blocks
on disk, and because each public method is one synchronous function executed there
inside its own transaction, every operation is atomic and operations of this store
object are serialised. Other store objects or processes on the same file are kept
consistent by SQLite's locking (WAL, ``BEGIN IMMEDIATE`` for writes, busy timeout).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError, StoreUnavailableError
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.sessions.base import (
    SessionPage,
    SessionRecord,
    SessionStore,
    StoredItem,
    check_limit,
    decode_cursor,
    encode_cursor,
)

__all__ = ["SqliteSessionStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    metadata TEXT NOT NULL,
    state TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    item_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_created ON sessions (created_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS items (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    created_at REAL NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS append_requests (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    request_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (session_id, request_id)
) WITHOUT ROWID;
"""

_SESSION_COLUMNS = "id, created_at, updated_at, metadata, state, item_count"

T = TypeVar("T")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _record(row: tuple[Any, ...]) -> SessionRecord:
    session_id, created_at, updated_at, metadata, state, item_count = row
    return SessionRecord(
        session_id=session_id,
        created_at=created_at,
        updated_at=updated_at,
        metadata=json.loads(metadata),
        state=json.loads(state),
        item_count=item_count,
    )


def _stored(session_id: str, row: tuple[Any, ...]) -> StoredItem:
    seq, created_at, data = row
    return StoredItem(session_id=session_id, sequence=seq, created_at=created_at, item=item_from_dict(json.loads(data)))


def _select_session(conn: sqlite3.Connection, session_id: str) -> SessionRecord:
    row = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        raise SessionNotFoundError(session_id)
    return _record(row)


def _require_session(conn: sqlite3.Connection, session_id: str) -> int:
    """The session's last sequence; raises when it does not exist."""
    row = conn.execute("SELECT last_seq FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        raise SessionNotFoundError(session_id)
    last_seq: int = row[0]
    return last_seq


def _insert_session(
    conn: sqlite3.Connection, session_id: str, metadata: dict[str, str] | None, state: dict[str, Any] | None
) -> None:
    now = time.time()
    conn.execute(
        "INSERT INTO sessions (id, created_at, updated_at, metadata, state) VALUES (?, ?, ?, ?, ?)",
        (session_id, now, now, _dumps(metadata or {}), _dumps(state or {})),
    )


class SqliteSessionStore(SessionStore):
    """Sessions in one SQLite file (or ``":memory:"``), driven from a single worker thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    # --- plumbing -------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"sqlite store at {self._path}: {exc}")

    def _connect(self) -> sqlite3.Connection:
        if self._path != ":memory:" and not self._path.startswith("file:"):
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so each call is exactly one transaction.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._transaction(conn, True, self._create_schema)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # Not executescript: it would COMMIT our transaction before running.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        if row[0] is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise StoreUnavailableError(
                f"sqlite store at {self._path}: schema version {row[0]} is not supported (expected {SCHEMA_VERSION})"
            )

    @staticmethod
    def _transaction(conn: sqlite3.Connection, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one transaction; writers take the lock up front so they never deadlock on upgrade."""
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def _run(self, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One hop to the worker thread. If the caller is cancelled the operation still
        completes or rolls back as a whole; it is never left half-written."""
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise StoreUnavailableError(f"sqlite store at {self._path}: not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, self._transaction, conn, write, fn)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc

    async def open(self) -> None:
        if self._conn is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentd-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(executor, self._connect)
        except BaseException as exc:
            executor.shutdown(wait=False)
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise self._unavailable(exc) from exc
            raise
        self._executor = executor

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None or conn is None:
            return
        try:
            # Queued behind any in-flight operation, so those finish first.
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            executor.shutdown(wait=False)

    # --- sessions -------------------------------------------------------------------

    async def create_session(
        self, session_id: str, metadata: dict[str, str] | None = None, state: dict[str, Any] | None = None
    ) -> SessionRecord:
        def op(conn: sqlite3.Connection) -> SessionRecord:
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise SessionExistsError(session_id)
            _insert_session(conn, session_id, metadata, state)
            return _select_session(conn, session_id)

        return await self._run(True, op)

    async def get_session(self, session_id: str) -> SessionRecord:
        return await self._run(False, lambda conn: _select_session(conn, session_id))

    async def list_sessions(self, limit: int, cursor: str | None = None) -> SessionPage:
        check_limit(limit)
        after = decode_cursor(cursor) if cursor is not None else None

        def op(conn: sqlite3.Connection) -> SessionPage:
            if after is None:
                rows = conn.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY created_at DESC, id DESC LIMIT ?",
                    (limit + 1,),
                ).fetchall()
            else:
                created_at, session_id = after
                rows = conn.execute(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions"
                    " WHERE created_at < ? OR (created_at = ? AND id < ?)"
                    " ORDER BY created_at DESC, id DESC LIMIT ?",
                    (created_at, created_at, session_id, limit + 1),
                ).fetchall()
            records = [_record(row) for row in rows[:limit]]
            last = records[-1] if len(rows) > limit else None
            return SessionPage(
                sessions=records,
                next_cursor=encode_cursor(last.created_at, last.session_id) if last else None,
            )

        return await self._run(False, op)

    async def update_session(
        self, session_id: str, *, metadata: dict[str, str] | None = None, state: dict[str, Any] | None = None
    ) -> SessionRecord:
        def op(conn: sqlite3.Connection) -> SessionRecord:
            _require_session(conn, session_id)
            conn.execute(
                "UPDATE sessions SET metadata = coalesce(?, metadata), state = coalesce(?, state), updated_at = ?"
                " WHERE id = ?",
                (
                    _dumps(metadata) if metadata is not None else None,
                    _dumps(state) if state is not None else None,
                    time.time(),
                    session_id,
                ),
            )
            return _select_session(conn, session_id)

        return await self._run(True, op)

    async def delete_session(self, session_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # Items and request ids go with it through ON DELETE CASCADE.
            if conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount == 0:
                raise SessionNotFoundError(session_id)

        await self._run(True, op)

    # --- items ----------------------------------------------------------------------

    async def append_items(
        self, session_id: str, items: Sequence[Item], request_id: str | None = None
    ) -> list[StoredItem]:
        items = list(items)

        def op(conn: sqlite3.Connection) -> list[StoredItem]:
            last_seq = _require_session(conn, session_id)
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
            now = time.time()
            first = last_seq + 1
            conn.executemany(
                "INSERT INTO items (session_id, seq, created_at, type, data) VALUES (?, ?, ?, ?, ?)",
                [(session_id, first + i, now, d["type"], _dumps(d)) for i, d in enumerate(dicts)],
            )
            last = first + len(dicts) - 1
            conn.execute(
                "UPDATE sessions SET last_seq = ?, item_count = item_count + ?, updated_at = ? WHERE id = ?",
                (last, len(dicts), now, session_id),
            )
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

        def op(conn: sqlite3.Connection) -> list[StoredItem]:
            _require_session(conn, session_id)
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

    async def read_history(self, session_id: str, *, create: bool = False) -> list[Item]:
        def op(conn: sqlite3.Connection) -> list[Item]:
            if create and not conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                _insert_session(conn, session_id, None, None)
                return []
            rows = conn.execute("SELECT data FROM items WHERE session_id = ? ORDER BY seq", (session_id,))
            return [item_from_dict(json.loads(data)) for (data,) in rows]

        return await self._run(create, op)

    async def pop_item(self, session_id: str) -> StoredItem | None:
        def op(conn: sqlite3.Connection) -> StoredItem | None:
            _require_session(conn, session_id)
            row = conn.execute(
                "SELECT seq, created_at, data FROM items WHERE session_id = ? ORDER BY seq DESC LIMIT 1",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM items WHERE session_id = ? AND seq = ?", (session_id, row[0]))
            conn.execute(
                "UPDATE sessions SET item_count = item_count - 1, updated_at = ? WHERE id = ?",
                (time.time(), session_id),
            )
            return _stored(session_id, row)

        return await self._run(True, op)

    async def clear_items(self, session_id: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            _require_session(conn, session_id)
            removed: int = conn.execute("DELETE FROM items WHERE session_id = ?", (session_id,)).rowcount
            if removed:
                conn.execute(
                    "UPDATE sessions SET item_count = 0, updated_at = ? WHERE id = ?", (time.time(), session_id)
                )
            return removed

        return await self._run(True, op)


def _items_between(conn: sqlite3.Connection, session_id: str, first: int, last: int) -> list[StoredItem]:
    """What an earlier request stored and still exists (some may since have been popped)."""
    rows = conn.execute(
        "SELECT seq, created_at, data FROM items WHERE session_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
        (session_id, first, last),
    ).fetchall()
    return [_stored(session_id, row) for row in rows]
