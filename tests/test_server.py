"""The server as an operator sees it: health, reflection, agent discovery, traces, shutdown, packaging."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentd.client import SyncAgentdClient
from agentd.server import Script, call, calls, say
from agentd.v1 import agent_service_pb2, trace_service_pb2
from tests.apps import tool_log
from tests.runs_util import collect


async def test_health_reports_serving_then_not_serving_on_shutdown(harness):
    channel = grpc.aio.insecure_channel(harness.target)
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "agentd.v1.AgentService", "agentd.v1.SessionService", "agentd.v1.TraceService"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(harness.server.stop(grace_s=0))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping
    await channel.close()


async def test_reflection_lists_the_services(harness):
    async with grpc.aio.insecure_channel(harness.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for response in stub.ServerReflectionInfo(ask()):
            names = {s.name for s in response.list_services_response.service}
            break
    assert {"agentd.v1.AgentService", "agentd.v1.SessionService", "agentd.v1.TraceService",
            "grpc.health.v1.Health"} <= names


async def test_agents_are_discoverable_with_tool_schemas_and_handoffs(harness):
    agents = {a.name: a for a in await harness.client.list_agents()}
    assert set(agents) == {"agents/assistant", "agents/specialist", "agents/reporter", "agents/operator"}
    assistant = agents["agents/assistant"]
    assert list(assistant.handoffs) == ["agents/specialist"]
    tools = {t.name: t for t in assistant.tools}
    assert set(tools) == {"get_weather", "wait", "explode", "whoami"}
    weather = tools["get_weather"]
    assert weather.description == "Current weather for a city."
    assert weather.strict
    assert weather.parameters["properties"]["city"]["description"] == "City name."
    assert not weather.caller_executed and not weather.needs_approval
    operator = {t.name: t for t in agents["agents/operator"].tools}
    assert operator["lookup_customer"].caller_executed and not operator["lookup_customer"].needs_approval
    assert operator["issue_refund"].needs_approval and not operator["issue_refund"].caller_executed
    first = await harness.client.agents.ListAgents(agent_service_pb2.ListAgentsRequest(page_size=1))
    assert len(first.agents) == 1 and first.next_page_token


async def test_traces_record_each_step(harness):
    conversation = Script.of(
        calls(call("get_weather", city="Paris"), call("explode", reason="x")),
        calls(call("transfer_to_specialist")),
        say("done"),
    )
    harness.model.set_script("assistant", conversation)
    harness.model.set_script("specialist", conversation)
    events = await collect(harness.client.run("assistant", "trace me", workflow_name="support", group_id="thread-9"))
    trace_id = events[0].trace_id
    listed = await harness.client.list_traces(workflow_name="support", group_id="thread-9")
    assert [t.trace_id for t in listed.traces] == [trace_id]
    assert listed.traces[0].run_id == events[0].run_id
    assert listed.traces[0].status == trace_service_pb2.SPAN_STATUS_OK
    assert (await harness.client.list_traces(workflow_name="other")).traces == []

    detail = await harness.client.get_trace(trace_id)
    spans = list(detail.spans)
    by_id = {s.span_id: s for s in spans}
    kinds = [trace_service_pb2.SpanKind.Name(s.kind) for s in spans]
    assert kinds.count("SPAN_KIND_RUN") == 1 and kinds.count("SPAN_KIND_AGENT") == 2
    assert kinds.count("SPAN_KIND_GENERATION") == 3 and kinds.count("SPAN_KIND_HANDOFF") == 1
    root = next(s for s in spans if s.kind == trace_service_pb2.SPAN_KIND_RUN)
    assert root.parent_span_id == ""
    for span in spans:
        if span is not root:
            assert span.parent_span_id in by_id
        assert span.HasField("end_time") and span.end_time.ToNanoseconds() >= span.start_time.ToNanoseconds()
    failing = next(s for s in spans if s.name == "explode")
    assert failing.status == trace_service_pb2.SPAN_STATUS_ERROR and "RuntimeError" in failing.error_message
    assert "boom" not in failing.error_message  # the exception's text is content: off unless AGENTD_TRACE_CONTENT
    generation = next(s for s in spans if s.kind == trace_service_pb2.SPAN_KIND_GENERATION)
    assert generation.attributes["input_tokens"] > 0 and generation.attributes["model"] == "assistant"


async def test_traces_page(harness):
    harness.model.set_script("assistant", Script.of(say("ok")))
    for _ in range(3):
        await harness.client.run_final_output("assistant", "hi", workflow_name="paged")
    first = await harness.client.list_traces(workflow_name="paged", page_size=2)
    second = await harness.client.list_traces(workflow_name="paged", page_size=2, page_token=first.next_page_token)
    ids = [t.trace_id for t in first.traces] + [t.trace_id for t in second.traces]
    assert len(ids) == len(set(ids)) == 3 and not second.next_page_token


async def test_traces_filter_by_agent_status_and_time(harness):
    from google.protobuf.timestamp_pb2 import Timestamp

    from agentd.client import RunFailedError

    handoff = Script.of(calls(call("transfer_to_specialist")), say("done"))
    harness.model.set_script("assistant", handoff)
    harness.model.set_script("specialist", handoff)
    handed_off = await collect(harness.client.run("assistant", "hand me over", workflow_name="filters"))
    between = Timestamp()
    between.GetCurrentTime()
    harness.model.set_script("reporter", Script.of(say("not json")))
    with pytest.raises(RunFailedError):
        await harness.client.run_final_output("reporter", "report", workflow_name="filters")
    failed = (await harness.client.list_traces(workflow_name="filters")).traces[0]
    assert failed.agent == "reporter" and failed.status == trace_service_pb2.SPAN_STATUS_ERROR

    async def ids(**filters) -> list[str]:
        request = trace_service_pb2.ListTracesRequest(workflow_name="filters", **filters)
        return [t.trace_id for t in (await harness.client.traces.ListTraces(request)).traces]

    # An agent matches a trace it was handed off to, not only the one it started with.
    assert await ids(agent="specialist") == [handed_off[0].trace_id]
    assert await ids(agent="assistant") == [handed_off[0].trace_id]
    assert await ids(agent="reporter") == [failed.trace_id]
    assert await ids(agent="nobody") == []
    assert await ids(status=trace_service_pb2.SPAN_STATUS_ERROR) == [failed.trace_id]
    assert await ids(status=trace_service_pb2.SPAN_STATUS_OK) == [handed_off[0].trace_id]
    assert await ids(start_time_from=between) == [failed.trace_id]
    assert await ids(start_time_to=between) == [handed_off[0].trace_id]

    listed = (await harness.client.list_traces(agent="specialist")).traces[0]
    assert list(listed.agents) == ["assistant", "specialist"]
    assert listed.input_tokens > 0 and listed.output_tokens > 0

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ids(start_time_from=between, start_time_to=between)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "start_time_to" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ids(status=42)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "status" in info.value.details()


async def test_shutdown_cancels_runs_that_outlive_the_grace_period(harness):
    harness.model.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="slow")), say("never")))
    stream = harness.client.run("assistant", "long job")
    events = []

    async def consume():
        async for event in stream:
            events.append(event)
            if event.WhichOneof("payload") == "tool_called":
                stop.set()

    stop = asyncio.Event()
    consumer = asyncio.create_task(consume())
    await stop.wait()
    await harness.server.stop(grace_s=0.2)
    await asyncio.wait_for(consumer, 5)
    assert events[-1].WhichOneof("payload") == "run_cancelled"
    assert events[-1].run_cancelled.reason == "server shutting down"
    assert tool_log.cancelled == ["slow"]


async def test_shutdown_lets_short_runs_finish(harness):
    harness.model.set_script("assistant", Script.of(calls(call("wait", seconds=0.3, label="short")), say("finished")))
    stream = harness.client.run("assistant", "short job")
    iterator = stream.__aiter__()
    await anext(iterator)
    stopping = asyncio.create_task(harness.server.stop(grace_s=5))
    rest = [e async for e in iterator]
    await stopping
    assert rest[-1].run_completed.final_output.string_value == "finished"


async def test_sync_client_streams_a_run(harness):
    harness.model.set_script("assistant", Script.of(calls(call("get_weather", city="Paris")), say("sync ok")))

    def run_sync() -> tuple[list[str], object]:
        with SyncAgentdClient(harness.target) as client:
            kinds = [e.WhichOneof("payload") for e in client.run("assistant", "sync?", session_id="sync-1")]
            return kinds, client.list_items("sync-1").items

    kinds, items = await asyncio.to_thread(run_sync)
    assert kinds[0] == "run_started" and kinds[-1] == "run_completed" and "tool_output" in kinds
    assert len(items) == 4


def test_generated_code_lives_under_agentd_only(tmp_path):
    """Installed, only the ``agentd`` namespace is importable (run away from the repo's working directory)."""
    probe = (
        "import importlib.util as u, json;"
        "print(json.dumps({n: u.find_spec(n) is not None for n in "
        "('agentd.v1.agent_service_pb2', 'agentd.client', 'agentd.server', 'generated', 'server', 'client')}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert found == {"agentd.v1.agent_service_pb2": True, "agentd.client": True, "agentd.server": True,
                     "generated": False, "server": False, "client": False}


def test_wheel_ships_one_namespace_and_a_thin_client(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("agentd-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    top_level = {n.split("/")[0] for n in names if not n.startswith("agentd-")}
    assert top_level == {"agentd"}
    assert "agentd/v1/agent_service_pb2.py" in names and "agentd/client/async_client.py" in names
    assert "agentd/server/runtime/run_loop.py" in names and not any(n.startswith("agentd/__init__") for n in names)
    always = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(re.split(r"[<>=!~ ;]", line.split(":", 1)[1].strip())[0] for line in always) == [
        "googleapis-common-protos", "grpcio", "protobuf"
    ]
