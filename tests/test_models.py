"""Model layer: the OpenAI Chat Completions model over real HTTP, and the scripted models.

The OpenAI model is always exercised with the real ``openai`` client talking to
``ScriptedOpenAIServer``, so streaming, retries and error mapping are the genuine ones.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import openai
import pytest

from agentd.server.models import scripted as scripted_module
from agentd.server.models.base import (
    Model,
    ModelRequest,
    ModelResponse,
    ModelSettings,
    OutputSchema,
    ToolSpec,
)
from agentd.server.models.chat_format import chat_roles, to_chat_messages
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.models.script import Script, call, calls, say
from agentd.server.models.scripted import ScriptedModel, ScriptedProvider, text_chunks
from agentd.server.runtime.errors import ModelError, ModelUnavailableError
from agentd.server.runtime.items import Item, MessageItem, ToolCallItem, ToolResultItem
from agentd.testing import ScriptedOpenAIServer

T = TypeVar("T")
GUARD_S = 60.0  # how long a test waits before it calls a wait a hang: a bound on a failure, never a latency
FOREVER_S = 3600.0  # a duration nothing in a test may wait out


async def guarded(awaitable: Awaitable[T], what: str, guard_s: float = GUARD_S) -> T:
    """``awaitable``'s result; fails the test, naming ``what``, if it has not come within ``guard_s``."""
    try:
        async with asyncio.timeout(guard_s) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            pytest.fail(f"{what}: still waiting after {guard_s:g}s (a hang)", pytrace=False)
        raise


async def eventually(check: Callable[[], bool], what: str, guard_s: float = GUARD_S) -> None:
    """Return once ``check()`` is true (a state nothing announces); fail, naming ``what``, after ``guard_s``."""

    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await guarded(poll(), what, guard_s)


WEATHER_TOOL = ToolSpec(
    name="get_weather",
    description="Current weather for a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    strict=True,
)

TWO_CALLS = calls(call("get_weather", city="Paris"), call("get_time", {"tz": "Europe/Paris", "format": "24h"}))


@pytest.fixture
async def server() -> AsyncIterator[ScriptedOpenAIServer]:
    async with ScriptedOpenAIServer() as scripted_server:
        yield scripted_server


@pytest.fixture
async def provider(server: ScriptedOpenAIServer) -> AsyncIterator[OpenAIProvider]:
    openai_provider = OpenAIProvider(api_key="test", base_url=server.base_url, timeout_s=5.0, max_retries=2)
    yield openai_provider
    await openai_provider.aclose()


def ask(text: str = "hi", *, model: str = "m", **kwargs: object) -> ModelRequest:
    return ModelRequest(model=model, instructions="Be brief.", items=[MessageItem("user", text)], **kwargs)  # type: ignore[arg-type]


async def collect(model: Model, request: ModelRequest) -> tuple[list[str], ModelResponse]:
    deltas: list[str] = []
    responses: list[ModelResponse] = []
    async for chunk in model.stream(request):
        if isinstance(chunk, ModelResponse):
            responses.append(chunk)
        else:
            deltas.append(chunk)
    assert len(responses) == 1, "a model yields exactly one ModelResponse, last"
    return deltas, responses[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- OpenAI model over HTTP --------------------------------------------------------


async def test_text_streams_as_deltas(server: ScriptedOpenAIServer, provider: OpenAIProvider) -> None:
    server.set_script("m", Script.of(say("Hello there, streaming world!")))

    deltas, response = await collect(provider.get_model("m"), ask())

    assert len(deltas) > 1
    assert "".join(deltas) == response.text == "Hello there, streaming world!"
    assert response.tool_calls == ()
    assert response.finish_reason == "stop"
    assert response.usage.requests == 1
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0


async def test_concurrent_tool_calls_are_assembled(server: ScriptedOpenAIServer, provider: OpenAIProvider) -> None:
    server.set_script("m", Script.of(TWO_CALLS))

    deltas, response = await collect(provider.get_model("m"), ask())

    assert deltas == []
    assert response.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in response.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "Europe/Paris", "format": "24h"}),
    ]
    ids = [c.call_id for c in response.tool_calls]
    assert all(ids) and len(set(ids)) == 2


async def test_request_carries_instructions_tools_and_settings(
    server: ScriptedOpenAIServer, provider: OpenAIProvider
) -> None:
    server.set_script("m", Script.of(say("ok")))
    settings = ModelSettings(temperature=0.2, max_tokens=50, tool_choice="get_weather", parallel_tool_calls=False)

    await collect(provider.get_model("m"), ask(tools=[WEATHER_TOOL], settings=settings))

    sent = server.requests[-1]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city.",
                "parameters": WEATHER_TOOL.parameters,
                "strict": True,
            },
        }
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["temperature"] == 0.2
    assert sent["max_completion_tokens"] == 50
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


async def test_request_without_tools_omits_tool_options(
    server: ScriptedOpenAIServer, provider: OpenAIProvider
) -> None:
    server.set_script("m", Script.of(say("ok")))

    await collect(provider.get_model("m"), ask(settings=ModelSettings(tool_choice="auto")))

    sent = server.requests[-1]
    assert not {"tools", "tool_choice", "temperature", "response_format"} & sent.keys()


async def test_output_schema_becomes_json_schema_response_format(
    server: ScriptedOpenAIServer, provider: OpenAIProvider
) -> None:
    server.set_script("m", Script.of(say('{"answer": 42}')))
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}

    _, response = await collect(provider.get_model("m"), ask(output_schema=OutputSchema("Answer", schema)))

    assert json.loads(response.text) == {"answer": 42}
    assert server.requests[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Answer", "schema": schema, "strict": True},
    }


REPLAY_ITEMS: Sequence[Item] = [
    MessageItem("user", "Weather and time in Paris?"),
    MessageItem("assistant", "Let me check."),
    ToolCallItem("call_a", "get_weather", '{"city":"Paris"}'),
    ToolCallItem("call_b", "get_time", '{"tz":"Europe/Paris"}'),
    ToolResultItem("call_a", "get_weather", "sunny"),
    ToolResultItem("call_b", "get_time", "14:00"),
]


async def test_conversation_replay_picks_the_next_turn(
    server: ScriptedOpenAIServer, provider: OpenAIProvider
) -> None:
    server.set_script("m", Script.of(TWO_CALLS, say("Sunny, 14:00."), say("never")))
    request = ModelRequest(model="m", instructions="Be brief.", items=REPLAY_ITEMS)

    _, response = await collect(provider.get_model("m"), request)

    assert response.text == "Sunny, 14:00."
    assert server.requests[-1]["messages"] == to_chat_messages("Be brief.", REPLAY_ITEMS)


@pytest.mark.parametrize("status", [500, 429])
async def test_transient_failures_are_retried_by_the_client(
    server: ScriptedOpenAIServer, provider: OpenAIProvider, status: int
) -> None:
    server.set_script("m", Script.of(say("made it")))
    server.fail_next(2, status, retry_after_s=0.01)

    _, response = await collect(provider.get_model("m"), ask())

    assert response.text == "made it"
    assert len(server.requests) == 3


async def test_retries_use_the_clients_own_backoff(server: ScriptedOpenAIServer, provider: OpenAIProvider) -> None:
    server.set_script("m", Script.of(say("made it")))
    server.fail_next(1)

    _, response = await collect(provider.get_model("m"), ask())

    assert response.text == "made it"
    assert len(server.requests) == 2


async def test_persistent_server_errors_are_unavailable(server: ScriptedOpenAIServer) -> None:
    server.set_script("m", Script.of(say("never")))
    server.fail_next(5, 503, "overloaded", retry_after_s=0.01)
    provider = OpenAIProvider(api_key="test", base_url=server.base_url, max_retries=1)
    try:
        with pytest.raises(ModelUnavailableError) as info:
            await collect(provider.get_model("m"), ask())
    finally:
        await provider.aclose()

    message = str(info.value)
    assert server.base_url in message and "503" in message and "overloaded" in message and "retries" in message
    assert len(server.requests) == 2


async def test_connection_refused_is_unavailable_quickly() -> None:
    """A refused connection is reported on the refusal ("unreachable", not "timed out"): the
    request timeout is an hour, so nothing else could end the call before the guard."""
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    provider = OpenAIProvider(api_key="test", base_url=base_url, max_retries=0, timeout_s=FOREVER_S)
    try:
        with pytest.raises(ModelUnavailableError, match="unreachable") as info:
            await guarded(collect(provider.get_model("m"), ask()), "a request to a refused port")
    finally:
        await provider.aclose()

    assert base_url in str(info.value)


async def test_timeout_is_unavailable(server: ScriptedOpenAIServer) -> None:
    server.set_script("m", Script.of(say("too late", delay_s=2)))
    provider = OpenAIProvider(api_key="test", base_url=server.base_url, timeout_s=0.2, max_retries=0)
    try:
        with pytest.raises(ModelUnavailableError, match="timed out"):
            await collect(provider.get_model("m"), ask())
    finally:
        await provider.aclose()


async def test_authentication_failure_is_a_model_error(
    server: ScriptedOpenAIServer, provider: OpenAIProvider
) -> None:
    server.set_script("m", Script.of(say("never")))
    server.fail_next(1, 401, "Incorrect API key provided")

    with pytest.raises(ModelError, match=r"HTTP 401 \(authentication failed"):
        await collect(provider.get_model("m"), ask())
    assert len(server.requests) == 1, "4xx answers are not retried"


async def test_unknown_model_is_a_model_error(server: ScriptedOpenAIServer, provider: OpenAIProvider) -> None:
    with pytest.raises(ModelError, match="404.*'gpt-nope' does not exist"):
        await collect(provider.get_model("gpt-nope"), ask(model="gpt-nope"))


async def test_exhausted_script_is_a_model_error(server: ScriptedOpenAIServer, provider: OpenAIProvider) -> None:
    server.set_script("m", Script.of(TWO_CALLS))
    request = ModelRequest(model="m", instructions="", items=REPLAY_ITEMS)

    with pytest.raises(ModelError, match="1 turn.*turn 2"):
        await collect(provider.get_model("m"), request)


async def test_cancellation_ends_promptly_and_frees_the_server(server: ScriptedOpenAIServer) -> None:
    """Cancelling a request in flight ends the call and the server's handler, which would
    otherwise sleep for an hour (the scripted delay; the request timeout is an hour too): both
    end before the guard only because of the cancel."""
    server.set_script("m", Script.of(say("too late", delay_s=FOREVER_S)))
    slow = OpenAIProvider(api_key="test", base_url=server.base_url, max_retries=0, timeout_s=FOREVER_S)
    task = asyncio.create_task(collect(slow.get_model("m"), ask()))
    try:
        # The request reached the server, whose handler now sleeps through the delay.
        await eventually(lambda: len(server.requests) == 1, "the request never reached the server")
        assert server.active_requests == 1

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await guarded(task, "the cancelled request")
        await eventually(lambda: server.active_requests == 0, "the server handler was left sleeping")
    finally:
        task.cancel()
        await slow.aclose()


async def test_consumer_can_stop_early_and_keep_using_the_model(
    server: ScriptedOpenAIServer, provider: OpenAIProvider
) -> None:
    server.set_script("m", Script.of(say("one two three four")))
    model = provider.get_model("m")
    for _ in range(3):
        stream = model.stream(ask())
        assert await anext(stream) == "one "
        await stream.aclose()  # type: ignore[attr-defined]

    deltas, _ = await collect(model, ask())
    assert "".join(deltas) == "one two three four"


async def test_server_also_answers_non_streaming_requests(server: ScriptedOpenAIServer) -> None:
    server.set_script("m", Script.of(TWO_CALLS, say("done")))
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="test") as client:
        first = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        tool_calls = first.choices[0].message.tool_calls or []
        assert [tc.function.name for tc in tool_calls] == ["get_weather", "get_time"]  # type: ignore[union-attr]
        assert first.choices[0].finish_reason == "tool_calls"

        second = await client.chat.completions.create(
            model="m", messages=to_chat_messages("", REPLAY_ITEMS)  # type: ignore[arg-type]
        )
        assert second.choices[0].message.content == "done"
        assert second.usage is not None and second.usage.total_tokens > 0
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m"]


# -- scripted models in process ----------------------------------------------------


async def test_scripted_model_matches_the_http_server(
    server: ScriptedOpenAIServer, provider: OpenAIProvider
) -> None:
    script = Script.of(calls(call("get_weather", city="Paris"), text="Checking the weather."), say("Sunny, 14:00."))
    server.set_script("m", script)
    local = ScriptedProvider({"m": script}).get_model("m")

    for items in ([MessageItem("user", "Weather?")], REPLAY_ITEMS):
        request = ModelRequest(model="m", instructions="Be brief.", items=items)
        remote_deltas, remote = await collect(provider.get_model("m"), request)
        local_deltas, response = await collect(local, request)
        assert local_deltas == remote_deltas
        assert (response.text, response.finish_reason, response.usage) == (
            remote.text,
            remote.finish_reason,
            remote.usage,
        )
        assert [(c.name, c.arguments) for c in response.tool_calls] == [
            (c.name, c.arguments) for c in remote.tool_calls
        ]


async def test_scripted_model_call_ids_are_unique_per_call() -> None:
    model = ScriptedModel("m", Script.of(TWO_CALLS))
    ids = set()
    for _ in range(3):
        _, response = await collect(model, ask())
        ids.update(c.call_id for c in response.tool_calls)
    assert len(ids) == 6


async def test_scripted_model_without_delay_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(delay: float) -> None:
        raise AssertionError(f"slept {delay}s")

    monkeypatch.setattr(scripted_module.asyncio, "sleep", no_sleep)
    deltas, response = await collect(ScriptedModel("m", Script.of(say("fast answer"))), ask())
    assert deltas == ["fast ", "answer"] and response.finish_reason == "stop"


async def test_scripted_model_exhausted_script() -> None:
    model = ScriptedModel("m", Script.of(TWO_CALLS))
    with pytest.raises(ModelError, match="turn 2"):
        await collect(model, ModelRequest(model="m", instructions="", items=REPLAY_ITEMS))


async def test_scripted_provider_resolves_names() -> None:
    special, fallback = Script.of(say("special")), Script.of(say("fallback"))
    provider = ScriptedProvider({"special": special}, default=fallback)
    assert provider.get_model("special") is provider.get_model("special")
    _, response = await collect(provider.get_model("anything"), ask())
    assert response.text == "fallback"

    with pytest.raises(ModelError, match="'other'.*special"):
        ScriptedProvider({"special": special}).get_model("other")
    await provider.aclose()


# -- chat format -------------------------------------------------------------------


def test_text_chunks_keep_all_whitespace() -> None:
    text = "  Hello,  world!\nSecond line. "
    assert "".join(text_chunks(text)) == text
    assert text_chunks("a b") == ["a ", "b"]
    assert text_chunks("") == []


def test_to_chat_messages_groups_assistant_text_with_its_tool_calls() -> None:
    messages = to_chat_messages("Be brief.", REPLAY_ITEMS)

    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"Europe/Paris"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "14:00"},
    ]
    assert chat_roles(messages) == ["user", "assistant", "tool", "tool"]


def test_to_chat_messages_edge_cases() -> None:
    items: list[Item] = [
        MessageItem("system", "Context note."),
        MessageItem("user", "go"),
        ToolCallItem("c1", "lookup", "{}"),
        ToolResultItem("c1", "lookup", "boom", is_error=True),
        MessageItem("assistant", ""),
        ToolCallItem("c2", "lookup", "{}"),
        ToolResultItem("c2", "lookup", "ok"),
        MessageItem("assistant", "Done."),
    ]

    messages = to_chat_messages("", items)

    assert messages[0] == {"role": "system", "content": "Context note."}
    assert messages[2]["content"] is None and [c["id"] for c in messages[2]["tool_calls"]] == ["c1"]
    assert messages[4]["content"] is None and [c["id"] for c in messages[4]["tool_calls"]] == ["c2"]
    assert messages[-1] == {"role": "assistant", "content": "Done."}
    assert chat_roles(messages) == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
