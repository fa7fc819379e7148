"""An in-process trace store: records traces and answers TraceService queries.

Bounded: beyond ``max_traces`` the oldest traces are dropped, so a long-lived server's
memory stays flat.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Callable

log = logging.getLogger("agentd.tracing")

from agentd.server.tenancy import DEFAULT_TENANT
from agentd.server.tracing.base import CONTENT_ATTRIBUTES, TOOL_NAME, SpanKind, kind_attributes, parse_traceparent


def _new_id(nbytes: int) -> str:
    return os.urandom(nbytes).hex()


@dataclass(slots=True, eq=False)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str
    kind: SpanKind
    name: str
    start_ns: int
    end_ns: int = 0
    error: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    capture_content: bool = True

    def set(self, **attributes: Any) -> None:
        self.attributes.update(_allowed(attributes, self.capture_content))

    def end(self, error: str = "", **attributes: Any) -> None:
        """``error``: content-free (an exception's type, not its message). ``error_detail``, the
        error with its content (which may hold personal data), replaces it only when the trace
        records content."""
        if self.end_ns:
            return
        detail = attributes.pop("error_detail", "")
        self.end_ns = time.time_ns()
        self.error = detail if detail and self.capture_content else error
        if attributes:
            self.attributes.update(_allowed(attributes, self.capture_content))


def _allowed(attributes: dict[str, Any], capture_content: bool) -> dict[str, Any]:
    if capture_content or not CONTENT_ATTRIBUTES.intersection(attributes):
        return attributes
    return {k: v for k, v in attributes.items() if k not in CONTENT_ATTRIBUTES}


@dataclass(slots=True, eq=False)
class TraceRecord:
    trace_id: str
    run_id: str
    workflow_name: str
    group_id: str
    metadata: dict[str, str]
    agent: str
    start_ns: int
    end_ns: int = 0
    error: str = ""
    # The tenant owning the run (agentd.server.tenancy): only its callers can list or read the trace.
    tenant: str = DEFAULT_TENANT
    # The version of the agent the run started with (RunInput.agent_version; 0: an app-module or
    # file agent, or a trace archived before versions were recorded).
    agent_version: int = 0
    spans: list[SpanRecord] = field(default_factory=list)
    capture_content: bool = True
    # The caller's span this trace continues (from its traceparent); "" when it starts here.
    remote_parent_id: str = ""
    # Called once with the trace when it ends (the store hands it to its archive); never raises.
    on_end: Callable[["TraceRecord"], None] | None = field(default=None, repr=False)

    def span(
        self, kind: SpanKind, name: str, parent: SpanRecord | None, *, span_id: str = "", **attributes: Any
    ) -> SpanRecord:
        record = SpanRecord(
            trace_id=self.trace_id,
            span_id=span_id or _new_id(8),
            parent_id=parent.span_id if parent is not None else self.remote_parent_id,
            kind=kind,
            name=name,
            start_ns=time.time_ns(),
            attributes=_allowed(kind_attributes(kind, name, attributes), self.capture_content),
            capture_content=self.capture_content,
        )
        self.spans.append(record)
        return record

    def end(self, error: str = "") -> None:
        if not self.end_ns:
            self.end_ns = time.time_ns()
            self.error = error
            if self.on_end is not None:
                try:
                    self.on_end(self)
                except Exception:  # recording must never raise into the run
                    log.exception("trace %s: handing the ended trace on failed", self.trace_id)

    @property
    def span_count(self) -> int:
        return len(self.spans)

    @property
    def status(self) -> str:
        """"in_progress", "error" or "ok"."""
        if not self.end_ns:
            return "in_progress"
        return "error" if self.error else "ok"

    @property
    def agents(self) -> list[str]:
        """Every agent that ran, in the order they first did."""
        seen = dict.fromkeys(s.name for s in self.spans if s.kind is SpanKind.AGENT)
        return list(seen) or [self.agent]

    def token_totals(self) -> tuple[int, int]:
        """(input, output) tokens over the run's model calls."""
        model_calls = [s.attributes for s in self.spans if s.kind is SpanKind.GENERATION]
        return (
            sum(int(a.get("input_tokens", 0)) for a in model_calls),
            sum(int(a.get("output_tokens", 0)) for a in model_calls),
        )

    def cost(self) -> tuple[int | None, int]:
        """(the run's cost in whole US nano-dollars, None when unknown; its unpriced model calls),
        from its run span's ``cost_usd`` and ``unpriced_calls``, which the run loop keeps current
        after each model turn and sets as the run ends (the calls before a takeover included)."""
        run_span = next((s for s in self.spans if s.kind is SpanKind.RUN), None)
        if run_span is None:
            return None, 0
        attributes = run_span.attributes
        return _cost_nanos(attributes.get(COST_USD)), _count(attributes.get(UNPRICED_CALLS))


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """The filters of ``list_traces`` (AND-combined; empty matches everything) and its keyset cursor.

    ``tenant`` is not optional: a listing only ever holds the traces of one tenant.
    """

    limit: int
    tenant: str = DEFAULT_TENANT
    before: tuple[int, str] | None = None
    workflow_name: str = ""
    group_id: str = ""
    agent: str = ""
    status: str = ""
    start_from_ns: int = 0
    start_to_ns: int = 0
    # Only traces whose run started with this agent version; None: any version (0 is a version:
    # app-module and file agents').
    agent_version: int | None = None


class InMemoryTraceStore:
    """Implements ``Tracer`` and the queries behind TraceService.

    Traces are keyed by (tenant, trace id): a run continuing a caller's trace takes the
    caller's trace id, and a caller of one tenant must not be able to replace (or hide) a
    trace of another by sending its id in a ``traceparent``.
    """

    def __init__(
        self,
        max_traces: int = 10_000,
        *,
        capture_content: bool = False,
        on_trace_end: Callable[[TraceRecord], None] | None = None,
    ) -> None:
        self._max = max_traces
        self._capture_content = capture_content
        self._traces: OrderedDict[tuple[str, str], TraceRecord] = OrderedDict()
        # Called with each trace as it ends (``TraceStore`` queues it for its archive).
        self.on_trace_end = on_trace_end

    def start_trace(
        self,
        *,
        run_id: str,
        workflow_name: str,
        group_id: str,
        metadata: dict[str, str],
        agent: str,
        traceparent: str = "",
        tenant: str = DEFAULT_TENANT,
        trace_id: str = "",
        agent_version: int = 0,
    ) -> TraceRecord:
        """``trace_id``: use this id (an exporter's); else the caller's from ``traceparent``, else a new one.
        ``tenant``: the tenant owning the run. ``agent_version``: the starting agent's version."""
        remote = parse_traceparent(traceparent) if traceparent else None
        trace = TraceRecord(
            trace_id=trace_id or (remote[0] if remote else _new_id(16)),
            remote_parent_id=remote[1] if remote else "",
            capture_content=self._capture_content,
            run_id=run_id,
            workflow_name=workflow_name,
            group_id=group_id,
            metadata=metadata,
            agent=agent,
            start_ns=time.time_ns(),
            tenant=tenant,
            agent_version=agent_version,
            on_end=self.on_trace_end,
        )
        key = (tenant, trace.trace_id)
        self._traces.pop(key, None)  # a run continuing the same trace replaces it, as the newest
        self._traces[key] = trace
        if len(self._traces) > self._max:
            self._traces.popitem(last=False)
        return trace

    def get_trace(self, trace_id: str, tenant: str | None = None) -> TraceRecord | None:
        """``tenant``'s trace ``trace_id``; with no tenant, any tenant's (tests, diagnostics)."""
        if tenant is not None:
            return self._traces.get((tenant, trace_id))
        trace = self._traces.get((DEFAULT_TENANT, trace_id))
        if trace is None:
            trace = next((t for (_, tid), t in self._traces.items() if tid == trace_id), None)
        return trace

    def list_traces(self, query: TraceQuery) -> tuple[list[TraceRecord], bool]:
        """Newest first, keyset-paged by ``(start_ns, trace_id)``; returns the page and whether more match."""
        q = query
        page: list[TraceRecord] = []
        for trace in reversed(self._traces.values()):
            if trace.tenant != q.tenant:
                continue
            if q.before is not None and (trace.start_ns, trace.trace_id) >= q.before:
                continue
            if q.start_to_ns and trace.start_ns >= q.start_to_ns:
                continue
            if q.start_from_ns and trace.start_ns < q.start_from_ns:
                break  # newest first: everything after this is older still
            if q.workflow_name and trace.workflow_name != q.workflow_name:
                continue
            if q.group_id and trace.group_id != q.group_id:
                continue
            if q.status and trace.status != q.status:
                continue
            if q.agent_version is not None and trace.agent_version != q.agent_version:
                continue
            if q.agent and q.agent != trace.agent and q.agent not in trace.agents:
                continue
            if len(page) == q.limit:
                return page, True
            page.append(trace)
        return page, False

    def stats(self, query: "StatsQuery") -> tuple[list["GroupStats"], bool]:
        """Run stats over the ended traces held here (see ``StatsQuery``; aggregated in Python: the
        store holds at most ``max_traces`` traces)."""
        q = query
        runs = []
        for trace in self._traces.values():
            if (
                trace.tenant != q.tenant
                or not trace.end_ns
                or not q.start_ns <= trace.start_ns < q.end_ns
                or (q.agent and trace.agent != q.agent)
                or (q.agent_version is not None and trace.agent_version != q.agent_version)
            ):
                continue
            input_tokens, output_tokens = trace.token_totals()
            runs.append(StatsRun(trace.agent, trace.agent_version, trace.start_ns, trace.end_ns, input_tokens,
                                 output_tokens, run_facts(trace)))
        return compute_stats(q, runs)


# --- run stats (StatsService) -----------------------------------------------------------
#
# What a trace says about its run, for aggregates: ``run_facts`` reads it once from the run span
# and the tool spans (the SQL archives store it in columns and ``trace_tool_calls`` when they write
# the trace; the memory store reads it at query time), and ``compute_stats`` aggregates runs with
# exactly the definitions the archives' SQL uses, so the three backends answer alike.

# Run span attributes the stats read (the run loop sets them as it ends the run span).
ERROR_CODE = "error_code"  # a failed run's RunErrorCode (its value, e.g. "model_error")
TTFT_MS = "ttft_ms"  # ms from the run's start to its first model token; absent when none came
COST_USD = "cost_usd"  # US dollars over the run's priced model calls; absent when none was priced
UNPRICED_CALLS = "unpriced_calls"  # model calls of models the price table does not name
CACHED_INPUT_TOKENS = "cached_input_tokens"
REASONING_TOKENS = "reasoning_tokens"

COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
# The percentiles every figure reports, in percent.
PERCENTILES = (50, 95, 99)
# Per group, the tools listed (most calls first); the others are only counted.
MAX_TOOLS = 100
# The version of a group's key when the query does not group by version.
ANY_VERSION = -1
_NANO_PER_USD = 1_000_000_000


def nearest_rank(count: int, percent: int) -> int:
    """The 1-based rank of the ``percent``-th percentile among ``count`` values sorted ascending:
    ``ceil(percent * count / 100)`` (nearest rank; 0 when there are no values). Integer arithmetic,
    which Postgres's ``percentile_disc`` (``ceil(fraction * count)`` in float8) equals for 50, 95
    and 99; the SQLite queries use this very expression."""
    return (percent * count + 99) // 100


@dataclass(frozen=True, slots=True)
class ToolCallFact:
    """One tool call of a run (a FUNCTION span)."""

    span_id: str
    tool: str
    is_error: bool
    duration_ns: int


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the stats need of an ended trace beyond its columns (agent, version, start, end, tokens)."""

    outcome: str  # COMPLETED, FAILED or CANCELLED
    error_code: str | None  # a failed run's code ("model_error"); None when the trace recorded none
    ttft_ms: float | None
    cost_nanos: int | None  # US nano-dollars; None when no call of the run had a price
    unpriced_calls: int
    cached_input_tokens: int
    reasoning_tokens: int
    tool_calls: tuple[ToolCallFact, ...]

    @property
    def tool_errors(self) -> int:
        return sum(call.is_error for call in self.tool_calls)


def _count(value: Any) -> int:
    """A non-negative count from an attribute; 0 when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return 0
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return number if 0 <= number < 2**63 else 0


def _ttft(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _cost_nanos(value: Any) -> int | None:
    """Whole US nano-dollars (half to even) of a ``cost_usd`` attribute (Decimal, number or numeric
    text); None when absent or not a finite, non-negative amount."""
    if value is None or isinstance(value, bool):
        return None
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
        if not amount.is_finite() or amount < 0:
            return None
        nanos = int((amount * _NANO_PER_USD).to_integral_value(ROUND_HALF_EVEN))
    except (InvalidOperation, ValueError, TypeError):
        return None
    return nanos if nanos < 2**63 else None


def _error_code(value: Any) -> str | None:
    """A RunErrorCode as stored: its value in lower case ("model_error"), from the enum, its value
    or its proto name ("RUN_ERROR_CODE_MODEL_ERROR"); None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, enum.Enum):
        value = value.value
    return str(value).strip().lower().removeprefix("run_error_code_")[:100] or None


def run_facts(trace: TraceRecord) -> RunFacts:
    """The run's outcome, error code, time to first token, cost and tool calls, from its spans.

    Outcome: a trace without error is a completed run; one whose run span has an error code, or
    whose error is anything but a cancellation ("cancelled: <reason>"), a failed run; else a
    cancelled one. Attributes a run span lacks read as unknown (TTFT, cost: None) or 0 (counts).
    """
    run_span = next((s for s in trace.spans if s.kind is SpanKind.RUN), None)
    attributes = run_span.attributes if run_span is not None else {}
    code = _error_code(attributes.get(ERROR_CODE))
    if not trace.error:
        outcome, code = COMPLETED, None
    elif code is None and trace.error.startswith("cancelled"):
        outcome = CANCELLED
    else:
        outcome = FAILED
    end = trace.end_ns
    calls = tuple(
        ToolCallFact(
            s.span_id,
            str(s.attributes.get(TOOL_NAME) or s.name),
            bool(s.error),
            max((s.end_ns or end or s.start_ns) - s.start_ns, 0),
        )
        for s in trace.spans
        if s.kind is SpanKind.FUNCTION
    )
    return RunFacts(
        outcome=outcome,
        error_code=code,
        ttft_ms=_ttft(attributes.get(TTFT_MS)),
        cost_nanos=_cost_nanos(attributes.get(COST_USD)),
        unpriced_calls=_count(attributes.get(UNPRICED_CALLS)),
        cached_input_tokens=_count(attributes.get(CACHED_INPUT_TOKENS)),
        reasoning_tokens=_count(attributes.get(REASONING_TOKENS)),
        tool_calls=calls,
    )


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """One page of run stats: ``tenant``'s ended runs that started in ``[start_ns, end_ns)``,
    grouped by starting agent (and version with ``by_version``), each group's series in buckets of
    ``bucket_ns`` aligned to the epoch. Groups come in (agent, version) order, after ``after`` (the
    previous page's last group), at most ``limit`` of them."""

    tenant: str
    start_ns: int
    end_ns: int
    bucket_ns: int
    limit: int
    agent: str = ""
    agent_version: int | None = None  # None: any version (0 is a version)
    by_version: bool = False
    after: tuple[str, int] | None = None
    max_tools: int = MAX_TOOLS


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank percentiles (``PERCENTILES``) of ``count`` values; None when ``count`` is 0."""

    count: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: list[Any]) -> "Percentiles":
        ordered = sorted(values)
        n = len(ordered)
        if not n:
            return cls()
        return cls(n, *(ordered[nearest_rank(n, p) - 1] for p in PERCENTILES))


@dataclass(slots=True)
class StatsFigures:
    """Figures over a set of runs (a group's window or one of its buckets)."""

    runs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    # Failed runs by error code ("" for a failed run whose trace recorded none).
    errors: dict[str, int] = field(default_factory=dict)
    duration_ns: Percentiles = Percentiles()
    ttft_ms: Percentiles = Percentiles()
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanos: int = 0
    unpriced_runs: int = 0
    tool_calls: int = 0
    tool_errors: int = 0


@dataclass(slots=True)
class ToolFigures:
    tool: str
    calls: int
    errors: int
    duration_ns: Percentiles


@dataclass(slots=True)
class GroupStats:
    """One group: ``agent_version`` is ``ANY_VERSION`` unless the query grouped by version;
    ``buckets`` (bucket index: start_ns // bucket_ns, figures) ascending, non-empty ones only;
    ``tools`` the ``max_tools`` most called, of ``tool_count`` distinct tools."""

    agent: str
    agent_version: int
    totals: StatsFigures
    buckets: list[tuple[int, StatsFigures]]
    tools: list[ToolFigures]
    tool_count: int


@dataclass(frozen=True, slots=True)
class StatsRun:
    """One ended run as ``compute_stats`` takes it."""

    agent: str
    agent_version: int
    start_ns: int
    end_ns: int
    input_tokens: int
    output_tokens: int
    facts: RunFacts


def _figures(runs: list[StatsRun]) -> StatsFigures:
    figures = StatsFigures(runs=len(runs))
    for run in runs:
        facts = run.facts
        if facts.outcome == COMPLETED:
            figures.completed += 1
        elif facts.outcome == CANCELLED:
            figures.cancelled += 1
        else:
            figures.failed += 1
            code = facts.error_code or ""
            figures.errors[code] = figures.errors.get(code, 0) + 1
        figures.input_tokens += run.input_tokens
        figures.output_tokens += run.output_tokens
        figures.cached_input_tokens += facts.cached_input_tokens
        figures.reasoning_tokens += facts.reasoning_tokens
        figures.cost_nanos += facts.cost_nanos or 0
        figures.unpriced_runs += facts.unpriced_calls > 0
        figures.tool_calls += len(facts.tool_calls)
        figures.tool_errors += facts.tool_errors
    figures.duration_ns = Percentiles.of([run.end_ns - run.start_ns for run in runs])
    figures.ttft_ms = Percentiles.of([run.facts.ttft_ms for run in runs if run.facts.ttft_ms is not None])
    return figures


def compute_stats(query: StatsQuery, runs: list[StatsRun]) -> tuple[list[GroupStats], bool]:
    """``query``'s page of groups over ``runs`` (already filtered by tenant, window, agent and
    version) and whether more groups follow: the in-memory twin of the archives' SQL."""
    groups: dict[tuple[str, int], list[StatsRun]] = {}
    for run in runs:
        key = (run.agent, run.agent_version if query.by_version else ANY_VERSION)
        groups.setdefault(key, []).append(run)
    keys = sorted(key for key in groups if query.after is None or key > query.after)
    page: list[GroupStats] = []
    for key in keys[: query.limit]:
        members = groups[key]
        buckets: dict[int, list[StatsRun]] = {}
        calls: dict[str, list[ToolCallFact]] = {}
        for run in members:
            buckets.setdefault(run.start_ns // query.bucket_ns, []).append(run)
            for call in run.facts.tool_calls:
                calls.setdefault(call.tool, []).append(call)
        tools = [
            ToolFigures(tool, len(made), sum(c.is_error for c in made), Percentiles.of([c.duration_ns for c in made]))
            for tool, made in calls.items()
        ]
        tools.sort(key=lambda t: (-t.calls, t.tool))
        page.append(GroupStats(
            agent=key[0],
            agent_version=key[1],
            totals=_figures(members),
            buckets=[(index, _figures(buckets[index])) for index in sorted(buckets)],
            tools=tools[: query.max_tools],
            tool_count=len(tools),
        ))
    return page, len(keys) > query.limit
