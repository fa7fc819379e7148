"""``SqliteAgentStore``: agents in the session store's SQLite file (see the package docstring)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

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
from agentd.server.agents.store.sqlite.schema import LATEST_VERSION, MIGRATIONS, VERSION_TABLE
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.sessions.base import SchemaStatus
from agentd.server.sqlite_worker import SqliteWorker, connect, transaction

__all__ = ["SqliteAgentStore"]

T = TypeVar("T")

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


class SqliteAgentStore(AgentStore):
    """Agents in one SQLite file (or ``":memory:"``), driven from a single worker thread."""

    backend = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, auto_migrate: bool = True) -> None:
        self._path = os.fspath(path)
        self._auto_migrate = auto_migrate
        self._worker = SqliteWorker(self._path, f"sqlite agent store at {self._path}", "agentd-agents-sqlite")

    @property
    def path(self) -> str:
        return self._path

    # --- plumbing -------------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection) -> None:
        status = transaction(conn, self._auto_migrate, self._migrate_or_check)
        if status.pending:
            raise StoreUnavailableError(
                f"{self._worker.location}: agent tables are at version {status.current}, this agentd needs "
                f"{status.latest}: run `agentd db migrate`"
            )

    def _status(self, conn: sqlite3.Connection) -> SchemaStatus:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (VERSION_TABLE,)
        ).fetchone()
        current = conn.execute(f"SELECT max(version) FROM {VERSION_TABLE}").fetchone()[0] if exists else None
        return SchemaStatus("sqlite", self._path, current or 0, LATEST_VERSION)

    def _migrate_or_check(self, conn: sqlite3.Connection) -> SchemaStatus:
        return self._apply_migrations(conn) if self._auto_migrate else self._status(conn)

    def _apply_migrations(self, conn: sqlite3.Connection) -> SchemaStatus:
        """Runs in one write transaction, so concurrent openers apply each migration once."""
        conn.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)")
        status = self._status(conn)
        # Not executescript: it would COMMIT our transaction before running.
        for version in range(status.current + 1, LATEST_VERSION + 1):
            for statement in MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (?)", (version,))
        return self._status(conn)

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
            return SchemaStatus("sqlite", self._path, 0, LATEST_VERSION)  # looking must not create the file
        return await self._with_connection(False, self._status)

    async def migrate(self) -> SchemaStatus:
        return await self._with_connection(True, self._apply_migrations)

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
