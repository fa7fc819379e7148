"""Tenants never meet: the cross-tenant matrix, on SQLite, Postgres and Redis, across two replicas.

Tenant A (acme) writes through one replica; tenant B (globex) probes through another.
For every RPC that names or lists a resource, B gets exactly what a missing resource
gets (same code, same message with the id swapped) or an empty list; the same session
id and request id in both tenants name different things; A's data is untouched, and
the tools of A's run see A's principal.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest

from agentd.client import AgentdClient
from agentd.server import Script, call, calls, say
from agentd.server.auth.api_keys import create_key
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import item_pb2
from agentd.v1 import session_service_pb2 as spb
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix
from tests.conftest import Harness, start_harness
from tests.runs_util import outcome, stream_outcome, wait_for_action

SCOPES = ["agents:read", "runs:read", "runs:write", "sessions:read", "sessions:write", "traces:read"]


@asynccontextmanager
async def two_replicas(store: str, model_server, tmp_path: Path, keys: Path) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two servers sharing one deployment's stores (SQLite: one embedded server plays both)."""
    settings: dict[str, Any] = {"api_keys_file": keys}
    namespace = new_prefix() if store == "redis" else new_schema()
    if store == "postgres":
        settings.update(store="postgres", postgres_url=POSTGRES_URL, postgres_schema=namespace)
    elif store == "redis":
        settings.update(store="redis", redis_url=REDIS_URL, redis_prefix=namespace)
    async with AsyncExitStack() as stack:
        if store == "postgres":
            await stack.enter_async_context(dropped_afterwards(namespace))
        if store == "redis":
            stack.push_async_callback(delete_prefix, namespace)
        first = await start_harness(model_server, tmp_path, replica_id="replica-1", **settings)
        stack.push_async_callback(first.server.stop, 0)
        stack.push_async_callback(first.client.close)
        if store == "sqlite":
            yield first, first
            return
        second = await start_harness(model_server, tmp_path, replica_id="replica-2", **settings)
        stack.push_async_callback(second.server.stop, 0)
        stack.push_async_callback(second.client.close)
        yield first, second




def text_item(text: str) -> item_pb2.Item:
    return item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text=text))



@pytest.mark.parametrize("store", ["sqlite", "postgres", "redis"])
async def test_another_tenants_resources_are_not_found_and_lists_are_empty(
    store: str, model_server, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    _, key_a = create_key(keys, tenant="acme", subject="ann", scopes=SCOPES)
    _, key_b = create_key(keys, tenant="globex", subject="bob", scopes=SCOPES)
    model_server.set_script("operator", Script.of(
        calls(call("issue_refund", order_id="A-1", amount_eur=5.0)), say("refunded")))
    async with two_replicas(store, model_server, tmp_path, keys) as (one, two), \
            AgentdClient(one.target, token=key_a) as a, AgentdClient(two.target, token=key_b) as b:
        # Tenant A: a session with a secret, and a run on it waiting for an approval.
        await a.sessions.CreateSession(spb.CreateSessionRequest(
            session_id="alice", session=spb.Session(metadata={"owner": "acme"})))
        await a.sessions.AddSessionItems(spb.AddSessionItemsRequest(
            parent="sessions/alice", items=[text_item("acme's card 4111")]))
        created = await a.agents.CreateRun(apb.CreateRunRequest(start=apb.StartRun(
            agent="agents/operator", input="refund A-1", session="sessions/alice", request_id="r-1")))
        run_a = created.run.name
        call_id = await wait_for_action(a, run_a.removeprefix("runs/"))

        # Tenant B probes every RPC that names A's resources; a missing one is the yardstick.
        def same_as_missing(found: tuple[grpc.StatusCode, str], missing: tuple[grpc.StatusCode, str],
                            name: str, made_up: str) -> None:
            assert found[0] == missing[0] == grpc.StatusCode.NOT_FOUND, (found, missing)
            assert found[1].replace(name, "X") == missing[1].replace(made_up, "X"), (found, missing)

        s = b.sessions
        for probe in (
            lambda n: s.GetSession(spb.GetSessionRequest(name=f"sessions/{n}")),
            lambda n: s.UpdateSession(spb.UpdateSessionRequest(session=spb.Session(name=f"sessions/{n}",
                                                                                    metadata={"x": "y"}))),
            lambda n: s.ListSessionItems(spb.ListSessionItemsRequest(parent=f"sessions/{n}")),
            lambda n: s.AddSessionItems(spb.AddSessionItemsRequest(parent=f"sessions/{n}", items=[text_item("x")])),
            lambda n: s.PopSessionItem(spb.PopSessionItemRequest(parent=f"sessions/{n}")),
            lambda n: s.ClearSessionItems(spb.ClearSessionItemsRequest(parent=f"sessions/{n}")),
            lambda n: s.DeleteSession(spb.DeleteSessionRequest(name=f"sessions/{n}")),
        ):
            same_as_missing(await outcome(probe("alice")), await outcome(probe("zelda")), "alice", "zelda")
        assert list((await s.ListSessions(spb.ListSessionsRequest())).sessions) == []

        made_up = "runs/run_" + "0" * 32
        g = b.agents
        for probe in (
            lambda n: g.GetRun(apb.GetRunRequest(name=n)),
            lambda n: g.CancelRun(apb.CancelRunRequest(name=n, reason="mallory")),
            lambda n: g.SubmitToolOutputs(apb.SubmitToolOutputsRequest(
                name=n, outputs=[apb.ToolOutputSubmission(call_id=call_id, output="forged")])),
            lambda n: g.ApproveToolCall(apb.ApproveToolCallRequest(
                name=n, approval=apb.ToolApproval(call_id=call_id, approved=True))),
        ):
            same_as_missing(await outcome(probe(run_a)), await outcome(probe(made_up)), run_a[5:], made_up[5:])
        same_as_missing(
            await stream_outcome(g.WatchRun(apb.WatchRunRequest(name=run_a))),
            await stream_outcome(g.WatchRun(apb.WatchRunRequest(name=made_up))), run_a[5:], made_up[5:],
        )
        assert list((await g.ListRuns(apb.ListRunsRequest(session="sessions/alice"))).runs) == []

        # The same ids in tenant B are B's own: a new session, a new run for request id r-1.
        await s.CreateSession(spb.CreateSessionRequest(session_id="alice", session=spb.Session(metadata={"owner": "globex"})))
        model_server.set_script("assistant", Script.of(say("hello globex")))
        mine = await g.CreateRun(apb.CreateRunRequest(start=apb.StartRun(
            agent="agents/assistant", input="hi", session="sessions/alice", request_id="r-1")))
        assert mine.run.name != run_a and mine.run.session == "sessions/alice" and mine.run.request_id == "r-1"
        assert [r.name for r in (await g.ListRuns(apb.ListRunsRequest(session="sessions/alice"))).runs] == [mine.run.name]

        # A's world is exactly as A left it, and A's run goes on.
        session = (await a.sessions.GetSession(spb.GetSessionRequest(name="sessions/alice"))).session
        assert dict(session.metadata) == {"owner": "acme"} and session.name == "sessions/alice"
        assert [r.name for r in (await a.agents.ListRuns(apb.ListRunsRequest(session="sessions/alice"))).runs] == [run_a]
        await a.agents.ApproveToolCall(apb.ApproveToolCallRequest(
            name=run_a, approval=apb.ToolApproval(call_id=call_id, approved=True)))
        events = [r.event async for r in a.agents.WatchRun(apb.WatchRunRequest(name=run_a))]
        assert events[-1].WhichOneof("payload") == "run_completed"
        assert events[0].run_started.session == "sessions/alice" and events[0].run_started.request_id == "r-1"
        items = (await a.sessions.ListSessionItems(spb.ListSessionItemsRequest(parent="sessions/alice"))).items
        assert items[0].message.text == "acme's card 4111" and items[0].name.startswith("sessions/alice/items/")
        listed = (await a.sessions.ListSessions(spb.ListSessionsRequest())).sessions
        assert [x.name for x in listed] == ["sessions/alice"]


async def test_tools_act_on_behalf_of_the_caller(model_server, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, tenant="acme", subject="ann", scopes=SCOPES)
    h = await start_harness(model_server, tmp_path, api_keys_file=keys)
    try:
        model_server.set_script("assistant", Script.of(calls(call("whoami")), say("done")))
        async with AgentdClient(h.target, token=key) as client:
            events = [e async for e in client.run("assistant", "who am I?", session_id="s-1")]
        (output,) = [e.tool_output.item.tool_result.output for e in events if e.WhichOneof("payload") == "tool_output"]
        seen = json.loads(output)
        assert seen == {"subject": "ann", "tenant": "acme", "session": "s-1", "can_write_runs": True}
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_an_admin_acts_in_another_tenant_only_when_it_says_so(model_server, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    _, ann = create_key(keys, tenant="acme", subject="ann", scopes=SCOPES)
    _, ops = create_key(keys, tenant="ops", subject="oncall", scopes=["admin"])
    h = await start_harness(model_server, tmp_path, api_keys_file=keys)
    try:
        async with AgentdClient(h.target, token=ann) as a, AgentdClient(h.target, token=ops) as admin:
            await a.sessions.CreateSession(spb.CreateSessionRequest(session_id="alice"))
            assert list((await admin.sessions.ListSessions(spb.ListSessionsRequest())).sessions) == []
            in_acme = [("x-agentd-tenant", "acme")]
            listed = await admin.sessions.ListSessions(spb.ListSessionsRequest(), metadata=in_acme)
            assert [x.name for x in listed.sessions] == ["sessions/alice"]
            code, details = await outcome(a.sessions.ListSessions(spb.ListSessionsRequest(),
                                                                  metadata=[("x-agentd-tenant", "ops")]))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
            code, details = await outcome(admin.sessions.ListSessions(spb.ListSessionsRequest(),
                                                                      metadata=[("x-agentd-tenant", "a/b")]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "x-agentd-tenant" in details
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
