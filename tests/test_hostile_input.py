"""Hostile and careless input: every bad value is INVALID_ARGUMENT naming its field, on every store.

What is refused (see ``agentd.server.services.validation``): control characters in ids,
NUL in text, Structs deeper than ``MAX_JSON_DEPTH`` or holding NaN/Infinity, timestamps
out of range, page tokens this server did not make for the same listing, and request
ids that could name another tenant's key. What is accepted must never poison anything:
whatever a caller or a model writes into a session (tool arguments of any shape
included), the session, the run's events and its streams stay readable, and the run ends
with its terminal event. No reply echoes more than a short prefix of a caller's value.
"""

from __future__ import annotations

import base64
import json
import logging
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from pydantic import BaseModel

from agentd.client import AgentdClient
from agentd.server import Agent, App, Script, call, calls, say
from agentd.server.auth.api_keys import create_key
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.runtime.items import MAX_JSON_DEPTH
from agentd.server.serve import start_server
from agentd.server.services.validation import encode_page_token, quote
from agentd.server.settings import Settings
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import item_pb2
from agentd.v1 import run_event_pb2
from agentd.v1 import session_service_pb2 as spb
from agentd.v1 import trace_service_pb2 as tpb
from tests import apps
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix
from tests.conftest import Harness
from tests.runs_util import collect, kinds, outcome, stream_outcome

STORES = ["sqlite", "postgres", "redis"]
SCOPES = ["agents:read", "runs:read", "runs:write", "sessions:read", "sessions:write", "traces:read"]


# -- servers -----------------------------------------------------------------------------


class Structured(BaseModel):
    score: float
    data: dict[str, Any] = {}


structured = Agent(name="structured", model="structured", instructions="Answer as JSON.", output_type=Structured)
hostile_app = App(agents=[*apps.app.agents, structured])


@asynccontextmanager
async def serve(store: str, model_server, tmp_path: Path, **settings: Any) -> AsyncIterator[Harness]:
    """A real server on ``store`` (sqlite, postgres or redis: its own schema or prefix)."""
    config: dict[str, Any] = dict(
        port=0, store="sqlite", sqlite_path=tmp_path / "agentd.db", tool_timeout_s=5, shutdown_grace_s=1
    )
    async with AsyncExitStack() as stack:
        if store == "postgres":
            schema = new_schema()
            await stack.enter_async_context(dropped_afterwards(schema))
            config.update(store="postgres", postgres_url=POSTGRES_URL, postgres_schema=schema)
        elif store == "redis":
            prefix = new_prefix()
            stack.push_async_callback(delete_prefix, prefix)
            config.update(store="redis", redis_url=REDIS_URL, redis_prefix=prefix)
        provider = OpenAIProvider(api_key="test-key", base_url=model_server.base_url, timeout_s=10, max_retries=2)
        server = await start_server(Settings(**{**config, **settings}), hostile_app, models=provider)
        stack.push_async_callback(server.stop, 0)
        client = AgentdClient(server.target)
        stack.push_async_callback(client.close)
        yield Harness(server, client, model_server)


@pytest.fixture(autouse=True)
def no_server_tracebacks(caplog: pytest.LogCaptureFixture):
    """Whatever a test sends, the in-process server logs no unexpected exception."""
    caplog.set_level(logging.WARNING)
    yield
    tracebacks = [
        f"{r.name}: {r.getMessage()[:200]}" for r in caplog.get_records("setup") + caplog.get_records("call")
        if r.levelno >= logging.ERROR and (r.exc_info or "Unexpected" in r.getMessage())
        and r.name.startswith(("agentd", "grpc"))
    ]
    assert not tracebacks, tracebacks


# -- helpers -----------------------------------------------------------------------------


def nested_dict(depth: int) -> dict[str, Any]:
    """``depth`` levels of objects: {"a": {"a": ... {"leaf": 1}}}."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def nested_json(depth: int) -> str:
    return '{"a":' * (depth - 1) + '{"leaf":1}' + "}" * (depth - 1)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def nested_lists(depth: int) -> struct_pb2.Struct:
    """A Struct holding ``depth - 1`` nested lists (``depth`` levels counting the Struct)."""
    inner = struct_pb2.ListValue()
    current = inner
    for _ in range(depth - 2):
        current = current.values.add().list_value
    message = struct_pb2.Struct()
    message.fields["x"].list_value.CopyFrom(inner)
    return message


def number_struct(number: float) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.fields["x"].number_value = number
    return message


def raw_token(text: str) -> str:
    """A page token as a forger would make it: the documented-looking shape, no checksum."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def text_item(text: str = "hello") -> item_pb2.Item:
    return item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text=text))


def start(**fields: Any) -> apb.StartRun:
    return apb.StartRun(**{"agent": "agents/assistant", "input": "hi", **fields})


async def expect_invalid(call_or_stream: Any, field: str) -> str:
    """INVALID_ARGUMENT whose message starts with ``field``; works for unary calls and streams."""
    if hasattr(call_or_stream, "__aiter__") and not hasattr(call_or_stream, "__await__"):
        code, details = await stream_outcome(call_or_stream)
    else:
        code, details = await outcome(call_or_stream)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)
    assert details.startswith((f"{field}:", f"{field} ", f"{field}[")), (field, details)
    return details


async def all_events_parse(client: AgentdClient, run_id: str) -> list[run_event_pb2.RunEvent]:
    """The run's events through WatchRun (every reply parsed by the Python client), well formed."""
    events = [r.event async for r in client.agents.WatchRun(apb.WatchRunRequest(name=f"runs/{run_id}"))]
    assert kinds(events)[-1] in ("run_completed", "run_failed", "run_cancelled")
    return events


# -- 1. control characters and NUL ------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_nul_in_ids_and_text_is_invalid_argument_naming_the_field(store, model_server, tmp_path):
    """On Postgres a NUL reached the database: UNKNOWN (or UNAVAILABLE for traces), a traceback each."""
    async with serve(store, model_server, tmp_path) as h:
        c, A, S, T = h.client, h.client.agents, h.client.sessions, h.client.traces
        await c.create_session("s1")
        nul = "a\x00b"
        cases = [
            # ids and names
            (A.CreateRun(apb.CreateRunRequest(start=start(request_id=nul))), "start.request_id"),
            (A.StreamRun(apb.StreamRunRequest(start=start(request_id=nul))), "start.request_id"),
            (A.CreateRun(apb.CreateRunRequest(start=start(agent=nul))), "start.agent"),
            (A.CreateRun(apb.CreateRunRequest(start=start(trace=apb.TraceOptions(workflow_name=nul)))),
             "start.trace.workflow_name"),
            (A.CreateRun(apb.CreateRunRequest(start=start(trace=apb.TraceOptions(group_id=nul)))),
             "start.trace.group_id"),
            (A.CreateRun(apb.CreateRunRequest(start=start(trace=apb.TraceOptions(metadata={nul: "v"})))),
             "start.trace.metadata"),
            (A.GetAgent(apb.GetAgentRequest(name=f"agents/{nul}")), "name"),
            (A.GetRun(apb.GetRunRequest(name=f"runs/{nul}")), "name"),
            (A.CancelRun(apb.CancelRunRequest(name=f"runs/{nul}")), "name"),
            (A.WatchRun(apb.WatchRunRequest(name=f"runs/{nul}")), "name"),
            (A.SubmitToolOutputs(apb.SubmitToolOutputsRequest(
                name=f"runs/{nul}", outputs=[apb.ToolOutputSubmission(call_id="c")])), "name"),
            (A.SubmitToolOutputs(apb.SubmitToolOutputsRequest(
                name="runs/run_x", outputs=[apb.ToolOutputSubmission(call_id=nul)])), "outputs[0].call_id"),
            (A.ApproveToolCall(apb.ApproveToolCallRequest(
                name="runs/run_x", approval=apb.ToolApproval(call_id=nul))), "approval.call_id"),
            (A.ListRuns(apb.ListRunsRequest(session=f"sessions/{nul}")), "session"),
            (S.CreateSession(spb.CreateSessionRequest(session_id=nul)), "session_id"),
            (S.CreateSession(spb.CreateSessionRequest(request_id=nul)), "request_id"),
            (S.CreateSession(spb.CreateSessionRequest(session=spb.Session(metadata={nul: "v"}))),
             "session.metadata"),
            (S.GetSession(spb.GetSessionRequest(name=f"sessions/{nul}")), "name"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[text_item()],
                                                          request_id=nul)), "request_id"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[
                item_pb2.Item(agent=nul, message=item_pb2.Message(role=item_pb2.ROLE_USER, text="x"))])),
             "items[0].agent"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[
                item_pb2.Item(tool_call=item_pb2.ToolCall(call_id=nul, tool_name="t"))])),
             "items[0].tool_call.call_id"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[
                item_pb2.Item(tool_call=item_pb2.ToolCall(call_id="c", tool_name=nul))])),
             "items[0].tool_call.tool_name"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[
                item_pb2.Item(tool_result=item_pb2.ToolResult(call_id=nul, tool_name="t"))])),
             "items[0].tool_result.call_id"),
            (T.GetTrace(tpb.GetTraceRequest(name=f"traces/{nul}")), "name"),
            (T.ListTraces(tpb.ListTracesRequest(workflow_name=nul)), "workflow_name"),
            (T.ListTraces(tpb.ListTracesRequest(group_id=nul)), "group_id"),
            (T.ListTraces(tpb.ListTracesRequest(agent=nul)), "agent"),
            (A.ListAgents(apb.ListAgentsRequest(page_token=encode_page_token("agents", nul))), "page_token"),
            # text
            (A.CreateRun(apb.CreateRunRequest(start=start(input=nul))), "start.input"),
            (A.StreamRun(apb.StreamRunRequest(start=start(input=nul, session="sessions/s2"))), "start.input"),
            (A.CreateRun(apb.CreateRunRequest(start=start(trace=apb.TraceOptions(metadata={"k": nul})))),
             "start.trace.metadata"),
            (A.CreateRun(apb.CreateRunRequest(start=start(context=struct({"user": nul})))), "start.context"),
            (A.CreateRun(apb.CreateRunRequest(start=start(context=struct({nul: "x"})))), "start.context"),
            (A.CancelRun(apb.CancelRunRequest(name="runs/run_x", reason=nul)), "reason"),
            (A.SubmitToolOutputs(apb.SubmitToolOutputsRequest(
                name="runs/run_x", outputs=[apb.ToolOutputSubmission(call_id="c", output=nul)])),
             "outputs[0].output"),
            (A.ApproveToolCall(apb.ApproveToolCallRequest(
                name="runs/run_x", approval=apb.ToolApproval(call_id="c", reason=nul))), "approval.reason"),
            (S.CreateSession(spb.CreateSessionRequest(session=spb.Session(metadata={"k": nul}))),
             "session.metadata"),
            (S.CreateSession(spb.CreateSessionRequest(session=spb.Session(state=struct({"k": nul})))),
             "session.state"),
            (S.UpdateSession(spb.UpdateSessionRequest(session=spb.Session(
                name="sessions/s1", state=struct({"k": [nul]})))), "session.state"),
            (S.UpdateSession(spb.UpdateSessionRequest(session=spb.Session(
                name="sessions/s1", metadata={"k": nul}))), "session.metadata"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[text_item(nul)])),
             "items[0].message.text"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[item_pb2.Item(
                tool_call=item_pb2.ToolCall(call_id="c", tool_name="t", raw_arguments=nul))])),
             "items[0].tool_call.raw_arguments"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[item_pb2.Item(
                tool_call=item_pb2.ToolCall(call_id="c", tool_name="t", arguments=struct({"k": nul})))])),
             "items[0].tool_call.arguments"),
            (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[item_pb2.Item(
                tool_result=item_pb2.ToolResult(call_id="c", tool_name="t", output=nul))])),
             "items[0].tool_result.output"),
        ]
        for call_, field in cases:
            details = await expect_invalid(call_, field)
            assert "U+0000" in details or "\\x00" in details, details
        # Nothing of a refused request was stored.
        assert (await c.get_session("s1")).item_count == 0
        assert [s.name for s in (await c.list_sessions()).sessions] == ["sessions/s1"]
        assert not (await c.list_runs("s1")).runs


async def test_other_control_characters_in_ids_are_refused_but_text_keeps_them(model_server, tmp_path):
    async with serve("sqlite", model_server, tmp_path) as h:
        A = h.client.agents
        for bad in ("line\nbreak", "tab\there", "esc\x1b[31m", "del\x7f", "c1\x85"):
            details = await expect_invalid(A.CreateRun(apb.CreateRunRequest(start=start(request_id=bad))),
                                           "start.request_id")
            assert "control characters" in details
            await expect_invalid(A.GetRun(apb.GetRunRequest(name=f"runs/{bad}")), "name")
        # Text may hold newlines, tabs and any Unicode.
        h.model.set_script("assistant", Script.of(say("ok")))
        assert await h.client.run_final_output("assistant", "two\nlines\tand ünïcödé ✓") == "ok"


async def test_over_long_ids_are_refused(model_server, tmp_path):
    async with serve("postgres", model_server, tmp_path) as h:
        await h.client.create_session("s1")
        long = "r" * 5000  # past Postgres' btree row limit for the request-id key: it failed with UNKNOWN
        await expect_invalid(h.client.sessions.AddSessionItems(spb.AddSessionItemsRequest(
            parent="sessions/s1", items=[text_item()], request_id=long)), "request_id")
        await expect_invalid(h.client.agents.CreateRun(apb.CreateRunRequest(start=start(request_id=long))),
                             "start.request_id")
        await expect_invalid(h.client.agents.SubmitToolOutputs(apb.SubmitToolOutputsRequest(
            name="runs/run_x", outputs=[apb.ToolOutputSubmission(call_id=long)])), "outputs[0].call_id")
        await expect_invalid(h.client.traces.GetTrace(tpb.GetTraceRequest(name=long)), "name")


async def test_a_request_id_cannot_name_another_tenants_run(model_server, tmp_path):
    """The default tenant's keys are stored unqualified and another tenant's as 'tenant/key': a
    default-tenant request id 'acme/r-1' named acme's run, and CreateRun handed it over."""
    keys = tmp_path / "keys.json"
    _, key_acme = create_key(keys, tenant="acme", subject="ann", scopes=SCOPES)
    _, key_default = create_key(keys, tenant="default", subject="dan", scopes=SCOPES)
    model_server.set_script("assistant", Script.of(say("acme's secret")))
    async with serve("sqlite", model_server, tmp_path, api_keys_file=keys) as h, \
            AgentdClient(h.target, token=key_acme) as acme, AgentdClient(h.target, token=key_default) as other:
        mine = await acme.agents.CreateRun(apb.CreateRunRequest(start=start(request_id="r-1")))
        await all_events_parse(acme, mine.run.name.removeprefix("runs/"))
        await expect_invalid(other.agents.CreateRun(apb.CreateRunRequest(start=start(request_id="acme/r-1"))),
                             "start.request_id")
        await expect_invalid(other.agents.StreamRun(apb.StreamRunRequest(start=start(request_id="acme/r-1"))),
                             "start.request_id")


# -- 2. Struct nesting and non-finite numbers --------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_structs_past_the_depth_limit_or_with_nan_are_invalid_argument(store, model_server, tmp_path):
    """33-deep objects were stored and then unreadable by the Python client; NaN/Inf answered UNKNOWN."""
    too_deep = struct(nested_dict(MAX_JSON_DEPTH + 1))
    bad_structs = {
        "too deep": too_deep,
        "deep lists": nested_lists(45),  # under the decoder's limit, over ours
        "nan": number_struct(float("nan")),
        "inf": number_struct(float("inf")),
        "-inf": number_struct(float("-inf")),
    }
    async with serve(store, model_server, tmp_path) as h:
        A, S = h.client.agents, h.client.sessions
        await h.client.create_session("s1")
        for name, bad in bad_structs.items():
            problem = "nests deeper than" if "deep" in name else "NaN or Infinity"
            for call_, field in [
                (A.CreateRun(apb.CreateRunRequest(start=start(context=bad))), "start.context"),
                (A.StreamRun(apb.StreamRunRequest(start=start(context=bad))), "start.context"),
                (S.CreateSession(spb.CreateSessionRequest(session_id="s2", session=spb.Session(state=bad))),
                 "session.state"),
                (S.UpdateSession(spb.UpdateSessionRequest(session=spb.Session(name="sessions/s1", state=bad))),
                 "session.state"),
                (S.AddSessionItems(spb.AddSessionItemsRequest(parent="sessions/s1", items=[item_pb2.Item(
                    tool_call=item_pb2.ToolCall(call_id="c", tool_name="t", arguments=bad))])),
                 "items[0].tool_call.arguments"),
            ]:
                details = await expect_invalid(call_, field)
                assert problem in details, (name, details)
        assert (await h.client.get_session("s1")).item_count == 0

        # At the limit everything is accepted, and every reply holding it parses.
        deepest = nested_dict(MAX_JSON_DEPTH)
        created = await S.CreateSession(spb.CreateSessionRequest(session_id="s3", session=spb.Session(
            state=struct(deepest))))
        assert created.session.state == struct(deepest)
        assert (await h.client.get_session("s3")).state == struct(deepest)
        added = await h.client.add_items("s3", [item_pb2.Item(tool_call=item_pb2.ToolCall(
            call_id="c", tool_name="get_weather", arguments=struct(deepest)))])
        assert added[0].tool_call.arguments == struct(deepest)
        assert (await h.client.list_items("s3")).items[0].tool_call.arguments == struct(deepest)
        h.model.set_script("assistant", Script.of(calls(call("get_weather", nested_json(MAX_JSON_DEPTH))), say("ok")))
        events = await collect(h.client.run("assistant", "hi", context=deepest))
        called = [e.tool_called.item.tool_call for e in events if e.HasField("tool_called")]
        assert called[0].arguments == struct(deepest) and not called[0].raw_arguments
        assert kinds(events)[-1] == "run_completed"


# -- 3. ListTraces times and forged page tokens ------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_list_traces_times_out_of_range_are_invalid_argument(store, model_server, tmp_path):
    """Each answered UNKNOWN ("Timestamp is not valid") with a traceback."""
    T = timestamp_pb2.Timestamp
    async with serve(store, model_server, tmp_path) as h:
        for bad in (T(seconds=1, nanos=-1), T(seconds=1, nanos=1_000_000_000), T(seconds=2**62),
                    T(seconds=-(2**62)), T(seconds=-1)):
            await expect_invalid(h.client.traces.ListTraces(tpb.ListTracesRequest(start_time_from=bad)),
                                 "start_time_from")
            await expect_invalid(h.client.traces.ListTraces(tpb.ListTracesRequest(start_time_to=bad)),
                                 "start_time_to")
        # The far future (past what int64 nanoseconds hold) is a valid bound.
        h.model.set_script("assistant", Script.of(say("ok")))
        await h.client.run_final_output("assistant", "hi")
        listed = await h.client.traces.ListTraces(tpb.ListTracesRequest(
            start_time_from=T(seconds=0), start_time_to=T(seconds=253_402_300_799)))
        assert len(listed.traces) == 1


@pytest.mark.parametrize("store", STORES)
async def test_forged_page_tokens_are_invalid_argument_on_every_list(store, model_server, tmp_path):
    """runs|garbage was UNKNOWN on Redis; huge positions UNKNOWN on SQLite and Postgres (UNAVAILABLE for
    traces); another session's run id silently gave an empty page."""
    async with serve(store, model_server, tmp_path) as h:
        c = h.client
        h.model.set_script("assistant", Script.of(say("ok")))
        for session in ("a", "b"):
            for _ in range(2):
                await c.run_final_output("assistant", "hi", session_id=session)
        # Real tokens of session a's listings, for misuse below.
        runs_a = await c.list_runs("a", page_size=1)
        items_a = await c.list_items("a", page_size=1)
        assert runs_a.next_page_token and items_a.next_page_token
        other_run_id = (await c.list_runs("b")).runs[0].name.removeprefix("runs/")
        traces = await c.list_traces(page_size=1)
        assert traces.next_page_token
        sessions = await c.list_sessions(page_size=1)
        agents = await c.agents.ListAgents(apb.ListAgentsRequest(page_size=1))

        lists = {
            "ListRuns": lambda t: c.agents.ListRuns(apb.ListRunsRequest(session="sessions/b", page_token=t)),
            "ListSessionItems": lambda t: c.sessions.ListSessionItems(spb.ListSessionItemsRequest(
                parent="sessions/b", page_token=t)),
            "ListSessionItems newest": lambda t: c.sessions.ListSessionItems(spb.ListSessionItemsRequest(
                parent="sessions/a", page_token=t, order=spb.ITEM_ORDER_NEWEST_FIRST)),
            "ListSessions": lambda t: c.sessions.ListSessions(spb.ListSessionsRequest(page_token=t)),
            "ListTraces": lambda t: c.traces.ListTraces(tpb.ListTracesRequest(page_token=t)),
            "ListAgents": lambda t: c.agents.ListAgents(apb.ListAgentsRequest(page_token=t)),
        }
        forged = [
            raw_token("runs|garbage"), raw_token(f"runs|{other_run_id}"), raw_token("runs|1.5|run_x"),
            raw_token(f"traces|{2**70}:x"), raw_token(f"traces|{2**63}:" + "0" * 32), raw_token("traces|-1:x"),
            raw_token(f"items-oldest|{2**70}"), raw_token("items-oldest|-5"), raw_token(f"items-newest|{2**64}"),
            raw_token("sessions|x"), raw_token("agents|\x00"), "garbage", "!!!", "a" * 5000,
            runs_a.next_page_token,  # session a's token on session b
            items_a.next_page_token,  # a's oldest-first token: b's listing, or a's newest-first one
            sessions.next_page_token, traces.next_page_token, agents.next_page_token,  # wrong kinds
        ]
        own = {"ListRuns": None, "ListSessionItems": None, "ListSessionItems newest": None,
               "ListSessions": sessions.next_page_token, "ListTraces": traces.next_page_token,
               "ListAgents": agents.next_page_token}
        for name, list_call in lists.items():
            for token in forged:
                if token == own[name]:
                    continue
                await expect_invalid(list_call(token), "page_token")
        # A changed filter does not continue a trace listing either.
        await expect_invalid(c.traces.ListTraces(tpb.ListTracesRequest(
            page_token=traces.next_page_token, agent="assistant")), "page_token")
        # The real tokens continue their own listings.
        assert len((await c.list_runs("a", page_token=runs_a.next_page_token)).runs) == 1
        assert (await c.list_items("a", page_size=1, page_token=items_a.next_page_token)).items
        assert (await c.list_traces(page_size=1, page_token=traces.next_page_token)).traces
        assert (await c.list_sessions(page_size=1, page_token=sessions.next_page_token)).sessions


# -- 4. data poisoning -------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_items_with_any_raw_arguments_never_poison_a_session(store, model_server, tmp_path):
    """'['*100000 answered UNKNOWN (RecursionError) *and was stored*: every later ListSessionItems failed.

    raw_arguments is the model's text verbatim: it is stored as is, and shown as a Struct
    only when it is a JSON object within the limits."""
    poison = {
        "deep brackets": "[" * 100_000,
        "deep object": nested_json(40),
        "just past the limit": nested_json(MAX_JSON_DEPTH + 1),
        "nan": '{"x": NaN}',
        "huge number": '{"x": 1e999}',
        "huge integer": '{"x": ' + "9" * 5000 + "}",
        "not an object": "[1, 2]",
    }
    async with serve(store, model_server, tmp_path) as h:
        c = h.client
        await c.create_session("s")
        items = [item_pb2.Item(tool_call=item_pb2.ToolCall(call_id=f"c{i}", tool_name="get_weather",
                                                            raw_arguments=text))
                 for i, text in enumerate(poison.values())]
        items += [item_pb2.Item(tool_result=item_pb2.ToolResult(call_id=f"c{i}", tool_name="get_weather",
                                                                output="Error: bad arguments", is_error=True))
                  for i in range(len(poison))]
        added = await c.add_items("s", items)
        for item, text in zip(added, poison.values()):
            assert item.tool_call.raw_arguments == text and not item.tool_call.arguments.fields
        listed = (await c.list_items("s")).items
        assert [i.tool_call.raw_arguments for i in listed[: len(poison)]] == list(poison.values())
        assert (await c.list_items("s", newest_first=True)).items
        # A run on the session reads it all as history, replays it to the model, and completes.
        h.model.set_script("assistant", Script.of(say("still fine")))
        events = await collect(c.run("assistant", "and now?", session_id="s"))
        assert events[-1].run_completed.final_output.string_value == "still fine"
        assert len((await c.list_items("s")).items) == len(items) + 2
        assert (await c.pop_item("s")) is not None


@pytest.mark.parametrize("store", STORES)
async def test_a_model_emitting_hostile_tool_arguments_gets_an_error_output_and_the_run_goes_on(
    store, model_server, tmp_path
):
    """'['*100000 failed the run with "internal error: RecursionError"; a 40-deep object completed a
    run whose every stream, WatchRun and session listing then failed to parse."""
    hostile = {
        "deep brackets": "[" * 100_000,
        "deep object": nested_json(40),
        "deep list in an object": '{"city": ' + "[" * 990 + "]" * 990 + "}",
        "huge integer": '{"city": ' + "9" * 5000 + "}",
        "nan": '{"city": NaN}',
    }
    async with serve(store, model_server, tmp_path) as h:
        c = h.client
        for n, (name, arguments) in enumerate(hostile.items()):
            h.model.set_script("assistant", Script.of(calls(call("get_weather", arguments)), say("recovered")))
            session = f"s{n}"
            events = await collect(c.run("assistant", "weather?", session_id=session))
            assert events[-1].run_completed.final_output.string_value == "recovered", (name, kinds(events))
            called = [e.tool_called.item.tool_call for e in events if e.HasField("tool_called")]
            assert called[0].raw_arguments == arguments and not called[0].arguments.fields, name
            output = [e.tool_output.item.tool_result for e in events if e.HasField("tool_output")][0]
            assert output.is_error and output.output.startswith("Error: "), (name, output.output)
            run_id = events[0].run_id
            assert len(await all_events_parse(c, run_id)) == len(events)
            assert (await c.get_run(run_id)).status == apb.RUN_STATUS_COMPLETED
            stored = (await c.list_items(session)).items
            assert [i.WhichOneof("content") for i in stored] == ["message", "tool_call", "tool_result", "message"]
            assert stored[1].tool_call.raw_arguments == arguments
            assert (await c.get_trace(events[0].trace_id)).spans


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_final_output_json_cannot_carry_fails_the_run_with_invalid_output(store, model_server, tmp_path):
    """A structured output nested past the limit (or with NaN) completed a run every client failed to read."""
    async with serve(store, model_server, tmp_path) as h:
        for text, problem in [
            (json.dumps({"score": 1, "data": nested_dict(40)}), "nests deeper than"),
            ('{"score": NaN}', "cannot represent"),
            ('{"score": 1e999}', "cannot represent"),
        ]:
            h.model.set_script("structured", Script.of(say(text)))
            events = await collect(h.client.run("structured", "judge", session_id="s"))
            failed = events[-1].run_failed
            assert failed.code == run_event_pb2.RUN_ERROR_CODE_INVALID_OUTPUT and problem in failed.message, failed
            await all_events_parse(h.client, events[0].run_id)
            assert (await h.client.get_run(events[0].run_id)).status == apb.RUN_STATUS_FAILED
        h.model.set_script("structured", Script.of(say(json.dumps({"score": 2, "data": nested_dict(10)}))))
        assert (await h.client.run_final_output("structured", "judge"))["score"] == 2


# -- 5. error messages quote a short prefix ----------------------------------------------


async def test_error_messages_quote_only_a_prefix_of_caller_values(model_server, tmp_path):
    """A 1 MB agent name came back whole and overflowed the metadata limit (RESOURCE_EXHAUSTED)."""
    assert quote("abc") == "'abc'"
    assert quote("x" * 100).startswith("'" + "x" * 64 + "'…") and "(100 characters)" in quote("x" * 100)
    huge = "a" * 1_000_000
    async with serve("sqlite", model_server, tmp_path) as h:
        A, S, T = h.client.agents, h.client.sessions, h.client.traces
        await h.client.create_session("s1")
        checks = [
            (A.GetAgent(apb.GetAgentRequest(name=f"agents/{huge}")), grpc.StatusCode.INVALID_ARGUMENT),
            (A.GetAgent(apb.GetAgentRequest(name=huge)), grpc.StatusCode.INVALID_ARGUMENT),
            (A.GetAgent(apb.GetAgentRequest(name="agents/" + "b" * 150)), grpc.StatusCode.INVALID_ARGUMENT),  # longer than an agent id can be
            (A.CreateRun(apb.CreateRunRequest(start=start(agent=huge))), grpc.StatusCode.INVALID_ARGUMENT),
            (A.CreateRun(apb.CreateRunRequest(start=start(agent="c" * 150))), grpc.StatusCode.NOT_FOUND),
            (A.GetRun(apb.GetRunRequest(name=huge)), grpc.StatusCode.INVALID_ARGUMENT),
            (S.GetSession(spb.GetSessionRequest(name=f"sessions/{huge}")), grpc.StatusCode.INVALID_ARGUMENT),
            (S.GetSession(spb.GetSessionRequest(name=huge)), grpc.StatusCode.INVALID_ARGUMENT),
            (S.CreateSession(spb.CreateSessionRequest(session_id=huge)), grpc.StatusCode.INVALID_ARGUMENT),
            (S.UpdateSession(spb.UpdateSessionRequest(session=spb.Session(name="sessions/s1"),
                                                      update_mask={"paths": [huge, "x" + huge]})),
             grpc.StatusCode.INVALID_ARGUMENT),
            (T.GetTrace(tpb.GetTraceRequest(name=huge)), grpc.StatusCode.INVALID_ARGUMENT),
            (T.GetTrace(tpb.GetTraceRequest(name="d" * 150)), grpc.StatusCode.NOT_FOUND),
        ]
        for call_, code in checks:
            got, details = await outcome(call_)
            assert got == code, (got, details[:300])
            assert len(details) < 400, details[:500]
        code, details = await outcome(A.GetAgent(apb.GetAgentRequest(name="agents/" + "b" * 150)))
        assert "'…" in details and "b" * 65 not in details  # a 64-character prefix of what was sent


async def test_a_hostile_cancel_reason_on_the_run_stream_still_cancels(model_server, tmp_path):
    """A control message has no reply to carry a refusal: a NUL in the reason must not lose the cancel."""
    async with serve("postgres", model_server, tmp_path) as h:
        h.model.set_script("assistant", Script.of(say("slow", delay_s=5)))
        stream = h.client.agents.Run()
        await stream.write(apb.RunRequest(start=start(session="sessions/c")))
        first = await stream.read()
        assert first.event.HasField("run_started")
        await stream.write(apb.RunRequest(cancel=apb.CancelRun(reason="stop\x00now")))
        events = [first.event]
        while (response := await stream.read()) is not grpc.aio.EOF:
            events.append(response.event)
        assert events[-1].run_cancelled.reason == "stop\ufffdnow"
        assert (await h.client.get_run(events[0].run_id)).status == apb.RUN_STATUS_CANCELLED


async def test_session_ttl_durations_out_of_range_are_invalid_argument(model_server, tmp_path):
    async with serve("sqlite", model_server, tmp_path) as h:
        for ttl in (duration_pb2.Duration(seconds=-1), duration_pb2.Duration(seconds=2**62)):
            await expect_invalid(h.client.sessions.CreateSession(spb.CreateSessionRequest(
                session_id="t", session=spb.Session(ttl=ttl))), "session.ttl")


async def test_undecodable_requests_to_mutating_rpcs_are_invalid_argument_without_a_traceback(
    model_server, tmp_path
):
    """Found by tests/test_fuzz.py: the audit line of a mutating RPC read the resource names of a
    request that never decoded (``Undecodable``): AttributeError, a traceback, and UNKNOWN where the
    client had already been told INVALID_ARGUMENT."""
    async with serve("sqlite", model_server, tmp_path) as h:
        channel = grpc.aio.insecure_channel(h.target)
        try:
            for method in ("/agentd.v1.SessionService/CreateSession", "/agentd.v1.AgentService/CancelRun"):
                call_ = channel.unary_unary(method)  # raw bytes: a string field holding invalid UTF-8
                code, details = await outcome(call_(b"\x0a\x02\xff\xfe", timeout=5))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request:"), details
            code, _ = await stream_outcome(channel.unary_stream("/agentd.v1.AgentService/StreamRun")(
                b"\x0a\x04\x12\x02\xff\xfe", timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await channel.close()
