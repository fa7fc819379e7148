"""One rule for resource names, on every RPC that takes one.

Every request field that names a resource (an agent, a session, a run, a trace, the parent
of items) accepts the full resource name (``sessions/s``) or the bare id (``s``). A name in
another collection (``runs/x`` where a session is expected), an empty id (``sessions/``) or
a deeper path (``sessions/a/b``) is INVALID_ARGUMENT naming the field and the forms
expected. Responses always carry full names.

Before: bare ids worked for ``StartRun.agent``/``session``, the run RPCs and ``GetTrace``
but not for ``GetAgent`` or any session RPC.
"""

from __future__ import annotations

from typing import Any, Callable

import grpc
import pytest

from agentd.server import Script, call, calls, say
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import item_pb2, run_event_pb2
from agentd.v1 import session_service_pb2 as spb
from agentd.v1 import stats_service_pb2 as stpb
from agentd.v1 import stats_service_pb2_grpc as stpb_grpc
from agentd.v1 import trace_service_pb2 as tpb
from tests.runs_util import outcome, stream_outcome

FULL, BARE = "full", "bare"


def name(form: str, collection: str, rid: str) -> str:
    return f"{collection}/{rid}" if form == FULL else rid


def text(t: str) -> item_pb2.Item:
    return item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text=t))


async def events_of(call_: Any) -> list:
    return [response.event async for response in call_]


@pytest.mark.parametrize("form", [FULL, BARE])
async def test_agent_service_takes_both_forms_and_answers_full_names(harness, form):
    A = harness.client.agents
    harness.model.set_script("assistant", Script.of(say("ok")))

    # GetAgent.name
    agent = (await A.GetAgent(apb.GetAgentRequest(name=name(form, "agents", "assistant")))).agent
    assert agent.name == "agents/assistant" and list(agent.handoffs) == ["agents/specialist"]

    def start(session: str) -> apb.StartRun:
        return apb.StartRun(agent=name(form, "agents", "assistant"), input="hi",
                            session=name(form, "sessions", session))

    # StartRun.agent and StartRun.session, on each RPC that starts a run.
    streamed = await events_of(A.StreamRun(apb.StreamRunRequest(start=start(f"stream-{form}"))))
    assert streamed[0].run_started.session == f"sessions/stream-{form}"
    assert streamed[-1].WhichOneof("payload") == "run_completed"

    bidi = A.Run()
    await bidi.write(apb.RunRequest(start=start(f"bidi-{form}")))
    await bidi.done_writing()
    ran = await events_of(bidi)
    assert ran[0].run_started.session == f"sessions/bidi-{form}"
    assert ran[-1].WhichOneof("payload") == "run_completed"

    created = (await A.CreateRun(apb.CreateRunRequest(start=start(f"create-{form}")))).run
    run_id = created.name.removeprefix("runs/")
    assert created.name == f"runs/{run_id}" and run_id.startswith("run_")
    assert created.agent == "agents/assistant" and created.session == f"sessions/create-{form}"

    # WatchRun.name, GetRun.name, CancelRun.name (of a run that ended: returned unchanged).
    watched = await events_of(A.WatchRun(apb.WatchRunRequest(name=name(form, "runs", run_id))))
    assert watched[-1].WhichOneof("payload") == "run_completed" and watched[0].run_id == run_id
    got = (await A.GetRun(apb.GetRunRequest(name=name(form, "runs", run_id)))).run
    assert got.name == created.name and got.agent == "agents/assistant" and got.session == created.session
    cancelled = (await A.CancelRun(apb.CancelRunRequest(name=name(form, "runs", run_id)))).run
    assert cancelled.name == created.name and cancelled.status == apb.RUN_STATUS_COMPLETED

    # ListRuns.session
    listed = (await A.ListRuns(apb.ListRunsRequest(session=name(form, "sessions", f"create-{form}")))).runs
    assert [r.name for r in listed] == [created.name]
    assert listed[0].session == f"sessions/create-{form}"


@pytest.mark.parametrize("form", [FULL, BARE])
async def test_answers_to_a_waiting_run_take_both_forms(harness, form):
    """SubmitToolOutputs.name and ApproveToolCall.name: one run asking for a tool output, then an approval."""
    A = harness.client.agents
    harness.model.set_script("operator", Script.of(
        calls(call("lookup_customer", customer_id="c-7")),
        calls(call("issue_refund", order_id="A-1", amount_eur=5)),
        say("done"),
    ))
    run = (await A.CreateRun(apb.CreateRunRequest(start=apb.StartRun(
        agent=name(form, "agents", "operator"), input="refund")))).run
    run_id = run.name.removeprefix("runs/")
    answered = []
    async for response in A.WatchRun(apb.WatchRunRequest(name=run.name)):
        event = response.event
        if event.WhichOneof("payload") != "action_required":
            continue
        call_id = event.action_required.item.tool_call.call_id
        if event.action_required.action == run_event_pb2.REQUIRED_ACTION_TOOL_OUTPUT:
            info = (await A.SubmitToolOutputs(apb.SubmitToolOutputsRequest(
                name=name(form, "runs", run_id),
                outputs=[apb.ToolOutputSubmission(call_id=call_id, output='{"tier": "gold"}')]))).run
        else:
            info = (await A.ApproveToolCall(apb.ApproveToolCallRequest(
                name=name(form, "runs", run_id), approval=apb.ToolApproval(call_id=call_id, approved=True)))).run
        assert info.name == run.name and info.agent == "agents/operator"
        answered.append(event.action_required.item.tool_call.tool_name)
    assert answered == ["lookup_customer", "issue_refund"]
    assert (await A.GetRun(apb.GetRunRequest(name=run.name))).run.status == apb.RUN_STATUS_COMPLETED


@pytest.mark.parametrize("form", [FULL, BARE])
async def test_session_service_takes_both_forms_and_answers_full_names(harness, form):
    S = harness.client.sessions
    sid = f"names-{form}"
    await S.CreateSession(spb.CreateSessionRequest(session_id=sid, session=spb.Session(metadata={"k": "v"})))
    session = name(form, "sessions", sid)

    # GetSession.name
    got = (await S.GetSession(spb.GetSessionRequest(name=session))).session
    assert got.name == f"sessions/{sid}" and got.metadata["k"] == "v"
    # UpdateSession.session.name
    updated = (await S.UpdateSession(spb.UpdateSessionRequest(
        session=spb.Session(name=session, metadata={"k": "w"}), update_mask={"paths": ["metadata"]}))).session
    assert updated.name == f"sessions/{sid}" and updated.metadata["k"] == "w"
    # AddSessionItems.parent
    added = (await S.AddSessionItems(spb.AddSessionItemsRequest(parent=session, items=[text("a"), text("b")]))).items
    assert [i.name for i in added] == [f"sessions/{sid}/items/1", f"sessions/{sid}/items/2"]
    # ListSessionItems.parent
    listed = (await S.ListSessionItems(spb.ListSessionItemsRequest(parent=session))).items
    assert [i.name for i in listed] == [f"sessions/{sid}/items/1", f"sessions/{sid}/items/2"]
    # PopSessionItem.parent
    popped = (await S.PopSessionItem(spb.PopSessionItemRequest(parent=session))).item
    assert popped.name == f"sessions/{sid}/items/2"
    # ClearSessionItems.parent
    assert (await S.ClearSessionItems(spb.ClearSessionItemsRequest(parent=session))).deleted_count == 1
    # DeleteSession.name
    await S.DeleteSession(spb.DeleteSessionRequest(name=session))
    code, _ = await outcome(S.GetSession(spb.GetSessionRequest(name=f"sessions/{sid}")))
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("form", [FULL, BARE])
async def test_trace_service_takes_both_forms_and_answers_full_names(harness, form):
    T = harness.client.traces
    harness.model.set_script("assistant", Script.of(say("ok")))
    events = await events_of(harness.client.agents.StreamRun(apb.StreamRunRequest(start=apb.StartRun(
        agent="agents/assistant", input="hi", trace=apb.TraceOptions(workflow_name=f"names-{form}")))))
    trace_id = events[0].trace_id

    # GetTrace.name
    trace = (await T.GetTrace(tpb.GetTraceRequest(name=name(form, "traces", trace_id)))).trace
    assert trace.name == f"traces/{trace_id}" and trace.trace_id == trace_id
    # ListTraces.agent (a filter naming an agent)
    for agent, expected in (("assistant", [trace_id]), ("specialist", [])):
        listed = (await T.ListTraces(tpb.ListTracesRequest(
            workflow_name=f"names-{form}", agent=name(form, "agents", agent)))).traces
        assert [t.trace_id for t in listed] == expected
        assert all(t.name == f"traces/{t.trace_id}" for t in listed)


def _start(**fields: str) -> apb.StartRun:
    return apb.StartRun(**{"agent": "agents/assistant", "input": "hi", **fields})


_OUTPUTS = [apb.ToolOutputSubmission(call_id="c1", output="x")]
_APPROVAL = apb.ToolApproval(call_id="c1", approved=True)

# Every request field naming a resource (but Run's, below): (RPC, field, the collection it
# expects, the call made from (client, name)).
NAME_FIELDS: list[tuple[str, str, str, Callable[[Any, str], Any]]] = [
    ("GetAgent", "name", "agents", lambda c, n: c.agents.GetAgent(apb.GetAgentRequest(name=n))),
    ("UpdateAgent", "name", "agents", lambda c, n: c.agents.UpdateAgent(apb.UpdateAgentRequest(name=n))),
    ("DeleteAgent", "name", "agents", lambda c, n: c.agents.DeleteAgent(apb.DeleteAgentRequest(name=n))),
    ("ListAgentVersions", "parent", "agents",
     lambda c, n: c.agents.ListAgentVersions(apb.ListAgentVersionsRequest(parent=n))),
    ("ListAgentAliases", "parent", "agents",
     lambda c, n: c.agents.ListAgentAliases(apb.ListAgentAliasesRequest(parent=n))),
    ("CreateRun", "start.agent", "agents",
     lambda c, n: c.agents.CreateRun(apb.CreateRunRequest(start=_start(agent=n)))),
    ("StreamRun", "start.agent", "agents",
     lambda c, n: c.agents.StreamRun(apb.StreamRunRequest(start=_start(agent=n)))),
    ("CreateRun", "start.session", "sessions",
     lambda c, n: c.agents.CreateRun(apb.CreateRunRequest(start=_start(session=n)))),
    ("StreamRun", "start.session", "sessions",
     lambda c, n: c.agents.StreamRun(apb.StreamRunRequest(start=_start(session=n)))),
    ("GetRun", "name", "runs", lambda c, n: c.agents.GetRun(apb.GetRunRequest(name=n))),
    ("ListRuns", "session", "sessions", lambda c, n: c.agents.ListRuns(apb.ListRunsRequest(session=n))),
    ("CancelRun", "name", "runs", lambda c, n: c.agents.CancelRun(apb.CancelRunRequest(name=n))),
    ("WatchRun", "name", "runs", lambda c, n: c.agents.WatchRun(apb.WatchRunRequest(name=n))),
    ("SubmitToolOutputs", "name", "runs",
     lambda c, n: c.agents.SubmitToolOutputs(apb.SubmitToolOutputsRequest(name=n, outputs=_OUTPUTS))),
    ("ApproveToolCall", "name", "runs",
     lambda c, n: c.agents.ApproveToolCall(apb.ApproveToolCallRequest(name=n, approval=_APPROVAL))),
    ("GetSession", "name", "sessions", lambda c, n: c.sessions.GetSession(spb.GetSessionRequest(name=n))),
    ("UpdateSession", "session.name", "sessions", lambda c, n: c.sessions.UpdateSession(spb.UpdateSessionRequest(
        session=spb.Session(name=n, metadata={"k": "v"})))),
    ("DeleteSession", "name", "sessions", lambda c, n: c.sessions.DeleteSession(spb.DeleteSessionRequest(name=n))),
    ("ListSessionItems", "parent", "sessions",
     lambda c, n: c.sessions.ListSessionItems(spb.ListSessionItemsRequest(parent=n))),
    ("AddSessionItems", "parent", "sessions",
     lambda c, n: c.sessions.AddSessionItems(spb.AddSessionItemsRequest(parent=n, items=[text("a")]))),
    ("PopSessionItem", "parent", "sessions",
     lambda c, n: c.sessions.PopSessionItem(spb.PopSessionItemRequest(parent=n))),
    ("ClearSessionItems", "parent", "sessions",
     lambda c, n: c.sessions.ClearSessionItems(spb.ClearSessionItemsRequest(parent=n))),
    ("GetTrace", "name", "traces", lambda c, n: c.traces.GetTrace(tpb.GetTraceRequest(name=n))),
    ("ListTraces", "agent", "agents", lambda c, n: c.traces.ListTraces(tpb.ListTracesRequest(agent=n))),
    ("GetStats", "agent", "agents",
     lambda c, n: stpb_grpc.StatsServiceStub(c._channel).GetStats(stpb.GetStatsRequest(agent=n))),
]
SINGULAR = {"agents": "agent", "sessions": "session", "runs": "run", "traces": "trace"}


async def _code_and_details(call_: Any) -> tuple[grpc.StatusCode, str]:
    if hasattr(call_, "__aiter__") and not hasattr(call_, "__await__"):
        return await stream_outcome(call_)
    return await outcome(call_)


async def _run_stream_outcome(client: Any, start: apb.StartRun) -> tuple[grpc.StatusCode, str]:
    bidi = client.agents.Run()
    await bidi.write(apb.RunRequest(start=start))
    await bidi.done_writing()
    return await stream_outcome(bidi)


@pytest.mark.parametrize("rpc,field,collection,make", NAME_FIELDS,
                         ids=[f"{rpc}.{field}" for rpc, field, _, _ in NAME_FIELDS])
async def test_a_name_of_the_wrong_kind_is_invalid_argument_naming_the_field_and_the_forms(
    harness, rpc, field, collection, make
):
    await harness.client.create_session("s")  # so that a right name would have found something
    expected = f"'{collection}/ID' or a bare {SINGULAR[collection]} ID"
    other = next(c for c in SINGULAR if c != collection)
    for wrong in (f"{other}/s", f"{collection}/", f"{collection}/s/items/1", "robots/s"):
        code, details = await _code_and_details(make(harness.client, wrong))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (wrong, code, details)
        assert details.startswith(f"{field}: "), (wrong, details)
        assert expected in details, (wrong, details)
    # A name of another collection says what it named.
    _, details = await _code_and_details(make(harness.client, f"{other}/s"))
    assert f"names a {SINGULAR[other]}, not a {SINGULAR[collection]}" in details, details


async def test_run_stream_start_names_of_the_wrong_kind_are_invalid_argument(harness):
    for field, start in (("start.agent", _start(agent="sessions/assistant")),
                         ("start.session", _start(session="runs/s"))):
        code, details = await _run_stream_outcome(harness.client, start)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: "), details


# Fields named like a resource that are not request names: set by the server or labels.
NOT_NAMES = {
    ("CreateSession", "session.name"),  # ignored on create: the session's id is session_id
    ("AddSessionItems", "items.name"),  # assigned by the server
    ("AddSessionItems", "items.agent"),  # the label of the agent that produced an item (bare, as in replies)
    # Input items are items: their name is assigned when stored, their agent is a label.
    *{(rpc, f"start.input_items.{f}") for rpc in ("Run", "StreamRun", "CreateRun") for f in ("name", "agent")},
    # Alias names (`agents/{agent}/aliases/{alias}`): one form only, tested in tests/test_agent_api.py.
    ("SetAgentAlias", "alias.name"),
    ("DeleteAgentAlias", "name"),
}
RUN_STREAM_NAMES = {("Run", "start.agent"), ("Run", "start.session")}  # tested above, on the Run stream


def _name_fields(message: Any, prefix: str = "") -> list[str]:
    from google.protobuf.descriptor import FieldDescriptor

    found = []
    for field in message.fields:
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name.startswith("agentd.v1."):
            found += _name_fields(field.message_type, f"{path}.")
        elif field.type == FieldDescriptor.TYPE_STRING and field.name in ("name", "parent", "session", "agent"):
            found.append(path)
    return found


def test_every_name_field_of_every_rpc_is_covered_here():
    """A new RPC (or field) taking a name fails here until it is added to NAME_FIELDS."""
    seen = set()
    for module in (apb, spb, tpb, stpb):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                seen |= {(method.name, path) for path in _name_fields(method.input_type)}
    covered = {(rpc, field) for rpc, field, _, _ in NAME_FIELDS} | RUN_STREAM_NAMES
    assert seen - NOT_NAMES == covered
