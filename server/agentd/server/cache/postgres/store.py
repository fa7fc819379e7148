"""``PostgresResultCache``: result cache entries in a Postgres schema (see the package docstring)."""

from __future__ import annotations

from agentd.server.cache.base import DEFAULT_MAX_ENTRY_BYTES, ResultCache
from agentd.server.cache.postgres.schema import LATEST_VERSION, MIGRATIONS, VERSION_TABLE
from agentd.server.cache.postgres.statements import Statements
from agentd.server.postgres_common import PostgresEngine, location
from agentd.server.sessions.base import SchemaStatus

__all__ = ["SWEEP_BATCH", "PostgresResultCache"]

# Expired rows deleted per statement by ``sweep``.
SWEEP_BATCH = 1000


class PostgresResultCache(PostgresEngine, ResultCache):
    """Entries in a Postgres schema, shared by every replica that points at it.

    Pool, calls, migrations, open, close and ping: ``PostgresEngine``'s.
    """

    backend = "postgres"
    _what = "result cache"
    _application = "agentd-cache"
    _tables = "result cache tables"
    _version_table = VERSION_TABLE
    _migrations = MIGRATIONS

    def __init__(
        self,
        *,
        url: str,
        schema: str = "agentd",
        min_size: int = 1,
        max_size: int = 4,
        statement_cache_size: int = 256,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        auto_migrate: bool = True,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    ) -> None:
        PostgresEngine.__init__(
            self, url=url, schema=schema, min_size=min_size, max_size=max_size,
            statement_cache_size=statement_cache_size, connect_timeout_s=connect_timeout_s,
            command_timeout_s=command_timeout_s, auto_migrate=auto_migrate,
        )
        ResultCache.__init__(self, max_entry_bytes=max_entry_bytes)
        self._sql = Statements().for_schema(self._quoted)

    # location: PostgresConnector's

    def _status(self, current: int) -> SchemaStatus:
        return SchemaStatus(self.backend, f"{location(self._url)} schema {self._schema}", current, LATEST_VERSION)

    async def schema_status(self) -> SchemaStatus:
        return self._status(await self._table_version())

    async def migrate(self) -> SchemaStatus:
        """Bring the result cache table to ``LATEST_VERSION`` (see ``postgres_common.apply_migrations``)."""
        return self._status(await self._migrate())

    async def _load(self, tenant: str, key: str, now: float) -> str | None:
        sql = self._sql.get
        value = await self._call(lambda conn: conn.fetchval(sql, tenant, key, now), idempotent=True)
        return None if value is None else str(value)

    async def _store(self, tenant: str, key: str, text: str, now: float, expires_at: float) -> None:
        sql = self._sql.put
        # Idempotent: a repeat writes the same row again.
        await self._call(lambda conn: conn.execute(sql, tenant, key, text, now, expires_at), idempotent=True)

    async def sweep(self, *, now: float) -> int:
        sql = self._sql.sweep
        deleted = 0
        while True:
            count = int(await self._call(lambda conn: conn.fetchval(sql, now, SWEEP_BATCH), idempotent=True))
            deleted += count
            if count < SWEEP_BATCH:
                return deleted
