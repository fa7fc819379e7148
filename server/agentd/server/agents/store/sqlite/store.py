"""``SqliteAgentStore``: agents in the session store's SQLite file (see the package docstring)."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any, Iterable, Sequence

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
from agentd.server.agents.store.sqlite.schema import MIGRATIONS, VERSION_TABLE
from agentd.server.sqlite_worker import SqliteEngine

__all__ = ["SqliteAgentStore"]

_VERSION_COLUMNS = "version, definition, create_time, created_by"
_AGENT_COLUMNS = "name, latest_version, create_time, update_time"
_MAX_VERSION = 2**63 - 1  # SQLite integers are 64-bit


def _version(tenant: str, name: str, row: tuple[Any, ...]) -> AgentVersionRecord:
    version, definition, create_time, created_by = row
    return AgentVersionRecord(tenant, name, version, load_definition(definition), create_time, created_by)


def _agent(tenant: str, row: tuple[Any, ...]) -> AgentRecord:
    name, latest, create_time, update_time = row
    return AgentRecord(tenant, name, latest, create_time, update_time)


def _alias(tenant: str, agent: str, row: tuple[Any, ...]) -> AliasRecord:
    alias, routes, update_time = row
    return AliasRecord(tenant, agent, alias, load_routes(routes), update_time)


def _live_latest(conn: sqlite3.Connection, tenant: str, name: str) -> int:
    """The live agent's latest version; ``AgentNotFoundError`` when missing or deleted."""
    row = conn.execute(
        "SELECT latest_version FROM agents WHERE tenant = ? AND name = ? AND deleted = 0", (tenant, name)
    ).fetchone()
    if row is None:
        raise AgentNotFoundError(tenant, name)
    latest: int = row[0]
    return latest


def _bump(conn: sqlite3.Connection, tenant: str, name: str) -> None:
    """Count the write store-wide and log what it touched, keeping the newest LIMIT entries."""
    # Not RETURNING: it needs SQLite 3.35, and the write lock is ours anyway.
    conn.execute("UPDATE agent_revision SET revision = revision + 1")
    (revision,) = conn.execute("SELECT revision FROM agent_revision").fetchone()
    conn.execute("INSERT INTO agent_changes (revision, tenant, name) VALUES (?, ?, ?)", (revision, tenant, name))
    conn.execute("DELETE FROM agent_changes WHERE revision <= ?", (revision - CHANGE_FEED_LIMIT,))


def _insert_version(
    conn: sqlite3.Connection, tenant: str, name: str, version: int, text: str, now: float, created_by: str
) -> AgentVersionRecord:
    conn.execute(
        "INSERT INTO agent_versions (tenant, name, version, definition, create_time, created_by)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (tenant, name, version, text, now, created_by),
    )
    return AgentVersionRecord(tenant, name, version, load_definition(text), now, created_by)


class SqliteAgentStore(SqliteEngine, AgentStore):
    """Agents in one SQLite file (or ``":memory:"``), driven from a single worker thread.

    Open, close, ping, schema status and migrations: ``SqliteEngine``'s.
    """

    backend = "sqlite"
    _version_table = VERSION_TABLE
    _migrations = MIGRATIONS
    _too_old = "{where}: agent tables are at version {current}, this agentd needs {latest}: run `agentd db migrate`"

    def __init__(self, path: str | os.PathLike[str], *, auto_migrate: bool = True) -> None:
        path = os.fspath(path)
        location = f"sqlite agent store at {path}"
        super().__init__(path, auto_migrate=auto_migrate, location=location, thread_name="agentd-agents-sqlite")

    # --- agents and versions ---------------------------------------------------------

    async def create_agent(
        self, tenant: str, name: str, definition: dict[str, Any], created_by: str = ""
    ) -> AgentVersionRecord:
        check_tenant(tenant)
        check_name("an agent name", name)
        text = dump_definition(definition)

        def op(conn: sqlite3.Connection) -> AgentVersionRecord:
            now = time.time()
            row = conn.execute(
                "SELECT latest_version, deleted FROM agents WHERE tenant = ? AND name = ?", (tenant, name)
            ).fetchone()
            if row is not None and not row[1]:
                raise AgentExistsError(tenant, name)
            version = (row[0] if row is not None else 0) + 1
            # A deleted agent's row comes back to life; its aliases went with the delete.
            conn.execute(
                "INSERT INTO agents (tenant, name, latest_version, create_time, update_time, deleted)"
                " VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (tenant, name) DO UPDATE SET"
                " latest_version = excluded.latest_version, create_time = excluded.create_time,"
                " update_time = excluded.update_time, deleted = 0",
                (tenant, name, version, now, now),
            )
            record = _insert_version(conn, tenant, name, version, text, now, created_by)
            _bump(conn, tenant, name)
            return record

        return await self._run(True, op)

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
        text = dump_definition(definition)

        def op(conn: sqlite3.Connection) -> AgentVersionRecord:
            now = time.time()
            latest = _live_latest(conn, tenant, name)
            if expected_version is not None and expected_version != latest:
                raise VersionConflictError(tenant, name, expected_version, latest)
            conn.execute(
                "UPDATE agents SET latest_version = ?, update_time = ? WHERE tenant = ? AND name = ?",
                (latest + 1, now, tenant, name),
            )
            record = _insert_version(conn, tenant, name, latest + 1, text, now, created_by)
            _bump(conn, tenant, name)
            return record

        return await self._run(True, op)

    async def get_agent(self, tenant: str, name: str) -> tuple[AgentRecord, AgentVersionRecord]:
        check_tenant(tenant)

        def op(conn: sqlite3.Connection) -> tuple[AgentRecord, AgentVersionRecord]:
            row = conn.execute(
                f"SELECT a.latest_version, a.create_time, a.update_time, v.definition, v.create_time, v.created_by"
                " FROM agents a JOIN agent_versions v"
                " ON v.tenant = a.tenant AND v.name = a.name AND v.version = a.latest_version"
                " WHERE a.tenant = ? AND a.name = ? AND a.deleted = 0",
                (tenant, name),
            ).fetchone()
            if row is None:
                raise AgentNotFoundError(tenant, name)
            latest, create_time, update_time, definition, version_time, created_by = row
            return (
                AgentRecord(tenant, name, latest, create_time, update_time),
                AgentVersionRecord(tenant, name, latest, load_definition(definition), version_time, created_by),
            )

        return await self._run(False, op)

    async def get_version(self, tenant: str, name: str, version: int) -> AgentVersionRecord:
        check_tenant(tenant)
        if not 1 <= version <= _MAX_VERSION:
            raise AgentVersionNotFoundError(tenant, name, version)

        def op(conn: sqlite3.Connection) -> AgentVersionRecord:
            row = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM agent_versions WHERE tenant = ? AND name = ? AND version = ?",
                (tenant, name, version),
            ).fetchone()
            if row is None:
                raise AgentVersionNotFoundError(tenant, name, version)
            return _version(tenant, name, row)

        return await self._run(False, op)

    async def list_agents(self, tenant: str, limit: int, cursor: str = "") -> tuple[list[AgentRecord], str]:
        check_tenant(tenant)
        check_limit(limit)
        after = decode_cursor(cursor)

        def op(conn: sqlite3.Connection) -> list[AgentRecord]:
            rows = conn.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE tenant = ? AND name > ? AND deleted = 0"
                " ORDER BY name LIMIT ?",
                (tenant, after, limit + 1),
            ).fetchall()
            return [_agent(tenant, row) for row in rows]

        records = await self._run(False, op)
        more = len(records) > limit
        return records[:limit], encode_cursor(records[limit - 1].name) if more else ""

    async def list_versions(
        self, tenant: str, name: str, limit: int, before_version: int = 0
    ) -> list[AgentVersionRecord]:
        check_tenant(tenant)
        check_limit(limit)
        if before_version < 0:
            raise ValueError(f"before_version must be 0 (from the newest) or a version, got {before_version}")
        below = min(before_version, _MAX_VERSION) if before_version else _MAX_VERSION

        def op(conn: sqlite3.Connection) -> list[AgentVersionRecord]:
            _live_latest(conn, tenant, name)
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM agent_versions WHERE tenant = ? AND name = ? AND version < ?"
                " ORDER BY version DESC LIMIT ?",
                (tenant, name, below, limit),
            ).fetchall()
            return [_version(tenant, name, row) for row in rows]

        return await self._run(False, op)

    async def delete_agent(self, tenant: str, name: str) -> None:
        check_tenant(tenant)

        def op(conn: sqlite3.Connection) -> None:
            updated = conn.execute(
                "UPDATE agents SET deleted = 1, update_time = ? WHERE tenant = ? AND name = ? AND deleted = 0",
                (time.time(), tenant, name),
            )
            if updated.rowcount == 0:
                raise AgentNotFoundError(tenant, name)
            conn.execute("DELETE FROM agent_aliases WHERE tenant = ? AND agent = ?", (tenant, name))
            _bump(conn, tenant, name)

        await self._run(True, op)

    async def tenants(self) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            return [t for (t,) in conn.execute("SELECT DISTINCT tenant FROM agents WHERE deleted = 0 ORDER BY tenant")]

        return await self._run(False, op)

    # --- aliases ---------------------------------------------------------------------

    async def set_alias(
        self, tenant: str, agent: str, alias: str, routes: Iterable[Sequence[int]]
    ) -> AliasRecord:
        check_tenant(tenant)
        check_name("an alias name", alias)
        checked = check_routes(routes)
        text = dump_routes(checked)

        def op(conn: sqlite3.Connection) -> AliasRecord:
            now = time.time()
            latest = _live_latest(conn, tenant, agent)
            for version, _ in checked:
                if version > latest:  # versions 1..latest all exist
                    raise AgentVersionNotFoundError(tenant, agent, version)
            conn.execute(
                "INSERT INTO agent_aliases (tenant, agent, alias, routes, update_time) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, agent, alias) DO UPDATE SET routes = excluded.routes,"
                " update_time = excluded.update_time",
                (tenant, agent, alias, text, now),
            )
            _bump(conn, tenant, agent)
            return AliasRecord(tenant, agent, alias, checked, now)

        return await self._run(True, op)

    async def get_alias(self, tenant: str, agent: str, alias: str) -> AliasRecord:
        check_tenant(tenant)

        def op(conn: sqlite3.Connection) -> AliasRecord:
            _live_latest(conn, tenant, agent)
            row = conn.execute(
                "SELECT alias, routes, update_time FROM agent_aliases WHERE tenant = ? AND agent = ? AND alias = ?",
                (tenant, agent, alias),
            ).fetchone()
            if row is None:
                raise AliasNotFoundError(tenant, agent, alias)
            return _alias(tenant, agent, row)

        return await self._run(False, op)

    async def list_aliases(self, tenant: str, agent: str) -> list[AliasRecord]:
        check_tenant(tenant)

        def op(conn: sqlite3.Connection) -> list[AliasRecord]:
            _live_latest(conn, tenant, agent)
            rows = conn.execute(
                "SELECT alias, routes, update_time FROM agent_aliases WHERE tenant = ? AND agent = ? ORDER BY alias",
                (tenant, agent),
            ).fetchall()
            return [_alias(tenant, agent, row) for row in rows]

        return await self._run(False, op)

    async def delete_alias(self, tenant: str, agent: str, alias: str) -> None:
        check_tenant(tenant)

        def op(conn: sqlite3.Connection) -> None:
            _live_latest(conn, tenant, agent)
            deleted = conn.execute(
                "DELETE FROM agent_aliases WHERE tenant = ? AND agent = ? AND alias = ?", (tenant, agent, alias)
            )
            if deleted.rowcount == 0:
                raise AliasNotFoundError(tenant, agent, alias)
            _bump(conn, tenant, agent)

        await self._run(True, op)

    # --- change feed -----------------------------------------------------------------

    async def revision(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            current: int = conn.execute("SELECT revision FROM agent_revision").fetchone()[0]
            return current

        return await self._run(False, op)

    async def changed_since(self, revision: int) -> Changes:
        check_revision(revision)

        def op(conn: sqlite3.Connection) -> Changes:
            current: int = conn.execute("SELECT revision FROM agent_revision").fetchone()[0]
            if revision > current or current - revision > CHANGE_FEED_LIMIT:
                return current, None
            rows = conn.execute(
                "SELECT tenant, name FROM agent_changes WHERE revision > ? AND revision <= ? ORDER BY revision",
                (revision, current),
            ).fetchall()
            if len(rows) != current - revision:  # the log was trimmed further than it should be
                return current, None
            return current, dedupe((t, n) for t, n in rows)

        return await self._run(False, op)
