"""Guardrails: input, output and tool checks with tripwires (runtime/guardrails.py).

Over the real server (SQLite, Postgres and Redis stores): an input tripwire in parallel mode
cancels the model call in flight and no tool runs; an answer that came first waits for the
verdict; blocking mode checks before the model is called; an output tripwire keeps the run's
earlier whole steps in the session but never the rejected output; a tool guardrail replaces
the result the model reads, or stops a call before its tool runs; the declarative regex,
deny list and classifier guardrails trip. A tripped run ends with ``guardrail_tripped`` then
``run_failed`` (GUARDRAIL_TRIPPED). In process: a run resumed from a checkpoint does not
check its input again, spans and metrics, the codec and declarative specs.

Synchronisation is by events only: guardrail functions wait on what the model endpoint (or
the provider in front of it) signals, never on time.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from agentd.client import AgentdClient
from agentd.server import (
    Agent,
    App,
    ClassifierGuardrail,
    DenyListGuardrail,
    GuardrailResult,
    RegexGuardrail,
    Script,
    ToolGuardrail,
    call,
    calls,
    function_tool,
    input_guardrail,
    output_guardrail,
    say,
    tool_guardrail,
)
from agentd.server.models.base import ModelRequest
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.models.scripted import ScriptedProvider
from agentd.server.runs.codec import decode_checkpoint, decode_payload, encode_checkpoint, encode_payload
from agentd.server.runtime import events as ev
from agentd.server.runtime.errors import AppConfigError
from agentd.server.runtime.guardrails import compile_guardrail, regex_flags
from agentd.server.runtime.run_loop import AgentRunner, Resume, RunInput
from agentd.server.runtime.usage import Usage
from agentd.server.serve import start_server
from agentd.server.sessions.memory import MemorySessionStore
from agentd.server.settings import Settings
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import run_event_pb2
from agentd.v1 import trace_service_pb2 as tpb
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix
from tests.conftest import Harness
from tests.runs_util import collect, kinds, of_kind
from tests.test_history_window import Sink

STORES = ["sqlite", "postgres", "redis"]


# --- the served app -------------------------------------------------------------------------


class WatchedModelServer(ScriptedOpenAIServer):
    """The scripted endpoint, signalling a request that arrived and one whose handler was
    cancelled because its client went away (the run cancelled its model call)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()
        self.abandoned = asyncio.Event()

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.arrived.set()
        try:
            return await super()._chat_completions(request)
        except asyncio.CancelledError:
            self.abandoned.set()
            raise


class World:
    """What the served app's guardrails and tools share with a test."""

    def __init__(self, model: WatchedModelServer) -> None:
        self.model = model
        self.answered = asyncio.Event()  # a call of the main model returned its whole answer to the run
        self.tool_runs: list[str] = []
        self.checks: list[str] = []
        self.requests_at_check: int | None = None


class WatchedProvider:
    """The server's model provider, signalling when a call of the "main" model finished."""

    def __init__(self, inner: Any, world: World) -> None:
        self._inner = inner
        self._world = world

    def get_model(self, name: str) -> Any:
        model, world = self._inner.get_model(name), self._world

        class Watched:
            async def stream(self, request: ModelRequest) -> AsyncIterator[Any]:
                async for chunk in model.stream(request):
                    yield chunk
                if name == "main":
                    world.answered.set()

        return Watched()

    async def aclose(self) -> None:
        await self._inner.aclose()


CARD = RegexGuardrail("card_number", r"\b\d{4}(?:[ -]?\d{4}){3}\b")


def build_app(w: World) -> App:
    @function_tool
    async def lookup(query: str) -> str:
        """Look a record up.

        Args:
            query: What to look up.
        """
        w.tool_runs.append(query)
        return f"secret record for {query}"

    @input_guardrail
    async def trips_mid_call(ctx, text: str) -> GuardrailResult:
        w.checks.append("trips_mid_call")
        await w.model.arrived.wait()  # the first model call is in flight
        return GuardrailResult(True, "forbidden topic", {"topic": "weapons"})

    @input_guardrail
    async def trips_after_answer(ctx, text: str) -> GuardrailResult:
        await w.answered.wait()  # the model's answer (with its tool call) reached the run first...
        await asyncio.to_thread(w.checks.append, "trips_after_answer")  # ... and the verdict takes a while
        return GuardrailResult(True, "too late for its tools")

    @input_guardrail
    async def passes_after_answer(ctx, text: str) -> bool:
        await w.answered.wait()
        await asyncio.to_thread(w.checks.append, "passes_after_answer")
        return False

    @input_guardrail
    def refuses(ctx, text: str) -> GuardrailResult:  # sync: runs on a worker thread
        w.checks.append("refuses")
        return GuardrailResult(True, "not allowed here", {"input_chars": len(text)})

    @input_guardrail
    def allows_first(ctx, text: str) -> bool:
        w.requests_at_check = len(w.model.requests)
        return False

    @output_guardrail
    def no_secrets(ctx, agent: str, output: Any) -> GuardrailResult:
        return GuardrailResult("SECRET" in output, "the answer leaks a secret", {"agent": agent})

    def redact(ctx, tool_name: str, output: str) -> GuardrailResult | None:
        if "secret" in output:
            return GuardrailResult(False, replacement=f"[redacted result of {tool_name} call {ctx.call_id}]")
        return None

    @tool_guardrail(name="no_drop")
    def no_drop(ctx, tool_name: str, arguments: str) -> bool:
        return "DROP" in arguments

    moderator = Agent(name="moderator", model="moderator", instructions="You moderate requests.")
    return App(
        agents=[
            Agent(name="parallel", model="main", tools=[lookup], input_guardrails=[trips_mid_call]),
            Agent(name="late", model="main", tools=[lookup], input_guardrails=[trips_after_answer]),
            Agent(name="waits", model="main", tools=[lookup], input_guardrails=[passes_after_answer]),
            Agent(name="blocking", model="main", tools=[lookup], input_guardrails=[refuses],
                  input_guardrail_mode="blocking"),
            Agent(name="checked-first", model="main", input_guardrails=[allows_first],
                  input_guardrail_mode="blocking"),
            Agent(name="careful", model="main", tools=[lookup], output_guardrails=[no_secrets]),
            Agent(name="redacting", model="main", tools=[lookup],
                  tool_guardrails=[ToolGuardrail("redact", after=redact), no_drop]),
            Agent(name="regex", model="main", input_guardrails=["card_number"]),  # by name, from App.guardrails
            Agent(name="denylist", model="main", output_guardrails=[DenyListGuardrail("profanity", ["darn", "heck"])]),
            Agent(name="classified", model="main", input_guardrail_mode="blocking", input_guardrails=[
                ClassifierGuardrail("moderation", moderator, "Block requests about weapons."),
            ]),
        ],
        guardrails=[CARD],
    )


@dataclass
class Served:
    h: Harness
    w: World

    @property
    def client(self) -> AgentdClient:
        return self.h.client

    @property
    def model(self) -> WatchedModelServer:
        return self.w.model


@asynccontextmanager
async def serve(tmp_path: Path, store: str = "sqlite") -> AsyncIterator[Served]:
    settings: dict[str, Any] = {
        "port": 0, "store": "sqlite", "sqlite_path": tmp_path / "agentd.db", "tool_timeout_s": 5, "shutdown_grace_s": 1,
    }
    namespace = new_prefix() if store == "redis" else new_schema()
    async with AsyncExitStack() as stack:
        if store == "postgres":
            settings.update(store="postgres", postgres_url=POSTGRES_URL, postgres_schema=namespace)
            await stack.enter_async_context(dropped_afterwards(namespace))
        elif store == "redis":
            settings.update(store="redis", redis_url=REDIS_URL, redis_prefix=namespace)
            stack.push_async_callback(delete_prefix, namespace)
        model = await stack.enter_async_context(WatchedModelServer())
        world = World(model)
        inner = OpenAIProvider(api_key="test-key", base_url=model.base_url, timeout_s=10, max_retries=0)
        server = await start_server(Settings(**settings), build_app(world), models=WatchedProvider(inner, world))
        stack.push_async_callback(server.stop, 0)
        client = AgentdClient(server.target)
        stack.push_async_callback(client.close)
        yield Served(Harness(server, client, model), world)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve(tmp_path) as s:
        yield s


def tripped_then_failed(events: list[run_event_pb2.RunEvent]) -> tuple[Any, Any]:
    """The run's guardrail_tripped and run_failed, checked to be its last two events and consistent."""
    assert kinds(events)[-2:] == ["guardrail_tripped", "run_failed"], kinds(events)
    tripped, failed = events[-2].guardrail_tripped, events[-1].run_failed
    assert failed.code == run_event_pb2.RUN_ERROR_CODE_GUARDRAIL_TRIPPED
    assert f"guardrail {tripped.guardrail!r} tripped" in failed.message
    assert kinds(events).count("guardrail_tripped") == 1
    return tripped, failed


# --- input guardrails -------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_an_input_tripwire_in_parallel_mode_cancels_the_model_call_and_no_tool_runs(
    store: str, tmp_path: Path
) -> None:
    async with serve(tmp_path, store) as s:
        # The model would ask for a tool, but only after a long think: the tripwire comes first.
        s.model.set_script("main", Script.of(calls(call("lookup", query="plans"), delay_s=60), say("done")))
        events = await collect(s.client.run("parallel", "how do I build a weapon?", session_id="s1"))
        tripped, failed = tripped_then_failed(events)
        assert (tripped.guardrail, tripped.stage, tripped.agent) == (
            "trips_mid_call", run_event_pb2.GUARDRAIL_STAGE_INPUT, "parallel")
        assert tripped.reason == "forbidden topic" and dict(tripped.output) == {"topic": "weapons"}
        assert "run's input: forbidden topic" in failed.message
        # The model call was under way when the tripwire came, and the run walked away from it.
        await asyncio.wait_for(s.model.abandoned.wait(), 10)
        assert len(s.model.requests) == 1
        assert not {"usage_updated", "tool_called", "tool_output", "message_output"} & set(kinds(events))
        assert s.w.tool_runs == [] and failed.usage.requests == 0
        # Nothing of the run reached the session (no step completed).
        assert await s.client.all_items("s1") == []


@pytest.mark.parametrize("store", STORES)
async def test_an_answer_that_comes_first_waits_for_the_verdict_and_its_tools_never_start(
    store: str, tmp_path: Path
) -> None:
    async with serve(tmp_path, store) as s:
        s.model.set_script("main", Script.of(calls(call("lookup", query="plans"), text="Looking."), say("done")))
        events = await collect(s.client.run("late", "anything", session_id="s1"))
        tripped, failed = tripped_then_failed(events)
        assert tripped.guardrail == "trips_after_answer"
        # The call was made and counts; nothing of its turn happened: no message, no call, no tool.
        assert [u.turn.requests for u in of_kind(events, "usage_updated")] == [1] and failed.usage.requests == 1
        assert not {"tool_called", "tool_output", "message_output"} & set(kinds(events))
        assert s.w.tool_runs == []
        assert await s.client.all_items("s1") == []

        # The same race, passed: the tools run once the verdict is in, and the run completes.
        s.w.answered.clear()
        events = await collect(s.client.run("waits", "anything", session_id="s2"))
        assert kinds(events)[-1] == "run_completed" and s.w.checks == ["trips_after_answer", "passes_after_answer"]
        assert s.w.tool_runs == ["plans"]
        assert len(await s.client.all_items("s2")) == 5  # input, message, call, result, answer


@pytest.mark.parametrize("store", STORES)
async def test_blocking_mode_never_calls_the_model_when_the_input_trips(store: str, tmp_path: Path) -> None:
    async with serve(tmp_path, store) as s:
        s.model.set_script("main", Script.of(calls(call("lookup", query="x")), say("done")))
        events = await collect(s.client.run("blocking", "hello there", session_id="s1"))
        tripped, failed = tripped_then_failed(events)
        assert (tripped.guardrail, tripped.reason) == ("refuses", "not allowed here")
        assert dict(tripped.output) == {"input_chars": 11.0}
        assert s.model.requests == [] and s.w.tool_runs == []
        assert (failed.turns, failed.usage.requests) == (0, 0)
        assert kinds(events) == ["run_started", "guardrail_tripped", "run_failed"]
        assert await s.client.all_items("s1") == []


async def test_blocking_mode_checks_before_the_first_model_call(served: Served) -> None:
    served.model.set_script("main", Script.of(say("hi")))
    events = await collect(served.client.run("checked-first", "hello"))
    assert kinds(events)[-1] == "run_completed"
    assert served.w.requests_at_check == 0 and len(served.model.requests) == 1


# --- output guardrails ------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_an_output_tripwire_keeps_the_tool_steps_but_never_the_rejected_output(
    store: str, tmp_path: Path
) -> None:
    async with serve(tmp_path, store) as s:
        s.model.set_script("main", Script.of(calls(call("lookup", query="vault")), say("The code is SECRET-42.")))
        events = await collect(s.client.run("careful", "what is the vault code?", session_id="s1"))
        tripped, failed = tripped_then_failed(events)
        assert (tripped.guardrail, tripped.stage, tripped.agent) == (
            "no_secrets", run_event_pb2.GUARDRAIL_STAGE_OUTPUT, "careful")
        assert dict(tripped.output) == {"agent": "careful"} and failed.turns == 2
        assert s.w.tool_runs == ["vault"]
        # The whole tool step is stored (with the input); the rejected answer is not.
        items = await s.client.all_items("s1")
        assert [i.WhichOneof("content") for i in items] == ["message", "tool_call", "tool_result"]
        assert items[0].message.text == "what is the vault code?"
        assert all("SECRET" not in (i.message.text if i.HasField("message") else "") for i in items)

        # A clean answer passes: the next run in the session completes and stores it.
        s.model.set_script("main", Script.of(say("I cannot share that.")))
        events = await collect(s.client.run("careful", "please?", session_id="s1"))
        assert kinds(events)[-1] == "run_completed"
        assert (await s.client.all_items("s1"))[-1].message.text == "I cannot share that."


# --- tool guardrails --------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_a_tool_guardrail_replaces_the_result_the_model_reads(store: str, tmp_path: Path) -> None:
    async with serve(tmp_path, store) as s:
        s.model.set_script("main", Script.of(calls(call("lookup", query="salaries")), say("It is redacted.")))
        events = await collect(s.client.run("redacting", "salaries?", session_id="s1"))
        assert kinds(events)[-1] == "run_completed" and "guardrail_tripped" not in kinds(events)
        assert s.w.tool_runs == ["salaries"]  # the tool ran; its result was replaced
        (output,) = of_kind(events, "tool_output")
        call_id = output.item.tool_result.call_id
        replaced = f"[redacted result of lookup call {call_id}]"
        assert output.item.tool_result.output == replaced
        # The model read the replacement, never the original...
        tool_messages = [m for m in s.model.requests[-1]["messages"] if m["role"] == "tool"]
        assert [m["content"] for m in tool_messages] == [replaced]
        assert "secret record" not in json.dumps(s.model.requests)
        # ... and the session stores the replacement too.
        items = await s.client.all_items("s1")
        assert [i.tool_result.output for i in items if i.HasField("tool_result")] == [replaced]


async def test_a_tool_guardrail_before_the_call_stops_it_and_its_tool_never_runs(served: Served) -> None:
    served.model.set_script("main", Script.of(
        calls(call("lookup", query="fine"), call("lookup", query="x; DROP TABLE users")), say("done")))
    events = await collect(served.client.run("redacting", "go", session_id="s1"))
    tripped, failed = tripped_then_failed(events)
    (dropped,) = [c.item.tool_call for c in of_kind(events, "tool_called") if "DROP" in str(c.item.tool_call)]
    assert (tripped.guardrail, tripped.stage, tripped.tool_name, tripped.call_id) == (
        "no_drop", run_event_pb2.GUARDRAIL_STAGE_TOOL_BEFORE, "lookup", dropped.call_id)
    assert "the tool did not run" in failed.message
    assert "x; DROP TABLE users" not in served.w.tool_runs
    # The turn never completed: the session holds none of it.
    assert await served.client.all_items("s1") == []


# --- declarative guardrails -------------------------------------------------------------------


async def test_a_regex_guardrail_named_in_the_app_trips_on_the_input(served: Served) -> None:
    served.model.set_script("main", Script.of(say("ok")))
    events = await collect(served.client.run("regex", "my card is 4111 1111 1111 1111"))
    tripped, _ = tripped_then_failed(events)
    assert tripped.guardrail == "card_number"
    assert dict(tripped.output) == {"pattern": CARD.pattern, "match": "4111 1111 1111 1111"}
    # Parallel mode: the model may have been called, but nothing of its answer was acted on.
    assert "message_output" not in kinds(events)

    events = await collect(served.client.run("regex", "no numbers here"))
    assert kinds(events)[-1] == "run_completed"


async def test_a_deny_list_guardrail_trips_on_a_whole_word_of_the_output(served: Served) -> None:
    served.model.set_script("main", Script.of(say("Well, HECK, that failed.")))
    events = await collect(served.client.run("denylist", "try"))
    tripped, _ = tripped_then_failed(events)
    assert (tripped.guardrail, tripped.stage) == ("profanity", run_event_pb2.GUARDRAIL_STAGE_OUTPUT)
    assert dict(tripped.output) == {"word": "heck"}

    served.model.set_script("main", Script.of(say("Checking the heckler's darning.")))  # not whole words
    events = await collect(served.client.run("denylist", "try"))
    assert kinds(events)[-1] == "run_completed"


async def test_a_classifier_guardrail_asks_its_agents_model_and_its_usage_counts(served: Served) -> None:
    served.model.set_script("moderator", Script.of(say('{"tripwire": true, "reason": "asks about weapons"}')))
    served.model.set_script("main", Script.of(say("never")))
    events = await collect(served.client.run("classified", "how do I build a weapon?"))
    tripped, failed = tripped_then_failed(events)
    assert (tripped.guardrail, tripped.reason) == ("moderation", "asks about weapons")
    assert dict(tripped.output) == {"tripwire": True, "reason": "asks about weapons"}
    # One model call: the classifier's (blocking mode: the agent's own model was never called).
    assert [r["model"] for r in served.model.requests] == ["moderator"]
    (usage,) = of_kind(events, "usage_updated")
    assert (usage.agent, usage.model) == ("moderator", "moderator") and failed.usage.requests == 1
    request = served.model.requests[0]
    assert request["messages"][-1] == {"role": "user", "content": "how do I build a weapon?"}
    system = request["messages"][0]["content"]
    assert "You moderate requests." in system and "Block requests about weapons." in system
    assert request["response_format"]["json_schema"]["schema"]["required"] == ["tripwire", "reason"]

    # A verdict that lets the input through: the run goes on, both calls in its usage.
    served.model.set_script("moderator", Script.of(say('{"tripwire": false, "reason": "fine"}')))
    served.model.set_script("main", Script.of(say("hello")))
    events = await collect(served.client.run("classified", "hi"))
    assert kinds(events)[-1] == "run_completed" and events[-1].run_completed.usage.requests == 2

    # An answer that is no verdict fails closed.
    served.model.set_script("moderator", Script.of(say("sure, whatever")))
    events = await collect(served.client.run("classified", "hi"))
    tripped, _ = tripped_then_failed(events)
    assert tripped.output["error"] == "no verdict"


# --- traces and metrics -----------------------------------------------------------------------


async def test_each_check_is_a_guardrail_span(served: Served) -> None:
    served.model.set_script("main", Script.of(calls(call("lookup", query="salaries")), say("done")))
    events = await collect(served.client.run("redacting", "salaries?"))
    assert kinds(events)[-1] == "run_completed"
    detail = await served.client.get_trace(events[0].trace_id)
    spans = [s for s in detail.spans if s.kind == tpb.SPAN_KIND_GUARDRAIL]
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["no_drop", "redact"]
    assert dict(by_name["no_drop"].attributes) == {
        "guardrail": "no_drop", "stage": "tool_before", "agent": "redacting", "tool_name": "lookup",
        "call_id": by_name["no_drop"].attributes["call_id"], "tripwire": False,
    }
    assert by_name["redact"].attributes["stage"] == "tool_after" and by_name["redact"].attributes["replaced"] is True
    assert all(s.status == tpb.SPAN_STATUS_OK for s in spans)

    served.model.set_script("moderator", Script.of(say('{"tripwire": true, "reason": "no"}')))
    events = await collect(served.client.run("classified", "x"))
    detail = await served.client.get_trace(events[0].trace_id)
    (check,) = [s for s in detail.spans if s.kind == tpb.SPAN_KIND_GUARDRAIL]
    assert check.attributes["tripwire"] is True and check.attributes["stage"] == "input"
    (generation,) = [s for s in detail.spans if s.kind == tpb.SPAN_KIND_GENERATION]
    assert generation.parent_span_id == check.span_id and generation.attributes["purpose"] == "guardrail"


async def test_guardrail_checks_are_counted_in_metrics() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from agentd.server.tracing.metrics import MetricsSpanProcessor
    from agentd.server.tracing.otel import OtelTracer

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    provider = TracerProvider()
    provider.add_span_processor(MetricsSpanProcessor(meters))
    tracer = OtelTracer(InMemoryTraceStore(), provider, capture_content=False)

    @input_guardrail
    def short(ctx, text: str) -> bool:
        return len(text) > 10

    app = App(agents=[Agent(name="main", input_guardrails=[short, RegexGuardrail("digits", r"\d")])])
    runner = AgentRunner(app, ScriptedProvider(default=Script.of(say("ok"))), MemorySessionStore(), tracer)
    for text in ("hi", "hello world, how are you"):
        await runner.run(RunInput(f"run_{len(text)}", "main", text), Sink())

    counts: dict[tuple[Any, ...], int] = {}
    for metric in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
        if metric.name == "agentd.guardrail.checks":
            for point in metric.data.data_points:
                a = point.attributes
                key = (a["agentd.guardrail.name"], a["agentd.guardrail.stage"], a["agentd.guardrail.tripped"],
                       a.get("error.type"))
                counts[key] = point.value
    # The second run: "short" trips; "digits" (still checking or done) passed or was cancelled.
    assert counts[("short", "input", False, None)] == 1 and counts[("short", "input", True, None)] == 1
    assert sum(v for k, v in counts.items() if k[0] == "digits") == 2
    meters.shutdown()


# --- takeover: a resumed run does not check its input again ---------------------------------


class Released(ScriptedProvider):
    """A scripted model that says when a call finished, to order a guardrail after it."""

    def __init__(self, script: Script, log: list[str]) -> None:
        super().__init__(default=script)
        self.log = log
        self.answered = asyncio.Event()

    def get_model(self, name: str) -> Any:
        model, provider = super().get_model(name), self

        class Model:
            async def stream(self, request: ModelRequest) -> AsyncIterator[Any]:
                async for chunk in model.stream(request):
                    yield chunk
                provider.log.append("model answered")
                provider.answered.set()

        return Model()


class LoggingSink(Sink):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def checkpoint(self, checkpoint: Any) -> None:
        self.log.append("checkpoint")
        await super().checkpoint(checkpoint)


async def test_a_resumed_run_does_not_check_its_input_again() -> None:
    log: list[str] = []
    providers: list[Released] = []

    @input_guardrail
    async def slow_check(ctx, text: str) -> bool:
        await providers[-1].answered.wait()  # the model's answer comes first: its turn waits for this
        await asyncio.to_thread(lambda: None)  # a verdict that takes a while (a thread hop)
        log.append("input checked")
        return False

    @function_tool
    def double(n: int) -> int:
        """Double a number."""
        log.append(f"double({n})")
        return n * 2

    app = App(agents=[Agent(name="main", tools=[double], input_guardrails=[slow_check])])
    script = Script.of(calls(call("double", n=2)), say("4"))
    run = RunInput("run_1", "main", "double 2", session_id="s", request_id="r1")

    def runner(store: MemorySessionStore) -> AgentRunner:
        providers.append(Released(script, log))
        return AgentRunner(app, providers[-1], store, InMemoryTraceStore())

    store = MemorySessionStore()
    first = LoggingSink(log)
    await runner(store).run(run, first)
    assert isinstance(first.payloads[-1], ev.RunCompleted)
    # The first turn's checkpoint (and its tool) came only after the input passed.
    assert log[:4] == ["model answered", "input checked", "checkpoint", "double(2)"]
    assert log.count("input checked") == 1

    # Taken over at each checkpoint, by another replica: the input is not checked again.
    for cp in first.checkpoints:
        cp = decode_checkpoint(encode_checkpoint(cp))  # as a run store keeps it
        log.clear()
        resumed = LoggingSink(log)
        await runner(MemorySessionStore()).run(run, resumed, Resume(2, "lease expired", cp))
        assert isinstance(resumed.payloads[-1], ev.RunCompleted), resumed.payloads[-1]
        assert "input checked" not in log

    # Taken over before its first checkpoint: the run starts over, its input check included.
    log.clear()
    again = LoggingSink(log)
    await runner(MemorySessionStore()).run(run, again, Resume(2, "lease expired", None))
    assert isinstance(again.payloads[-1], ev.RunCompleted) and log.count("input checked") == 1


async def test_a_tripped_run_is_never_checkpointed_and_concurrent_trips_report_one() -> None:
    @input_guardrail
    def first(ctx, text: str) -> GuardrailResult:
        return GuardrailResult(True, "one")

    @input_guardrail
    def second(ctx, text: str) -> GuardrailResult:
        return GuardrailResult(True, "two")

    app = App(agents=[Agent(name="main", input_guardrails=[first, second], input_guardrail_mode="blocking")])
    sink = Sink()
    await AgentRunner(app, ScriptedProvider(default=Script.of(say("x"))), MemorySessionStore(),
                      InMemoryTraceStore()).run(RunInput("run_1", "main", "hi"), sink)
    assert sink.checkpoints == []
    tripped = [p for p in sink.payloads if isinstance(p, ev.GuardrailTripped)]
    assert len(tripped) == 1 and tripped[0].guardrail in ("first", "second")
    assert isinstance(sink.payloads[-1], ev.RunFailed) and sink.payloads[-1].code is ev.RunErrorCode.GUARDRAIL_TRIPPED


async def test_a_guardrail_that_raises_fails_the_run_as_internal() -> None:
    @output_guardrail
    def broken(ctx, agent: str, output: Any) -> bool:
        raise RuntimeError("secret detail")

    app = App(agents=[Agent(name="main", output_guardrails=[broken])])
    sink = Sink()
    await AgentRunner(app, ScriptedProvider(default=Script.of(say("x"))), MemorySessionStore(),
                      InMemoryTraceStore()).run(RunInput("run_1", "main", "hi"), sink)
    failed = sink.payloads[-1]
    assert isinstance(failed, ev.RunFailed) and failed.code is ev.RunErrorCode.INTERNAL
    assert "RuntimeError" in failed.message and "secret detail" not in failed.message
    assert not any(isinstance(p, ev.GuardrailTripped) for p in sink.payloads)


# --- codec, specs, configuration --------------------------------------------------------------


def test_guardrail_tripped_round_trips_through_the_run_log() -> None:
    payload = ev.GuardrailTripped("no_drop", "tool_before", "a", "why", {"k": [1, "x"]}, "lookup", "call_1")
    assert decode_payload(encode_payload(payload)) == payload
    failed = ev.RunFailed(ev.RunErrorCode.GUARDRAIL_TRIPPED, "m", Usage(1, 2, 1), 1)
    assert decode_payload(encode_payload(failed)) == failed


def test_declarative_specs_compile_to_guardrails() -> None:
    @dataclass
    class Spec:  # the shape of agents/definition.py's GuardrailSpec, duck-typed
        type: str
        name: str = ""
        ref: str = ""
        pattern: str = ""
        flags: Any = None
        words: tuple[str, ...] = ()
        case_sensitive: bool = False
        agent: str = ""
        instructions: str = ""

    @input_guardrail
    def mine(ctx, text: str) -> bool:
        return False

    registry = {"mine": mine}
    moderator = Agent(name="moderator")
    resolve = {"moderator": moderator}.__getitem__
    assert compile_guardrail(Spec("python", ref="mine"), stage="input", app_guardrails=registry,
                             resolve_agent=resolve) is mine
    regex = compile_guardrail(Spec("regex", name="r", pattern="abc", flags=["IGNORECASE"]), stage="output",
                              app_guardrails=registry, resolve_agent=resolve)
    assert isinstance(regex, RegexGuardrail) and regex._regex.search("xABCx")
    deny = compile_guardrail({"type": "deny_list", "name": "d", "words": ["Foo"], "case_sensitive": True},
                             stage="tool", app_guardrails=registry, resolve_agent=resolve)
    assert isinstance(deny, DenyListGuardrail) and deny.words == ("Foo",)
    classifier = compile_guardrail(Spec("classifier", name="c", agent="moderator", instructions="i"), stage="input",
                                   app_guardrails=registry, resolve_agent=resolve)
    assert isinstance(classifier, ClassifierGuardrail) and classifier.agent is moderator
    assert regex_flags("im") == regex_flags(["i", "MULTILINE"])

    with pytest.raises(AppConfigError, match="names no guardrail"):
        compile_guardrail(Spec("python", ref="nope"), stage="input", app_guardrails=registry, resolve_agent=resolve)
    with pytest.raises(AppConfigError, match="cannot be one of the output guardrails"):
        compile_guardrail(Spec("python", ref="mine"), stage="output", app_guardrails=registry, resolve_agent=resolve)
    with pytest.raises(AppConfigError, match="unknown agent"):
        compile_guardrail(Spec("classifier", name="c", agent="ghost"), stage="input", app_guardrails=registry,
                          resolve_agent=resolve)
    with pytest.raises(AppConfigError, match="invalid pattern"):
        compile_guardrail(Spec("regex", name="r", pattern="("), stage="input", app_guardrails=registry,
                          resolve_agent=resolve)
    with pytest.raises(AppConfigError, match="unknown guardrail type"):
        compile_guardrail(Spec("magic", name="m"), stage="input", app_guardrails=registry, resolve_agent=resolve)


def test_an_app_with_inconsistent_guardrails_does_not_load() -> None:
    @output_guardrail
    def out(ctx, agent: str, output: Any) -> bool:
        return False

    with pytest.raises(AppConfigError, match="cannot be one of the input guardrails"):
        App(agents=[Agent(name="a", input_guardrails=[out])])
    with pytest.raises(AppConfigError, match="not in App.guardrails"):
        App(agents=[Agent(name="a", input_guardrails=["missing"])])
    with pytest.raises(AppConfigError, match="not a guardrail"):
        App(agents=[Agent(name="a", output_guardrails=[lambda ctx, agent, output: False])])
    with pytest.raises(AppConfigError, match="two input guardrails named"):
        App(agents=[Agent(name="a", input_guardrails=[CARD, RegexGuardrail("card_number", "x")])])
    with pytest.raises(AppConfigError, match="which the app does not have"):
        App(agents=[Agent(name="a", input_guardrails=[ClassifierGuardrail("c", "ghost")])])
    with pytest.raises(ValueError, match="input_guardrail_mode"):
        Agent(name="a", input_guardrail_mode="eventually")  # type: ignore[arg-type]
    # A classifier's agent given as an object is served by the app, like a handoff target.
    app = App(agents=[Agent(name="a", input_guardrails=[ClassifierGuardrail("c", Agent(name="judge"))])])
    assert set(app.compiled) == {"a", "judge"}


def test_tool_guardrail_results_are_what_the_loop_reads() -> None:
    assert ToolGuardrail("t", before=lambda *a: True).checks("tool_before")
    assert not ToolGuardrail("t", before=lambda *a: True).checks("tool_after")
    with pytest.raises(ValueError):
        ToolGuardrail("t")
    with pytest.raises(ValueError):
        RegexGuardrail("bad name!", "x")


def test_the_cli_renders_a_tripwire_on_one_line() -> None:
    import io

    from rich.console import Console

    from agentd.cli.render import RunRenderer

    out = io.StringIO()
    renderer = RunRenderer(Console(file=out, width=200, color_system=None))
    event = run_event_pb2.RunEvent(run_id="run_1", sequence=5)
    event.guardrail_tripped.guardrail = "no_drop"
    event.guardrail_tripped.stage = run_event_pb2.GUARDRAIL_STAGE_TOOL_BEFORE
    event.guardrail_tripped.reason = "drops a table"
    event.guardrail_tripped.tool_name = "lookup"
    event.guardrail_tripped.call_id = "call_1"
    renderer.event(event)
    assert out.getvalue() == "  ⛔ guardrail no_drop tripped (tool_before · lookup call call_1): drops a table\n"


async def test_a_catastrophic_regex_fails_closed_within_its_time_budget() -> None:
    from agentd.server.runtime.guardrails import REGEX_TIMEOUT_S, GuardrailSubject, RegexGuardrail

    # Patterns may come from API callers: one that backtracks catastrophically trips, saying
    # why, instead of stalling the server's event loop.
    guard = RegexGuardrail("backtracking", r"(x+x+)+y")
    result = await guard.check(None, None, GuardrailSubject("input", "a", "x" * 5000))  # type: ignore[arg-type]
    assert result.tripwire and "took longer" in result.reason and result.output["timeout_s"] == REGEX_TIMEOUT_S
    assert not (await guard.check(None, None, GuardrailSubject("input", "a", "nothing"))).tripwire  # type: ignore[arg-type]
    assert (await guard.check(None, None, GuardrailSubject("input", "a", "xxy"))).tripwire  # type: ignore[arg-type]
