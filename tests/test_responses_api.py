"""Agents on the OpenAI Responses API, over real HTTP: the real openai client against the
scripted endpoint's ``/v1/responses``, through the real agentd server.

Covers streamed text, function tools (call ids kept), hosted tools (hosted_tool_call
events), handoffs, reasoning items (stored in the session with only their summary shown,
their encrypted content sent back to the model and never out of the server), usage with
reasoning tokens, error mapping, the provider's API choice and configuration errors.
"""

from __future__ import annotations

import io
import typing
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from rich.console import Console

from agentd.cli.render import RunRenderer, items_table
from agentd.client import AgentdClient
from agentd.server import Agent, App, Script, call, calls, hosted, reason, say
from agentd.server.agents.build import agent_from_definition
from agentd.server.agents.definition import DefinitionError, definition_errors, parse_definition
from agentd.server.models.base import ModelHostedCall, ModelRequest, ModelResponse, ToolSpec
from agentd.server.models.openai_chat import OpenAIChatModel, OpenAIProvider
from agentd.server.models.openai_responses import OpenAIResponsesModel
from agentd.server.models.responses_format import keep_reasoning, to_responses_input
from agentd.server.models.scripted import ScriptedProvider
from agentd.server.runs.codec import decode_checkpoint, decode_payload, encode_checkpoint, encode_payload
from agentd.server.runtime import events as ev
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.errors import AppConfigError
from agentd.server.runtime.items import MessageItem, ReasoningItem, ToolCallItem, ToolResultItem, item_from_dict
from agentd.server.runtime.usage import Usage
from agentd.server.serve import start_server
from agentd.server.services.convert import item_to_proto, write_run_event
from agentd.server.settings import Settings
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import item_pb2, run_event_pb2, session_service_pb2
from tests.apps import get_weather
from tests.conftest import Harness
from tests.runs_util import collect, kinds, of_kind

WEATHER = ToolSpec("get_weather", "Weather.", {"type": "object", "properties": {}}, False)

researcher = Agent(
    name="researcher",
    model="resp",
    model_api="responses",
    instructions="Research, then hand off to the writer.",
    tools=[get_weather],
    hosted_tools=[{"type": "web_search"}],
    handoffs=["writer"],
)
writer = Agent(name="writer", model="resp", model_api="responses", instructions="Write it up.")
thinker = Agent(
    name="thinker", model="think", model_api="responses", instructions="Think first.", tools=[get_weather]
)
# The same model as the thinker's, on Chat Completions: it never sends reasoning.
chatter = Agent(name="chatter", model="think", model_api="chat_completions", instructions="Chat.")
# No model_api: the provider's default (Chat Completions for the scripted endpoint's base URL).
plain = Agent(name="plain", model="plain")
# Hosted tools and no model_api: the Responses API regardless of the provider's default.
searcher = Agent(name="searcher", model="plain", hosted_tools=[{"type": "web_search"}])

APP = App(agents=[researcher, writer, thinker, chatter, plain, searcher])


async def start(model: ScriptedOpenAIServer, tmp_path: Path, app: App = APP, **settings: object) -> Harness:
    config = Settings(**{  # type: ignore[arg-type]
        "port": 0, "store": "sqlite", "sqlite_path": tmp_path / "agentd.db", "tool_timeout_s": 5,
        "shutdown_grace_s": 1, **settings,
    })
    provider = OpenAIProvider(api_key="test-key", base_url=model.base_url, timeout_s=10, max_retries=2)
    server = await start_server(config, app, models=provider)
    return Harness(server, AgentdClient(server.target), model)


@pytest.fixture
async def h(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await start(model_server, tmp_path)
    try:
        yield harness
    finally:
        await harness.client.close()
        await harness.server.stop(grace_s=0)


def responses_requests(model: ScriptedOpenAIServer) -> list[dict[str, Any]]:
    return [r for r in model.requests if "input" in r]


def input_of(request: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [item for item in request["input"] if item.get("type") == kind]


async def test_text_streams_as_deltas_with_usage_and_reasoning_tokens(h: Harness) -> None:
    h.model.set_script("think", Script.of(say("It is sunny in Paris today.", reason("Recall the forecast"))))
    events = await collect(h.client.run("thinker", "Weather?"))
    assert events[-1].run_completed.final_output.string_value == "It is sunny in Paris today."
    deltas = of_kind(events, "text_delta")
    assert len(deltas) > 1 and "".join(d.text for d in deltas) == "It is sunny in Paris today."
    # The request went to /v1/responses, stateless, asking for the encrypted reasoning.
    (request,) = h.model.requests
    assert request["store"] is False and request["include"] == ["reasoning.encrypted_content"]
    assert request["instructions"] == "Think first." and request["stream"] is True
    assert request["input"] == [{"type": "message", "role": "user", "content": "Weather?"}]
    assert [t["name"] for t in request["tools"]] == ["get_weather"]
    # Usage, reasoning tokens included: per turn and for the run.
    (updated,) = of_kind(events, "usage_updated")
    assert updated.model == "think" and updated.turn.requests == 1
    assert updated.turn.reasoning_tokens > 0 and updated.turn.output_tokens > updated.turn.reasoning_tokens
    usage = events[-1].run_completed.usage
    assert usage.reasoning_tokens == updated.turn.reasoning_tokens and usage.total_tokens == (
        usage.input_tokens + usage.output_tokens
    )


async def test_function_tool_hosted_tool_and_handoff(h: Harness) -> None:
    h.model.set_script("resp", Script.of(
        calls(hosted("web_search", query="Paris weather", sources=["https://meteo.example/paris"]),
              call("get_weather", city="Paris")),
        calls(call("transfer_to_writer")),
        say("Paris: 21°C and clear."),
    ))
    events = await collect(h.client.run("researcher", "Paris?"))
    assert events[-1].run_completed.last_agent == "writer"
    assert events[-1].run_completed.final_output.string_value == "Paris: 21°C and clear."

    (hosted_call,) = of_kind(events, "hosted_tool_call")
    assert (hosted_call.agent, hosted_call.tool, hosted_call.status) == ("researcher", "web_search", "completed")
    assert hosted_call.call_id.startswith("ws_")
    details = dict(hosted_call.details)
    assert details["query"] == "Paris weather" and list(details["sources"]) == ["https://meteo.example/paris"]
    # Streamed during the turn: before the turn's usage and its tool calls.
    names = kinds(events)
    assert names.index("hosted_tool_call") < names.index("usage_updated") < names.index("tool_called")
    # No tool_output for a hosted call: only the function and handoff calls have one.
    assert [o.item.tool_result.tool_name for o in of_kind(events, "tool_output")] == [
        "get_weather", "transfer_to_writer"
    ]

    first, second, third = responses_requests(h.model)
    # The hosted tool is declared beside the function tools (and the handoff).
    assert first["tools"] == [
        {"type": "function", "name": "get_weather", "description": first["tools"][0]["description"],
         "parameters": first["tools"][0]["parameters"], "strict": True},
        {"type": "function", "name": "transfer_to_writer", "description": first["tools"][1]["description"],
         "parameters": first["tools"][1]["parameters"], "strict": True},
        {"type": "web_search"},
    ]
    # The model's call id is kept: in the event, the session, and the next turn's input.
    (called, _) = [c.item.tool_call for c in of_kind(events, "tool_called")]
    assert called.tool_name == "get_weather" and called.call_id.startswith("call_0_")
    (function_call,) = input_of(second, "function_call")
    (output,) = input_of(second, "function_call_output")
    assert function_call == {"type": "function_call", "call_id": called.call_id, "name": "get_weather",
                             "arguments": '{"city":"Paris"}'}
    assert output["call_id"] == called.call_id and '"temperature_c": 21' in output["output"]
    # Hosted calls are not replayed; the writer gets the handoff and its own instructions.
    assert not [i for i in second["input"] if i.get("type") not in ("message", "function_call",
                                                                   "function_call_output")]
    assert third["instructions"] == "Write it up."
    assert [i["name"] for i in input_of(third, "function_call")] == ["get_weather", "transfer_to_writer"]
    (handoff,) = of_kind(events, "handoff")
    assert (handoff.from_agent, handoff.to_agent) == ("researcher", "writer")


async def test_reasoning_is_kept_in_the_session_and_sent_back_never_shown(h: Harness) -> None:
    h.model.set_script("think", Script.of(
        calls(reason("I need the weather", "Call the tool"), call("get_weather", city="Paris")),
        say("Sunny, 21°C.", reason("Summarise the tool's answer")),
    ))
    first_run = await collect(h.client.run("thinker", "Paris?", session_id="s1"))
    assert first_run[-1].WhichOneof("payload") == "run_completed"
    # Within the run: the reasoning before the call goes back with the call, encrypted content and all.
    turn1, turn2 = responses_requests(h.model)
    assert not input_of(turn1, "reasoning")
    (sent,) = input_of(turn2, "reasoning")
    assert sent["id"].startswith("rs_0_") and sent["encrypted_content"].startswith("enc_")
    assert sent["summary"] == [{"type": "summary_text", "text": "I need the weather"},
                               {"type": "summary_text", "text": "Call the tool"}]
    assert [i.get("type") for i in turn2["input"]] == ["message", "reasoning", "function_call",
                                                      "function_call_output"]

    # The session keeps both reasoning items, showing only their summaries.
    items = await h.client.all_items("s1")
    assert [i.WhichOneof("content") for i in items] == [
        "message", "reasoning", "tool_call", "tool_result", "reasoning", "message"
    ]
    assert list(items[1].reasoning.summary) == ["I need the weather", "Call the tool"]
    assert items[1].agent == "thinker" and items[1].sequence == 2
    assert list(items[4].reasoning.summary) == ["Summarise the tool's answer"]

    # The next run sends both back, in place, with the very encrypted content the model gave.
    h.model.set_script("think", Script.of(say("Still sunny.")))
    second_run = await collect(h.client.run("thinker", "And now?", session_id="s1"))
    (turn3,) = responses_requests(h.model)[2:]
    replayed = input_of(turn3, "reasoning")
    assert len(replayed) == 2 and replayed[0] == sent
    assert replayed[1]["summary"] == [{"type": "summary_text", "text": "Summarise the tool's answer"}]
    assert [i.get("type") for i in turn3["input"]] == [
        "message", "reasoning", "function_call", "function_call_output", "reasoning", "message", "message"
    ]
    secrets = [r["encrypted_content"] for r in replayed]

    # The Chat Completions path skips reasoning items.
    h.model.set_script("think", Script.of(say("chatty")))
    await collect(h.client.run("chatter", "Hi", session_id="s1"))
    chat = h.model.requests[-1]
    assert "messages" in chat and [m["role"] for m in chat["messages"]] == [
        "system", "user", "assistant", "tool", "assistant", "user", "assistant", "user"
    ]

    # The encrypted content never leaves the server: not in events, items, runs or traces.
    seen = b"".join(e.SerializeToString() for e in [*first_run, *second_run])
    seen += b"".join(i.SerializeToString() for i in await h.client.all_items("s1"))
    for run in (first_run, second_run):
        seen += (await h.client.get_run(run[0].run_id)).SerializeToString()
        seen += (await h.client.get_trace(run[0].trace_id)).SerializeToString()
    assert b"Summarise the tool" in seen  # what is shown is there...
    for secret in secrets:
        assert secret.encode() not in seen  # ...and the reasoning itself is not


async def test_reasoning_before_a_hosted_call_is_not_kept(h: Harness) -> None:
    """Replayed without the hosted call that followed it, the API would refuse it."""
    h.model.set_script("resp", Script.of(
        say("Found it.", reason("Search first"), hosted("web_search", query="x"), reason("Now answer")),
    ))
    await collect(h.client.run("researcher", "Find x", session_id="s2"))
    items = await h.client.all_items("s2")
    assert [i.WhichOneof("content") for i in items] == ["message", "reasoning", "message"]
    assert list(items[1].reasoning.summary) == ["Now answer"]


async def test_caller_added_reasoning_items_are_listed_but_never_sent(h: Harness) -> None:
    await h.client.create_session("s3")
    await h.client.add_items("s3", [
        item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text="hi")),
        item_pb2.Item(reasoning=item_pb2.Reasoning(summary=["copied from elsewhere"]), agent="thinker"),
        item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_ASSISTANT, text="hello")),
    ])
    items = await h.client.all_items("s3")
    assert list(items[1].reasoning.summary) == ["copied from elsewhere"]
    h.model.set_script("think", Script.of(say("ok")))
    await collect(h.client.run("thinker", "again", session_id="s3"))
    (request,) = responses_requests(h.model)
    assert not input_of(request, "reasoning")  # nothing encrypted to send back


async def test_endpoint_errors_map_like_the_chat_models(h: Harness) -> None:
    h.model.set_script("think", Script.of(say("never")))
    h.model.fail_next(1, 400, "Invalid 'input[0]': bad things")
    events = await collect(h.client.run("thinker", "x"))
    failed = events[-1].run_failed
    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_ERROR
    assert "HTTP 400: Invalid 'input[0]': bad things" in failed.message and "'think'" in failed.message

    h.model.fail_next(3, 500, "upstream exploded", retry_after_s=0.01)
    events = await collect(h.client.run("thinker", "x"))
    failed = events[-1].run_failed
    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_UNAVAILABLE
    assert "HTTP 500" in failed.message and "gave up after 2 retries" in failed.message
    assert len(responses_requests(h.model)) == 4  # one 400, then 1 + 2 retries of the 500

    # A transient failure the client's retries ride out.
    h.model.fail_next(1, 503, "busy", retry_after_s=0.01)
    events = await collect(h.client.run("thinker", "x"))
    assert events[-1].run_completed.final_output.string_value == "never"


async def test_a_response_that_fails_mid_stream_maps_by_its_code(h: Harness) -> None:
    h.model.set_script("think", Script.of(say("never")))
    h.model.fail_responses_next(1, "server_error", "The server had an error while processing your request.")
    failed = (await collect(h.client.run("thinker", "x")))[-1].run_failed
    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_UNAVAILABLE
    assert "(server_error): The server had an error" in failed.message
    h.model.fail_responses_next(1, "invalid_prompt", "Invalid prompt: flagged.")
    failed = (await collect(h.client.run("thinker", "x")))[-1].run_failed
    assert failed.code == run_event_pb2.RUN_ERROR_CODE_MODEL_ERROR and "(invalid_prompt)" in failed.message


async def test_a_model_without_encrypted_reasoning_is_asked_again_without_it(h: Harness) -> None:
    h.model.set_script("think", Script.of(say("plain answer", reason("unseen"))))
    h.model.fail_next(1, 400, "Encrypted content is not supported with this model.")
    events = await collect(h.client.run("thinker", "x", session_id="s4"))
    assert events[-1].run_completed.final_output.string_value == "plain answer"
    refused, retried = responses_requests(h.model)
    assert refused["include"] == ["reasoning.encrypted_content"] and "include" not in retried
    # No encrypted content came back: the item is kept for its summary but never sent.
    await collect(h.client.run("thinker", "y", session_id="s4"))
    later = responses_requests(h.model)[-1]
    assert "include" not in later and not input_of(later, "reasoning")


async def test_the_provider_default_and_the_agent_choice(h: Harness) -> None:
    # A custom base URL: "auto" is Chat Completions, for an agent that does not choose.
    h.model.set_script("plain", Script.of(say("via chat")))
    events = await collect(h.client.run("plain", "x"))
    assert events[-1].run_completed.final_output.string_value == "via chat"
    assert "messages" in h.model.requests[-1]
    # Hosted tools without a model_api: the Responses API.
    h.model.set_script("plain", Script.of(say("via responses", hosted("web_search", query="q"))))
    events = await collect(h.client.run("searcher", "x"))
    assert of_kind(events, "hosted_tool_call")[0].tool == "web_search"
    assert "input" in h.model.requests[-1] and h.model.requests[-1]["tools"] == [{"type": "web_search"}]


async def test_the_server_setting_picks_the_api_for_agents_that_do_not(
    model_server: ScriptedOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentd.server.serve import build_models

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_BASE_URL", model_server.base_url)
    settings = Settings(model_provider="openai", model_api="responses")  # type: ignore[call-arg]
    provider = build_models(settings, APP)
    assert isinstance(provider, OpenAIProvider) and provider.api == "responses"
    model_server.set_script("plain", Script.of(say("by setting")))
    _, response = await _collect(provider.get_model("plain"), ModelRequest("plain", "", (MessageItem("user", "x"),)))
    assert response.text == "by setting" and "input" in model_server.requests[-1]
    await provider.aclose()
    assert OpenAIProvider(api_key="k", base_url=model_server.base_url).api == "chat_completions"


def test_auto_is_the_responses_api_on_openais_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert OpenAIProvider(api_key="k").api == "responses"
    assert OpenAIProvider(api_key="k", base_url="https://api.openai.com/v1").api == "responses"
    assert OpenAIProvider(api_key="k", base_url="http://localhost:11434/v1").api == "chat_completions"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://vllm.internal:8000/v1")
    provider = OpenAIProvider(api_key="k")
    assert provider.api == "chat_completions"
    assert isinstance(provider.get_model("m", api="responses"), OpenAIResponsesModel)
    assert isinstance(provider.get_model("m", api="chat_completions"), OpenAIChatModel)
    assert OpenAIProvider(api_key="k", api="responses").api == "responses"


def test_chat_completions_agents_with_hosted_tools_do_not_load() -> None:
    bad = Agent(name="bad", model_api="chat_completions", hosted_tools=[{"type": "web_search"}])
    with pytest.raises(AppConfigError, match="only the Responses API runs"):
        App(agents=[bad])
    with pytest.raises(AppConfigError, match="hosted_tools\\[0\\]: hosted tool type 'web_browse'"):
        App(agents=[Agent(name="odd", hosted_tools=[{"type": "web_browse"}])])
    with pytest.raises(AppConfigError, match="vector_store_ids"):
        App(agents=[Agent(name="files", hosted_tools=[{"type": "file_search"}])])
    with pytest.raises(AppConfigError, match="model_api 'assistants'"):
        App(agents=[Agent(name="api", model_api="assistants")])


def test_declarative_agents_take_model_api_and_hosted_tools() -> None:
    data = {
        "name": "scout", "model": "gpt-5", "model_api": "responses",
        "model_settings": {"reasoning_effort": "low", "reasoning_summary": "auto"},
        "hosted_tools": [{"type": "web_search", "search_context_size": "low"},
                         {"type": "file_search", "vector_store_ids": ["vs_1"]},
                         {"type": "code_interpreter"}],
    }
    agent = agent_from_definition(parse_definition(data), app_tools={}, known_agents=set())
    assert agent.model_api == "responses" and agent.model_settings.reasoning_summary == "auto"
    assert agent.hosted_tools == [{"type": "web_search", "search_context_size": "low"},
                                  {"type": "file_search", "vector_store_ids": ["vs_1"]},
                                  {"type": "code_interpreter"}]
    assert App(agents=[agent]).get("scout").model_api == "responses"  # type: ignore[union-attr]

    errors = definition_errors({
        "name": "bad", "model_api": "chat_completions",
        "hosted_tools": [{"type": "file_search"}, {"type": "web_browse"}],
    })
    paths = [path for path, _ in errors]
    assert "hosted_tools" in paths and "hosted_tools[0].vector_store_ids" in paths and "hosted_tools[1].type" in paths
    assert any("only on the Responses API" in message for _, message in errors)
    with pytest.raises(DefinitionError):
        parse_definition({"name": "bad", "model_api": "assistants"})


async def _collect(model: Any, request: ModelRequest) -> tuple[list[Any], ModelResponse]:
    chunks = [chunk async for chunk in model.stream(request)]
    assert isinstance(chunks[-1], ModelResponse)
    return chunks[:-1], chunks[-1]


async def test_the_in_process_scripted_model_answers_like_the_endpoint(model_server: ScriptedOpenAIServer) -> None:
    script = Script.of(calls(reason("plan"), hosted("code_interpreter", code="print(6*7)", logs="42"),
                             reason("answer"), call("get_weather", city="Oslo"), text="Let me check."))
    model_server.set_script("m", script)
    provider = OpenAIProvider(api_key="k", base_url=model_server.base_url, api="responses")
    request = ModelRequest("m", "Be brief.", (MessageItem("user", "Oslo?"),), tools=(WEATHER,),
                           api="responses", hosted_tools=({"type": "code_interpreter"},))
    remote_chunks, remote = await _collect(provider.get_model("m"), request)
    local_chunks, local = await _collect(ScriptedProvider({"m": script}).get_model("m"), request)
    await provider.aclose()
    for chunks in (remote_chunks, local_chunks):
        (hosted_call,) = [c for c in chunks if isinstance(c, ModelHostedCall)]
        assert hosted_call.tool == "code_interpreter" and hosted_call.call_id.startswith("ci_")
        assert hosted_call.details == {"code": "print(6*7)", "logs": "42"}
        assert "".join(c for c in chunks if isinstance(c, str)) == "Let me check."
    assert remote.usage == local.usage and remote.usage.reasoning_tokens == 4  # (4//4+1) + (6//4+1)
    assert remote.text == local.text and remote.finish_reason == local.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in remote.tool_calls] == [(c.name, c.arguments) for c in local.tool_calls]
    # Only the reasoning right before the message is kept (the first one preceded the hosted call).
    assert [r.summary for r in remote.reasoning] == [r.summary for r in local.reasoning] == [("answer",)]
    assert remote.reasoning[0].encrypted_content.startswith("enc_")
    # The request as sent: the hosted tool gets an automatic container.
    assert model_server.requests[-1]["tools"][-1] == {"type": "code_interpreter", "container": {"type": "auto"}}


async def test_the_endpoint_also_answers_without_streaming(model_server: ScriptedOpenAIServer) -> None:
    import openai

    model_server.set_script("m", Script.of(say("whole", reason("why"))))
    async with openai.AsyncOpenAI(api_key="k", base_url=model_server.base_url) as client:
        response = await client.responses.create(model="m", input="hi", include=["reasoning.encrypted_content"])
    from openai.types.responses import Response

    Response.model_validate(response.to_dict())  # strictly the shape the openai types describe
    assert response.output_text == "whole" and response.status == "completed"
    assert response.output[0].type == "reasoning" and response.output[0].encrypted_content
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 1


async def test_the_endpoint_streams_what_the_openai_types_describe(model_server: ScriptedOpenAIServer) -> None:
    """Every streamed event validates (strictly: required fields, literal types) against the
    installed openai package's ``ResponseStreamEvent``, the ground truth for the shapes."""
    import openai
    from openai.types.responses import ResponseStreamEvent

    model_server.set_script("m", Script.of(calls(
        reason("a", "b"),
        hosted("web_search", query="q", sources=["https://x"]),
        hosted("file_search", queries=["q"], results=["notes.md"]),
        hosted("code_interpreter", code="1+1", logs="2"),
        hosted("image_generation", prompt="a cat"),
        call("get_weather", city="Oslo"),
        call("get_weather", city="Rome"),
        text="Done.",
    )))
    union = typing.get_args(ResponseStreamEvent)[0]  # Annotated[Union[...], discriminator]
    classes = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls for cls in typing.get_args(union)}
    async with openai.AsyncOpenAI(api_key="k", base_url=model_server.base_url) as client:
        stream = await client.responses.create(
            model="m", input=[{"type": "message", "role": "user", "content": "go"}], stream=True,
            include=["reasoning.encrypted_content"],
        )
        typed = [event async for event in stream]
    raw = [event.to_dict() for event in typed]
    for event in raw:
        classes[event["type"]].model_validate(event)  # raises on a missing field or a wrong type
    assert [e["sequence_number"] for e in raw] == list(range(len(raw)))
    assert raw[0]["type"] == "response.created" and raw[-1]["type"] == "response.completed"
    done_types = [e["item"]["type"] for e in raw if e["type"] == "response.output_item.done"]
    assert done_types == ["reasoning", "web_search_call", "file_search_call", "code_interpreter_call",
                          "image_generation_call", "message", "function_call", "function_call"]
    completed = typed[-1].response  # type: ignore[union-attr]
    assert completed.output_text == "Done." and completed.usage.output_tokens_details.reasoning_tokens == 1
    assert {type(e).__name__ for e in typed} >= {
        "ResponseReasoningSummaryTextDeltaEvent", "ResponseWebSearchCallCompletedEvent",
        "ResponseFunctionCallArgumentsDeltaEvent", "ResponseTextDeltaEvent", "ResponseCompletedEvent",
    }


def test_items_events_and_checkpoints_round_trip() -> None:
    reasoning = ReasoningItem("rs_1", ("a", "b"), "enc_secret", "thinker")
    assert item_from_dict(reasoning.to_dict()) == reasoning
    assert item_from_dict({"type": "reasoning", "id": "rs_2"}) == ReasoningItem("rs_2")
    with pytest.raises(ValueError):
        item_from_dict({"type": "reasoning", "id": "rs_3", "summary": "not a list"})
    proto = item_to_proto(reasoning)
    assert proto.WhichOneof("content") == "reasoning" and list(proto.reasoning.summary) == ["a", "b"]
    assert b"enc_secret" not in proto.SerializeToString()
    # An empty summary is still a reasoning item on the wire.
    assert item_to_proto(ReasoningItem("rs_4")).WhichOneof("content") == "reasoning"

    hosted_event = ev.HostedToolCall("a", "web_search", "ws_1", "completed", {"query": "q", "sources": ["u"]})
    assert decode_payload(encode_payload(hosted_event)) == hosted_event
    out = run_event_pb2.RunEvent()
    write_run_event(ev.RunEvent("run_1", 3, 0, "t" * 32, hosted_event), out)
    assert out.hosted_tool_call.tool == "web_search" and dict(out.hosted_tool_call.details)["query"] == "q"

    usage = Usage(10, 7, 1, 4)
    updated = ev.UsageUpdated("a", "m", usage, usage.copy())
    assert decode_payload(encode_payload(updated)) == updated
    old = decode_payload('{"t":"usage_updated","agent":"a","model":"m","turn":[1,2,1],"run":[1,2,1]}')
    # Written before costs were recorded: that call's cost is unknown, so it counts as unpriced.
    assert old.turn == Usage(1, 2, 1, unpriced_calls=1)  # type: ignore[union-attr]
    checkpoint = Checkpoint("a", 1, usage, 0, (MessageItem("user", "x"), reasoning), (reasoning,), "r/1", 0)
    assert decode_checkpoint(encode_checkpoint(checkpoint)).run_items[1] == reasoning


def test_responses_input_and_the_reasoning_rule() -> None:
    items = [
        MessageItem("user", "q"),
        ReasoningItem("rs_1", ("s",), "enc"),
        ReasoningItem("rs_2", ("no content",), ""),
        ToolCallItem("c1", "t", "{}"),
        ToolResultItem("c1", "t", "out"),
    ]
    assert to_responses_input(items) == [
        {"type": "message", "role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}],
         "encrypted_content": "enc"},
        {"type": "function_call", "call_id": "c1", "name": "t", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "out"},
    ]
    assert [i["type"] for i in to_responses_input(items, reasoning=False)] == [
        "message", "function_call", "function_call_output"
    ]
    assert keep_reasoning(["reasoning", "message"]) == [True, False]
    assert keep_reasoning(["reasoning", "reasoning", "function_call"]) == [True, True, False]
    assert keep_reasoning(["reasoning", "web_search_call", "reasoning", "message"]) == [False, False, True, False]
    assert keep_reasoning(["message", "reasoning"]) == [False, False]


def test_the_cli_shows_hosted_calls_reasoning_items_and_reasoning_tokens() -> None:
    buffer = io.StringIO()
    renderer = RunRenderer(Console(file=buffer, width=120, color_system=None))
    event = run_event_pb2.RunEvent()
    write_run_event(ev.RunEvent("run_1", 2, 0, "t" * 32, ev.HostedToolCall(
        "a", "web_search", "ws_1", "completed", {"query": "weather Paris", "sources": ["u1", "u2"]}
    )), event)
    renderer.event(event)
    done = run_event_pb2.RunEvent()
    write_run_event(ev.RunEvent("run_1", 3, 0, "t" * 32, ev.RunCompleted("x", "a", Usage(5, 9, 1, 4), 1, 0.1)), done)
    renderer.event(done)
    text = buffer.getvalue()
    assert "web_search(weather Paris) · 2 source(s)" in text and "9 out tokens (4 reasoning)" in text

    session = session_service_pb2.Session(name="sessions/s", item_count=1)
    table = items_table(session, [item_pb2.Item(reasoning=item_pb2.Reasoning(summary=["thought"]), sequence=1)])
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(table)
    assert "reasoning" in out.getvalue() and "thought" in out.getvalue()
