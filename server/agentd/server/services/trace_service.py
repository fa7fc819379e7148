"""TraceService: what runs did, from the trace store (live traces in memory, ended ones archived).

A caller sees only its tenant's traces (``current_principal().tenant``): listings hold
nothing else, and another tenant's trace answers exactly as a missing one does.
"""

from __future__ import annotations

import grpc

from agentd.server.auth.principal import current_principal
from agentd.server.services import validation
from agentd.server.services.convert import money_from_nanos, struct_from_dict, timestamp_ns
from agentd.server.services.errors import NotFound, unary_errors
from agentd.server.services.validation import InvalidArgument
from agentd.server.tracing.base import SpanKind
from agentd.server.tracing.memory import InMemoryTraceStore, SpanRecord, TraceQuery, TraceRecord
from agentd.server.tracing.store import TraceStore
from agentd.v1 import trace_service_pb2 as pb
from agentd.v1 import trace_service_pb2_grpc as pb_grpc

DEFAULT_TRACE_PAGE = 50

_KINDS = {
    SpanKind.RUN: pb.SPAN_KIND_RUN,
    SpanKind.AGENT: pb.SPAN_KIND_AGENT,
    SpanKind.GENERATION: pb.SPAN_KIND_GENERATION,
    SpanKind.FUNCTION: pb.SPAN_KIND_FUNCTION,
    SpanKind.HANDOFF: pb.SPAN_KIND_HANDOFF,
    SpanKind.GUARDRAIL: pb.SPAN_KIND_GUARDRAIL,
}


class TraceService(pb_grpc.TraceServiceServicer):
    def __init__(self, store: TraceStore | InMemoryTraceStore) -> None:
        self._store = store if isinstance(store, TraceStore) else TraceStore(store)

    @unary_errors
    async def ListTraces(self, request: pb.ListTracesRequest, context: grpc.aio.ServicerContext) -> pb.ListTracesResponse:
        size = validation.page_size(request.page_size, DEFAULT_TRACE_PAGE)
        status = _STATUS_FILTER.get(request.status)
        if status is None:
            raise InvalidArgument("status", f"unknown status value {request.status}")
        for field in ("workflow_name", "group_id"):
            validation.check_id(field, getattr(request, field))
        # The agent filter names an agent: 'agents/ID' or the bare ID, as every name field.
        agent = validation.resource_id("agent", request.agent, "agents") if request.agent else ""
        start_from = validation.unix_ns("start_time_from", request.start_time_from) \
            if request.HasField("start_time_from") else 0
        start_to = validation.unix_ns("start_time_to", request.start_time_to) if request.HasField("start_time_to") else 0
        if start_from and start_to and start_from >= start_to:
            raise InvalidArgument("start_time_to", "must be later than start_time_from")
        # Unset: any version; 0 is a version (app-module and file agents').
        agent_version = request.agent_version if request.HasField("agent_version") else None
        if agent_version is not None and agent_version < 0:
            raise InvalidArgument("agent_version", f"must not be negative, got {agent_version}")
        tenant = current_principal().tenant
        # A token continues the listing it came from: the same tenant and the same filters. The
        # version is bound only when set, so "any version" and version 0 differ, and a token from
        # before versions were filterable still continues its listing (no filter holds a control
        # character, so the number of parts tells them apart).
        filters = [tenant, request.workflow_name, request.group_id, agent, status, str(start_from), str(start_to)]
        if agent_version is not None:
            filters.append(f"agent_version={agent_version}")
        scope = "\x00".join(filters)
        cursor = validation.decode_page_token("traces", request.page_token, scope=scope)
        before = None
        if cursor is not None:
            start, _, trace_id = cursor.partition(":")
            if not trace_id:
                raise validation.corrupted_token()
            before = (validation.token_int(start), validation.check_id("page_token", trace_id))
        query = TraceQuery(
            limit=size,
            tenant=tenant,
            before=before,
            workflow_name=request.workflow_name,
            group_id=request.group_id,
            agent=agent,
            status=status,
            start_from_ns=start_from,
            start_to_ns=start_to,
            agent_version=agent_version,
        )
        traces, more = await self._store.list_traces(query)
        response = pb.ListTracesResponse(traces=[_trace_to_proto(t) for t in traces])
        if more and traces:
            last = traces[-1]
            response.next_page_token = validation.encode_page_token(
                "traces", f"{last.start_ns}:{last.trace_id}", scope=scope
            )
        return response

    @unary_errors
    async def GetTrace(self, request: pb.GetTraceRequest, context: grpc.aio.ServicerContext) -> pb.GetTraceResponse:
        trace_id = validation.resource_id("name", request.name, "traces")
        tenant = current_principal().tenant
        trace = await self._store.get_trace(trace_id, tenant)
        # Another tenant's trace is answered exactly as a missing one: the same code, the same message.
        if trace is None or trace.tenant != tenant:
            raise NotFound(
                f"name: trace {validation.quote(trace_id)} does not exist (or has aged out of the trace store)",
                reason="TRACE_NOT_FOUND", resource=f"traces/{trace_id}", metadata={"trace": trace_id},
            )
        spans = sorted(trace.spans, key=lambda s: s.start_ns)
        return pb.GetTraceResponse(trace=_trace_to_proto(trace), spans=[_span_to_proto(s) for s in spans])


_STATUS_FILTER = {
    pb.SPAN_STATUS_UNSPECIFIED: "",
    pb.SPAN_STATUS_OK: "ok",
    pb.SPAN_STATUS_ERROR: "error",
    pb.SPAN_STATUS_IN_PROGRESS: "in_progress",
}


def _status(end_ns: int, error: str) -> int:
    if not end_ns:
        return pb.SPAN_STATUS_IN_PROGRESS
    return pb.SPAN_STATUS_ERROR if error else pb.SPAN_STATUS_OK


def _trace_to_proto(trace: TraceRecord) -> pb.Trace:
    message = pb.Trace(
        name=f"traces/{trace.trace_id}",
        trace_id=trace.trace_id,
        workflow_name=trace.workflow_name,
        group_id=trace.group_id,
        metadata=trace.metadata,
        run_id=trace.run_id,
        agent=trace.agent,
        start_time=timestamp_ns(trace.start_ns),
        status=_status(trace.end_ns, trace.error),
        span_count=trace.span_count,
        agents=trace.agents,
        agent_version=trace.agent_version,
    )
    message.input_tokens, message.output_tokens = trace.token_totals()
    cost_nanos, message.unpriced_calls = trace.cost()
    if cost_nanos is not None:  # unset: unknown (no call priced), never 0
        message.cost.CopyFrom(money_from_nanos(cost_nanos))
    if trace.end_ns:
        message.end_time.CopyFrom(timestamp_ns(trace.end_ns))
    return message


def _span_to_proto(span: SpanRecord) -> pb.Span:
    message = pb.Span(
        span_id=span.span_id,
        parent_span_id=span.parent_id,
        name=span.name,
        kind=_KINDS[span.kind],
        start_time=timestamp_ns(span.start_ns),
        status=_status(span.end_ns, span.error),
        error_message=span.error,
        attributes=struct_from_dict(span.attributes),
    )
    if span.end_ns:
        message.end_time.CopyFrom(timestamp_ns(span.end_ns))
    return message
