"""An in-process trace store: records traces and answers TraceService queries.

Bounded: beyond ``max_traces`` the oldest traces are dropped, so a long-lived server's
memory stays flat.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("agentd.tracing")

from agentd.server.tenancy import DEFAULT_TENANT
from agentd.server.tracing.base import CONTENT_ATTRIBUTES, SpanKind, kind_attributes, parse_traceparent


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
