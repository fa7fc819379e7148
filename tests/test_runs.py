"""Runs over the real wire: agentd server on loopback, real client, real openai client to a scripted endpoint."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from agentd.client import RunCancelledError, RunFailedError
from agentd.server import Script, call, calls, say
from agentd.v1 import run_event_pb2
from tests.apps import tool_log
from tests.runs_util import collect, kinds, of_kind


async def test_multi_turn_run_with_concurrent_tool_calls(harness):
    harness.model.set_script("assistant", Script.of(
        calls(call("wait", seconds=0.5, label="a"), call("wait", seconds=0.5, label="b"),
              call("get_weather", city="Paris")),
        say("Both waits finished and Paris is sunny."),
    ))
    started = time.perf_counter()
    events = await collect(harness.client.run("assistant", "wait twice and check Paris"))
    elapsed = time.perf_counter() - started

    names = kinds(events)
    assert names[-1] == "run_completed"
    # All three calls are announced before any output: they ran concurrently, not one after another.
    assert names.index("tool_output") > max(i for i, n in enumerate(names) if n == "tool_called")
    assert elapsed < 0.9, f"tools ran one after another ({elapsed:.2f}s; 1.0s of waits in total)"
    outputs = {o.item.tool_result.tool_name: o.item.tool_result for o in of_kind(events, "tool_output")}
    assert json.loads(outputs["get_weather"].output)["temperature_c"] == 21
    assert set(tool_log.finished) == {"a", "b"}
    # Each output pairs with its call.
    call_ids = {c.item.tool_call.call_id for c in of_kind(events, "tool_called")}
    assert {o.item.tool_result.call_id for o in of_kind(events, "tool_output")} == call_ids

    done = events[-1].run_completed
    assert done.final_output.string_value == "Both waits finished and Paris is sunny."
    assert done.turns == 2 and done.last_agent == "assistant"
    # Run usage is the sum of the per-turn usage events.
    turns = of_kind(events, "usage_updated")
    assert len(turns) == 2
    assert done.usage.input_tokens == sum(u.turn.input_tokens for u in turns) > 0
    assert done.usage.output_tokens == sum(u.turn.output_tokens for u in turns) > 0
    assert done.usage.requests == 2
    # Text streamed as deltas that add up to the message.
    text = "".join(d.text for d in of_kind(events, "text_delta"))
    assert text == of_kind(events, "message_output")[0].item.message.text == done.final_output.string_value
    assert len(of_kind(events, "text_delta")) > 1

    # The model saw the tools with strict schemas and the dynamic instructions with the run context.
    first = harness.model.requests[0]
    tools = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert set(tools) == {"get_weather", "wait", "explode", "whoami", "transfer_to_specialist"}
    assert tools["wait"]["strict"] is True
    assert tools["wait"]["parameters"]["required"] == ["seconds", "label"]
    assert first["messages"][0] == {"role": "system", "content": "You help someone. Use tools; hand hard questions to the specialist."}


async def test_run_context_reaches_dynamic_instructions(harness):
    harness.model.set_script("assistant", Script.of(say("hi")))
    assert await harness.client.run_final_output("assistant", "hello", context={"user": "Ada"}) == "hi"
    assert harness.model.requests[-1]["messages"][0]["content"].startswith("You help Ada.")


async def test_handoff_continues_with_the_new_agent_and_the_conversation(harness):
    # One script plays the whole conversation: turn indexes count across agents.
    conversation = Script.of(
        calls(call("transfer_to_specialist")),
        calls(call("get_weather", city="Oslo")),
        say("Oslo is 12 degrees."),
    )
    harness.model.set_script("assistant", conversation)
    harness.model.set_script("specialist", conversation)
    events = await collect(harness.client.run("assistant", "Weather in Oslo? It's complicated."))
    handoff = of_kind(events, "handoff")
    assert [(h.from_agent, h.to_agent) for h in handoff] == [("assistant", "specialist")]
    assert [u.agent for u in of_kind(events, "agent_updated")] == ["specialist"]
    names = kinds(events)
    assert names.index("handoff") < names.index("agent_updated")
    done = events[-1].run_completed
    assert done.last_agent == "specialist" and done.final_output.string_value == "Oslo is 12 degrees."
    # The specialist saw the whole conversation, with its own instructions and tools.
    specialist_request = next(r for r in harness.model.requests if r["model"] == "specialist")
    assert specialist_request["messages"][0]["content"] == "You are the specialist."
    assert any(m.get("content") == "Weather in Oslo? It's complicated." for m in specialist_request["messages"])
    assert [t["function"]["name"] for t in specialist_request["tools"]] == ["get_weather"]
    weather = of_kind(events, "tool_output")[-1]
    assert weather.agent == "specialist" and json.loads(weather.item.tool_result.output)["city"] == "Oslo"


async def test_structured_output_is_validated(harness):
    harness.model.set_script("reporter", Script.of(
        say(json.dumps({"city": "Paris", "temperature_c": 21, "summary": "sunny"})),
    ))
    output = await harness.client.run_final_output("reporter", "Paris?")
    assert output == {"city": "Paris", "temperature_c": 21.0, "summary": "sunny"}
    request = harness.model.requests[-1]
    assert request["response_format"]["type"] == "json_schema"
    assert request["response_format"]["json_schema"]["name"] == "WeatherReport"

    agent = await harness.client.get_agent("reporter")
    assert set(agent.output_schema["properties"].keys()) == {"city", "temperature_c", "summary"}

    harness.model.set_script("reporter", Script.of(say('{"city": "Paris"}')))
    with pytest.raises(RunFailedError) as failure:
        await harness.client.run_final_output("reporter", "Paris?")
    assert failure.value.code == run_event_pb2.RUN_ERROR_CODE_INVALID_OUTPUT
    assert "WeatherReport" in failure.value.detail


async def test_max_turns_ends_the_run_with_a_clear_error(harness):
    harness.model.set_script("assistant", Script.of(*[calls(call("get_weather", city="Rome"))] * 5, say("never")))
    events = await collect(harness.client.run("assistant", "loop", max_turns=2))
    failed = events[-1].run_failed
    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MAX_TURNS_EXCEEDED
    assert "max_turns=2" in failed.message and failed.turns == 2


async def test_tool_problems_are_fed_back_and_the_run_continues(harness):
    harness.model.set_script("assistant", Script.of(
        calls(call("get_weather", '{"city": "Par'), call("no_such_tool", x=1), call("explode", reason="test"),
              call("get_weather", town="Paris")),
        say("Recovered."),
    ))
    events = await collect(harness.client.run("assistant", "break things"))
    results = [o.item.tool_result for o in of_kind(events, "tool_output")]
    assert all(r.is_error for r in results)
    by_position = [r.output for r in results]
    assert any("not valid JSON" in o for o in by_position)
    assert any("there is no tool named 'no_such_tool'" in o for o in by_position)
    assert any("RuntimeError: boom: test" in o for o in by_position)
    assert any("city: Field required" in o for o in by_position)
    # Malformed arguments are reported verbatim on the call event.
    raw = [c.item.tool_call.raw_arguments for c in of_kind(events, "tool_called")]
    assert '{"city": "Par' in raw
    assert events[-1].run_completed.final_output.string_value == "Recovered."
    # The model was told about each error on its next turn.
    tool_messages = [m for m in harness.model.requests[-1]["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == 4 and all(m["content"].startswith("Error: ") for m in tool_messages)


async def test_cancel_from_the_client_stops_tools_promptly(harness):
    harness.model.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="long")), say("never")))
    stream = harness.client.run("assistant", "wait forever")
    events = []
    async for event in stream:
        events.append(event)
        if event.WhichOneof("payload") == "tool_called":
            await asyncio.sleep(0.05)
            cancelled_at = time.perf_counter()
            await stream.cancel("user pressed stop")
    assert time.perf_counter() - cancelled_at < 1
    assert kinds(events)[-1] == "run_cancelled"
    assert events[-1].run_cancelled.reason == "user pressed stop"
    assert tool_log.cancelled == ["long"]
    assert harness.server.runs.active_count == 0


async def test_cancel_during_a_slow_model_call(harness):
    harness.model.set_script("assistant", Script.of(say("too late", delay_s=30)))
    stream = harness.client.run("assistant", "think hard")
    with pytest.raises(RunCancelledError):
        async for event in stream:
            if event.WhichOneof("payload") == "run_started":
                await asyncio.sleep(0.1)
                await stream.cancel()
            from agentd.client._requests import final_output_of

            final_output_of(event)
    assert harness.server.runs.active_count == 0


async def test_client_disconnect_cancels_the_run_and_keeps_only_whole_steps(harness):
    harness.model.set_script("assistant", Script.of(
        calls(call("get_weather", city="Paris")),
        calls(call("wait", seconds=30, label="stuck")),
        say("never"),
    ))
    stream = harness.client.run("assistant", "go", session_id="disconnect-1")
    async for event in stream:
        if event.WhichOneof("payload") == "tool_called" and event.tool_called.item.tool_call.tool_name == "wait":
            break  # leaving the loop cancels the call: the client is gone
    for _ in range(100):
        if harness.server.runs.active_count == 0:
            break
        await asyncio.sleep(0.02)
    assert harness.server.runs.active_count == 0
    assert tool_log.cancelled == ["stuck"]
    items = await harness.client.all_items("disconnect-1")
    # The user input and the first, completed step; nothing of the step that was cut off.
    kinds_ = [i.WhichOneof("content") for i in items]
    assert kinds_ == ["message", "tool_call", "tool_result"]
    assert items[1].tool_call.tool_name == "get_weather"
    assert items[1].tool_call.call_id == items[2].tool_result.call_id


async def test_session_continues_across_runs(harness):
    harness.model.set_script("assistant", Script.of(
        calls(call("get_weather", city="Paris")),
        say("Paris is 21 degrees."),
    ))
    first = await collect(harness.client.run("assistant", "Weather in Paris?", session_id="conv-1"))
    assert first[0].run_started.session == "sessions/conv-1"
    assert first[0].run_started.history_items == 0
    stored = await harness.client.all_items("conv-1")
    assert [i.sequence for i in stored] == [1, 2, 3, 4]
    assert stored[0].message.text == "Weather in Paris?" and stored[-1].message.text == "Paris is 21 degrees."

    harness.model.set_script("assistant", Script.of(say("You asked about Paris.")))
    second = await collect(harness.client.run("assistant", "What did I ask?", session_id="conv-1"))
    assert second[0].run_started.history_items == 4
    # The model received the first run's conversation before the new input.
    messages = harness.model.requests[-1]["messages"]
    contents = [m.get("content") for m in messages]
    assert contents.index("Weather in Paris?") < contents.index("Paris is 21 degrees.") < contents.index("What did I ask?")
    assert any(m["role"] == "tool" for m in messages)
    assert [i.sequence for i in await harness.client.all_items("conv-1")] == [1, 2, 3, 4, 5, 6]


async def test_second_run_on_a_busy_session_is_rejected(harness):
    harness.model.set_script("assistant", Script.of(calls(call("wait", seconds=0.5, label="hold")), say("done")))
    first = harness.client.run("assistant", "hold the session", session_id="busy-1")
    iterator = first.__aiter__()
    assert (await anext(iterator)).WhichOneof("payload") == "run_started"

    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await harness.client.run_final_output("assistant", "me too", session_id="busy-1")
    assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already has an active run" in rejected.value.details()
    from agentd.v1 import item_pb2

    with pytest.raises(grpc.aio.AioRpcError) as write:
        await harness.client.add_items("busy-1", [item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text="x"))])
    assert write.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    rest = [e async for e in iterator]
    assert rest[-1].WhichOneof("payload") == "run_completed"
    # Once the first run is over the session takes new runs again.
    harness.model.set_script("assistant", Script.of(say("free again")))
    assert await harness.client.run_final_output("assistant", "now?", session_id="busy-1") == "free again"


async def test_duplicate_request_id_of_a_live_run_is_rejected(harness):
    harness.model.set_script("assistant", Script.of(calls(call("wait", seconds=0.5, label="dup")), say("done")))
    first = harness.client.run("assistant", "once", request_id="req-42").__aiter__()
    await anext(first)
    with pytest.raises(grpc.aio.AioRpcError) as duplicate:
        await harness.client.run_final_output("assistant", "once", request_id="req-42")
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert [e async for e in first][-1].WhichOneof("payload") == "run_completed"


async def test_deadline_cancels_the_run_on_the_server(harness):
    harness.model.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="deadline")), say("never")))
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await harness.client.run_final_output("assistant", "slow", timeout=0.5)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if harness.server.runs.active_count == 0 and tool_log.cancelled:
            break
        await asyncio.sleep(0.02)
    assert harness.server.runs.active_count == 0
    assert tool_log.cancelled == ["deadline"]
