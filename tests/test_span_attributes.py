"""Span attributes as TraceService answers them: every tool span names its tool.

trace_service.proto's ``Span.attributes`` lists the keys agentd sets per span kind; a
tool span (SPAN_KIND_FUNCTION) carries ``tool_name`` whichever way the call went: a tool
that ran, one that failed, one the model invented, one the caller executed.
"""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentd.server import Script, call, calls, say
from agentd.server.tracing.base import SpanKind
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.server.tracing.otel import OtelTracer
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import trace_service_pb2 as tpb
from tests.conftest import Harness, start_harness
from tests.runs_util import collect


def _tool_spans(detail: tpb.GetTraceResponse) -> list[tpb.Span]:
    return [s for s in detail.spans if s.kind == tpb.SPAN_KIND_FUNCTION]


async def test_tool_spans_carry_the_tool_name(harness: Harness) -> None:
    harness.model.set_script(
        "assistant",
        Script.of(
            calls(call("get_weather", city="Oslo"), call("explode", reason="fuse"), call("no_such_tool", x=1)),
            say("Oslo is 12 degrees."),
        ),
    )
    events = await collect(harness.client.run("assistant", "Weather in Oslo?"))
    assert events[-1].WhichOneof("payload") == "run_completed"

    detail = await harness.client.get_trace(events[0].trace_id)
    spans = {s.name: s for s in _tool_spans(detail)}
    assert sorted(spans) == ["explode", "get_weather", "no_such_tool"]
    for name, span in spans.items():
        assert span.attributes["tool_name"] == name, span
        assert span.attributes["call_id"]
    assert spans["get_weather"].status == tpb.SPAN_STATUS_OK
    # A failed tool and a tool the model invented are named all the same.
    assert spans["explode"].status == tpb.SPAN_STATUS_ERROR
    assert spans["no_such_tool"].status == tpb.SPAN_STATUS_ERROR
    # Tool content stays out without AGENTD_TRACE_CONTENT; the name is not content.
    assert not {"arguments", "output"} & set(spans["get_weather"].attributes.fields)

    # The documented keys of the other kinds are there too.
    by_kind = {tpb.SpanKind.Name(s.kind): s for s in detail.spans}
    assert {"run_id", "agent", "turns", "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens",
            "unpriced_calls", "ttft_ms"} <= set(by_kind["SPAN_KIND_RUN"].attributes)
    assert set(by_kind["SPAN_KIND_AGENT"].attributes) == {"agent"}
    assert {"model", "agent", "finish_reason", "input_tokens", "output_tokens", "cached_input_tokens",
            "reasoning_tokens"} <= set(by_kind["SPAN_KIND_GENERATION"].attributes)
    # No price table here: every call is unpriced, so no cost is recorded (never a 0).
    assert "cost_usd" not in by_kind["SPAN_KIND_RUN"].attributes
    assert by_kind["SPAN_KIND_RUN"].attributes["unpriced_calls"] == 2
    assert not any("cost_usd" in s.attributes for s in detail.spans)


async def test_a_caller_executed_tool_span_carries_the_tool_name(harness: Harness) -> None:
    harness.model.set_script("operator", Script.of(calls(call("lookup_customer", customer_id="c-7")), say("found")))
    created = await harness.client.agents.CreateRun(
        apb.CreateRunRequest(start=apb.StartRun(agent="agents/operator", input="Who is c-7?"))
    )
    run_name = created.run.name
    seen = []
    async for response in harness.client.agents.WatchRun(apb.WatchRunRequest(name=run_name)):
        event = response.event
        seen.append(event)
        if event.WhichOneof("payload") == "action_required":
            call_id = event.action_required.item.tool_call.call_id
            await harness.client.agents.SubmitToolOutputs(apb.SubmitToolOutputsRequest(
                name=run_name, outputs=[apb.ToolOutputSubmission(call_id=call_id, output="gold customer")]
            ))
        if event.WhichOneof("payload") in ("run_completed", "run_failed", "run_cancelled"):
            break
    assert seen[-1].WhichOneof("payload") == "run_completed"

    (span,) = _tool_spans(await harness.client.get_trace(seen[0].trace_id))
    assert span.name == "lookup_customer" and span.attributes["tool_name"] == "lookup_customer"


async def test_tool_span_names_survive_the_trace_archive(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    """An ended trace read back from the SQLite archive after a restart still names its tools."""
    model_server.set_script("assistant", Script.of(calls(call("get_weather", city="Paris")), say("21 degrees")))
    first = await start_harness(model_server, tmp_path)
    try:
        events = await collect(first.client.run("assistant", "Weather in Paris?"))
    finally:
        await first.client.close()
        await first.server.stop(grace_s=0)
    second = await start_harness(model_server, tmp_path)
    try:
        assert second.server.traces.memory.get_trace(events[0].trace_id) is None  # from the archive
        (span,) = _tool_spans(await second.client.get_trace(events[0].trace_id))
    finally:
        await second.client.close()
        await second.server.stop(grace_s=0)
    assert span.attributes["tool_name"] == "get_weather"


def test_otel_tool_spans_carry_gen_ai_tool_name() -> None:
    """Exported spans name the tool with the GenAI convention's ``gen_ai.tool.name``, and the
    TraceService record of the same span has ``tool_name``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = InMemoryTraceStore()
    tracer = OtelTracer(store, provider, capture_content=False)
    trace = tracer.start_trace(run_id="run_1", workflow_name="w", group_id="", metadata={}, agent="assistant")
    root = trace.span(SpanKind.RUN, "w", None, run_id="run_1", agent="assistant")
    tool = trace.span(SpanKind.FUNCTION, "get_weather", root, call_id="call_1", arguments='{"city": "Oslo"}')
    tool.end(output="12 degrees")
    root.end()
    trace.end()

    (exported,) = [s for s in exporter.get_finished_spans() if s.name == "execute_tool get_weather"]
    assert exported.attributes["gen_ai.tool.name"] == "get_weather"
    assert exported.attributes["gen_ai.tool.call.id"] == "call_1"
    assert "gen_ai.tool.call.arguments" not in exported.attributes
    record = store.get_trace(trace.trace_id)
    (function,) = [s for s in record.spans if s.kind is SpanKind.FUNCTION]
    assert function.attributes == {"tool_name": "get_weather", "call_id": "call_1"}
    provider.shutdown()
