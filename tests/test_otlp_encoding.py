"""``otlp_encoding``: the OTLP trace export request agentd builds is the OpenTelemetry SDK's.

For every span agentd makes, and for the other shapes an SDK span can take (kinds, local,
remote and no parent, trace state, error status, attribute values of every type, several
resources and instrumentation scopes, dropped attributes), ``encode_spans`` parses to the
message the SDK's own encoder (``opentelemetry.exporter.otlp.proto.common``) builds; spans
with events or links are the SDK encoder's, and still equal to it.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind as OtelSpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from agentd.server.tracing import otlp_encoding
from agentd.server.tracing.base import SpanKind
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.server.tracing.otel import OtelTracer
from agentd.server.tracing.otlp_encoding import encode_spans

REMOTE_PARENT = SpanContext(
    0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True, trace_flags=TraceFlags(1),
    trace_state=TraceState([("vendor", "abc"), ("other", "x1")]),
)

# One attribute of every value type the SDK's encoder takes (span attributes go through the SDK's
# validation, which makes sequences tuples and refuses mixed ones).
EVERY_TYPE: dict[str, Any] = {
    "str": "hello",
    "empty_str": "",
    "long_str": "x" * 500,
    "unicode": "héllo wörld ✓",
    "bool_true": True,
    "bool_false": False,
    "int": 42,
    "zero": 0,
    "negative": -7,
    "int64_min": -(2**63),
    "int64_max": 2**63 - 1,
    "float": 3.25,
    "negative_float": -0.5,
    "float_whole": 1.0,
    "str_seq": ("a", "b", ""),
    "bool_seq": (True, False),
    "int_seq": (1, -2, 3),
    "float_seq": (0.5, 1.5),
    "empty_seq": (),
    "one_str_seq": ("stop",),
}


def _provider(resource: Resource, **kwargs: Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource, **kwargs)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _agentd_spans(runs: int = 3, *, capture_content: bool = True) -> list[ReadableSpan]:
    """The spans agentd's tracer makes for a few runs (otel.py), one in the trace of a remote caller."""
    provider, exporter = _provider(Resource.create({"service.name": "agentd", "deployment.environment": "test"}))
    tracer = OtelTracer(InMemoryTraceStore(capture_content=capture_content), provider, capture_content=capture_content)
    for i in range(runs):
        traceparent = f"00-{REMOTE_PARENT.trace_id:032x}-{REMOTE_PARENT.span_id:016x}-01" if i == 1 else ""
        trace = tracer.start_trace(
            run_id=f"run_{i}", workflow_name="agentd run", group_id=f"group_{i % 2}", metadata={"tier": "pro"},
            agent="assistant", traceparent=traceparent, tenant="acme", agent_version=2,
        )
        run = trace.span(SpanKind.RUN, "agentd run", None, run_id=f"run_{i}", agent="assistant", agent_version=2)
        agent = trace.span(SpanKind.AGENT, "assistant", run, agent="assistant")
        guard = trace.span(SpanKind.GUARDRAIL, "no_pii", agent, guardrail="no_pii", stage="input")
        guard.end(tripwire=False)
        generation = trace.span(SpanKind.GENERATION, "gpt-4o-mini", agent, model="gpt-4o-mini", agent="assistant")
        generation.end(finish_reason="tool_calls", input_tokens=120 + i, output_tokens=30)
        tool = trace.span(SpanKind.FUNCTION, "get_weather", agent, call_id=f"call_{i}", arguments='{"city": "Oslo"}')
        tool.end(error="ToolError: no such city" if i == 0 else "", error_detail="", output="12 degrees")
        handoff = trace.span(SpanKind.HANDOFF, "assistant -> specialist", agent, from_agent="assistant",
                             to_agent="specialist")
        handoff.end()
        generation = trace.span(SpanKind.GENERATION, "gpt-4o-mini", agent, model="gpt-4o-mini", agent="assistant")
        generation.end(finish_reason="stop", input_tokens=200, output_tokens=40 + i)
        agent.end()
        run.end(error="MaxTurnsExceeded: 10 turns" if i == 2 else "", turns=2, input_tokens=320, output_tokens=70)
        trace.end()
    return list(exporter.get_finished_spans())


def _sdk_spans() -> list[ReadableSpan]:
    """Spans of the SDK's own tracer: every kind, parents local, remote and none, trace state, error
    status with a description, attributes of every type, dropped attributes; two resources (one of
    them as two equal objects, used in turn), several instrumentation scopes."""
    resource_a = Resource.create({"service.name": "svc-a", "host.name": "h1"}, schema_url="https://schema/a")
    resource_a_again = Resource.create({"service.name": "svc-a", "host.name": "h1"}, schema_url="https://schema/a")
    assert resource_a == resource_a_again and resource_a is not resource_a_again
    resource_b = Resource({"service.name": "svc-b", "replicas": 3, "weights": (0.5, 0.25)})
    provider_a, exporter_a = _provider(resource_a)
    provider_a2, exporter_a2 = _provider(resource_a_again)
    provider_b, exporter_b = _provider(resource_b, span_limits=SpanLimits(max_span_attributes=len(EVERY_TYPE) - 2))
    tracers = [
        provider_a.get_tracer("agentd"),
        provider_a.get_tracer("library", "1.2.3", schema_url="https://schema/lib", attributes={"scope.attr": "v"}),
        provider_a2.get_tracer("agentd"),
        provider_b.get_tracer("other"),
    ]
    remote = set_span_in_context(NonRecordingSpan(REMOTE_PARENT))
    kinds = list(OtelSpanKind)
    for i in range(12):
        tracer = tracers[i % len(tracers)]
        kind = kinds[i % len(kinds)]
        with tracer.start_as_current_span(f"root {i}", kind=kind, attributes=EVERY_TYPE) as root:
            with tracer.start_as_current_span(f"child {i}", kind=kinds[(i + 1) % len(kinds)]) as child:
                child.set_attribute("attempt", i)
                child.set_attribute("flag", i % 2 == 0)
                child.set_status(Status(StatusCode.ERROR, f"failed: {i}"))
            if i % 3 == 0:
                root.set_status(Status(StatusCode.OK))
        with tracer.start_as_current_span(f"remote child {i}", context=remote, kind=OtelSpanKind.SERVER) as span:
            span.set_attribute("agentd.run_id", f"run_{i}")
            span.set_status(StatusCode.ERROR)  # no description
        unnamed = tracer.start_span("", attributes={"n": i})
        unnamed.end()
    return [*exporter_a.get_finished_spans(), *exporter_b.get_finished_spans(), *exporter_a2.get_finished_spans()]


def _interleaved(*groups: list[ReadableSpan]) -> list[ReadableSpan]:
    """The spans of ``groups`` taken in turn: resources and scopes alternate within the batch."""
    out: list[ReadableSpan] = []
    for i in range(max(len(g) for g in groups)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _direct_span(name: str, attributes: dict[str, Any] | None, **kwargs: Any) -> ReadableSpan:
    """A ``ReadableSpan`` made as otel.py makes them: attributes as given, unvalidated."""
    kwargs.setdefault("context", SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1)))
    kwargs.setdefault("resource", Resource.create({"service.name": "direct"}))
    kwargs.setdefault("start_time", 1_700_000_000_000_000_000)
    kwargs.setdefault("end_time", 1_700_000_000_500_000_000)
    return ReadableSpan(name=name, attributes=attributes, **kwargs)


def assert_encodes_as_sdk(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    expected = sdk_encode_spans(spans)
    encoded = encode_spans(spans)
    request = ExportTraceServiceRequest.FromString(encoded)
    assert request == expected
    assert encoded == expected.SerializeToString()
    # Again, from the warm caches.
    assert ExportTraceServiceRequest.FromString(encode_spans(spans)) == expected
    return request


def test_agentd_spans_encode_as_the_sdk_does() -> None:
    spans = _agentd_spans()
    request = assert_encodes_as_sdk(spans)
    (resource_spans,) = request.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "agentd"
    assert len(scope_spans.spans) == len(spans) == 3 * 7
    # Without content capture too (fewer attributes, the error detail left out).
    assert_encodes_as_sdk(_agentd_spans(capture_content=False))


def test_varied_sdk_spans_encode_as_the_sdk_does() -> None:
    spans = _sdk_spans()
    request = assert_encodes_as_sdk(spans)
    # What the test set covers, as the SDK's encoder sees it.
    # The two equal resources are one, and their equal "agentd" scopes one.
    scopes = [[ss.scope.name for ss in r.scope_spans] for r in request.resource_spans]
    assert scopes == [["agentd", "library"], ["other"]]
    encoded = [s for r in request.resource_spans for ss in r.scope_spans for s in ss.spans]
    assert {s.kind for s in encoded} == {1, 2, 3, 4, 5}
    assert {s.flags for s in encoded} == {0x100, 0x300}
    assert any(not s.parent_span_id for s in encoded)
    assert any(s.trace_state == "vendor=abc,other=x1" for s in encoded)
    assert any(s.status.code == 2 and s.status.message == "failed: 0" for s in encoded)
    assert any(s.dropped_attributes_count for s in encoded)
    root = next(s for s in encoded if s.name == "root 0")
    assert {a.key: a.value.WhichOneof("value") for a in root.attributes} == {
        key: {str: "string_value", bool: "bool_value", int: "int_value", float: "double_value",
              tuple: "array_value"}[type(value)]
        for key, value in EVERY_TYPE.items()
    }
    # Resources and scopes alternating span by span: grouped in order of first appearance.
    agentd = _agentd_spans(2)
    assert_encodes_as_sdk(_interleaved(spans, agentd, list(reversed(spans))))
    assert_encodes_as_sdk(spans[:1])
    assert_encodes_as_sdk([])


def test_unvalidated_attribute_values_encode_as_the_sdk_does(caplog: pytest.LogCaptureFixture) -> None:
    """otel.py hands its dicts to ReadableSpan unvalidated: every value type the SDK's encoder knows,
    and values it leaves out (with a log line) while the span and its other attributes still go."""
    resource = Resource.create({"service.name": "direct"})
    remote_parent = SpanContext(0xABC, 0x123, is_remote=True)
    local_parent = SpanContext(0xABC, 0x456, is_remote=False)
    spans = [
        _direct_span("every type", {
            **EVERY_TYPE,
            "list": ["x", 1, True, 2.5, None],
            "bytes": b"\x00\xff",
            "none": None,
            "mapping": {"a": 1, "b": ("x", "y"), 3: {"nested": False}},
            "int_tuple_like_bool": (1,),
            "bool_tuple": (True,),
            "str_tuple": ("1",),
        }, resource=resource, parent=remote_parent, kind=OtelSpanKind.CLIENT),
        # The cache tells these apart although True == 1 == 1.0 as dict keys.
        _direct_span("same key, int", {"v": 1, "t": (1,)}, resource=resource, parent=local_parent),
        _direct_span("same key, bool", {"v": True, "t": (True,)}, resource=resource, parent=local_parent),
        _direct_span("same key, float", {"v": 1.0, "t": (1.0,)}, resource=resource, parent=local_parent),
        _direct_span("same key, str", {"v": "1", "t": ("1",)}, resource=resource, parent=local_parent),
        _direct_span("no attributes", None, resource=resource),
        _direct_span("no scope, no times", {"k": "v"}, resource=resource, start_time=None, end_time=None,
                     instrumentation_scope=None),
        _direct_span("unset status with description", {}, resource=resource,
                     status=Status(StatusCode.OK, "ignored by the SDK")),
        # Left out by both encoders: beyond int64, not UTF-8, an unknown type, inside a sequence.
        _direct_span("refused values", {
            "before": "kept", "huge": 2**64, "surrogate": "\ud800", "object": object(), "bad_seq": ("a", 2**70),
            "tiny": -(2**63) - 1, "after": 7,
        }, resource=resource),
    ]
    with caplog.at_level(logging.WARNING):
        request = assert_encodes_as_sdk(spans)
    refused = next(s for ss in request.resource_spans[0].scope_spans for s in ss.spans if s.name == "refused values")
    assert [a.key for a in refused.attributes] == ["before", "after"]


def test_spans_with_events_or_links_are_the_sdk_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    provider, exporter = _provider(Resource.create({"service.name": "agentd"}))
    tracer = provider.get_tracer("agentd")
    linked = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1))
    with tracer.start_as_current_span("plain before", attributes={"a": 1}):
        pass
    with tracer.start_as_current_span("with event") as span:
        span.add_event("started", {"attempt": 1, "tags": ("x", "y")}, timestamp=1_700_000_000_000_000_123)
        span.add_event("bare")
    with tracer.start_as_current_span("with link", links=[Link(linked, {"why": "retry"})]) as span:
        span.set_attribute("b", "two")
    with tracer.start_as_current_span("both", links=[Link(linked)]) as span:
        span.record_exception(ValueError("boom"))
        span.set_status(Status(StatusCode.ERROR, "boom"))
    with tracer.start_as_current_span("plain after", kind=OtelSpanKind.PRODUCER):
        pass
    spans = list(exporter.get_finished_spans())

    from opentelemetry.exporter.otlp.proto.common._internal import trace_encoder

    sdk_encoded: list[str] = []
    real = trace_encoder._encode_span
    monkeypatch.setattr(trace_encoder, "_encode_span", lambda s: sdk_encoded.append(s.name) or real(s))
    request = ExportTraceServiceRequest.FromString(encode_spans(spans))
    assert sorted(sdk_encoded) == ["both", "with event", "with link"]
    monkeypatch.undo()
    assert request == sdk_encode_spans(spans)
    names = [s.name for s in request.resource_spans[0].scope_spans[0].spans]
    assert names == [s.name for s in spans]  # in batch order, mixed with the others
    # Mixed with agentd's spans, in turn.
    assert_encodes_as_sdk(_interleaved(spans, _agentd_spans(1)))


def test_the_grpc_exporter_sends_what_the_sdk_would() -> None:
    """export.py's exporter translates a batch with ``encode_spans``, to the SDK's request."""
    from agentd.server.tracing.export import _grpc_exporter

    exporter = _grpc_exporter()
    try:
        spans = _interleaved(_agentd_spans(2), _sdk_spans())
        assert exporter._translate_data(spans) == sdk_encode_spans(spans)
        assert exporter._fast
    finally:
        exporter.shutdown()


def test_the_attribute_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp_encoding, "_MAX_CACHED", 16)
    monkeypatch.setattr(otlp_encoding, "_SPAN_ATTRIBUTES", {})
    spans = [_direct_span(f"span {i}", {"id": f"id_{i}", "ok": i % 2 == 0, "seq": (f"s{i}",)}) for i in range(40)]
    assert_encodes_as_sdk(spans)
    assert len(otlp_encoding._SPAN_ATTRIBUTES) <= 16
