"""``SqliteResultCache``: result cache entries in the session store's SQLite file (see the package docstring)."""

from __future__ import annotations

import os
import sqlite3

from agentd.server.cache.base import DEFAULT_MAX_ENTRY_BYTES, ResultCache
from agentd.server.cache.sqlite.schema import MIGRATIONS, VERSION_TABLE
from agentd.server.sqlite_worker import SqliteEngine

__all__ = ["SWEEP_BATCH", "SqliteResultCache"]

# Expired rows deleted per write transaction by ``sweep``.
SWEEP_BATCH = 1000

_GET = "SELECT value FROM result_cache WHERE tenant = ? AND key = ? AND expires_at > ?"
_PUT = (
    "INSERT INTO result_cache (tenant, key, value, created_at, expires_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, key) DO UPDATE SET value = excluded.value, created_at = excluded.created_at,"
    " expires_at = excluded.expires_at"
)
_SWEEP = (
    "DELETE FROM result_cache WHERE (tenant, key) IN"
    " (SELECT tenant, key FROM result_cache WHERE expires_at <= ? LIMIT ?)"
)


class SqliteResultCache(SqliteEngine, ResultCache):
    """Entries in one SQLite file (or ``":memory:"``), driven from a single worker thread.

    Open, close, ping, schema status and migrations: ``SqliteEngine``'s.
    """

    backend = "sqlite"
    _version_table = VERSION_TABLE
    _migrations = MIGRATIONS
    _too_old = (
        "{where}: result cache tables are at version {current}, this agentd needs {latest}: run `agentd db migrate`"
    )

    def __init__(
        self, path: str | os.PathLike[str], *, auto_migrate: bool = True, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    ) -> None:
        path = os.fspath(path)
        SqliteEngine.__init__(
            self, path, auto_migrate=auto_migrate, location=f"sqlite result cache at {path}",
            thread_name="agentd-cache-sqlite",
        )
        ResultCache.__init__(self, max_entry_bytes=max_entry_bytes)

    @property
    def location(self) -> str:
        return self._worker.location

    async def _load(self, tenant: str, key: str, now: float) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(_GET, (tenant, key, now)).fetchone()
            return None if row is None else str(row[0])

        return await self._run(False, op)

    async def _store(self, tenant: str, key: str, text: str, now: float, expires_at: float) -> None:
        await self._run(True, lambda conn: conn.execute(_PUT, (tenant, key, text, now, expires_at)))

    async def sweep(self, *, now: float) -> int:
        deleted = 0
        while True:
            count = await self._run(True, lambda conn: conn.execute(_SWEEP, (now, SWEEP_BATCH)).rowcount)
            deleted += count
            if count < SWEEP_BATCH:
                return deleted
