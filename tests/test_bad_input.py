"""Every RPC answers bad input with the right status and a message naming the field."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest

from agentd.client import AgentdClient
from agentd.server import Script, say
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.serve import start_server
from agentd.server.settings import Settings
from agentd.v1 import (
    agent_service_pb2,
    item_pb2,
    run_event_pb2,
    session_service_pb2,
    trace_service_pb2,
)
from tests.apps import app
from tests.runs_util import collect


async def expect_status(awaitable, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await awaitable
    assert error.value.code() == code, error.value.details()
    for fragment in fragments:
        assert fragment in error.value.details()
    return error.value.details()


async def test_unknown_agent_is_not_found(harness):
    details = await expect_status(harness.client.run_final_output("nobody", "hi"), grpc.StatusCode.NOT_FOUND,
                                  "start.agent", "'nobody'")
    assert "assistant" in details  # says which agents exist
    await expect_status(harness.client.get_agent("nobody"), grpc.StatusCode.NOT_FOUND)
    await expect_status(
        harness.client.agents.GetAgent(agent_service_pb2.GetAgentRequest(name="robots/x")),
        grpc.StatusCode.INVALID_ARGUMENT, "name", "agents/ID",
    )


async def test_empty_and_oversized_input(harness):
    await expect_status(harness.client.run_final_output("assistant", "   "), grpc.StatusCode.INVALID_ARGUMENT,
                        "start.input", "must not be empty")
    too_long = "x" * (harness.server.settings.max_input_chars + 1)
    await expect_status(harness.client.run_final_output("assistant", too_long), grpc.StatusCode.INVALID_ARGUMENT,
                        "start.input", "limit")
    await expect_status(harness.client.run_final_output("assistant", "hi", max_turns=-1),
                        grpc.StatusCode.INVALID_ARGUMENT, "start.max_turns")
    await expect_status(harness.client.run_final_output("assistant", "hi", session_id="bad id!"),
                        grpc.StatusCode.INVALID_ARGUMENT, "start.session")


async def test_run_stream_must_start_with_start(harness):
    call = harness.client.agents.Run()
    await call.write(agent_service_pb2.RunRequest(cancel=agent_service_pb2.CancelRun()))
    await call.done_writing()
    await expect_status(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "first message")


async def test_stream_run_rejects_bad_requests_too(harness):
    call = harness.client.agents.StreamRun(agent_service_pb2.StreamRunRequest(start=agent_service_pb2.StartRun(
        agent="agents/assistant", input="")))
    await expect_status(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "start.input")


@pytest.mark.parametrize("page_size", [-1, 1001])
async def test_bad_page_sizes(harness, page_size):
    calls = [
        harness.client.sessions.ListSessions(session_service_pb2.ListSessionsRequest(page_size=page_size)),
        harness.client.agents.ListAgents(agent_service_pb2.ListAgentsRequest(page_size=page_size)),
        harness.client.traces.ListTraces(trace_service_pb2.ListTracesRequest(page_size=page_size)),
    ]
    for call in calls:
        await expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "page_size", "between 0 and 1000")
    await harness.client.create_session("paged")
    await expect_status(harness.client.list_items("paged", page_size=page_size), grpc.StatusCode.INVALID_ARGUMENT,
                        "page_size")


async def test_bad_page_tokens(harness):
    await harness.client.create_session("tokens")
    for token in ("garbage", "!!!"):
        await expect_status(harness.client.list_items("tokens", page_token=token), grpc.StatusCode.INVALID_ARGUMENT,
                            "page_token")
        await expect_status(harness.client.list_sessions(page_token=token), grpc.StatusCode.INVALID_ARGUMENT,
                            "page_token")
        await expect_status(harness.client.list_traces(page_token=token), grpc.StatusCode.INVALID_ARGUMENT,
                            "page_token")
    # A token from one listing does not continue another (different order).
    await harness.client.add_items("tokens", [_text(f"m{i}") for i in range(3)])
    page = await harness.client.list_items("tokens", page_size=1)
    assert page.next_page_token
    await expect_status(harness.client.list_items("tokens", page_size=1, newest_first=True,
                                                  page_token=page.next_page_token),
                        grpc.StatusCode.INVALID_ARGUMENT, "page_token")


async def test_bad_items_and_names(harness):
    await harness.client.create_session("items")
    await expect_status(harness.client.add_items("items", []), grpc.StatusCode.INVALID_ARGUMENT, "items")
    await expect_status(harness.client.add_items("items", [item_pb2.Item()]), grpc.StatusCode.INVALID_ARGUMENT,
                        "items[0]")
    await expect_status(
        harness.client.add_items("items", [_text("ok"), item_pb2.Item(tool_call=item_pb2.ToolCall(tool_name="t"))]),
        grpc.StatusCode.INVALID_ARGUMENT, "items[1].tool_call",
    )
    # Nothing of a rejected request was stored.
    assert (await harness.client.get_session("items")).item_count == 0
    await expect_status(
        harness.client.sessions.GetSession(session_service_pb2.GetSessionRequest(name="runs/items")),
        grpc.StatusCode.INVALID_ARGUMENT, "name", "sessions/ID",
    )
    await expect_status(harness.client.get_session("missing"), grpc.StatusCode.NOT_FOUND, "'missing'")
    await expect_status(harness.client.create_session("items"), grpc.StatusCode.ALREADY_EXISTS)
    await expect_status(harness.client.create_session("no/slash"), grpc.StatusCode.INVALID_ARGUMENT, "session_id")
    await expect_status(harness.client.get_trace("0" * 32), grpc.StatusCode.NOT_FOUND, "trace")
    await expect_status(
        harness.client.sessions.UpdateSession(session_service_pb2.UpdateSessionRequest(
            session=session_service_pb2.Session(name="sessions/items"),
            update_mask={"paths": ["item_count"]})),
        grpc.StatusCode.INVALID_ARGUMENT, "update_mask",
    )


def _text(text: str) -> item_pb2.Item:
    return item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text=text))


async def test_model_endpoint_down_fails_the_run_without_hanging(tmp_path: Path):
    """A refused model endpoint fails the run on the refusal: the model timeout is an hour, so
    only the refusal (after its one retry) can end the run before the guard."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    provider = OpenAIProvider(api_key="k", base_url=f"http://127.0.0.1:{closed_port}/v1", max_retries=1,
                              timeout_s=3600)
    server = await start_server(Settings(port=0, store="memory"), app, models=provider)
    try:
        async with AgentdClient(server.target) as client:
            try:
                async with asyncio.timeout(60):  # a bound on a hang, not a measured time
                    events = await collect(client.run("assistant", "hello?", session_id="down-1"))
            except TimeoutError:
                pytest.fail("the run hung on a model endpoint that refuses connections", pytrace=False)
            failed = events[-1].run_failed
            assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_UNAVAILABLE
            assert str(closed_port) in failed.message
            # Nothing half-done reached the session.
            assert (await client.get_session("down-1")).item_count == 0
    finally:
        await server.stop(grace_s=0)


async def test_rate_limits_are_retried(harness):
    harness.model.set_script("assistant", Script.of(say("after retries")))
    harness.model.fail_next(2, status=429, retry_after_s=0.01)
    assert await harness.client.run_final_output("assistant", "hi") == "after retries"


async def test_model_rejecting_the_request_is_a_model_error(harness):
    harness.model.fail_next(1, status=401, message="bad api key")
    events = await collect(harness.client.run("assistant", "hi"))
    failed = events[-1].run_failed
    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_ERROR
    assert "HTTP 401" in failed.message and "authentication failed" in failed.message
    assert "bad api key" not in failed.message  # the upstream body may echo credentials


async def test_tampered_page_tokens_are_invalid_argument(harness):
    """A token of the right kind but with a corrupted position inside."""
    from agentd.server.services.validation import encode_page_token

    await harness.client.create_session("tampered")
    calls = {
        "sessions": lambda t: harness.client.list_sessions(page_token=t),
        "items-oldest": lambda t: harness.client.list_items("tampered", page_token=t),
        "traces": lambda t: harness.client.list_traces(page_token=t),
    }
    for kind, call in calls.items():
        await expect_status(call(encode_page_token(kind, "not-a-cursor")), grpc.StatusCode.INVALID_ARGUMENT,
                            "page_token")


async def test_over_capacity_queues_and_a_full_queue_is_resource_exhausted(model_server, tmp_path):
    from tests.conftest import start_harness

    h = await start_harness(model_server, tmp_path, max_active_runs=1, max_queued_runs=1)
    try:
        model_server.set_script("assistant", Script.of(say("slow", delay_s=0.5)))
        first = h.client.run("assistant", "one").__aiter__()
        await anext(first)
        queued = await h.client.create_run("assistant", "two")
        assert queued.status == agent_service_pb2.RUN_STATUS_QUEUED
        await expect_status(h.client.run_final_output("assistant", "three"), grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "AGENTD_MAX_QUEUED_RUNS")
        assert [e async for e in first][-1].WhichOneof("payload") == "run_completed"
        # The queued run starts as soon as the replica has room.
        events = [e async for e in h.client.watch_run(queued.name.removeprefix("runs/"))]
        assert events[-1].run_completed.final_output.string_value == "slow"
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
