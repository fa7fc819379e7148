"""Agents as data through the API: create, update (versions), pin, aliases, delete — over a real
server with raw stubs, as a service with no Python code of its own would call it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from agentd.client import AgentdClient, AgentdRpcError
from agentd.server import Script, call, calls, say
from agentd.server.agents.catalog import session_bucket
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as apb
from tests.conftest import Harness, start_harness
from tests.runs_util import assert_well_formed, wait_for_action


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


def definition(version_label: str, **extra: Any) -> dict[str, Any]:
    """A no-Python agent: a caller-executed tool, an output schema, a template."""
    return {
        "name": "pricing",
        "description": "Quotes prices.",
        "instructions": f"You quote prices for {{customer}} ({version_label}).",
        "model": "pricing",
        "tools": [{
            "type": "caller",
            "name": "price_lookup",
            "description": "Look a price up in the caller's catalogue.",
            "parameters": {
                "type": "object",
                "properties": {"sku": {"type": "string"}},
                "required": ["sku"],
                "additionalProperties": False,
            },
        }],
        "output_schema": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "price_eur": {"type": "number"}},
            "required": ["sku", "price_eur"],
            "additionalProperties": False,
        },
        **extra,
    }


SCRIPT = Script.of(calls(call("price_lookup", sku="A-1")), say('{"sku": "A-1", "price_eur": 12.5}'))


@pytest.fixture
async def api(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(model_server, tmp_path)
    model_server.set_script("pricing", SCRIPT)
    try:
        yield h
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def create(client: AgentdClient, data: dict[str, Any]) -> apb.Agent:
    return (await client.agents.CreateAgent(apb.CreateAgentRequest(definition=struct(data)))).agent


async def run_to_end(client: AgentdClient, agent: str, customer: str) -> list:
    """Start a run, answer its caller-executed tool as the calling service would, return its events."""
    run = await client.create_run(agent, "price of A-1?", context={"customer": customer})
    run_id = run.name.removeprefix("runs/")
    call_id = await wait_for_action(client, run_id)
    await client.submit_tool_output(run_id, call_id, '{"price_eur": 12.5}')
    events = [e async for e in client.watch_run(run_id)]
    assert_well_formed(events)
    return events


async def test_a_service_without_python_defines_runs_and_updates_an_agent(api: Harness) -> None:
    agent = await create(api.client, definition("v1"))
    assert (agent.name, agent.version, agent.source) == ("agents/pricing", 1, apb.AGENT_SOURCE_API)
    assert agent.tools[0].caller_executed and agent.output_schema.fields["required"]
    assert json_format.MessageToDict(agent.definition)["instructions"].endswith("(v1).")

    # A run of version 1 waits for the caller's tool output...
    first = await api.client.create_run("pricing", "price of A-1?", context={"customer": "Ada"})
    first_id = first.name.removeprefix("runs/")
    assert first.agent_version == 1
    call_id = await wait_for_action(api.client, first_id)

    # ...while the agent is updated to version 2.
    updated = (await api.client.agents.UpdateAgent(apb.UpdateAgentRequest(
        name="agents/pricing", definition=struct(definition("v2")), expected_version=1,
    ))).agent
    assert updated.version == 2
    second = await run_to_end(api.client, "pricing", "Bob")
    assert second[0].run_started.agent_version == 2

    # The run started before the update finishes on version 1.
    await api.client.submit_tool_output(first_id, call_id, '{"price_eur": 12.5}')
    events = [e async for e in api.client.watch_run(first_id)]
    assert_well_formed(events)
    assert events[0].run_started.agent_version == 1
    assert json_format.MessageToDict(events[-1].run_completed.final_output) == {"sku": "A-1", "price_eur": 12.5}
    prompts = [m["content"] for r in api.model.requests if r["model"] == "pricing"
               for m in r["messages"] if m["role"] == "system"]
    assert "You quote prices for Ada (v1)." in prompts and "You quote prices for Bob (v2)." in prompts
    assert (await api.client.get_run(first_id)).agent_version == 1

    # Versions are resources; an exact version can be read and run.
    versions = (await api.client.agents.ListAgentVersions(apb.ListAgentVersionsRequest(parent="pricing"))).versions
    assert [v.name for v in versions] == ["agents/pricing/versions/2", "agents/pricing/versions/1"]
    pinned = await run_to_end(api.client, "agents/pricing/versions/1", "Cy")
    assert pinned[0].run_started.agent_version == 1


async def test_bad_definitions_get_every_violation_at_once(api: Harness) -> None:
    bad = definition("v1", handoffs=["nobody"], max_turns=0)
    bad["tools"][0]["parameters"] = {"type": "object", "properties": {"sku": {"type": "strng"}}}
    bad["instructions"] = "Hello {0}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(api.client, bad)
    error = AgentdRpcError.of(caught.value)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_ARGUMENT"
    fields = {v.field for v in error.field_violations}
    assert {"definition.max_turns", "definition.instructions"} <= fields, fields
    assert any(f.startswith("definition.tools[0].parameters") for f in fields), fields
    assert any(f.startswith("definition.handoffs") for f in fields), fields
    # A python tool by import path is the operator's, never the API caller's.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(api.client, definition("v1", tools=[{"type": "python", "ref": "os:system"}]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_code_agents_are_read_only_and_their_names_taken(api: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(api.client, definition("v1") | {"name": "assistant"})
    assert AgentdRpcError.of(caught.value).reason == "AGENT_EXISTS"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.client.agents.UpdateAgent(apb.UpdateAgentRequest(name="assistant", definition=struct({})))
    assert AgentdRpcError.of(caught.value).reason == "AGENT_READ_ONLY"
    listed = {a.name: a for a in await api.client.list_agents()}
    assert listed["agents/assistant"].source == apb.AGENT_SOURCE_CODE and listed["agents/assistant"].version == 0


async def test_stale_updates_conflict_and_deleted_agents_stop_starting(api: Harness) -> None:
    await create(api.client, definition("v1"))
    await api.client.agents.UpdateAgent(apb.UpdateAgentRequest(name="pricing", definition=struct(definition("v2"))))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.client.agents.UpdateAgent(apb.UpdateAgentRequest(
            name="pricing", definition=struct(definition("v3")), expected_version=1,
        ))
    error = AgentdRpcError.of(caught.value)
    assert error.code() == grpc.StatusCode.ABORTED and error.reason == "VERSION_CONFLICT"
    assert error.reason_metadata["latest_version"] == "2"
    await api.client.agents.DeleteAgent(apb.DeleteAgentRequest(name="agents/pricing"))
    with pytest.raises(AgentdRpcError) as caught_run:
        await api.client.create_run("pricing", "hi", context={"customer": "x"})
    assert caught_run.value.reason == "AGENT_NOT_FOUND"


async def test_agents_belong_to_their_tenant_and_need_the_write_scope(
    model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    from agentd.server.auth.api_keys import create_key

    keys = tmp_path / "keys.json"
    read_run = ["agents:read", "runs:read", "runs:write"]
    _, acme = create_key(keys, tenant="acme", subject="ann", scopes=[*read_run, "agents:write"])
    _, globex = create_key(keys, tenant="globex", subject="bob", scopes=[*read_run, "agents:write"])
    _, reader = create_key(keys, tenant="acme", subject="ro", scopes=read_run)
    h = await start_harness(model_server, tmp_path, api_keys_file=keys)
    model_server.set_script("pricing", SCRIPT)
    try:
        async with AgentdClient(h.target, token=acme) as a, AgentdClient(h.target, token=globex) as b, \
                AgentdClient(h.target, token=reader) as ro:
            await create(a, definition("v1"))
            # Another tenant: not found, and free to use the same id for its own agent.
            with pytest.raises(AgentdRpcError) as caught:
                await b.get_agent("pricing")
            assert caught.value.reason == "AGENT_NOT_FOUND"
            assert "agents/pricing" not in {x.name for x in await b.list_agents()}
            with pytest.raises(AgentdRpcError):
                await b.create_run("pricing", "hi", context={"customer": "x"})
            assert (await create(b, definition("globex's"))).version == 1
            # Reading needs agents:read; writing needs agents:write.
            assert (await ro.get_agent("pricing")).version == 1
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await create(ro, definition("v1") | {"name": "other"})
            assert AgentdRpcError.of(denied.value).reason == "PERMISSION_DENIED"
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_a_90_10_alias_splits_sessions_sticky_and_within_three_points(api: Harness) -> None:
    await create(api.client, definition("v1"))
    await api.client.agents.UpdateAgent(apb.UpdateAgentRequest(name="pricing", definition=struct(definition("v2"))))
    alias = (await api.client.agents.SetAgentAlias(apb.SetAgentAliasRequest(alias=apb.AgentAlias(
        name="agents/pricing/aliases/prod",
        routes=[apb.AliasRoute(version=1, weight=90), apb.AliasRoute(version=2, weight=10)],
    )))).alias
    assert [(r.version, r.weight) for r in alias.routes] == [(1, 90), (2, 10)]
    # The split is a pure function of the session: 1,000 sessions, within ±3 points of 90/10.
    buckets = [session_bucket(f"customer-{i}") for i in range(1000)]
    share_v1 = sum(b < 90 for b in buckets) / 10
    assert 87 <= share_v1 <= 93, share_v1
    # Over the wire, each session stays on one version, and lands where its bucket says.
    for i in range(20):
        session = f"customer-{i}"
        expected = 1 if session_bucket(session) < 90 else 2
        for _ in range(2):
            info = await api.client.agents.GetAgent(apb.GetAgentRequest(name="agents/pricing/aliases/prod"))
            assert info.agent.version in (1, 2)
            run = await api.client.create_run("agents/pricing/aliases/prod", "quote", session_id=session,
                                              context={"customer": session}, session_policy="enqueue")
            assert run.agent_version == expected
            await api.client.cancel_run(run.name)
    aliases = (await api.client.agents.ListAgentAliases(apb.ListAgentAliasesRequest(parent="pricing"))).aliases
    assert [a.name for a in aliases] == ["agents/pricing/aliases/prod"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.client.agents.SetAgentAlias(apb.SetAgentAliasRequest(alias=apb.AgentAlias(
            name="agents/pricing/aliases/bad", routes=[apb.AliasRoute(version=1, weight=50)],
        )))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sum to 100" in caught.value.details()


async def test_a_change_on_one_replica_is_served_by_another(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    # Two servers sharing one SQLite file (two replicas of the embedded default).
    shared = tmp_path / "shared.db"
    a = await start_harness(model_server, tmp_path / "a", sqlite_path=shared)
    b = await start_harness(model_server, tmp_path / "b", sqlite_path=shared)
    model_server.set_script("pricing", SCRIPT)
    try:
        await create(a.client, definition("v1"))
        # b learns of it at once when asked by name (it looks the store up), and by its poll otherwise.
        got = (await b.client.agents.GetAgent(apb.GetAgentRequest(name="pricing"))).agent
        assert got.version == 1
        await a.client.agents.UpdateAgent(apb.UpdateAgentRequest(name="pricing", definition=struct(definition("v2"))))
        for _ in range(100):  # the poll runs every 0.5 s: within a second
            if (await b.client.agents.GetAgent(apb.GetAgentRequest(name="pricing"))).agent.version == 2:
                break
            await asyncio.sleep(0.05)
        assert (await b.client.agents.GetAgent(apb.GetAgentRequest(name="pricing"))).agent.version == 2
    finally:
        for h in (a, b):
            await h.client.close()
            await h.server.stop(grace_s=0)


async def test_api_agents_reach_only_mcp_hosts_the_operator_allows_and_never_show_their_secrets(
    model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    server = {"type": "streamable_http", "name": "crm", "url": "http://127.0.0.1:9/mcp",
              "headers": {"Authorization": "Bearer s3cret"}}
    # By default no API caller may point the server at any host (its own network included).
    h = await start_harness(model_server, tmp_path / "closed")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(h.client, definition("v1", mcp_servers=[server]))
        error = AgentdRpcError.of(caught.value)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.field_violations] == ["definition.mcp_servers[0].url"]
        assert "AGENTD_MCP_ALLOWED_HOSTS" in error.field_violations[0].description
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # and processes never
            await create(h.client, definition("v1", mcp_servers=[{"type": "stdio", "name": "sh", "command": "sh"}]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
    # An allowed host works; the header values (credentials) are write-only.
    h = await start_harness(model_server, tmp_path / "open", mcp_allowed_hosts=["127.0.0.1"])
    try:
        agent = await create(h.client, definition("v1", mcp_servers=[server]))
        shown = json_format.MessageToDict(agent.definition)["mcp_servers"][0]["headers"]
        assert shown == {"Authorization": "<redacted>"}
        listed = {a.name: a for a in await h.client.list_agents()}["agents/pricing"]
        assert "s3cret" not in json.dumps(json_format.MessageToDict(listed.definition))
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
