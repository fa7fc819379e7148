"""``SqliteTraceArchive``: ended traces in their own SQLite file (see the package docstring)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from typing import Any, Callable, TypeVar

from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.sqlite_worker import SqliteWorker, transaction
from agentd.server.tracing.archive import (
    STATS_COLUMNS,
    ArchivedTrace,
    Retention,
    StatsStatements,
    TraceArchive,
    TraceQuery,
    agents_to_index,
    assemble_stats,
    dumps,
    stats_columns,
    stats_params,
    summary,
    where_clause,
)
from agentd.server.tracing.base import SpanKind
from agentd.server.tracing.memory import GroupStats, SpanRecord, StatsQuery, TraceRecord
from agentd.server.tracing.sqlite.schema import LATEST_VERSION, MIGRATIONS

__all__ = ["SqliteTraceArchive"]

log = logging.getLogger("agentd.tracing")

_TRACE_COLUMNS = (
    "t.trace_id, t.run_id, t.workflow_name, t.group_id, t.metadata, t.agent, t.agents, t.error,"
    " t.start_ns, t.end_ns, t.input_tokens, t.output_tokens, t.span_count, t.tenant, t.agent_version,"
    " t.cost_usd_nanos, t.unpriced_calls"
)

T = TypeVar("T")


def _trace(row: tuple[Any, ...]) -> ArchivedTrace:
    (trace_id, run_id, workflow, group, metadata, agent, agents, error, start, end, tin, tout, count, tenant,
     agent_version, cost_nanos, unpriced_calls) = row
    return ArchivedTrace(
        trace_id=trace_id,
        run_id=run_id,
        workflow_name=workflow,
        group_id=group,
        metadata=json.loads(metadata),
        agent=agent,
        start_ns=start,
        end_ns=end,
        error=error,
        tenant=tenant,
        agent_version=agent_version,
        stored_agents=json.loads(agents),
        input_tokens=tin,
        output_tokens=tout,
        stored_span_count=count,
        stored_cost_nanos=cost_nanos,
        stored_unpriced_calls=unpriced_calls or 0,
    )


def _span(row: tuple[Any, ...]) -> SpanRecord:
    trace_id, span_id, parent_id, kind, name, start, end, error, attributes = row
    return SpanRecord(
        trace_id=trace_id,
        span_id=span_id,
        parent_id=parent_id,
        kind=SpanKind(kind),
        name=name,
        start_ns=start,
        end_ns=end,
        error=error,
        attributes=json.loads(attributes),
    )


def _insert(conn: sqlite3.Connection, trace: TraceRecord) -> None:
    agents, input_tokens, output_tokens = summary(trace)
    spans = list(trace.spans)
    facts, stats = stats_columns(trace)
    # Replaces an earlier trace with this id of the same tenant (runs continuing one caller
    # trace share it); another tenant's keeps its id, spans included (see TraceArchive.write).
    conn.execute("DELETE FROM traces WHERE trace_id = ? AND tenant = ?", (trace.trace_id, trace.tenant))
    inserted = conn.execute(
        "INSERT INTO traces (trace_id, run_id, workflow_name, group_id, metadata, agent, agents, status, error,"
        f" start_ns, end_ns, input_tokens, output_tokens, span_count, tenant, agent_version, {STATS_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (trace_id) DO NOTHING",
        (
            trace.trace_id, trace.run_id, trace.workflow_name, trace.group_id, dumps(trace.metadata), trace.agent,
            dumps(agents), trace.status, trace.error, trace.start_ns, trace.end_ns, input_tokens, output_tokens,
            len(spans), trace.tenant, trace.agent_version, *stats,
        ),
    ).rowcount
    if not inserted:
        log.warning("trace %s not archived: the archive holds another tenant's trace with this id",
                    trace.trace_id)
        return
    conn.executemany(
        "INSERT OR REPLACE INTO trace_spans (trace_id, span_id, parent_id, kind, name, start_ns, end_ns, error,"
        " attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (trace.trace_id, s.span_id, s.parent_id, s.kind.value, s.name, s.start_ns, s.end_ns, s.error,
             dumps(s.attributes))
            for s in spans
        ],
    )
    conn.executemany(
        "INSERT INTO trace_agents (trace_id, agent) VALUES (?, ?)",
        [(trace.trace_id, agent) for agent in agents_to_index(trace)],
    )
    if facts.tool_calls:
        conn.executemany(
            "INSERT OR REPLACE INTO trace_tool_calls (trace_id, span_id, tool_name, is_error, duration_ns)"
            " VALUES (?, ?, ?, ?, ?)",
            [(trace.trace_id, c.span_id, c.tool, int(c.is_error), c.duration_ns) for c in facts.tool_calls],
        )


class SqliteTraceArchive(TraceArchive):
    backend = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, auto_migrate: bool = True) -> None:
        self._path = os.fspath(path)
        self._auto_migrate = auto_migrate
        self._worker = SqliteWorker(self._path, f"sqlite trace archive at {self._path}", "agentd-traces-sqlite")
        self._stats = StatsStatements(__package__, numbered=False)

    @property
    def location(self) -> str:
        return self._worker.location

    @property
    def is_open(self) -> bool:
        return self._worker.is_open

    # --- plumbing -------------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection) -> None:
        current = transaction(conn, True, self._migrate_or_check)
        if current < LATEST_VERSION:
            raise StoreUnavailableError(
                f"{self.location}: schema is at version {current}, this agentd needs {LATEST_VERSION}"
                ": run `agentd db migrate`"
            )

    def _migrate_or_check(self, conn: sqlite3.Connection) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS trace_schema_version (version INTEGER NOT NULL)")
        current = conn.execute("SELECT coalesce(max(version), 0) FROM trace_schema_version").fetchone()[0]
        if not self._auto_migrate:
            return int(current)
        for version in range(current + 1, LATEST_VERSION + 1):
            for statement in MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO trace_schema_version (version) VALUES (?)", (version,))
        return max(int(current), LATEST_VERSION)

    async def _run(self, write: bool, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._worker.run(write, fn)

    async def open(self) -> None:
        await self._worker.open(self._prepare)

    async def close(self) -> None:
        await self._worker.close()

    # --- traces ---------------------------------------------------------------------

    async def write(self, traces: list[TraceRecord]) -> None:
        if not traces:
            return

        def op(conn: sqlite3.Connection) -> None:
            for trace in traces:
                _insert(conn, trace)

        await self._run(True, op)

    async def get(self, trace_id: str, tenant: str | None = None) -> TraceRecord | None:
        def op(conn: sqlite3.Connection) -> TraceRecord | None:
            row = conn.execute(f"SELECT {_TRACE_COLUMNS} FROM traces t WHERE t.trace_id = ?", (trace_id,)).fetchone()
            if row is None:
                return None
            trace = _trace(row)
            if tenant is not None and trace.tenant != tenant:
                return None
            trace.spans = [
                _span(r)
                for r in conn.execute(
                    "SELECT trace_id, span_id, parent_id, kind, name, start_ns, end_ns, error, attributes"
                    " FROM trace_spans WHERE trace_id = ? ORDER BY start_ns, span_id",
                    (trace_id,),
                )
            ]
            return trace

        return await self._run(False, op)

    async def list(self, query: TraceQuery) -> tuple[list[TraceRecord], bool]:
        where, params = where_clause(query, lambda n: "?")

        def op(conn: sqlite3.Connection) -> list[TraceRecord]:
            rows = conn.execute(
                f"SELECT {_TRACE_COLUMNS} FROM traces t{where} ORDER BY t.start_ns DESC, t.trace_id DESC LIMIT ?",
                (*params, query.limit + 1),
            ).fetchall()
            return [_trace(row) for row in rows]

        page = await self._run(False, op)
        return page[: query.limit], len(page) > query.limit

    async def sweep(self, retention: Retention) -> int:
        def op(conn: sqlite3.Connection) -> int:
            removed = 0
            if retention.max_age_s is not None:
                cutoff = time.time_ns() - int(retention.max_age_s * 1e9)
                removed += conn.execute("DELETE FROM traces WHERE start_ns < ?", (cutoff,)).rowcount
            oldest_kept = conn.execute(
                "SELECT start_ns, trace_id FROM traces ORDER BY start_ns DESC, trace_id DESC LIMIT 1 OFFSET ?",
                (retention.max_traces - 1,),
            ).fetchone()
            if oldest_kept is not None:
                removed += conn.execute(
                    "DELETE FROM traces WHERE (start_ns, trace_id) < (?, ?)", tuple(oldest_kept)
                ).rowcount
            return removed

        return await self._run(True, op)

    async def stats(self, query: StatsQuery) -> tuple[list[GroupStats], bool]:
        """One read transaction: the page's groups, then their figures, errors and tools (see
        ``queries/stats_*.sql``)."""
        statements = self._stats

        def op(conn: sqlite3.Connection) -> tuple[list[GroupStats], bool]:
            params = stats_params(query)
            sql, _ = statements.get("stats_groups", query)
            keys = [(agent, int(version)) for agent, version in conn.execute(sql, params)]
            more = len(keys) > query.limit
            keys = keys[: query.limit]
            if not keys:
                return [], False
            params = stats_params(query, keys[0], keys[-1])
            rows = [conn.execute(statements.get(name, query)[0], params).fetchall()
                    for name in ("stats_runs", "stats_errors", "stats_tools")]
            return assemble_stats(query, keys, *rows), more

        return await self._run(False, op)
