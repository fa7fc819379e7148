"""``PostgresTraceArchive``: ended traces in the session store's Postgres schema (see the
package docstring)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import suppress
from typing import Any, Awaitable, Callable, TypeVar

import asyncpg

from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.postgres_common import ErrorText, apply_migrations, check_schema, location, schema_version
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
from agentd.server.tracing.postgres.schema import LATEST_VERSION, MIGRATIONS
from agentd.server.tracing.memory import GroupStats, SpanRecord, StatsQuery, TraceRecord

__all__ = ["PostgresTraceArchive"]

log = logging.getLogger("agentd.tracing")

_TRACE_COLUMNS = (
    "t.trace_id, t.run_id, t.workflow_name, t.group_id, t.metadata::text AS metadata, t.agent, t.agents::text AS agents,"
    " t.error, t.start_ns, t.end_ns, t.input_tokens, t.output_tokens, t.span_count, t.tenant, t.agent_version,"
    " t.cost_usd_nanos, t.unpriced_calls"
)
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, asyncio.TimeoutError)

# The connection died under the operation (not a timeout: that one is still alive and cancelling).
_CONNECTION_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)

T = TypeVar("T")


def _clean(value: Any) -> Any:
    """``value`` without NUL characters, which jsonb cannot hold."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _json(value: Any) -> str:
    text = dumps(value)
    return dumps(_clean(value)) if "\\u0000" in text or "\x00" in text else text


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd")


def _trace(row: asyncpg.Record) -> ArchivedTrace:
    return ArchivedTrace(
        trace_id=row["trace_id"],
        run_id=row["run_id"],
        workflow_name=row["workflow_name"],
        group_id=row["group_id"],
        metadata=json.loads(row["metadata"]),
        agent=row["agent"],
        start_ns=row["start_ns"],
        end_ns=row["end_ns"],
        error=row["error"],
        tenant=row["tenant"],
        agent_version=row["agent_version"],
        stored_agents=json.loads(row["agents"]),
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        stored_span_count=row["span_count"],
        stored_cost_nanos=row["cost_usd_nanos"],
        stored_unpriced_calls=row["unpriced_calls"] or 0,
    )


def _span(row: asyncpg.Record) -> SpanRecord:
    return SpanRecord(
        trace_id=row["trace_id"],
        span_id=row["span_id"],
        parent_id=row["parent_id"],
        kind=SpanKind(row["kind"]),
        name=row["name"],
        start_ns=row["start_ns"],
        end_ns=row["end_ns"],
        error=row["error"],
        attributes=json.loads(row["attributes"]),
    )


class PostgresTraceArchive(TraceArchive):
    backend = "postgres"

    def __init__(
        self,
        *,
        url: str,
        schema: str = "agentd",
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        auto_migrate: bool = True,
    ) -> None:
        self._q = check_schema(schema)
        self._url = url
        self._schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._auto_migrate = auto_migrate
        self._pool: asyncpg.Pool | None = None
        self._error_text = ErrorText(url)
        self._stats = StatsStatements(__package__, numbered=True, schema=self._q)

    @property
    def location(self) -> str:
        return f"postgres trace archive at {location(self._url)} schema {self._schema}"

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    # --- plumbing -------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self.location}: {self._error_text(exc)}")

    async def _run(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection. Every archive operation is idempotent (a write
        replaces the traces it writes), so one that met a dead connection is tried once more
        on a fresh one: after an outage the pool's stale connections cost no traces."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError(f"{self.location}: not open")
        timeout = self._connect_timeout_s + self._command_timeout_s
        for attempt in (1, 2):
            try:
                async with pool.acquire(timeout=timeout) as conn:
                    try:
                        return await op(conn)
                    except _CONNECTION_LOST as exc:
                        if isinstance(exc, TimeoutError):
                            raise
                        with suppress(asyncpg.InterfaceError):
                            conn.terminate()
                        raise
            except _CONNECTION_LOST as exc:
                if attempt == 2 or isinstance(exc, TimeoutError):
                    raise self._unavailable(exc) from exc
            except _DRIVER_ERRORS as exc:
                raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._url,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                server_settings={"application_name": "agentd-traces"},
            )
        except _DRIVER_ERRORS as exc:
            raise self._unavailable(exc) from exc
        try:
            async with pool.acquire() as conn:
                current = await self._migrate_or_check(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _DRIVER_ERRORS):
                raise self._unavailable(exc) from exc
            raise
        if current < LATEST_VERSION:
            pool.terminate()
            raise StoreUnavailableError(
                f"{self.location}: trace schema is at version {current}, this agentd needs {LATEST_VERSION}"
                ": run `agentd db migrate`"
            )
        self._pool = pool

    async def _migrate_or_check(self, conn: asyncpg.Connection) -> int:
        if not self._auto_migrate:
            return await schema_version(conn, self._q, "trace_schema_version")
        return await apply_migrations(conn, self._schema, "trace_schema_version", MIGRATIONS, "trace tables")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self._command_timeout_s)
        except (asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            pool.terminate()

    # --- traces ---------------------------------------------------------------------

    async def _insert(self, conn: asyncpg.Connection, trace: TraceRecord) -> None:
        q = self._q
        agents, input_tokens, output_tokens = summary(trace)
        spans = list(trace.spans)
        facts, stats = stats_columns(trace)
        # Replaces an earlier trace with this id of the same tenant (runs continuing one caller
        # trace share it); another tenant's keeps its id, spans included (see TraceArchive.write).
        await conn.execute(
            f"DELETE FROM {q}.traces WHERE trace_id = $1 AND tenant = $2", trace.trace_id, trace.tenant
        )
        status = await conn.execute(
            f"INSERT INTO {q}.traces (trace_id, run_id, workflow_name, group_id, metadata, agent, agents, status,"
            f" error, start_ns, end_ns, input_tokens, output_tokens, span_count, tenant, agent_version, {STATS_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14, $15, $16,"
            " $17, $18, $19, $20, $21, $22, $23, $24, $25)"
            " ON CONFLICT (trace_id) DO NOTHING",
            trace.trace_id, _text(trace.run_id), _text(trace.workflow_name), _text(trace.group_id),
            _json(trace.metadata), _text(trace.agent), _json(agents), trace.status, _text(trace.error),
            trace.start_ns, trace.end_ns, input_tokens, output_tokens, len(spans), trace.tenant,
            trace.agent_version, stats[0], _text(stats[1]) if stats[1] is not None else None, *stats[2:],
        )
        if status.split()[-1] == "0":
            log.warning("trace %s not archived: the archive holds another tenant's trace with this id",
                        trace.trace_id)
            return
        if spans:
            await conn.executemany(
                f"INSERT INTO {q}.trace_spans (trace_id, span_id, parent_id, kind, name, start_ns, end_ns, error,"
                " attributes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)"
                " ON CONFLICT (trace_id, span_id) DO NOTHING",
                [
                    (trace.trace_id, s.span_id, s.parent_id, s.kind.value, _text(s.name), s.start_ns, s.end_ns,
                     _text(s.error), _json(s.attributes))
                    for s in spans
                ],
            )
        await conn.executemany(
            f"INSERT INTO {q}.trace_agents (trace_id, agent) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(trace.trace_id, _text(agent)) for agent in agents_to_index(trace)],
        )
        if facts.tool_calls:
            await conn.executemany(
                f"INSERT INTO {q}.trace_tool_calls (trace_id, span_id, tool_name, is_error, duration_ns)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (trace_id, span_id) DO NOTHING",
                [(trace.trace_id, c.span_id, _text(c.tool), c.is_error, c.duration_ns) for c in facts.tool_calls],
            )

    async def write(self, traces: list[TraceRecord]) -> None:
        if not traces:
            return

        async def op(conn: asyncpg.Connection) -> None:
            try:
                async with conn.transaction():
                    for trace in traces:
                        await self._insert(conn, trace)
                return
            except asyncpg.DataError:
                if len(traces) == 1:
                    raise
            # One trace Postgres cannot hold (NaN in an attribute...) must not cost the batch.
            for trace in traces:
                try:
                    async with conn.transaction():
                        await self._insert(conn, trace)
                except asyncpg.DataError as exc:
                    log.warning("trace %s not archived: postgres cannot store it (%s)", trace.trace_id, exc)

        await self._run(op)

    async def get(self, trace_id: str, tenant: str | None = None) -> TraceRecord | None:
        q = self._q

        async def op(conn: asyncpg.Connection) -> TraceRecord | None:
            row = await conn.fetchrow(f"SELECT {_TRACE_COLUMNS} FROM {q}.traces t WHERE t.trace_id = $1", trace_id)
            if row is None:
                return None
            trace = _trace(row)
            if tenant is not None and trace.tenant != tenant:
                return None
            rows = await conn.fetch(
                "SELECT trace_id, span_id, parent_id, kind, name, start_ns, end_ns, error, attributes::text AS attributes"
                f" FROM {q}.trace_spans WHERE trace_id = $1 ORDER BY start_ns, span_id",
                trace_id,
            )
            trace.spans = [_span(r) for r in rows]
            return trace

        return await self._run(op)

    async def list(self, query: TraceQuery) -> tuple[list[TraceRecord], bool]:
        q = self._q
        where, params = where_clause(query, lambda n: f"${n}", agents_table=f"{q}.trace_agents")
        sql = (
            f"SELECT {_TRACE_COLUMNS} FROM {q}.traces t{where}"
            f" ORDER BY t.start_ns DESC, t.trace_id DESC LIMIT ${len(params) + 1}"
        )
        rows = await self._run(lambda conn: conn.fetch(sql, *params, query.limit + 1))
        page = [_trace(row) for row in rows]
        return page[: query.limit], len(page) > query.limit

    async def sweep(self, retention: Retention) -> int:
        q = self._q

        async def op(conn: asyncpg.Connection) -> int:
            removed = 0
            if retention.max_age_s is not None:
                cutoff = time.time_ns() - int(retention.max_age_s * 1e9)
                status = await conn.execute(f"DELETE FROM {q}.traces WHERE start_ns < $1", cutoff)
                removed += int(status.split()[-1])
            oldest_kept = await conn.fetchrow(
                f"SELECT start_ns, trace_id FROM {q}.traces ORDER BY start_ns DESC, trace_id DESC LIMIT 1 OFFSET $1",
                retention.max_traces - 1,
            )
            if oldest_kept is not None:
                status = await conn.execute(
                    f"DELETE FROM {q}.traces WHERE (start_ns, trace_id) < ($1, $2)",
                    oldest_kept["start_ns"], oldest_kept["trace_id"],
                )
                removed += int(status.split()[-1])
            return removed

        return await self._run(op)

    async def stats(self, query: StatsQuery) -> tuple[list[GroupStats], bool]:
        """One repeatable-read transaction (the four queries see one snapshot): the page's groups,
        then their figures, errors and tools (see ``queries/stats_*.sql``)."""
        statements = self._stats

        def args(name: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
            sql, names = statements.get(name, query)
            return sql, [params[n] for n in names]

        async def op(conn: asyncpg.Connection) -> tuple[list[GroupStats], bool]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                sql, values = args("stats_groups", stats_params(query))
                keys = [(row[0], int(row[1])) for row in await conn.fetch(sql, *values)]
                more = len(keys) > query.limit
                keys = keys[: query.limit]
                if not keys:
                    return [], False
                params = stats_params(query, keys[0], keys[-1])
                rows = []
                for name in ("stats_runs", "stats_errors", "stats_tools"):
                    sql, values = args(name, params)
                    rows.append([tuple(row) for row in await conn.fetch(sql, *values)])
                return assemble_stats(query, keys, *rows), more

        return await self._run(op)
