"""OpenTelemetry spans for every run, next to the in-process trace store.

``OtelTracer`` implements ``Tracer`` by recording each span twice: as a record in
``InMemoryTraceStore`` for TraceService, and as an OpenTelemetry span handed, when it
ends, to the tracer provider's span processors (the OTLP batch processor, which exports
on its own thread so the run loop never waits on a collector, and the metrics processor,
metrics.py). Both share trace and span ids, so the trace id a client sees on its run
events is the one it finds in Jaeger or any OTLP backend, and a caller's ``traceparent``
makes the run a child of the caller's span in both.

The OpenTelemetry side is built once per span, when it ends: a finished ``ReadableSpan``
(what the SDK's own ``Span.end`` hands its processors) with the ids, times and attributes
the record has, rather than an SDK ``Span`` kept alive and updated through the run (its
per-span context, sampler call, attribute validation and locks cost the run loop several
times what the record does). The provider's configuration still applies: its sampler
decides once per trace (at the run's root span, as the SDK's default parent-based
sampler does for every child), its id generator makes the ids, its span limits bound the
attributes, its resource and the ``agentd`` instrumentation scope label the spans. A
trace the sampler drops is still recorded for TraceService, as before.

Attribute names follow the OpenTelemetry GenAI semantic conventions where they exist
(``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``...);
agentd's own are under ``agentd.``; the run span carries ``agentd.tenant``, the tenant
owning the run (never who called: a subject may be personal data) and
``agentd.agent.version``, the version of the agent the run started with; model-call spans
carry ``agentd.tenant`` too. Cost and the other run figures keep agentd's keys: a priced
model call's ``agentd.cost_usd`` (a double, US dollars rounded to whole nano-dollars; absent
when unpriced), ``agentd.cached_input_tokens`` and ``agentd.reasoning_tokens``; the run
span's ``agentd.cost_usd``, ``agentd.unpriced_calls``, ``agentd.ttft_ms`` and, on failure,
``agentd.error_code``. Tool arguments and results are content: they are recorded only with
``capture_content``.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace as otel
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import SpanContext, SpanKind as OtelSpanKind, Status, StatusCode, TraceFlags
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
# The attributes every span of a kind starts with (copied per span).
_KIND_ATTRIBUTES = {
    kind: {"gen_ai.operation.name": _OPERATION[kind], "agentd.span_kind": kind.value} for kind in SpanKind
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
_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags.SAMPLED
_RANDOM_TRACE_ID = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # newer SDKs flag ids that are random


def _add_otel_attributes(result: dict[str, Any], attributes: dict[str, Any], capture_content: bool) -> None:
    """Add ``attributes`` (agentd's names) to ``result`` under their OpenTelemetry names."""
    for key, value in attributes.items():
        if key in CONTENT_ATTRIBUTES and not capture_content:
            continue
        if key == "finish_reason":
            result["gen_ai.response.finish_reasons"] = (str(value),)
        elif isinstance(value, (str, bool, int, float)):
            result[_ATTRIBUTE_NAMES.get(key, f"agentd.{key}")] = value
        else:
            result[_ATTRIBUTE_NAMES.get(key, f"agentd.{key}")] = str(value)


def _random_ids(id_generator: Any) -> bool:
    is_random = getattr(id_generator, "is_trace_id_random", None)
    return bool(is_random()) if is_random is not None else False


def _span_name(kind: SpanKind, name: str) -> str:
    if kind is SpanKind.RUN:
        return name
    if kind is SpanKind.HANDOFF:
        return f"handoff {name}"
    return f"{_OPERATION[kind]} {name}"


class _Export:
    """What every span of one sampled trace shares: the provider's tracer parts and the trace's context."""

    __slots__ = ("processor", "resource", "scope", "info", "id_generator", "limits", "trace_id", "flags", "state",
                 "capture_content")

    def __init__(self, tracer: Any, trace_id: int, flags: TraceFlags, state: Any, capture_content: bool) -> None:
        self.processor = tracer.span_processor
        self.resource = tracer.resource
        self.scope = getattr(tracer, "_instrumentation_scope", None)
        self.info = getattr(tracer, "instrumentation_info", None)
        self.id_generator = tracer.id_generator
        self.limits = getattr(tracer, "_span_limits", None)
        self.trace_id = trace_id
        self.flags = flags
        self.state = state
        self.capture_content = capture_content

    def emit(
        self,
        name: str,
        span_id: int,
        parent: SpanContext | None,
        kind: OtelSpanKind,
        attributes: dict[str, Any],
        status: Status,
        start_ns: int,
        end_ns: int,
    ) -> None:
        """Hand one finished span to the provider's processors (as the SDK's ``Span.end`` does)."""
        limits = self.limits
        if limits is not None and (
            limits.max_span_attribute_length is not None
            or (limits.max_span_attributes is not None and len(attributes) > limits.max_span_attributes)
        ):
            attributes = BoundedAttributes(  # type: ignore[assignment]
                limits.max_span_attributes, attributes, immutable=True, max_value_len=limits.max_span_attribute_length
            )
        span = ReadableSpan(
            name=name,
            context=SpanContext(self.trace_id, span_id, False, self.flags, self.state),
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=kind,
            instrumentation_info=self.info,
            status=status,
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self.scope,
        )
        self.processor.on_end(span)

    def context(self, span_id: int) -> SpanContext:
        return SpanContext(self.trace_id, span_id, False, self.flags, self.state)


class _OtelSpan:
    """A span in both worlds: the record now, the OpenTelemetry span when it ends; ``end`` closes both, once."""

    __slots__ = ("record", "_export", "_id", "_parent", "_name", "_kind", "_attributes", "_start_ns", "_context")

    def __init__(
        self,
        record: SpanRecord,
        export: _Export | None,
        span_id: int,
        parent: SpanContext | None,
        name: str,
        kind: OtelSpanKind,
        attributes: dict[str, Any],
        start_ns: int,
    ) -> None:
        self.record = record
        self._export = export
        self._id = span_id
        self._parent = parent
        self._name = name
        self._kind = kind
        self._attributes = attributes  # OpenTelemetry names, converted as they are set
        self._start_ns = start_ns
        self._context: SpanContext | None = None

    @property
    def span_id(self) -> str:
        return self.record.span_id

    @property
    def context(self) -> SpanContext | None:
        """This span's OpenTelemetry context (None when its trace is not sampled)."""
        if self._context is None and self._export is not None:
            self._context = self._export.context(self._id)
        return self._context

    def set(self, **attributes: Any) -> None:
        self.record.set(**attributes)
        if self._export is not None and not self.record.end_ns:
            _add_otel_attributes(self._attributes, attributes, self._export.capture_content)

    def end(self, error: str = "", **attributes: Any) -> None:
        if self.record.end_ns:
            return
        # ``error`` is content-free; ``error_detail`` (an exception message...) is content, exported
        # only with capture_content, like tool arguments and results (SpanRecord.end does the same).
        detail = attributes.pop("error_detail", "")
        self.record.end(error, error_detail=detail, **attributes)
        export = self._export
        if export is None:
            return
        otel_attributes = self._attributes
        if attributes:
            _add_otel_attributes(otel_attributes, attributes, export.capture_content)
        status = _UNSET
        if detail and export.capture_content:
            error = detail
        if error:
            status = Status(StatusCode.ERROR, error)
            otel_attributes["error.type"] = error.split(":", 1)[0][:120]
        export.emit(self._name, self._id, self._parent, self._kind, otel_attributes, status, self._start_ns,
                    self.record.end_ns)


class _OtelTrace:
    """The run's trace: the first parentless span is the root whose id and attributes start_trace chose."""

    def __init__(
        self,
        record: TraceRecord,
        export: _Export | None,
        root_id: int,
        remote_parent: SpanContext | None,
        root_attributes: dict[str, Any],
        workflow_name: str,
    ) -> None:
        self.record = record
        self._export = export
        self._remote_parent = remote_parent
        self._root: tuple[int, dict[str, Any]] | None = (root_id, root_attributes)
        self._workflow_name = workflow_name

    @property
    def trace_id(self) -> str:
        return self.record.trace_id

    def span(self, kind: SpanKind, name: str, parent: _OtelSpan | None, **attributes: Any) -> _OtelSpan:
        export = self._export
        if parent is None and self._root is not None:
            (span_id, otel_attributes), self._root = self._root, None
            start_ns = self.record.start_ns
        else:
            span_id = export.id_generator.generate_span_id() if export is not None else 0
            otel_attributes = {}
            start_ns = 0
        attributes = kind_attributes(kind, name, attributes)
        if export is not None:
            otel_attributes.update(_KIND_ATTRIBUTES[kind])
            if kind is SpanKind.GENERATION:  # model calls' metrics (their cost) are per tenant too
                otel_attributes["agentd.tenant"] = self.record.tenant
            _add_otel_attributes(otel_attributes, attributes, export.capture_content)
            record_id = format(span_id, "016x")
        else:
            record_id = ""  # not exported: the record makes its own id
        record = self.record.span(kind, name, parent.record if parent else None, span_id=record_id, **attributes)
        if parent is not None:
            parent_context = parent.context
        else:
            parent_context = self._remote_parent
        kind_ = OtelSpanKind.CLIENT if kind is SpanKind.GENERATION else OtelSpanKind.INTERNAL
        return _OtelSpan(record, export, span_id, parent_context, _span_name(kind, name), kind_, otel_attributes,
                         start_ns or record.start_ns)

    def end(self, error: str = "") -> None:
        self.record.end(error)
        if self._root is not None:  # no span was ever opened on it: the root ends as it started
            (span_id, attributes), self._root = self._root, None
            if self._export is not None:
                self._export.emit(self._workflow_name, span_id, self._remote_parent, OtelSpanKind.INTERNAL,
                                  attributes, _UNSET, self.record.start_ns, self.record.end_ns or time.time_ns())


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
        tracer = self._tracer
        parent_context = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        remote = otel.get_current_span(parent_context).get_span_context() if parent_context is not None else None
        if remote is not None and not remote.is_valid:
            remote = None
        # The tenant, never the caller's subject (a user id is personal data): spans and the
        # metrics derived from them (metrics.py) can be told apart per tenant, not per person.
        attributes: dict[str, Any] = {
            "agentd.tenant": tenant,
            "agentd.run_id": run_id,
            "agentd.workflow_name": workflow_name,
            "agentd.group_id": group_id,
            "gen_ai.agent.name": agent,
            "agentd.agent.version": agent_version,
            **{f"agentd.metadata.{k}": v for k, v in metadata.items()},
        }
        export: _Export | None = None
        root_id = 0
        if not hasattr(tracer, "span_processor"):  # a no-op tracer (OTEL_SDK_DISABLED): nothing is exported
            trace_id = remote.trace_id if remote is not None else 0
        else:
            trace_id = remote.trace_id if remote is not None else tracer.id_generator.generate_trace_id()
            root_id = tracer.id_generator.generate_span_id()
            enabled = getattr(tracer, "_is_enabled", None)
            sampling = None
            if enabled is None or enabled():
                sampling = tracer.sampler.should_sample(
                    parent_context, trace_id, workflow_name, OtelSpanKind.INTERNAL, attributes, ()
                )
            if sampling is not None and sampling.decision.is_recording():
                flags = _SAMPLED if sampling.decision.is_sampled() else 0
                random_id = remote.trace_flags & _RANDOM_TRACE_ID if remote is not None else (
                    _RANDOM_TRACE_ID if _RANDOM_TRACE_ID and _random_ids(tracer.id_generator) else 0
                )
                export = _Export(tracer, trace_id, TraceFlags(flags | random_id), sampling.trace_state,
                                 self._capture_content)
                attributes = dict(sampling.attributes)
        record = self._store.start_trace(
            run_id=run_id,
            workflow_name=workflow_name,
            group_id=group_id,
            metadata=metadata,
            agent=agent,
            traceparent=traceparent,
            tenant=tenant,
            trace_id=format(trace_id, "032x") if trace_id else "",
            agent_version=agent_version,
        )
        return _OtelTrace(record, export, root_id, remote, attributes, workflow_name)
