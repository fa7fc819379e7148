"""OpenTelemetry export: a real server sends a run's spans over OTLP/gRPC to a loopback receiver."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from agentd.server import Script, call, calls, say
from agentd.testing import ScriptedOpenAIServer
from tests.conftest import start_harness
from tests.otlp_receiver import OtlpReceiver, attributes
from tests.runs_util import collect

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def otlp_env(monkeypatch: pytest.MonkeyPatch):
    def configure(port: int) -> None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms: the test need not wait 5 s for a batch
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "agentd-test")

    return configure


def tree(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id.hex(): s for s in spans}


async def test_run_spans_reach_an_otlp_receiver_as_one_tree(
    model_server: ScriptedOpenAIServer, tmp_path: Path, otlp_env
) -> None:
    async with OtlpReceiver() as receiver:
        otlp_env(receiver.port)
        h = await start_harness(model_server, tmp_path, trace_content=True)
        try:
            conversation = Script.of(
                calls(call("get_weather", city="Paris"), call("explode", reason="fuse")),
                calls(call("transfer_to_specialist")),
                say("Paris is 21 degrees."),
            )
            h.model.set_script("assistant", conversation)
            h.model.set_script("specialist", conversation)
            traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
            events = await collect(h.client.run("assistant", "Weather?", metadata=[("traceparent", traceparent)]))
            assert events[-1].WhichOneof("payload") == "run_completed"
            # The run continues the caller's trace, and every event says so.
            assert {e.trace_id for e in events} == {CALLER_TRACE}
            spans = await receiver.wait_for(CALLER_TRACE, 9)
            stored = await h.client.get_trace(CALLER_TRACE)
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)

    assert receiver.resources[0]["service.name"] == "agentd-test"
    # TraceService and the OTLP backend hold the same spans under the same ids.
    assert {(s.span_id, s.parent_span_id) for s in stored.spans} == {
        (s.span_id.hex(), s.parent_span_id.hex()) for s in spans
    }
    by_id = tree(spans)
    names = sorted(s.name for s in spans)
    assert names == sorted([
        "agentd run",
        "invoke_agent assistant", "invoke_agent specialist",
        "chat assistant", "chat assistant", "chat specialist",
        "execute_tool get_weather", "execute_tool explode",
        "handoff assistant -> specialist",
    ]), names
    (root,) = [s for s in spans if s.name == "agentd run"]
    assert root.parent_span_id.hex() == CALLER_SPAN  # the caller's span is the parent
    assert attributes(root)["agentd.run_id"] == events[0].run_id
    assert attributes(root)["gen_ai.operation.name"] == "invoke_agent"

    def parent_name(span: Span) -> str:
        return by_id[span.parent_span_id.hex()].name

    for span in spans:
        if span is not root:
            assert span.parent_span_id.hex() in by_id, f"{span.name} has no parent in the trace"
        assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
    assert {parent_name(s) for s in spans if s.name.startswith("invoke_agent")} == {"agentd run"}
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert {parent_name(s) for s in chats} == {"invoke_agent assistant", "invoke_agent specialist"}
    for chat in chats:
        attrs = attributes(chat)
        assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == chat.name[5:]
        assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
        assert attrs["gen_ai.response.finish_reasons"] in (["tool_calls"], ["stop"])
        assert chat.kind == Span.SPAN_KIND_CLIENT

    (weather,) = [s for s in spans if s.name == "execute_tool get_weather"]
    attrs = attributes(weather)
    assert json.loads(attrs["gen_ai.tool.call.arguments"]) == {"city": "Paris"}
    assert json.loads(attrs["gen_ai.tool.call.result"])["temperature_c"] == 21
    assert weather.status.code != Status.STATUS_CODE_ERROR and parent_name(weather) == "invoke_agent assistant"

    (explode,) = [s for s in spans if s.name == "execute_tool explode"]
    assert explode.status.code == Status.STATUS_CODE_ERROR and "boom: fuse" in explode.status.message

    (handoff,) = [s for s in spans if s.name.startswith("handoff")]
    assert attributes(handoff)["agentd.handoff.to_agent"] == "specialist"


async def test_content_stays_out_of_spans_unless_allowed(
    model_server: ScriptedOpenAIServer, tmp_path: Path, otlp_env
) -> None:
    async with OtlpReceiver() as receiver:
        otlp_env(receiver.port)
        h = await start_harness(model_server, tmp_path)  # AGENTD_TRACE_CONTENT defaults to off
        try:
            h.model.set_script("assistant", Script.of(calls(call("get_weather", city="Paris")), say("ok")))
            events = await collect(h.client.run("assistant", "Weather?"))
            spans = await receiver.wait_for(events[0].trace_id, 5)
            stored = await h.client.get_trace(events[0].trace_id)
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)
    (tool,) = [s for s in spans if s.name == "execute_tool get_weather"]
    keys = attributes(tool).keys()
    assert "gen_ai.tool.call.id" in keys
    assert "gen_ai.tool.call.arguments" not in keys and "gen_ai.tool.call.result" not in keys
    # TraceService follows the same rule.
    (stored_tool,) = [s for s in stored.spans if s.name == "get_weather"]
    assert "call_id" in stored_tool.attributes.fields
    assert not {"arguments", "output"} & set(stored_tool.attributes.fields)
    assert "Paris" not in str(stored_tool.attributes)


async def test_a_run_completes_when_the_collector_is_down(
    model_server: ScriptedOpenAIServer, tmp_path: Path, otlp_env
) -> None:
    async with OtlpReceiver() as receiver:
        dead_port = receiver.port  # nothing listens here once the receiver stops
    otlp_env(dead_port)
    h = await start_harness(model_server, tmp_path)
    try:
        h.model.set_script("assistant", Script.of(calls(call("get_weather", city="Oslo")), say("12 degrees.")))
        started = asyncio.get_running_loop().time()
        events = await asyncio.wait_for(collect(h.client.run("assistant", "Weather?")), 10)
        assert events[-1].WhichOneof("payload") == "run_completed"
        assert asyncio.get_running_loop().time() - started < 2
        assert os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(str(dead_port))
    finally:
        await h.client.close()
        stopping = asyncio.get_running_loop().time()
        await h.server.stop(grace_s=0)
        assert asyncio.get_running_loop().time() - stopping < 5  # shutdown does not wait on the collector


async def test_spans_export_over_otlp_http_too(
    model_server: ScriptedOpenAIServer, tmp_path: Path, otlp_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    received: list[Span] = []

    async def export(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest.FromString(await request.read())
        received.extend(s for rs in message.resource_spans for ss in rs.scope_spans for s in ss.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        otlp_env(port)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        h = await start_harness(model_server, tmp_path)
        try:
            h.model.set_script("assistant", Script.of(say("hello")))
            events = await collect(h.client.run("assistant", "hi"))
            deadline = asyncio.get_running_loop().time() + 10
            while len([s for s in received if s.trace_id.hex() == events[0].trace_id]) < 3:
                assert asyncio.get_running_loop().time() < deadline, f"received {len(received)} spans"
                await asyncio.sleep(0.05)
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)
    finally:
        await runner.cleanup()
    assert sorted(s.name for s in received if s.trace_id.hex() == events[0].trace_id) == [
        "agentd run", "chat assistant", "invoke_agent assistant",
    ]
