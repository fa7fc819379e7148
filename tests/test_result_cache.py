"""The result cache over the real server (runs/cached.py): agents that opt in get identical
requests answered from the cache, on every store (memory, SQLite, Postgres, Redis).

A real server on loopback, the real client, and the scripted OpenAI-compatible endpoint,
whose requests are counted per model: a hit makes no model call, its run's log is
``run_started`` + ``run_completed`` marked cached with the same final output, and it is a run
like any other (GetRun, WatchRun, request ids). A miss runs normally; the TTL expires (the
hooks' clock is moved, nothing sleeps); a new agent version makes new entries; runs with a
session, agents that can reach tools with side effects (unless they allow them), failed runs
and servers with the cache off are never cached. Hits and misses are counted in
``agentd.cache.lookups``.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from agentd.client import AgentdClient, AgentdRpcError
from agentd.server import Agent, App, Script, call, calls, function_tool, say
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.runs.cached import CachedRuns
from agentd.server.runtime.agent import ResultCaching
from agentd.server.serve import RunningServer, start_server
from agentd.server.settings import Settings
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import run_event_pb2
from agentd.server.tracing.metrics import CacheMetrics
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix
from tests.runs_util import collect, kinds, of_kind

STORES = ["memory", "sqlite", "postgres", "redis"]
TTL_S = 60.0

# --- the served app ---------------------------------------------------------------------------

lookups_done: list[str] = []


@function_tool
def lookup_price(sku: str) -> str:
    """Look a price up (read only: safe to skip on a cache hit).

    Args:
        sku: The article.
    """
    lookups_done.append(sku)
    return f"{sku}: 12.50 EUR"


@function_tool
def place_order(sku: str) -> str:
    """Place an order (a side effect).

    Args:
        sku: The article.
    """
    return f"ordered {sku}"


quoter = Agent(name="quoter", model="quoter", instructions="Quote prices.", cache=ResultCaching(TTL_S))
structured = Agent(
    name="structured", model="structured", instructions="Quote as JSON.", cache=ResultCaching(TTL_S),
    output_schema={"type": "object", "properties": {"sku": {"type": "string"}, "price": {"type": "number"}},
                   "required": ["sku", "price"], "additionalProperties": False},
)
# Its tool only reads: the owner allows a hit to skip it.
reader = Agent(name="reader", model="reader", instructions="Look prices up.", tools=[lookup_price],
               cache=ResultCaching(TTL_S, allow_tools=True))
orders = Agent(name="orders", model="orders", instructions="Take orders.", tools=[place_order])
# No tools of its own, but it can hand off to an agent with a side effect: never cached.
front = Agent(name="front", model="front", instructions="Route.", handoffs=[orders], cache=ResultCaching(TTL_S))
plain = Agent(name="plain", model="plain", instructions="No caching.")

APP = App(agents=[quoter, structured, reader, orders, front, plain])

SCRIPTS = {
    "quoter": Script.of(say("A-1 costs 12.50 EUR.")),
    "structured": Script.of(say('{"sku": "A-1", "price": 12.5}')),
    "reader": Script.of(calls(call("lookup_price", sku="A-1")), say("A-1: 12.50 EUR, as looked up.")),
    "front": Script.of(say("Nothing to route.")),
    "plain": Script.of(say("Plain answer.")),
    "faq": Script.of(say("The FAQ answer.")),
}


@dataclass
class Served:
    server: RunningServer
    client: AgentdClient
    model: ScriptedOpenAIServer
    reader: InMemoryMetricReader

    @property
    def cache(self) -> CachedRuns:
        assert self.server.result_cache is not None
        return self.server.result_cache

    def calls(self, model: str) -> int:
        """Model requests made for ``model`` so far."""
        return sum(1 for body in self.model.requests if body.get("model") == model)

    def lookups(self) -> dict[tuple[str, str], int]:
        """agentd.cache.lookups by (agent, result)."""
        found: dict[tuple[str, str], int] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "agentd.cache.lookups":
                        for point in metric.data.data_points:
                            attributes = point.attributes or {}
                            found[(str(attributes["gen_ai.agent.name"]), str(attributes["agentd.cache.result"]))] = \
                                int(point.value)
        return found


@asynccontextmanager
async def serve(tmp_path: Path, store: str = "sqlite", **extra: Any) -> AsyncIterator[Served]:
    settings: dict[str, Any] = {"port": 0, "store": store, "sqlite_path": tmp_path / "agentd.db", "tool_timeout_s": 5,
                                "shutdown_grace_s": 1, **extra}
    namespace = new_prefix() if store == "redis" else new_schema()
    async with AsyncExitStack() as stack:
        if store == "postgres":
            settings.update(postgres_url=POSTGRES_URL, postgres_schema=namespace)
            await stack.enter_async_context(dropped_afterwards(namespace))
        elif store == "redis":
            settings.update(redis_url=REDIS_URL, redis_prefix=namespace)
            stack.push_async_callback(delete_prefix, namespace)
        model = await stack.enter_async_context(ScriptedOpenAIServer(dict(SCRIPTS)))
        provider = OpenAIProvider(api_key="test-key", base_url=model.base_url, timeout_s=10, max_retries=0)
        server = await start_server(Settings(**settings), APP, models=provider)
        stack.push_async_callback(server.stop, 0)
        client = AgentdClient(server.target)
        stack.push_async_callback(client.close)
        reader = InMemoryMetricReader()
        if server.result_cache is not None:
            server.result_cache.metrics = CacheMetrics(MeterProvider(metric_readers=[reader]))
        lookups_done.clear()
        yield Served(server, client, model, reader)


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


def final(events: list[run_event_pb2.RunEvent]) -> Any:
    return json_format.MessageToDict(events[-1].run_completed)["finalOutput"]


def assert_cached(events: list[run_event_pb2.RunEvent], produced_by: list[run_event_pb2.RunEvent]) -> None:
    """A hit: two events, both marked cached, ending as the producing run did."""
    assert kinds(events) == ["run_started", "run_completed"], kinds(events)
    started, completed = events[0].run_started, events[1].run_completed
    original = produced_by[-1].run_completed
    assert started.cached and completed.cached
    assert started.history_items == 0 and started.session == ""
    assert (completed.final_output, completed.last_agent, completed.turns) == (
        original.final_output, original.last_agent, original.turns)
    assert completed.usage == original.usage  # what the answer cost when it was made
    assert events[0].trace_id == produced_by[0].trace_id  # the trace of the run that made it
    assert events[0].run_id != produced_by[0].run_id


def assert_executed(events: list[run_event_pb2.RunEvent]) -> None:
    assert kinds(events)[-1] == "run_completed", kinds(events)
    assert not events[0].run_started.cached and not events[-1].run_completed.cached
    assert "usage_updated" in kinds(events)  # a model call was made


# --- hit, miss, TTL ---------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_identical_requests_hit_and_others_miss_until_the_ttl_ends(store: str, tmp_path: Path) -> None:
    async with serve(tmp_path, store) as s:
        context = {"customer": "c-1", "tier": {"level": 2, "flags": ["gold"]}}
        first = await collect(s.client.run("quoter", "price of A-1?", context=context))
        assert_executed(first)
        assert s.calls("quoter") == 1

        # The same request (its context's keys in another order): answered from the cache.
        second = await collect(s.client.run("quoter", "price of A-1?",
                                            context={"tier": {"flags": ["gold"], "level": 2}, "customer": "c-1"}))
        assert_cached(second, first)
        assert final(second) == final(first) == "A-1 costs 12.50 EUR."
        assert s.calls("quoter") == 1  # no model call

        # A cached run is a run: GetRun has its result, WatchRun replays its log from any point.
        run_id = second[0].run_id
        info = await s.client.get_run(run_id)
        assert info.status == apb.RUN_STATUS_COMPLETED and info.completed.cached
        assert info.completed.final_output == second[-1].run_completed.final_output
        watched = [e async for e in s.client.watch_run(run_id)]
        assert [(e.sequence, e.WhichOneof("payload")) for e in watched] == [(1, "run_started"), (2, "run_completed")]
        assert all(e.run_started.cached or e.run_completed.cached for e in watched)

        # Anything else that could change the answer misses.
        for other in (dict(input="price of A-2?"), dict(context={"customer": "c-2"}),
                      dict(context=context, max_turns=3)):
            options = {"context": context, **other}
            events = await collect(s.client.run("quoter", options.pop("input", "price of A-1?"), **options))
            assert_executed(events)
        assert s.calls("quoter") == 4

        # Past the TTL (by the cache's clock) the entry is gone: the run executes, and stores anew.
        s.cache.clock = lambda: time.time() + TTL_S + 1
        expired = await collect(s.client.run("quoter", "price of A-1?", context=context))
        assert_executed(expired)
        assert s.calls("quoter") == 5
        again = await collect(s.client.run("quoter", "price of A-1?", context=context))
        assert_cached(again, expired)
        assert s.calls("quoter") == 5

        counts = s.cache.cache.counts
        assert (counts.hits, counts.misses, counts.stores) == (2, 5, 5)
        assert s.lookups() == {("quoter", "hit"): 2, ("quoter", "miss"): 5}


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_structured_outputs_and_background_runs_are_cached(store: str, tmp_path: Path) -> None:
    async with serve(tmp_path, store) as s:
        first = await collect(s.client.run("structured", "quote A-1"))
        assert final(first) == {"sku": "A-1", "price": 12.5}
        created = await s.client.create_run("structured", "quote A-1", request_id="bg-1")
        watched = [e async for e in s.client.watch_run(created.name.removeprefix("runs/"))]
        assert_cached(watched, first)
        assert final(watched) == {"sku": "A-1", "price": 12.5}
        # The request id names the cached run, as any run's does.
        repeat = await s.client.create_run("structured", "quote A-1", request_id="bg-1")
        assert repeat.name == created.name and repeat.completed.cached
        assert s.calls("structured") == 1


# --- versions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_a_new_agent_version_makes_new_entries(store: str, tmp_path: Path) -> None:
    async with serve(tmp_path, store) as s:
        definition = {"name": "faq", "model": "faq", "instructions": "Answer from the FAQ.", "cache": {"ttl_s": 60}}
        await s.client.agents.CreateAgent(apb.CreateAgentRequest(definition=struct(definition)))
        v1 = await collect(s.client.run("faq", "opening hours?"))
        assert_executed(v1)
        assert v1[0].run_started.agent_version == 1
        assert_cached(await collect(s.client.run("faq", "opening hours?")), v1)
        assert s.calls("faq") == 1

        await s.client.agents.UpdateAgent(apb.UpdateAgentRequest(
            name="agents/faq", definition=struct({**definition, "instructions": "Answer from the new FAQ."})))
        v2 = await collect(s.client.run("faq", "opening hours?"))
        assert_executed(v2)  # version 2: the version 1 entry is not its answer
        assert v2[0].run_started.agent_version == 2 and s.calls("faq") == 2
        assert_cached(await collect(s.client.run("faq", "opening hours?")), v2)
        # A run pinned to version 1 still gets version 1's entry.
        pinned = await collect(s.client.run("agents/faq/versions/1", "opening hours?"))
        assert_cached(pinned, v1)
        assert s.calls("faq") == 2


# --- never cached -----------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_runs_with_a_session_are_never_cached(store: str, tmp_path: Path) -> None:
    async with serve(tmp_path, store) as s:
        for _ in range(2):
            assert_executed(await collect(s.client.run("quoter", "price of A-1?", session_id="alice")))
        assert s.calls("quoter") == 2
        # Not even looked up; and a session-less run after them is a first miss.
        assert s.lookups() == {}
        assert_executed(await collect(s.client.run("quoter", "price of A-1?")))
        assert s.lookups() == {("quoter", "miss"): 1}


async def test_tools_with_side_effects_are_never_skipped_unless_the_agent_allows_it(tmp_path: Path) -> None:
    async with serve(tmp_path, "sqlite") as s:
        # Allowed: the second run neither calls the model nor runs the tool.
        first = await collect(s.client.run("reader", "price of A-1?"))
        assert "tool_output" in kinds(first) and lookups_done == ["A-1"]
        assert_cached(await collect(s.client.run("reader", "price of A-1?")), first)
        assert lookups_done == ["A-1"] and s.calls("reader") == 2  # two turns, once

        # An agent that can hand off to one with a side effect: never cached, never looked up.
        for _ in range(2):
            assert_executed(await collect(s.client.run("front", "order A-1")))
        assert s.calls("front") == 2
        assert ("front", "miss") not in s.lookups() and ("front", "hit") not in s.lookups()

        # An agent without the opt-in is never looked up either.
        for _ in range(2):
            assert_executed(await collect(s.client.run("plain", "hello")))
        assert all(agent != "plain" for agent, _ in s.lookups())


def test_agents_whose_own_tools_break_the_rules_do_not_load() -> None:
    with pytest.raises(ValueError, match="allow_tools"):
        Agent(name="x", tools=[place_order], cache=ResultCaching(60))
    with pytest.raises(ValueError, match="allow_tools"):
        Agent(name="x", hosted_tools=[{"type": "web_search"}], cache=ResultCaching(60))

    @function_tool(caller_executed=True)
    def crm(customer_id: str) -> str:
        """The caller's CRM."""
        return ""

    @function_tool(needs_approval=True)
    def refund(order_id: str) -> str:
        """Refund."""
        return ""

    for tool in (crm, refund):  # runs that wait for the caller: not even with allow_tools
        with pytest.raises(ValueError, match="caller"):
            Agent(name="x", tools=[tool], cache=ResultCaching(60, allow_tools=True))
    for ttl in (0, -1, float("nan"), 31 * 86400):
        with pytest.raises(ValueError, match="ttl_s"):
            ResultCaching(ttl)


async def test_definitions_that_break_the_rules_are_refused(tmp_path: Path) -> None:
    async with serve(tmp_path, "memory") as s:
        caller_tool = {"type": "caller", "name": "crm", "parameters": {"type": "object", "properties": {},
                                                                      "additionalProperties": False}}
        cases = [
            ({"tools": [caller_tool], "cache": {"ttl_s": 60, "allow_tools": True}}, "definition.tools[0]"),
            ({"tools": [{"type": "python", "ref": "lookup_price", "needs_approval": True}],
              "cache": {"ttl_s": 60, "allow_tools": True}}, "definition.tools[0].needs_approval"),
            ({"tools": [{"type": "python", "ref": "lookup_price"}], "cache": {"ttl_s": 60}},
             "definition.cache.allow_tools"),
            ({"cache": {"ttl_s": 0}}, "definition.cache.ttl_s"),
            ({"cache": {"ttl_s": 60, "forever": True}}, "definition.cache.forever"),
        ]
        for extra, field in cases:
            data = {"name": "bad", "model": "faq", **extra}
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.client.agents.CreateAgent(apb.CreateAgentRequest(definition=struct(data)))
            error = AgentdRpcError.of(info.value)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            fields = {v.field for v in error.field_violations}
            assert field in fields, (extra, fields)
        # With allow_tools the app's read-only tool is fine, and the definition shows the opt-in.
        ok = {"name": "ok", "model": "reader", "tools": [{"type": "python", "ref": "lookup_price"}],
              "cache": {"ttl_s": 60, "allow_tools": True}}
        agent = (await s.client.agents.CreateAgent(apb.CreateAgentRequest(definition=struct(ok)))).agent
        assert json_format.MessageToDict(agent.definition)["cache"] == {"ttl_s": 60, "allow_tools": True}


async def test_failed_runs_are_never_cached(tmp_path: Path) -> None:
    async with serve(tmp_path, "memory") as s:
        s.model.fail_next(1, status=400, message="bad request")
        failed = await collect(s.client.run("quoter", "price of A-1?"))
        assert kinds(failed)[-1] == "run_failed"
        completed = await collect(s.client.run("quoter", "price of A-1?"))
        assert_executed(completed)  # the failure left nothing to hit
        assert_cached(await collect(s.client.run("quoter", "price of A-1?")), completed)
        assert s.cache.cache.counts.stores == 1


async def test_a_server_with_the_cache_off_caches_nothing(tmp_path: Path) -> None:
    async with serve(tmp_path, "memory", result_cache=False) as s:
        assert s.server.result_cache is None
        for _ in range(2):
            assert_executed(await collect(s.client.run("quoter", "price of A-1?")))
        assert s.calls("quoter") == 2


async def test_a_cache_that_fails_is_a_miss_not_a_failed_run(tmp_path: Path) -> None:
    async with serve(tmp_path, "sqlite") as s:
        assert_executed(await collect(s.client.run("quoter", "price of A-1?")))
        await s.cache.cache.close()  # every lookup and store now fails
        events = await collect(s.client.run("quoter", "price of A-1?"))
        assert_executed(events)
        assert of_kind(events, "run_completed")[0].final_output.string_value == "A-1 costs 12.50 EUR."
        assert s.lookups() == {("quoter", "miss"): 2}


async def test_a_cache_whose_tables_are_missing_leaves_the_server_running_without_it(tmp_path: Path) -> None:
    # Every other table exists (a server ran once with the cache off); migrations are a deploy step.
    async with serve(tmp_path, "sqlite", result_cache=False):
        pass
    async with serve(tmp_path, "sqlite", auto_migrate=False) as s:
        assert s.server.result_cache is None
        for _ in range(2):
            assert_executed(await collect(s.client.run("quoter", "price of A-1?")))
        assert s.calls("quoter") == 2


def test_the_cached_flag_survives_the_run_log_and_the_contract() -> None:
    from agentd.server.runs.codec import decode_payload, encode_payload
    from agentd.server.runtime import events as ev
    from agentd.server.runtime.usage import Usage
    from agentd.server.services.convert import write_run_event

    for payload in (ev.RunStarted("quoter", "", 0, "r-1", 0, 3, cached=True),
                    ev.RunCompleted({"a": 1}, "quoter", Usage(1, 2, 1), 1, 0.001, cached=True)):
        assert decode_payload(encode_payload(payload)) == payload
        event = run_event_pb2.RunEvent()
        write_run_event(ev.RunEvent("run_1", 1, 0, "t" * 32, payload), event)
        assert getattr(event, event.WhichOneof("payload")).cached
    # Uncached events are logged as before (no flag), and older logs read as uncached.
    plain = ev.RunCompleted("x", "quoter", Usage(), 1, 0.5)
    assert '"cached"' not in encode_payload(plain) and decode_payload(encode_payload(plain)) == plain
    started = ev.RunStarted("quoter", "", 0, "", 0, 0)
    assert '"cached"' not in encode_payload(started) and not decode_payload(encode_payload(started)).cached
