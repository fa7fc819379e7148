"""OpenTelemetry spans for every run, next to the in-process trace store.

``OtelTracer`` implements ``Tracer`` by recording each span twice: as an OpenTelemetry
span (exported over OTLP by the SDK's batch processor, on its own thread, so the run
loop never waits on a collector) and as a record in ``InMemoryTraceStore`` for
TraceService. Both share trace and span ids, so the trace id a client sees on its run
events is the one it finds in Jaeger or any OTLP backend, and a caller's
``traceparent`` makes the run a child of the caller's span in both.

Attribute names follow the OpenTelemetry GenAI semantic conventions where they exist
(``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``...);
agentd's own are under ``agentd.``; the run span carries ``agentd.tenant``, the tenant
owning the run (never who called: a subject may be personal data) and
``agentd.agent.version``, the version of the agent the run started with. Tool arguments and
results are content: they are recorded only with ``capture_content``.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace as otel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, SpanKind as OtelSpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentd.server.tenancy import DEFAULT_TENANT
from agentd.server.tracing.base import CONTENT_ATTRIBUTES, SpanKind, kind_attributes
from agentd.server.tracing.memory import InMemoryTraceStore, SpanRecord, TraceRecord

_PROPAGATOR = TraceContextTextMapPropagator()
_OPERATION = {
    SpanKind.RUN: "invoke_agent",
    SpanKind.AGENT: "invoke_agent",
    SpanKind.GENERATION: "chat",
    SpanKind.FUNCTION: "execute_tool",
    SpanKind.HANDOFF: "handoff",
    SpanKind.GUARDRAIL: "guardrail",
}
# agentd attribute -> OpenTelemetry attribute, per span kind.
_ATTRIBUTE_NAMES: dict[str, str] = {
    "agent": "gen_ai.agent.name",
    "model": "gen_ai.request.model",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "tool_name": "gen_ai.tool.name",
    "call_id": "gen_ai.tool.call.id",
    "arguments": "gen_ai.tool.call.arguments",
    "output": "gen_ai.tool.call.result",
    "run_id": "agentd.run_id",
    "agent_version": "agentd.agent.version",
    "turns": "agentd.turns",
    "from_agent": "agentd.handoff.from_agent",
    "to_agent": "agentd.handoff.to_agent",
    "guardrail": "agentd.guardrail.name",
    "stage": "agentd.guardrail.stage",
    "tripwire": "agentd.guardrail.tripwire",
    "replaced": "agentd.guardrail.replaced",
    "mcp_server": "agentd.mcp.server",
    "mcp_tool": "agentd.mcp.tool",
}


def _otel_attributes(attributes: dict[str, Any], capture_content: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in attributes.items():
        if key in CONTENT_ATTRIBUTES and not capture_content:
            continue
        if key == "finish_reason":
            result["gen_ai.response.finish_reasons"] = [str(value)]
        elif isinstance(value, (str, bool, int, float)):
            result[_ATTRIBUTE_NAMES.get(key, f"agentd.{key}")] = value
        else:
            result[_ATTRIBUTE_NAMES.get(key, f"agentd.{key}")] = str(value)
    return result


def _span_name(kind: SpanKind, name: str) -> str:
    if kind is SpanKind.RUN:
        return name
    if kind is SpanKind.HANDOFF:
        return f"handoff {name}"
    return f"{_OPERATION[kind]} {name}"


class _OtelSpan:
    """A span in both worlds; ``end`` closes both, once."""

    __slots__ = ("record", "otel_span", "_capture_content")

    def __init__(self, record: SpanRecord, otel_span: Span, capture_content: bool) -> None:
        self.record = record
        self.otel_span = otel_span
        self._capture_content = capture_content

    @property
    def span_id(self) -> str:
        return self.record.span_id

    def set(self, **attributes: Any) -> None:
        self.record.set(**attributes)
        self.otel_span.set_attributes(_otel_attributes(attributes, self._capture_content))

    def end(self, error: str = "", **attributes: Any) -> None:
        if self.record.end_ns:
            return
        # ``error`` is content-free; ``error_detail`` (an exception message...) is content, exported
        # only with capture_content, like tool arguments and results (SpanRecord.end does the same).
        detail = attributes.pop("error_detail", "")
        self.record.end(error, error_detail=detail, **attributes)
        if detail and self._capture_content:
            error = detail
        if attributes:
            self.otel_span.set_attributes(_otel_attributes(attributes, self._capture_content))
        if error:
            self.otel_span.set_status(Status(StatusCode.ERROR, error))
            self.otel_span.set_attribute("error.type", error.split(":", 1)[0][:120])
        self.otel_span.end(end_time=self.record.end_ns)


class _OtelTrace:
    """The run's trace: the first parentless span is the root started with the trace."""

    def __init__(self, record: TraceRecord, tracer: otel.Tracer, root: Span, capture_content: bool) -> None:
        self.record = record
        self._tracer = tracer
        self._root: Span | None = root
        self._capture_content = capture_content

    @property
    def trace_id(self) -> str:
        return self.record.trace_id

    def span(self, kind: SpanKind, name: str, parent: _OtelSpan | None, **attributes: Any) -> _OtelSpan:
        attributes = kind_attributes(kind, name, attributes)
        otel_attributes = {"gen_ai.operation.name": _OPERATION[kind], "agentd.span_kind": kind.value}
        otel_attributes.update(_otel_attributes(attributes, self._capture_content))
        if parent is None and self._root is not None:
            otel_span, self._root = self._root, None
            otel_span.update_name(_span_name(kind, name))
            otel_span.set_attributes(otel_attributes)
        else:
            context = otel.set_span_in_context(parent.otel_span) if parent is not None else None
            kind_ = OtelSpanKind.CLIENT if kind is SpanKind.GENERATION else OtelSpanKind.INTERNAL
            otel_span = self._tracer.start_span(
                _span_name(kind, name), context=context, kind=kind_, attributes=otel_attributes
            )
        span_id = format(otel_span.get_span_context().span_id, "016x")
        record = self.record.span(kind, name, parent.record if parent else None, span_id=span_id, **attributes)
        return _OtelSpan(record, otel_span, self._capture_content)

    def end(self, error: str = "") -> None:
        self.record.end(error)
        if self._root is not None:  # no span was ever opened on it
            self._root.end()
            self._root = None


class OtelTracer:
    """``Tracer`` that records into ``store`` and exports through ``provider``."""

    def __init__(self, store: InMemoryTraceStore, provider: TracerProvider, *, capture_content: bool) -> None:
        self._store = store
        self._tracer = provider.get_tracer("agentd")
        self._capture_content = capture_content

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
        agent_version: int = 0,
    ) -> _OtelTrace:
        parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        # The tenant, never the caller's subject (a user id is personal data): spans and the
        # metrics derived from them (metrics.py) can be told apart per tenant, not per person.
        attributes = {
            "agentd.tenant": tenant,
            "agentd.run_id": run_id,
            "agentd.workflow_name": workflow_name,
            "agentd.group_id": group_id,
            "gen_ai.agent.name": agent,
            "agentd.agent.version": agent_version,
            **{f"agentd.metadata.{k}": v for k, v in metadata.items()},
        }
        root = self._tracer.start_span(workflow_name, context=parent, attributes=attributes)
        context = root.get_span_context()
        record = self._store.start_trace(
            run_id=run_id,
            workflow_name=workflow_name,
            group_id=group_id,
            metadata=metadata,
            agent=agent,
            traceparent=traceparent,
            tenant=tenant,
            trace_id=format(context.trace_id, "032x"),
            agent_version=agent_version,
        )
        return _OtelTrace(record, self._tracer, root, self._capture_content)
