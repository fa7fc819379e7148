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
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from agentd.server.tracing.memory import TraceQuery, TraceRecord

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

    @property
    def agents(self) -> list[str]:
        return list(self.stored_agents) or [self.agent]

    def token_totals(self) -> tuple[int, int]:
        return self.input_tokens, self.output_tokens

    @property
    def span_count(self) -> int:
        return self.stored_span_count


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
