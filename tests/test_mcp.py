"""MCP tool servers over the real agentd server: a stdio MCP server (a Python subprocess written
with the mcp package's MCPServer) and a streamable HTTP one (the low-level Server, in-process on
a loopback port), with the scripted OpenAI endpoint calling their tools by name.

Synchronisation is on events only: the HTTP server's asyncio events, the stdio server's reports
over a TCP connection to the test (``SyncListener``), ``MCPServer.wait_connected``, run events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from agentd.client import AgentdClient
from agentd.server import Agent, App, Script, call, calls, function_tool, say
from agentd.server.auth.api_keys import create_key
from agentd.server.mcp import MCPServerStdio, MCPServerStreamableHttp, MCPUnavailableError, ToolFilter
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.serve import start_server
from agentd.server.settings import Settings
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import trace_service_pb2 as tpb
from tests.conftest import Harness
from tests.mcp_servers.http_server import HttpMCPServer
from tests.runs_util import collect, kinds, of_kind, outcome, wait_for_action

STDIO_SERVER = Path(__file__).parent / "mcp_servers" / "stdio_server.py"
SCOPES = ["agents:read", "agents:write", "runs:read", "runs:write", "sessions:read", "sessions:write", "traces:read"]


class SyncListener:
    """Where the stdio server's ``block`` tool reports "started <pid>" and "cancelled"."""

    def __init__(self) -> None:
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> "SyncListener":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        await self.lines.put(line.decode().strip())
        writer.close()

    async def next(self) -> str:
        return await self.lines.get()


@function_tool
def add(a: int, b: int) -> int:
    """The agent's own add (its name collides with the MCP servers' add)."""
    return a + b


@dataclass
class Env:
    harness: Harness
    http: HttpMCPServer
    stdio: MCPServerStdio
    remote: MCPServerStreamableHttp
    sync: SyncListener
    tmp_path: Path
    keys: Path

    @property
    def client(self) -> AgentdClient:
        return self.harness.client

    @property
    def model(self) -> ScriptedOpenAIServer:
        return self.harness.model


def build_app(stdio: MCPServerStdio, remote: MCPServerStreamableHttp) -> App:
    # The same endpoint again, with calls limited to two seconds (its own connection).
    hasty = MCPServerStreamableHttp("hasty", remote.url, timeout_s=2, tool_filter=ToolFilter(allowed=["block"]))
    return App(agents=[
        Agent(name="local", model="local", instructions="Use the tools.", tools=[add], mcp_servers=[stdio]),
        Agent(name="remote", model="remote", instructions="Use the tools.", mcp_servers=[remote]),
        Agent(name="both", model="both", instructions="Use the tools.", mcp_servers=[stdio, remote]),
        Agent(name="hasty", model="hasty", instructions="Use the tools.", mcp_servers=[hasty]),
    ])


@pytest.fixture
async def env(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[Env]:
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, tenant="acme", subject="alice", scopes=SCOPES)
    async with SyncListener() as sync, HttpMCPServer() as http:
        stdio = MCPServerStdio(
            "files", sys.executable, [str(STDIO_SERVER)], env={"AGENTD_TEST_SYNC_PORT": str(sync.port)},
            tool_filter=ToolFilter(blocked=["secret"]), max_result_chars=1000, connect_timeout_s=60,
        )
        remote = MCPServerStreamableHttp(
            "crm", http.url, {"X-Static": "static"},
            context_headers={"X-Agentd-Tenant": "{tenant}", "X-Agentd-Subject": "{subject}", "X-Agentd-Run": "{run_id}"},
            require_approval=["delete_all"], connect_timeout_s=60,
        )
        harness = await start(model_server, tmp_path, build_app(stdio, remote), keys, key,
                              mcp_allowed_hosts=["127.0.0.1"])  # API agents may reach the test server
        try:
            yield Env(harness, http, stdio, remote, sync, tmp_path, keys)
        finally:
            await harness.client.close()
            await harness.server.stop(grace_s=5)


async def start(model: ScriptedOpenAIServer, tmp_path: Path, app: App, keys: Path, key: str, **settings: Any) -> Harness:
    config = Settings(**{  # type: ignore[arg-type]
        "port": 0, "store": "sqlite", "sqlite_path": tmp_path / "agentd.db", "tool_timeout_s": 60,
        "shutdown_grace_s": 5, "api_keys_file": keys, **settings,
    })
    provider = OpenAIProvider(api_key="test-key", base_url=model.base_url, timeout_s=30, max_retries=2)
    server = await start_server(config, app, models=provider)
    return Harness(server, AgentdClient(server.target, token=key), model)


def offered(body: dict[str, Any]) -> list[str]:
    """The tool names a model request offered (Chat Completions or Responses)."""
    names = []
    for tool in body.get("tools") or []:
        names.append(tool["function"]["name"] if "function" in tool else tool.get("name"))
    return names


def results_sent(body: dict[str, Any]) -> list[str]:
    """The tool results a model request sent back (Chat Completions or Responses)."""
    out = [m.get("content") for m in body.get("messages") or [] if m.get("role") == "tool"]
    items = body.get("input") if isinstance(body.get("input"), list) else []
    out += [item.get("output") for item in items if item.get("type") == "function_call_output"]
    return out


def requests_of(model: ScriptedOpenAIServer, name: str) -> list[dict[str, Any]]:
    return [r for r in model.requests if r.get("model") == name]


def outputs(events: list) -> list[tuple[str, str, bool]]:
    return [(o.item.tool_result.tool_name, o.item.tool_result.output, o.item.tool_result.is_error)
            for o in of_kind(events, "tool_output")]


async def run(env: Env, agent: str, text: str = "go", **options: Any) -> list:
    events = await collect(env.client.run(agent, text, **options))
    assert kinds(events)[-1] == "run_completed", events[-1]
    return events


# -- listing, filtering, naming -------------------------------------------------------------


async def test_tools_are_listed_filtered_and_prefixed_where_they_collide(env: Env) -> None:
    local = await env.client.get_agent("local")
    names = [t.name for t in local.tools]
    # Its own add keeps its name; the server's add is prefixed; the filter keeps "secret" out.
    assert names[0] == "add" and "files_add" in names and "secret" not in names
    assert {"pid", "whoami", "fail", "big", "grow", "block"} <= set(names)
    schema = {t.name: t for t in local.tools}["files_add"]
    assert set(schema.parameters["properties"]) == {"a", "b"}  # the server's own JSON schema

    both = {t.name: t for t in (await env.client.get_agent("both")).tools}
    # Names both servers have are prefixed on both; the others keep theirs.
    assert {"files_add", "crm_add", "files_whoami", "crm_whoami", "files_grow", "crm_grow"} <= set(both)
    assert {"lookup", "pid", "delete_all"} <= set(both) and "add" not in both
    assert both["delete_all"].needs_approval and not both["lookup"].needs_approval

    env.model.set_script("both", Script.of(say("nothing to do")))
    await run(env, "both")
    assert set(offered(requests_of(env.model, "both")[-1])) == set(both)


# -- calls ---------------------------------------------------------------------------------------


async def test_calls_reach_both_servers_and_the_model_reads_the_results(env: Env) -> None:
    env.model.set_script("both", Script.of(
        calls(call("files_add", a=2, b=3), call("crm_add", a=40, b=2), call("lookup", id="c-7")),
        say("done"),
    ))
    events = await run(env, "both")
    assert sorted(outputs(events)) == sorted([
        ("files_add", "5", False), ("crm_add", "42", False), ("lookup", '{"id": "c-7", "name": "Ada"}', False),
    ])
    # The model's next request carries the results.
    assert sorted(results_sent(requests_of(env.model, "both")[-1])) == sorted(["5", "42", '{"id": "c-7", "name": "Ada"}'])
    assert sorted(json.dumps(c.arguments) for c in env.http.calls) == ['{"a": 40, "b": 2}', '{"id": "c-7"}']

    # Each call is an execute_tool span naming its server.
    detail = await env.client.get_trace(events[0].trace_id)
    spans = {s.name: s for s in detail.spans if s.kind == tpb.SPAN_KIND_FUNCTION}
    assert spans["files_add"].attributes["mcp_server"] == "files"
    assert spans["files_add"].attributes["mcp_tool"] == "add"
    assert spans["lookup"].attributes["mcp_server"] == "crm" and "mcp_tool" not in spans["lookup"].attributes
    assert spans["crm_add"].attributes["tool_name"] == "crm_add"


async def test_errors_go_back_to_the_model_and_the_run_goes_on(env: Env) -> None:
    env.model.set_script("both", Script.of(
        calls(
            call("fail", reason="no stock"),  # the tool's own error result
            call("lookup", id=7),  # arguments that break the tool's schema: never sent
            call("crm_nope", x=1),  # no such tool
        ),
        say("handled"),
    ))
    events = await run(env, "both")
    by_tool = {name: (output, error) for name, output, error in outputs(events)}
    assert by_tool["fail"][1] and "failed on purpose: no stock" in by_tool["fail"][0]
    assert by_tool["lookup"][1] and "invalid arguments for tool 'lookup'" in by_tool["lookup"][0]
    assert by_tool["crm_nope"][1] and "no tool named 'crm_nope'" in by_tool["crm_nope"][0]
    assert not env.http.calls  # the invalid lookup never reached the server
    assert events[-1].run_completed.final_output.string_value == "handled"


async def test_a_server_that_is_down_gives_an_error_output(env: Env) -> None:
    await env.client.get_agent("remote")  # connected, tools listed
    await env.http.stop()
    env.model.set_script("remote", Script.of(calls(call("add", a=1, b=2)), say("the crm is down")))
    events = await run(env, "remote")
    [(name, output, error)] = outputs(events)
    assert error and output.startswith("Error: MCP server 'crm' is unavailable")
    assert events[-1].run_completed.final_output.string_value == "the crm is down"


async def test_a_call_that_times_out_is_cancelled_on_the_server(env: Env) -> None:
    env.model.set_script("hasty", Script.of(calls(call("block")), say("too slow")))
    events = await run(env, "hasty")
    [(_, output, error)] = outputs(events)
    assert error and output == "Error: tool 'block' timed out after 2s"
    assert env.http.block_started.is_set()
    await env.http.block_cancelled.wait()  # the MCP server saw the cancellation
    assert events[-1].run_completed.final_output.string_value == "too slow"


async def test_an_unreachable_server_is_held_down_after_bounded_attempts(env: Env) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gone = MCPServerStreamableHttp("gone", f"http://127.0.0.1:{port}/mcp", max_reconnect_attempts=2)
    try:
        with pytest.raises(MCPUnavailableError, match="could not connect: ConnectError"):
            await gone.list_tools()
        assert gone.connection.state == "backoff"
        with pytest.raises(MCPUnavailableError, match="is reconnecting"):  # fails at once while it waits
            await gone.list_tools()
        await gone.connection.wait_until(lambda c: c.state == "down")  # the second attempt failed too
        with pytest.raises(MCPUnavailableError, match="is down"):
            await gone.list_tools()
    finally:
        await gone.aclose()


async def test_a_long_result_is_cut_with_a_note(env: Env) -> None:
    env.model.set_script("local", Script.of(calls(call("big", size=5000)), say("ok")))
    events = await run(env, "local")
    [(_, output, error)] = outputs(events)
    assert not error and output.startswith("x" * 1000)
    assert output.endswith("[truncated: the tool returned 5000 characters; only the first 1000 are shown]")


# -- tool lists that change ------------------------------------------------------------------


async def test_a_stdio_server_adds_a_tool_and_the_next_turn_sees_it(env: Env) -> None:
    env.model.set_script("local", Script.of(calls(call("grow")), calls(call("extra", word="hi")), say("ok")))
    events = await run(env, "local")
    assert outputs(events) == [("grow", "grown", False), ("extra", "extra: hi", False)]
    first, second = requests_of(env.model, "local")[-3:-1]
    assert "extra" not in offered(first) and "extra" in offered(second)
    assert "extra" in [t.name for t in (await env.client.get_agent("local")).tools]


async def test_an_http_server_adds_a_tool_and_the_next_turn_sees_it(env: Env) -> None:
    env.model.set_script("remote", Script.of(calls(call("grow")), calls(call("fresh")), say("ok")))
    events = await run(env, "remote")
    assert outputs(events) == [("grow", "grown", False), ("fresh", "fresh!", False)]
    assert "fresh" in offered(requests_of(env.model, "remote")[-2])


async def test_tool_lists_refresh_on_demand(env: Env) -> None:
    before = await env.remote.list_tools()
    env.http.tools.pop("lookup")  # changed without telling the client
    assert "lookup" in [t.name for t in await env.remote.list_tools()]  # the cache
    assert "lookup" not in [t.name for t in await env.remote.refresh_tools()]
    assert len(before) == len(await env.remote.list_tools()) + 1


# -- reconnecting ------------------------------------------------------------------------------


async def test_a_killed_stdio_server_is_started_again(env: Env) -> None:
    env.model.set_script("local", Script.of(calls(call("pid")), say("ok")))
    events = await run(env, "local")
    [(_, pid, _)] = outputs(events)
    generation = env.stdio.generation
    os.kill(int(pid), signal.SIGKILL)
    await env.stdio.wait_connected(after_generation=generation)  # the owner saw it die and started a new one

    env.model.set_script("local", Script.of(calls(call("files_add", a=20, b=22), call("pid")), say("ok")))
    events = await run(env, "local")
    by_tool = {name: output for name, output, _ in outputs(events)}
    assert by_tool["files_add"] == "42" and by_tool["pid"] != pid


async def test_an_http_server_that_restarted_gets_a_new_session(env: Env) -> None:
    await env.client.get_agent("remote")
    generation = env.remote.generation
    await env.http.stop()
    await env.http.start()  # the same port; it knows no session now
    # The call finds its session unknown (the server answers 404 before running anything), so it
    # goes again on a new session: the model never sees the restart.
    env.model.set_script("remote", Script.of(calls(call("add", a=1, b=1)), say("ok")))
    events = await run(env, "remote")
    assert outputs(events) == [("add", "2", False)]
    assert env.remote.generation > generation and [c.name for c in env.http.calls] == ["add"]


# -- approvals ----------------------------------------------------------------------------------


async def test_an_approval_gated_mcp_tool_waits_for_approve_tool_call(env: Env) -> None:
    env.model.set_script("remote", Script.of(calls(call("delete_all")), say("deleted")))
    created = await env.client.create_run("remote", "delete everything")
    run_id = created.name.removeprefix("runs/")
    call_id = await wait_for_action(env.client, run_id)
    assert not env.http.calls  # nothing ran before the approval
    await env.client.approve_tool_call(run_id, call_id, True)
    events = await collect(env.client.watch_run(run_id))
    assert kinds(events)[-1] == "run_completed"
    assert outputs(events) == [("delete_all", "deleted everything", False)]
    assert [c.name for c in env.http.calls] == ["delete_all"]

    # Denied: never sent to the server; the model reads why.
    env.model.set_script("remote", Script.of(calls(call("delete_all")), say("not allowed")))
    created = await env.client.create_run("remote", "delete everything again")
    run_id = created.name.removeprefix("runs/")
    call_id = await wait_for_action(env.client, run_id)
    await env.client.approve_tool_call(run_id, call_id, False, "not on a Friday")
    events = await collect(env.client.watch_run(run_id))
    [(_, output, error)] = outputs(events)
    assert error and "not on a Friday" in output
    assert [c.name for c in env.http.calls] == ["delete_all"]


# -- cancellation -----------------------------------------------------------------------------------


async def test_cancelling_a_run_cancels_the_http_call_on_the_server(env: Env) -> None:
    env.model.set_script("remote", Script.of(calls(call("block")), say("never")))
    created = await env.client.create_run("remote", "block")
    run_id = created.name.removeprefix("runs/")
    await env.http.block_started.wait()
    await env.client.cancel_run(run_id, "changed my mind")
    await env.http.block_cancelled.wait()  # the MCP server saw the cancellation
    events = await collect(env.client.watch_run(run_id))
    assert kinds(events)[-1] == "run_cancelled"


async def test_cancelling_a_run_cancels_the_stdio_call_on_the_server(env: Env) -> None:
    env.model.set_script("local", Script.of(calls(call("block")), say("never")))
    created = await env.client.create_run("local", "block")
    run_id = created.name.removeprefix("runs/")
    assert (await env.sync.next()).startswith("started ")
    await env.client.cancel_run(run_id, "changed my mind")
    assert await env.sync.next() == "cancelled"
    events = await collect(env.client.watch_run(run_id))
    assert kinds(events)[-1] == "run_cancelled"
    # The session is fine afterwards.
    env.model.set_script("local", Script.of(calls(call("files_add", a=1, b=2)), say("ok")))
    assert outputs(await run(env, "local")) == [("files_add", "3", False)]


# -- identity ---------------------------------------------------------------------------------------


async def test_the_callers_identity_reaches_the_servers(env: Env) -> None:
    env.model.set_script("both", Script.of(calls(call("files_whoami"), call("crm_whoami")), say("ok")))
    events = await run(env, "both", session_id="s-1")
    run_id = events[0].run_id
    seen = {name: json.loads(output) for name, output, _ in outputs(events)}
    for name in ("files_whoami", "crm_whoami"):
        meta = seen[name]
        assert meta["agentd/run"] == run_id and meta["agentd/tenant"] == "acme" and meta["agentd/subject"] == "alice"
        assert meta["agentd/agent"] == "both" and meta["agentd/session"] == "s-1" and meta["agentd/call"]
    [http_call] = env.http.calls
    assert http_call.headers["x-agentd-tenant"] == "acme" and http_call.headers["x-agentd-subject"] == "alice"
    assert http_call.headers["x-agentd-run"] == run_id and http_call.headers["x-static"] == "static"


# -- declarative agents ----------------------------------------------------------------------------


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


async def test_an_api_agent_takes_tools_from_an_http_server_but_cannot_start_processes(env: Env) -> None:
    definition = {
        "name": "crm-agent", "model": "crm-agent", "instructions": "Use the CRM.",
        "mcp_servers": [{
            "type": "streamable_http", "name": "crm", "url": env.http.url,
            "tool_filter": {"allow": ["lookup", "whoami"]}, "context_headers": {"X-Agentd-Tenant": "{tenant}"},
        }],
    }
    await env.client.agents.CreateAgent(apb.CreateAgentRequest(definition=struct(definition)))
    agent = await env.client.get_agent("crm-agent")
    assert sorted(t.name for t in agent.tools) == ["lookup", "whoami"]
    env.model.set_script("crm-agent", Script.of(calls(call("lookup", id="c-1")), say("found")))
    events = await run(env, "crm-agent")
    assert outputs(events) == [("lookup", '{"id": "c-1", "name": "Ada"}', False)]
    assert env.http.calls[-1].headers["x-agentd-tenant"] == "acme"

    stdio = {"name": "shell", "mcp_servers": [{"type": "stdio", "name": "sh", "command": "sh"}]}
    code, details = await outcome(env.client.agents.CreateAgent(apb.CreateAgentRequest(definition=struct(stdio))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "mcp_servers[0].type" in details and "starts a process" in details


async def test_an_agent_file_may_run_a_stdio_server(
    model_server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "files.json").write_text(json.dumps({
        "name": "filer", "model": "filer",
        "mcp_servers": [{
            "type": "stdio", "name": "files", "command": sys.executable, "args": [str(STDIO_SERVER)],
            "tool_filter": {"deny": ["secret", "block"]}, "require_approval": "never",
        }],
    }))
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, tenant="acme", subject="alice", scopes=SCOPES)
    app = App(agents=[Agent(name="plain", model="plain")])
    harness = await start(model_server, tmp_path, app, keys, key, agents_dir=agents)
    try:
        tools = [t.name for t in (await harness.client.get_agent("filer")).tools]
        assert "add" in tools and "secret" not in tools and "block" not in tools
        model_server.set_script("filer", Script.of(calls(call("add", a=5, b=6)), say("eleven")))
        events = await collect(harness.client.run("filer", "add"))
        assert outputs(events) == [("add", "11", False)]
    finally:
        await harness.client.close()
        await harness.server.stop(grace_s=5)


# -- shutdown ---------------------------------------------------------------------------------------


async def test_shutdown_closes_live_sessions_cleanly(
    model_server: ScriptedOpenAIServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, tenant="acme", subject="alice", scopes=SCOPES)
    async with SyncListener() as sync, HttpMCPServer() as http:
        stdio = MCPServerStdio("files", sys.executable, [str(STDIO_SERVER)],
                               env={"AGENTD_TEST_SYNC_PORT": str(sync.port)}, connect_timeout_s=60)
        remote = MCPServerStreamableHttp("crm", http.url, connect_timeout_s=60)
        harness = await start(model_server, tmp_path, build_app(stdio, remote), keys, key)
        try:
            model_server.set_script("both", Script.of(calls(call("pid"), call("crm_add", a=1, b=2)), say("ok")))
            events = await collect(harness.client.run("both", "go"))
            by_tool = {name: output for name, output, _ in outputs(events)}
            pid = int(by_tool["pid"])
            assert by_tool["crm_add"] == "3"
            assert stdio.connection.state == remote.connection.state == "connected"
        finally:
            await harness.client.close()
            await harness.server.stop(grace_s=5)
        # Both sessions were closed by their own tasks, in order; the stdio server has exited.
        assert stdio.connection.state == remote.connection.state == "idle"
        assert stdio.connection.owner is not None and stdio.connection.owner.done()
        assert remote.connection.owner is not None and remote.connection.owner.done()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    def text(record: logging.LogRecord) -> str:
        return (record.getMessage() + " " + (caplog.handler.format(record) if record.exc_info else "")).lower()

    # anyio's complaints when a cancel scope or task group is left by another task or out of order,
    # and any warning or error of agentd, the mcp client, anyio or asyncio (a task never retrieved...).
    problems = [
        r for r in caplog.records
        if any(words in text(r) for words in ("different task", "non-innermost", "cancel scope stack"))
        or (r.levelno >= logging.WARNING and "cancel scope" in text(r))
        or (r.levelno >= logging.ERROR and r.name.split(".")[0] in ("agentd", "mcp", "anyio", "asyncio"))
    ]
    assert not problems, [f"{r.name}: {r.getMessage()}" for r in problems]
    assert any("closed 3 MCP session(s)" in r.getMessage() for r in caplog.records)  # hasty's too (warmed up)
