"""``PostgresAgentStore``: agents in a Postgres schema (see the package docstring)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import asyncpg

from agentd.server.agents.store.base import (
    CHANGE_FEED_LIMIT,
    AgentExistsError,
    AgentNotFoundError,
    AgentRecord,
    AgentStore,
    AgentVersionNotFoundError,
    AgentVersionRecord,
    AliasNotFoundError,
    AliasRecord,
    Changes,
    VersionConflictError,
    check_limit,
    check_name,
    check_revision,
    check_routes,
    check_tenant,
    decode_cursor,
    dedupe,
    dump_definition,
    dump_routes,
    encode_cursor,
    load_definition,
    load_routes,
)
from agentd.server.agents.store.postgres.schema import (
    AGENT_EXISTS,
    AGENT_NOT_FOUND,
    ALIAS_NOT_FOUND,
    LATEST_VERSION,
    MIGRATIONS,
    VERSION_CONFLICT,
    VERSION_NOT_FOUND,
    VERSION_TABLE,
)
from agentd.server.agents.store.postgres.statements import Statements
from agentd.server.postgres_common import PostgresEngine, location
from agentd.server.sessions.base import SchemaStatus

__all__ = ["PostgresAgentStore"]

_MAX_VERSION = 2**63 - 1  # versions are bigint


class PostgresAgentStore(PostgresEngine, AgentStore):
    """Agents in a Postgres schema, shared by every replica that points at it.

    Pool, calls, migrations, open, close and ping: ``PostgresEngine``'s.
    """

    backend = "postgres"
    _what = "agent store"
    _application = "agentd-agents"
    _tables = "agent tables"
    _version_table = VERSION_TABLE
    _migrations = MIGRATIONS
    _own_sqlstate = "AGA"

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
    ) -> None:
        super().__init__(
            url=url, schema=schema, min_size=min_size, max_size=max_size, statement_cache_size=statement_cache_size,
            connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s, auto_migrate=auto_migrate,
        )
        self._sql = Statements().for_schema(self._quoted)

    # --- plumbing -------------------------------------------------------------------

    async def _write(self, sql: str, *args: Any) -> Any:
        """One write function; its ``AGA..`` errors are left for the caller to translate."""
        return await self._call(lambda conn: conn.fetchval(sql, *args))

    # --- schema ---------------------------------------------------------------------

    def _status(self, current: int) -> SchemaStatus:
        return SchemaStatus(self.backend, f"{location(self._url)} schema {self._schema}", current, LATEST_VERSION)

    async def schema_status(self) -> SchemaStatus:
        return self._status(await self._table_version())

    async def migrate(self) -> SchemaStatus:
        """Bring the agent tables to ``LATEST_VERSION`` (see ``postgres_common.apply_migrations``)."""
        return self._status(await self._migrate())

    # --- agents and versions ---------------------------------------------------------

    @staticmethod
    def _agent_error(exc: asyncpg.PostgresError, tenant: str, name: str) -> Exception:
        """A function's ``AGA..`` error as the store's own."""
        if exc.sqlstate == AGENT_NOT_FOUND:
            return AgentNotFoundError(tenant, name)
        if exc.sqlstate == AGENT_EXISTS:
            return AgentExistsError(tenant, name)
        if exc.sqlstate == VERSION_NOT_FOUND:
            return AgentVersionNotFoundError(tenant, name, int(exc.detail or 0))
        if exc.sqlstate == ALIAS_NOT_FOUND:
            return AliasNotFoundError(tenant, name, "")  # the caller fills in the alias
        raise AssertionError(f"unexpected error code {exc.sqlstate}")  # pragma: no cover

    async def create_agent(
        self, tenant: str, name: str, definition: dict[str, Any], created_by: str = ""
    ) -> AgentVersionRecord:
        check_tenant(tenant)
        check_name("an agent name", name)
        text = dump_definition(definition)
        now = time.time()
        try:
            version = await self._write(self._sql.create, tenant, name, text, created_by, now)
        except asyncpg.PostgresError as exc:
            raise self._agent_error(exc, tenant, name) from None
        return AgentVersionRecord(tenant, name, version, load_definition(text), now, created_by)

    async def update_agent(
        self,
        tenant: str,
        name: str,
        definition: dict[str, Any],
        *,
        expected_version: int | None = None,
        created_by: str = "",
    ) -> AgentVersionRecord:
        check_tenant(tenant)
        if expected_version is not None and expected_version < 1:
            raise ValueError(f"expected_version starts at 1, got {expected_version}")
        expected = None if expected_version is None else min(expected_version, _MAX_VERSION)
        text = dump_definition(definition)
        now = time.time()
        try:
            version = await self._write(self._sql.update, tenant, name, text, expected, created_by, now)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == VERSION_CONFLICT:
                assert expected_version is not None
                raise VersionConflictError(tenant, name, expected_version, int(exc.detail or 0)) from None
            raise self._agent_error(exc, tenant, name) from None
        return AgentVersionRecord(tenant, name, version, load_definition(text), now, created_by)

    async def get_agent(self, tenant: str, name: str) -> tuple[AgentRecord, AgentVersionRecord]:
        check_tenant(tenant)
        row = await self._call(lambda conn: conn.fetchrow(self._sql.get, tenant, name), idempotent=True)
        if row is None:
            raise AgentNotFoundError(tenant, name)
        latest, create_time, update_time, definition, version_time, created_by = row
        return (
            AgentRecord(tenant, name, latest, create_time, update_time),
            AgentVersionRecord(tenant, name, latest, load_definition(definition), version_time, created_by),
        )

    async def get_version(self, tenant: str, name: str, version: int) -> AgentVersionRecord:
        check_tenant(tenant)
        if not 1 <= version <= _MAX_VERSION:
            raise AgentVersionNotFoundError(tenant, name, version)
        row = await self._call(lambda conn: conn.fetchrow(self._sql.version, tenant, name, version), idempotent=True)
        if row is None:
            raise AgentVersionNotFoundError(tenant, name, version)
        return AgentVersionRecord(tenant, name, row[0], load_definition(row[1]), row[2], row[3])

    async def list_agents(self, tenant: str, limit: int, cursor: str = "") -> tuple[list[AgentRecord], str]:
        check_tenant(tenant)
        check_limit(limit)
        after = decode_cursor(cursor)
        rows = await self._call(
            lambda conn: conn.fetch(self._sql.list_agents, tenant, after, limit + 1), idempotent=True
        )
        records = [AgentRecord(tenant, *row) for row in rows[:limit]]
        return records, encode_cursor(records[-1].name) if len(rows) > limit else ""

    async def list_versions(
        self, tenant: str, name: str, limit: int, before_version: int = 0
    ) -> list[AgentVersionRecord]:
        check_tenant(tenant)
        check_limit(limit)
        if before_version < 0:
            raise ValueError(f"before_version must be 0 (from the newest) or a version, got {before_version}")
        below = min(before_version, _MAX_VERSION) if before_version else _MAX_VERSION
        rows = await self._call(
            lambda conn: conn.fetch(self._sql.versions, tenant, name, below, limit), idempotent=True
        )
        if not rows:
            raise AgentNotFoundError(tenant, name)
        return [
            AgentVersionRecord(tenant, name, row[0], load_definition(row[1]), row[2], row[3])
            for row in rows
            if row[0] is not None
        ]

    async def delete_agent(self, tenant: str, name: str) -> None:
        check_tenant(tenant)
        try:
            await self._write(self._sql.delete, tenant, name, time.time())
        except asyncpg.PostgresError as exc:
            raise self._agent_error(exc, tenant, name) from None

    async def tenants(self) -> list[str]:
        rows = await self._call(lambda conn: conn.fetch(self._sql.tenants), idempotent=True)
        return [row[0] for row in rows]

    # --- aliases ---------------------------------------------------------------------

    async def set_alias(
        self, tenant: str, agent: str, alias: str, routes: Iterable[Sequence[int]]
    ) -> AliasRecord:
        check_tenant(tenant)
        check_name("an alias name", alias)
        checked = check_routes(routes)
        versions = [min(version, _MAX_VERSION) for version, _ in checked]
        now = time.time()
        try:
            await self._write(self._sql.set_alias, tenant, agent, alias, versions, dump_routes(checked), now)
        except asyncpg.PostgresError as exc:
            raise self._agent_error(exc, tenant, agent) from None
        return AliasRecord(tenant, agent, alias, checked, now)

    async def get_alias(self, tenant: str, agent: str, alias: str) -> AliasRecord:
        check_tenant(tenant)
        row = await self._call(lambda conn: conn.fetchrow(self._sql.alias, tenant, agent, alias), idempotent=True)
        if row is None:
            raise AgentNotFoundError(tenant, agent)
        if row[0] is None:
            raise AliasNotFoundError(tenant, agent, alias)
        return AliasRecord(tenant, agent, row[0], load_routes(row[1]), row[2])

    async def list_aliases(self, tenant: str, agent: str) -> list[AliasRecord]:
        check_tenant(tenant)
        rows = await self._call(lambda conn: conn.fetch(self._sql.aliases, tenant, agent), idempotent=True)
        if not rows:
            raise AgentNotFoundError(tenant, agent)
        return [AliasRecord(tenant, agent, row[0], load_routes(row[1]), row[2]) for row in rows if row[0] is not None]

    async def delete_alias(self, tenant: str, agent: str, alias: str) -> None:
        check_tenant(tenant)
        try:
            await self._write(self._sql.delete_alias, tenant, agent, alias)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == ALIAS_NOT_FOUND:
                raise AliasNotFoundError(tenant, agent, alias) from None
            raise self._agent_error(exc, tenant, agent) from None

    # --- change feed -----------------------------------------------------------------

    async def revision(self) -> int:
        current: int = await self._call(lambda conn: conn.fetchval(self._sql.revision), idempotent=True)
        return current

    async def changed_since(self, revision: int) -> Changes:
        check_revision(revision)
        since = min(revision, _MAX_VERSION)
        rows = await self._call(
            lambda conn: conn.fetch(self._sql.changes, since, CHANGE_FEED_LIMIT), idempotent=True
        )
        current: int = rows[0][0]
        if revision > current or current - revision > CHANGE_FEED_LIMIT:
            return current, None
        entries = [(row[1], row[2]) for row in rows if row[1] is not None]
        if len(entries) != current - revision:  # the log was trimmed further than it should be
            return current, None
        return current, dedupe(entries)
