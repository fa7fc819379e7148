"""One SQLite connection driven from one dedicated thread: the plumbing shared by the
SQLite session store and the SQLite trace archive.

The event loop never blocks on disk, and because each operation is one synchronous
function run there inside its own transaction, every operation is atomic and the
operations of one worker are serialised. If the awaiting caller is cancelled, the
operation still completes or rolls back as a whole; it is never left half-written.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from agentd.server.runtime.errors import StoreUnavailableError

T = TypeVar("T")


def connect(path: str) -> sqlite3.Connection:
    """A connection set up the way both stores want it (creating the file's directory).

    ``isolation_level=None``: callers issue BEGIN/COMMIT through ``transaction``, so each
    operation is exactly one transaction. WAL lets readers run beside the one writer.
    """
    if path != ":memory:" and not path.startswith("file:"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def transaction(conn: sqlite3.Connection, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
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


class SqliteWorker:
    """Owns the thread and the connection; ``location`` prefixes every error message."""

    def __init__(self, path: str, location: str, thread_name: str) -> None:
        self.path = path
        self.location = location
        self._thread_name = thread_name
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self.location}: {exc}")

    async def open(self, prepare: Callable[[sqlite3.Connection], None]) -> None:
        """Connect on the worker thread and run ``prepare`` (migrate or check the schema;
        raise to refuse) before any operation."""
        if self._conn is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)

        def connect_and_prepare() -> sqlite3.Connection:
            conn = connect(self.path)
            try:
                prepare(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(executor, connect_and_prepare)
        except BaseException as exc:
            executor.shutdown(wait=False)
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise self.unavailable(exc) from exc
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

    async def run(self, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One hop to the worker thread, ``fn`` inside one transaction."""
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise StoreUnavailableError(f"{self.location}: not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, transaction, conn, write, fn)
        except sqlite3.Error as exc:
            raise self.unavailable(exc) from exc
