"""One SQLite connection driven from one dedicated thread: the plumbing shared by the
SQLite session store, the SQLite agent store and the SQLite trace archive; and, in
``SqliteEngine``, the schema handling and lifecycle of a store on it.

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
from typing import Callable, Sequence, TypeVar

from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.sessions.base import SchemaStatus

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


# --- versioned tables ----------------------------------------------------------------


def table_version(conn: sqlite3.Connection, version_table: str) -> int:
    """The version recorded in ``version_table`` (0 when the table does not exist yet)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (version_table,)
    ).fetchone()
    current = conn.execute(f"SELECT max(version) FROM {version_table}").fetchone()[0] if exists else None
    return int(current or 0)


def apply_migrations(conn: sqlite3.Connection, version_table: str, migrations: Sequence[str]) -> int:
    """Apply the pending ``migrations`` (version N is ``migrations[N - 1]``), recording each
    in ``version_table``, and return the version reached.

    Call it inside one write transaction (``transaction(conn, True, ...)``), so concurrent
    openers apply each migration once. Each migration runs one statement at a time, split
    on ";" (so no ";" in their comments): executescript would COMMIT our transaction first.
    """
    conn.execute(f"CREATE TABLE IF NOT EXISTS {version_table} (version INTEGER NOT NULL)")
    current = table_version(conn, version_table)
    for version in range(current + 1, len(migrations) + 1):
        for statement in migrations[version - 1].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"INSERT INTO {version_table} (version) VALUES (?)", (version,))
    return table_version(conn, version_table)


class SqliteEngine:
    """A store in one SQLite file on a ``SqliteWorker``: open (migrate, or check the tables
    when ``auto_migrate`` is off, before any operation), close, ping, and the ``agentd db``
    commands (``schema_status``, ``migrate``), which work on a closed store too.

    The session and the agent store keep their tables in the same file, each with its own
    ``_version_table`` and ``_migrations``, and handle them the same way: so it is done
    here once. ``_too_old`` is what ``open`` says of tables older than this code.
    """

    _version_table = "schema_version"
    _migrations: Sequence[str] = ()
    _too_old = "{where}: schema is at version {current}, this agentd needs {latest}: run `agentd db migrate`"

    def __init__(self, path: str, *, auto_migrate: bool, location: str, thread_name: str) -> None:
        self._path = path
        self._auto_migrate = auto_migrate
        self._worker = SqliteWorker(path, location, thread_name)

    @property
    def path(self) -> str:
        return self._path

    def _status(self, conn: sqlite3.Connection) -> SchemaStatus:
        return SchemaStatus("sqlite", self._path, table_version(conn, self._version_table), len(self._migrations))

    def _apply_migrations(self, conn: sqlite3.Connection) -> SchemaStatus:
        apply_migrations(conn, self._version_table, self._migrations)
        return self._status(conn)

    def _migrate_or_check(self, conn: sqlite3.Connection) -> SchemaStatus:
        return self._apply_migrations(conn) if self._auto_migrate else self._status(conn)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        status = transaction(conn, self._auto_migrate, self._migrate_or_check)
        if status.pending:
            raise StoreUnavailableError(
                self._too_old.format(where=self._worker.location, current=status.current, latest=status.latest)
            )

    async def _run(self, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._worker.run(write, fn)

    async def open(self) -> None:
        await self._worker.open(self._prepare)

    async def close(self) -> None:
        await self._worker.close()

    async def ping(self) -> None:
        await self._run(False, lambda conn: conn.execute("SELECT 1").fetchone())

    async def _with_connection(self, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
        """For the ``agentd db`` commands: use the open store, or a short-lived connection."""
        if self._worker.is_open:
            return await self._run(write, fn)

        def standalone() -> T:
            conn = connect(self._path)
            try:
                return transaction(conn, write, fn)
            finally:
                conn.close()

        try:
            return await asyncio.to_thread(standalone)
        except sqlite3.Error as exc:
            raise self._worker.unavailable(exc) from exc

    async def schema_status(self) -> SchemaStatus:
        if not self._worker.is_open and self._path != ":memory:" and not Path(self._path).exists():
            # Looking must not create the file.
            return SchemaStatus("sqlite", self._path, 0, len(self._migrations))
        return await self._with_connection(False, self._status)

    async def migrate(self) -> SchemaStatus:
        return await self._with_connection(True, self._apply_migrations)
