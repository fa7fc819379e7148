"""Durable storage of ended traces: the interface every backend implements.

The live part of tracing stays in memory (``InMemoryTraceStore``): running traces are
recorded and served from there. When a trace ends, ``TraceStore`` (tracing/store.py)
hands it to a ``TraceArchive`` in the background, in batches; TraceService then finds
it there after a restart and from any replica sharing the database.

Backends: ``SqliteTraceArchive`` (the ``sqlite`` package, its own file) and
``PostgresTraceArchive`` (the ``postgres`` package, the session store's database and schema).

Tenants: every trace is stored with the tenant owning its run and listed only to that
tenant (``TraceQuery.tenant``); ``get`` finds a trace by id, then compares its tenant.
A trace id is the archive's key, but a caller picks the trace id of a run that
continues its ``traceparent``: ``write`` never replaces (or adds spans to) a trace of
another tenant with the same id; that trace keeps it and the newcomer is not archived.

Retention (``sweep``): a trace is kept while it is among the newest ``max_traces``
traces *and*, when ``max_age_s`` is set, younger than that (by its start time); the
sweep deletes everything else, with its spans. Retention is global, across tenants.

Run stats (``stats``, StatsService): aggregated by the database, never by loading traces.
``write`` stores with each trace what its run span says about the run (``run_facts``:
outcome, error code, time to first token, cost, unpriced calls, cached and reasoning
tokens, tool calls and errors) and a row per tool call (``trace_tool_calls``). The
queries are the ``queries/stats_*.sql`` files beside each backend, rendered here for the
filters a query has (``StatsStatements``), and their rows become ``GroupStats`` here too
(``assemble_stats``), so both backends answer exactly as the memory store's
``compute_stats`` does: the same groups, buckets, nearest-rank percentiles and sums.
"""

from __future__ import annotations

import abc
import json
import re
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Callable, Sequence

from agentd.server.tracing.memory import (
    GroupStats,
    Percentiles,
    RunFacts,
    StatsFigures,
    StatsQuery,
    ToolFigures,
    TraceQuery,
    TraceRecord,
    run_facts,
)

# One encoder for the process: json.dumps with options builds a new one on every call.
_encode: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def dumps(value: Any) -> str:
    return _encode(value)


@dataclass(slots=True, eq=False)
class ArchivedTrace(TraceRecord):
    """A trace read back from an archive.

    Listings do not load spans, so the summary a listing shows (agents, token totals,
    span count) is stored with the trace and served from these fields.
    """

    stored_agents: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    stored_span_count: int = 0
    # The run's cost (run_facts: US nano-dollars, None when unknown or archived before costs were
    # recorded) and unpriced model calls, from the stats columns.
    stored_cost_nanos: int | None = None
    stored_unpriced_calls: int = 0

    @property
    def agents(self) -> list[str]:
        return list(self.stored_agents) or [self.agent]

    def token_totals(self) -> tuple[int, int]:
        return self.input_tokens, self.output_tokens

    @property
    def span_count(self) -> int:
        return self.stored_span_count

    def cost(self) -> tuple[int | None, int]:
        return self.stored_cost_nanos, self.stored_unpriced_calls


@dataclass(frozen=True, slots=True)
class Retention:
    """Keep the newest ``max_traces``; with ``max_age_s``, also drop traces started longer ago than that."""

    max_traces: int
    max_age_s: float | None = None


def summary(trace: TraceRecord) -> tuple[list[str], int, int]:
    """(agents, input tokens, output tokens) to store with ``trace``."""
    input_tokens, output_tokens = trace.token_totals()
    return trace.agents, input_tokens, output_tokens


def agents_to_index(trace: TraceRecord) -> list[str]:
    """Every agent the agent filter must match: those that ran and the one it started with."""
    return list(dict.fromkeys([trace.agent, *trace.agents]))


class TraceArchive(abc.ABC):
    """Ended traces in a database. Methods raise ``StoreUnavailableError`` when it cannot be reached."""

    backend: str = ""

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the traces are, for messages (never credentials)."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date; idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish in-flight work and disconnect; idempotent."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @abc.abstractmethod
    async def write(self, traces: list[TraceRecord]) -> None:
        """Store ended traces, each with its spans atomically. A trace id already stored by the
        same tenant is replaced; one stored by another tenant is kept and the new trace skipped."""

    @abc.abstractmethod
    async def get(self, trace_id: str, tenant: str | None = None) -> TraceRecord | None:
        """The trace with its spans and its ``tenant``, or None; None too when ``tenant`` is given
        and the trace is another tenant's (its spans are then never read)."""

    @abc.abstractmethod
    async def list(self, query: TraceQuery) -> tuple[list[TraceRecord], bool]:
        """``query.tenant``'s traces, newest first by ``(start_ns, trace_id)``, without spans; the
        page and whether more match."""

    @abc.abstractmethod
    async def sweep(self, retention: Retention) -> int:
        """Delete traces beyond ``retention``; returns how many were deleted."""

    @abc.abstractmethod
    async def stats(self, query: StatsQuery) -> tuple[list[GroupStats], bool]:
        """``query``'s page of run stats, aggregated by the database (see ``StatsQuery``,
        ``compute_stats``), and whether more groups follow."""


def where_clause(
    query: TraceQuery, placeholder: Callable[[int], str], agents_table: str = "trace_agents"
) -> tuple[str, list[Any]]:
    """The WHERE clause (over ``traces t``) and its parameters for ``query``, shared by the SQL backends.

    ``placeholder(n)`` renders the n-th parameter (1-based): ``?`` for SQLite, ``$n`` for Postgres.
    """
    conditions: list[str] = []
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return placeholder(len(params))

    # Always filtered by tenant, which leads the listing indexes (traces_by_tenant...).
    conditions.append(f"t.tenant = {param(query.tenant)}")
    if query.before is not None:
        conditions.append(f"(t.start_ns, t.trace_id) < ({param(query.before[0])}, {param(query.before[1])})")
    if query.start_to_ns:
        conditions.append(f"t.start_ns < {param(query.start_to_ns)}")
    if query.start_from_ns:
        conditions.append(f"t.start_ns >= {param(query.start_from_ns)}")
    if query.workflow_name:
        conditions.append(f"t.workflow_name = {param(query.workflow_name)}")
    if query.group_id:
        conditions.append(f"t.group_id = {param(query.group_id)}")
    if query.status:
        conditions.append(f"t.status = {param(query.status)}")
    if query.agent_version is not None:
        conditions.append(f"t.agent_version = {param(query.agent_version)}")
    if query.agent:
        conditions.append(
            f"EXISTS (SELECT 1 FROM {agents_table} a WHERE a.trace_id = t.trace_id AND a.agent = {param(query.agent)})"
        )
    return " WHERE " + " AND ".join(conditions), params


# --- run stats ----------------------------------------------------------------------------


def stats_columns(trace: TraceRecord) -> tuple[RunFacts, tuple[Any, ...]]:
    """The facts of ``trace``'s run and the values of the stats columns of its ``traces`` row:
    (outcome, error_code, ttft_ms, cost_usd_nanos, unpriced_calls, cached_input_tokens,
    reasoning_tokens, tool_calls, tool_errors)."""
    facts = run_facts(trace)
    return facts, (
        facts.outcome, facts.error_code, facts.ttft_ms, facts.cost_nanos, facts.unpriced_calls,
        facts.cached_input_tokens, facts.reasoning_tokens, len(facts.tool_calls), facts.tool_errors,
    )


STATS_COLUMNS = (
    "outcome, error_code, ttft_ms, cost_usd_nanos, unpriced_calls, cached_input_tokens, reasoning_tokens,"
    " tool_calls, tool_errors"
)
STATS_QUERIES = ("stats_groups", "stats_runs", "stats_errors", "stats_tools")
_COMMENT = re.compile(r"--[^\n]*")
_NAMED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


class StatsStatements:
    """The run stats queries of one backend: its ``queries/stats_*.sql`` files, rendered for the
    filters of a query (an agent, a version, grouping by version) so that each variant reads the
    index it can (a tenant's window, or one agent's), and cached per variant.

    The files use named parameters (``:tenant``); ``numbered`` backends (asyncpg) get them as
    ``$1``, ``$2``... with the names in order (``params``). ``{s}`` is the quoted schema."""

    def __init__(self, package: str, *, numbered: bool, schema: str = "") -> None:
        folder = files(package).joinpath("queries")
        self._templates = {name: folder.joinpath(f"{name}.sql").read_text(encoding="utf-8") for name in STATS_QUERIES}
        self._numbered = numbered
        self._schema = schema
        self._rendered: dict[tuple[str, bool, bool, bool], tuple[str, tuple[str, ...]]] = {}

    def get(self, name: str, query: StatsQuery) -> tuple[str, tuple[str, ...]]:
        """(SQL, parameter names in order) of query ``name`` for ``query``'s filters."""
        variant = (name, bool(query.agent), query.agent_version is not None, query.by_version)
        found = self._rendered.get(variant)
        if found is None:
            filters = "t.tenant = :tenant AND t.start_ns >= :start_ns AND t.start_ns < :end_ns"
            if query.agent:
                filters += " AND t.agent = :agent"
            if query.agent_version is not None:
                filters += " AND t.agent_version = :agent_version"
            sql = _COMMENT.sub("", self._templates[name])
            sql = sql.replace("{filters}", filters).replace("{version}", "t.agent_version" if query.by_version else "-1")
            sql = sql.replace("{s}", self._schema).strip()
            # SQLite's templates name the index to read (Postgres plans from its statistics).
            sql = sql.replace("{indexed}", f"INDEXED BY traces_by_tenant{'_agent' if query.agent else ''}")
            names: list[str] = []
            if self._numbered:
                def number(match: re.Match[str]) -> str:
                    if match.group(1) not in names:
                        names.append(match.group(1))
                    return f"${names.index(match.group(1)) + 1}"

                sql = _NAMED.sub(number, sql)
            else:
                names = list(dict.fromkeys(_NAMED.findall(sql)))
            found = self._rendered[variant] = (sql, tuple(names))
        return found


def stats_params(query: StatsQuery, first: tuple[str, int] | None = None,
                 last: tuple[str, int] | None = None) -> dict[str, Any]:
    """Every named parameter of the stats queries, for ``query`` (and the page's first and last
    group, for the queries over a page)."""
    return {
        "tenant": query.tenant,
        "start_ns": query.start_ns,
        "end_ns": query.end_ns,
        "agent": query.agent,
        "agent_version": query.agent_version,
        "bucket_ns": query.bucket_ns,
        "after_agent": query.after[0] if query.after else None,
        "after_version": query.after[1] if query.after else None,
        "limit": query.limit + 1,
        "first_agent": first[0] if first else None,
        "first_version": first[1] if first else None,
        "last_agent": last[0] if last else None,
        "last_version": last[1] if last else None,
        "max_tools": query.max_tools,
    }


def _percentiles(count: int, p50: Any, p95: Any, p99: Any) -> Percentiles:
    return Percentiles(int(count), p50, p95, p99) if count else Percentiles()


def assemble_stats(
    query: StatsQuery,
    keys: Sequence[tuple[str, int]],
    run_rows: Sequence[Sequence[Any]],
    error_rows: Sequence[Sequence[Any]],
    tool_rows: Sequence[Sequence[Any]],
) -> list[GroupStats]:
    """The page's ``GroupStats`` from the rows of the stats queries (``stats_runs``,
    ``stats_errors``, ``stats_tools``), whichever backend ran them."""
    groups = {
        (agent, int(version)): GroupStats(agent, int(version), StatsFigures(), [], [], 0)
        for agent, version in keys
    }
    figures: dict[tuple[str, int, int], StatsFigures] = {}
    for row in run_rows:
        (agent, version, bucket, runs, completed, failed, cancelled, d50, d95, d99, ttft_count, t50, t95, t99,
         input_tokens, output_tokens, cached, reasoning, cost, unpriced, tool_calls, tool_errors) = row
        group = groups.get((agent, int(version)))
        if group is None:
            continue
        entry = StatsFigures(
            runs=int(runs), completed=int(completed), failed=int(failed), cancelled=int(cancelled),
            duration_ns=_percentiles(runs, d50, d95, d99), ttft_ms=_percentiles(ttft_count or 0, t50, t95, t99),
            input_tokens=int(input_tokens), output_tokens=int(output_tokens), cached_input_tokens=int(cached),
            reasoning_tokens=int(reasoning), cost_nanos=int(cost), unpriced_runs=int(unpriced),
            tool_calls=int(tool_calls), tool_errors=int(tool_errors),
        )
        figures[(agent, int(version), int(bucket))] = entry
        if bucket == -1:
            group.totals = entry
        else:
            group.buckets.append((int(bucket), entry))
    for agent, version, bucket, code, count in error_rows:
        entry = figures.get((agent, int(version), int(bucket)))
        if entry is not None:
            entry.errors[code] = entry.errors.get(code, 0) + int(count)
    for agent, version, tool, calls, errors, p50, p95, p99, tools in tool_rows:
        group = groups.get((agent, int(version)))
        if group is not None:
            group.tools.append(ToolFigures(tool, int(calls), int(errors), _percentiles(calls, p50, p95, p99)))
            group.tool_count = int(tools)
    for group in groups.values():
        group.buckets.sort(key=lambda entry: entry[0])
    return [groups[(agent, int(version))] for agent, version in keys]
