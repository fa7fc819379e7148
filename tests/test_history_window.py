"""The history window over the real server: a run sends the model only its session's newest
items (AGENTD_HISTORY_MAX_ITEMS, or the agent's ``history_limit``), and its ``run_started``
says how many older items were left out (``history_omitted``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from agentd.client import AgentdClient
from agentd.server import Agent, App, Script, call, calls, function_tool, say
from agentd.server.models.base import ModelRequest
from agentd.server.models.scripted import ScriptedProvider
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.serve import start_server
from agentd.server.runs.codec import decode_payload, encode_payload
from agentd.server.runtime import events as ev
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.items import Item, MessageItem
from agentd.server.runtime.run_loop import AgentRunner, Resume, RunInput
from agentd.server.sessions.memory import MemorySessionStore
from agentd.server.settings import Settings
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import item_pb2
from tests.conftest import Harness
from tests.runs_util import assert_well_formed, collect, of_kind


def user(text: str) -> item_pb2.Item:
    return item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text=text))


def assistant(text: str) -> item_pb2.Item:
    return item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_ASSISTANT, text=text))


def tool_call(call_id: str) -> item_pb2.Item:
    return item_pb2.Item(tool_call=item_pb2.ToolCall(call_id=call_id, tool_name="get_weather", raw_arguments="{}"))


def tool_result(call_id: str) -> item_pb2.Item:
    return item_pb2.Item(tool_result=item_pb2.ToolResult(call_id=call_id, tool_name="get_weather", output=call_id))


def conversation(count: int) -> list[item_pb2.Item]:
    """``count`` messages m0, m1... alternating user and assistant."""
    return [(user if i % 2 == 0 else assistant)(f"m{i}") for i in range(count)]


async def add_all(client: AgentdClient, session_id: str, items: list[item_pb2.Item]) -> None:
    await client.create_session(session_id)
    for start in range(0, len(items), 1000):  # AddSessionItems takes at most 1000 per call
        await client.add_items(session_id, items[start : start + 1000])


def sent_texts(request: dict) -> list[str]:
    """The text contents of a chat completion request's non-system messages, in order."""
    return [m.get("content") or "" for m in request["messages"] if m["role"] != "system"]


short = Agent(name="short", model="short", instructions="Keep it short.", history_limit=10)
whole = Agent(name="whole", model="whole", instructions="Read everything.", history_limit=0)


async def start(model: ScriptedOpenAIServer, tmp_path: Path, app: App, **settings: object) -> Harness:
    config = Settings(**{  # type: ignore[arg-type]
        "port": 0, "store": "sqlite", "sqlite_path": tmp_path / "agentd.db", "tool_timeout_s": 5,
        "shutdown_grace_s": 1, **settings,
    })
    provider = OpenAIProvider(api_key="test-key", base_url=model.base_url, timeout_s=10, max_retries=2)
    server = await start_server(config, app, models=provider)
    return Harness(server, AgentdClient(server.target), model)


@pytest.fixture
async def windowed(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start(model_server, tmp_path, App(agents=[short, whole, Agent(name="plain", model="plain")]))
    try:
        yield h
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_a_run_over_a_long_session_sends_only_the_default_window(windowed: Harness) -> None:
    await add_all(windowed.client, "long", conversation(5000))
    windowed.model.set_script("plain", Script.of(say("ok")))
    events = await collect(windowed.client.run("plain", "what now?", session_id="long"))
    assert_well_formed(events)
    assert events[-1].WhichOneof("payload") == "run_completed"
    run_started = events[0].run_started
    assert (run_started.history_items, run_started.history_omitted) == (200, 4800)
    # The model got the 200 newest items and the input, nothing older.
    assert sent_texts(windowed.model.requests[-1]) == [f"m{i}" for i in range(4800, 5000)] + ["what now?"]
    # The session keeps everything: the window only bounds what a run reads.
    items = await windowed.client.all_items("long")
    assert len(items) == 5002 and items[0].message.text == "m0" and items[-1].message.text == "ok"


async def test_the_agent_history_limit_overrides_the_server_window(windowed: Harness) -> None:
    await add_all(windowed.client, "s", conversation(300))
    windowed.model.set_script("short", Script.of(say("short answer")))
    events = await collect(windowed.client.run("short", "go", session_id="s"))
    assert (events[0].run_started.history_items, events[0].run_started.history_omitted) == (10, 290)
    assert sent_texts(windowed.model.requests[-1]) == [f"m{i}" for i in range(290, 300)] + ["go"]

    # history_limit=0: the whole session, however long.
    windowed.model.set_script("whole", Script.of(say("all of it")))
    events = await collect(windowed.client.run("whole", "again", session_id="s"))
    assert (events[0].run_started.history_items, events[0].run_started.history_omitted) == (302, 0)
    assert sent_texts(windowed.model.requests[-1])[:2] == ["m0", "m1"]


async def test_the_server_setting_sets_the_window_and_zero_reads_everything(
    model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    plain = Agent(name="plain", model="plain")
    for setting, expected in [(50, (50, 250)), (0, (300, 0))]:
        h = await start(model_server, tmp_path / str(setting), App(agents=[plain]), history_max_items=setting)
        try:
            await add_all(h.client, "s", conversation(300))
            model_server.set_script("plain", Script.of(say("ok")))
            events = await collect(h.client.run("plain", "hi", session_id="s"))
            started = events[0].run_started
            assert (started.history_items, started.history_omitted) == expected
            assert len(sent_texts(model_server.requests[-1])) == expected[0] + 1
        finally:
            await h.client.close()
            await h.server.stop(grace_s=0)


async def test_a_window_never_starts_with_a_tool_result_whose_call_was_cut_off(windowed: Harness) -> None:
    # ... user, [call a, call b, result a, result b], assistant "done", user, assistant: with a
    # window of 10, the cut falls between the calls; the window starts after the step instead.
    items = [
        *conversation(20),
        user("weather twice?"),
        assistant("checking"),
        tool_call("a"),
        tool_call("b"),
        tool_result("a"),
        tool_result("b"),
        assistant("done"),
        user("thanks"),
        assistant("welcome"),
        user("one more"),
        assistant("sure"),
        user("bye"),
        assistant("bye"),
    ]
    assert [i.WhichOneof("content") for i in items[-10:]][:3] == ["tool_call", "tool_result", "tool_result"]
    await add_all(windowed.client, "cut", items)
    windowed.model.set_script("short", Script.of(say("ok")))
    events = await collect(windowed.client.run("short", "go", session_id="cut"))
    started = events[0].run_started
    # The newest 10 began at call b; call b and both results were dropped as well.
    assert (started.history_items, started.history_omitted) == (7, len(items) - 7)
    messages = [m for m in windowed.model.requests[-1]["messages"] if m["role"] != "system"]
    assert not any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    assert sent_texts(windowed.model.requests[-1]) == [
        "done", "thanks", "welcome", "one more", "sure", "bye", "bye", "go"
    ]


async def test_a_window_starting_at_a_whole_step_keeps_it(windowed: Harness) -> None:
    # The cut falls exactly at the step's first call: the step is whole, nothing more is dropped.
    items = [*conversation(20), tool_call("a"), tool_result("a"), *conversation(8)]
    await add_all(windowed.client, "whole-step", items)
    windowed.model.set_script("short", Script.of(say("ok")))
    events = await collect(windowed.client.run("short", "go", session_id="whole-step"))
    assert (events[0].run_started.history_items, events[0].run_started.history_omitted) == (10, 20)
    messages = [m for m in windowed.model.requests[-1]["messages"] if m["role"] != "system"]
    assert messages[0]["role"] == "assistant" and messages[0]["tool_calls"][0]["id"] == "a"
    assert messages[1]["role"] == "tool" and messages[1]["tool_call_id"] == "a"


async def test_a_run_with_tools_in_a_windowed_session_keeps_its_own_steps(windowed: Harness) -> None:
    # The window bounds the session's history, not the run's own turns (an unknown tool: an error result).
    await add_all(windowed.client, "steps", conversation(100))
    windowed.model.set_script("short", Script.of(calls(call("nope")), say("after the tool")))
    events = await collect(windowed.client.run("short", "use a tool", session_id="steps"))
    assert events[-1].WhichOneof("payload") == "run_completed"
    assert (events[0].run_started.history_items, events[0].run_started.history_omitted) == (10, 90)
    second = windowed.model.requests[-1]["messages"]
    assert [m["role"] for m in second if m["role"] != "system"][-3:] == ["user", "assistant", "tool"]
    assert sent_texts(windowed.model.requests[-1])[:11] == [f"m{i}" for i in range(90, 100)] + ["use a tool"]
    assert len(of_kind(events, "tool_output")) == 1


# --- in process: a resumed run sends the model the window its first execution read --------


class RecordingProvider(ScriptedProvider):
    """A scripted provider that keeps every request's items."""

    def __init__(self, script: Script) -> None:
        super().__init__(default=script)
        self.requests: list[list[Item]] = []

    def get_model(self, name: str) -> Any:
        model, requests = super().get_model(name), self.requests

        class Recording:
            async def stream(self, request: ModelRequest) -> AsyncIterator[Any]:
                requests.append(list(request.items))
                async for chunk in model.stream(request):
                    yield chunk

        return Recording()


@function_tool
def double(n: int) -> int:
    """Double a number."""
    return n * 2


class Sink:
    trace_id = ""
    cancel_reason = ""

    def __init__(self) -> None:
        self.payloads: list[Any] = []
        self.checkpoints: list[Checkpoint] = []

    def emit(self, payload: Any) -> None:
        self.payloads.append(payload)

    async def checkpoint(self, checkpoint: Checkpoint) -> None:
        self.checkpoints.append(checkpoint)

    async def wait_action(self, key: str) -> dict:
        raise AssertionError(key)


async def test_a_resumed_run_reads_the_same_window_from_any_checkpoint() -> None:
    windowed_app = App(agents=[Agent(name="main", tools=[double], history_limit=5)])
    script = Script.of(calls(call("double", n=2)), calls(call("double", n=4)), say("4 and 8"))
    prior: list[Item] = [MessageItem("user" if i % 2 == 0 else "assistant", f"m{i}") for i in range(21)]
    # The window of 5: m16..m20.
    run = RunInput("run_1", "main", "double 2 then 4", session_id="s")

    async def session_with(items: list[Item]) -> MemorySessionStore:
        store = MemorySessionStore()
        await store.create_session("s")
        await store.append_items("s", items)
        return store

    provider = RecordingProvider(script)
    store = await session_with(prior)
    first = Sink()
    await AgentRunner(windowed_app, provider, store, InMemoryTraceStore()).run(run, first)
    started = first.payloads[0]
    assert isinstance(started, ev.RunStarted) and (started.history_items, started.history_omitted) == (5, 16)
    window = prior[16:]
    assert all(request[:6] == [*window, MessageItem("user", run.input)] for request in provider.requests)
    expected_session = await store.read_history("s")
    assert len(first.checkpoints) == 5

    for cp in first.checkpoints:
        for step_saved in (False, True) if cp.step_items else (False,):
            earlier = list(cp.run_items[: len(cp.run_items) - len(cp.step_items) - len(cp.unsaved)])
            fresh = await session_with(prior + earlier)
            if step_saved:
                await fresh.append_items("s", list(cp.step_items), request_id=cp.step_request_id)
            provider = RecordingProvider(script)
            resumed = Sink()
            await AgentRunner(windowed_app, provider, fresh, InMemoryTraceStore()).run(
                run, resumed, Resume(2, "taken over", cp)
            )
            assert isinstance(resumed.payloads[-1], ev.RunCompleted), (cp.turns, step_saved, resumed.payloads[-1])
            assert all(request[:6] == [*window, MessageItem("user", run.input)] for request in provider.requests)
            history = await fresh.read_history("s")
            assert len(history) == len(expected_session) and history[: len(prior) + 1] == expected_session[:22]


def test_run_started_keeps_history_omitted_in_the_log_and_reads_old_logs() -> None:
    started = ev.RunStarted("main", "s", 200, "r1", 4800)
    assert decode_payload(encode_payload(started)) == started
    # A log written before the history window existed: nothing was left out.
    old = '{"t":"run_started","agent":"main","session_id":"s","history_items":3,"request_id":""}'
    assert decode_payload(old) == ev.RunStarted("main", "s", 3, "", 0)
