"""Runs pin an agent version, and their traces, spans and metrics carry it: ListTraces filters by
version (on the memory store and on both archives), so the versions behind a split alias can be
compared. API agents are made with the AgentService RPCs, as a service without Python would."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from agentd.server import Script, say
from agentd.server.tracing.archive import TraceQuery
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.server.tracing.postgres import PostgresTraceArchive
from agentd.server.tracing.sqlite import SqliteTraceArchive
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import trace_service_pb2 as tpb
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.conftest import Harness, start_harness
from tests.otlp_receiver import OtlpMetricsReceiver, OtlpReceiver, attributes, data_points, point_attributes


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


def definition(label: str) -> dict[str, Any]:
    return {"name": "quoter", "description": "Quotes.", "instructions": f"You quote ({label}).", "model": "quoter"}


async def create_v1_then_v2(client, runs_per_version: tuple[int, int]) -> dict[int, list[str]]:
    """Agent ``quoter`` at version 1 then 2 (CreateAgent, UpdateAgent), with runs of each: the
    trace ids by version, oldest first."""
    created = (await client.agents.CreateAgent(apb.CreateAgentRequest(definition=struct(definition("v1"))))).agent
    assert created.version == 1
    traces: dict[int, list[str]] = {1: [], 2: []}
    for version, count in zip((1, 2), runs_per_version):
        if version == 2:
            updated = (await client.agents.UpdateAgent(apb.UpdateAgentRequest(
                name="agents/quoter", definition=struct(definition("v2")), expected_version=1,
            ))).agent
            assert updated.version == 2
        for _ in range(count):
            events = [e async for e in client.run("quoter", "quote", workflow_name="versions")]
            assert events[0].run_started.agent_version == version
            assert events[-1].WhichOneof("payload") == "run_completed"
            traces[version].append(events[0].trace_id)
    return traces


async def listed(client, **filters: Any) -> list[str]:
    response = await client.traces.ListTraces(tpb.ListTracesRequest(page_size=100, **filters))
    return [t.trace_id for t in response.traces]


async def stop(h: Harness) -> None:
    await h.client.close()
    await h.server.stop(grace_s=0)


async def check_listings(h: Harness, traces: dict[int, list[str]], app_trace: str) -> None:
    """ListTraces by agent and version: exactly that version's traces, newest first."""
    client = h.client
    v1, v2 = list(reversed(traces[1])), list(reversed(traces[2]))
    assert await listed(client, agent="agents/quoter", agent_version=1) == v1
    assert await listed(client, agent="quoter", agent_version=2) == v2
    assert await listed(client, agent="quoter") == v2 + v1  # unset: any version
    assert await listed(client, agent_version=0) == [app_trace]  # 0 is a version: the app-module agent's
    assert await listed(client, agent="quoter", agent_version=0) == []
    assert await listed(client, agent="assistant", agent_version=1) == []
    assert await listed(client, agent_version=3) == []
    # ...combined with the other filters.
    assert await listed(client, agent_version=1, workflow_name="versions",
                        status=tpb.SPAN_STATUS_OK) == v1
    assert await listed(client, agent_version=1, status=tpb.SPAN_STATUS_ERROR) == []

    # Every listed trace and GetTrace carry the version; so does the run span.
    everything = (await client.traces.ListTraces(tpb.ListTracesRequest(page_size=100))).traces
    assert {t.trace_id: t.agent_version for t in everything} == {
        **{t: 1 for t in v1}, **{t: 2 for t in v2}, app_trace: 0,
    }
    for version, trace_id in ((1, v1[0]), (2, v2[0]), (0, app_trace)):
        detail = await client.get_trace(trace_id)
        assert detail.trace.agent_version == version
        (run_span,) = [s for s in detail.spans if s.kind == tpb.SPAN_KIND_RUN]
        assert json_format.MessageToDict(run_span.attributes)["agent_version"] == version

    # Pages of one version; the token is bound to it ("any" and 0 are different listings).
    first = await client.traces.ListTraces(tpb.ListTracesRequest(agent="quoter", agent_version=1, page_size=1))
    assert [t.trace_id for t in first.traces] == v1[:1] and first.next_page_token
    second = await client.traces.ListTraces(tpb.ListTracesRequest(
        agent="quoter", agent_version=1, page_size=1, page_token=first.next_page_token))
    assert [t.trace_id for t in second.traces] == v1[1:2]
    for other in ({"agent_version": 2}, {"agent_version": 0}, {}):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.traces.ListTraces(tpb.ListTracesRequest(
                agent="quoter", page_size=1, page_token=first.next_page_token, **other))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, other
    any_version = await client.traces.ListTraces(tpb.ListTracesRequest(agent="quoter", page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.traces.ListTraces(tpb.ListTracesRequest(
            agent="quoter", agent_version=0, page_size=1, page_token=any_version.next_page_token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.traces.ListTraces(tpb.ListTracesRequest(agent_version=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "agent_version" in caught.value.details()


async def run_versions(h: Harness) -> tuple[dict[int, list[str]], str]:
    h.model.set_script("quoter", Script.of(say("42 EUR.")))
    h.model.set_script("assistant", Script.of(say("Hello.")))
    traces = await create_v1_then_v2(h.client, (2, 1))
    app = [e async for e in h.client.run("assistant", "hi", workflow_name="versions")]
    assert app[0].run_started.agent_version == 0
    return traces, app[0].trace_id


# --- through the server, per trace store ---------------------------------------------------


async def test_memory_store_lists_traces_by_agent_version(model_server: ScriptedOpenAIServer, tmp_path: Path):
    h = await start_harness(model_server, tmp_path, trace_store="memory")
    try:
        traces, app_trace = await run_versions(h)
        assert h.server.traces.archive is None
        await check_listings(h, traces, app_trace)
    finally:
        await stop(h)


async def _archive_then_restart(model_server: ScriptedOpenAIServer, tmp_path: Path, **settings: Any) -> None:
    first = await start_harness(model_server, tmp_path, **settings)
    try:
        traces, app_trace = await run_versions(first)
        await first.server.traces.flush()
        archive = first.server.traces.archive
        assert archive is not None
        # The archive filters in SQL.
        page, more = await archive.list(TraceQuery(limit=10, agent="quoter", agent_version=1))
        assert [t.trace_id for t in page] == list(reversed(traces[1])) and not more
        assert all(t.agent_version == 1 for t in page)
        page, _ = await archive.list(TraceQuery(limit=10, agent_version=0))
        assert [t.trace_id for t in page] == [app_trace]
    finally:
        await stop(first)
    # After a restart memory is empty: every answer comes from the archive.
    second = await start_harness(model_server, tmp_path, **settings)
    try:
        assert second.server.traces.memory.get_trace(traces[1][0]) is None
        await check_listings(second, traces, app_trace)
    finally:
        await stop(second)


async def test_sqlite_archive_lists_traces_by_agent_version(model_server: ScriptedOpenAIServer, tmp_path: Path):
    await _archive_then_restart(model_server, tmp_path, trace_store="sqlite")


async def test_postgres_archive_lists_traces_by_agent_version(model_server: ScriptedOpenAIServer, tmp_path: Path):
    schema = new_schema()
    async with dropped_afterwards(schema):
        await _archive_then_restart(
            model_server, tmp_path, store="postgres", postgres_url=POSTGRES_URL, postgres_schema=schema,
            trace_store="postgres",
        )


# --- the stores themselves -----------------------------------------------------------------


def test_memory_store_tells_any_version_from_version_zero():
    memory = InMemoryTraceStore()
    for i, version in enumerate((0, 1, 2, 1)):
        trace = memory.start_trace(run_id=f"r{i}", workflow_name="w", group_id="", metadata={}, agent="a",
                                   agent_version=version)
        trace.end()

    def versions(limit: int = 10, **filters: Any) -> list[int]:
        page, _ = memory.list_traces(TraceQuery(limit=limit, **filters))
        return [t.agent_version for t in page]

    assert versions() == [1, 2, 1, 0]
    assert versions(agent_version=0) == [0]
    assert versions(agent_version=1) == [1, 1]
    assert versions(agent_version=1, limit=1) == [1]
    assert versions(agent_version=5) == []


@pytest.fixture(params=["sqlite", "postgres"])
async def archive_path(request, tmp_path) -> AsyncIterator[tuple[str, Any]]:
    """An archive location, not yet created: ("sqlite", path) or ("postgres", schema)."""
    if request.param == "sqlite":
        yield "sqlite", tmp_path / "traces.db"
        return
    schema = new_schema()
    async with dropped_afterwards(schema):
        yield "postgres", schema


async def test_traces_archived_before_versions_read_as_version_zero(archive_path):
    """An archive at schema version 2 (tenants, no agent versions) migrates: its traces are version 0,
    listed by ``agent_version=0`` and not by any other version; a version listing reads its index."""
    from agentd.server.tracing.postgres import MIGRATIONS as PG_MIGRATIONS
    from agentd.server.tracing.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

    backend, where = archive_path
    row = ("c" * 32, "r-old", "w", "g", "{}", "a", '["a"]', "ok", "", 1_000, 2_000, 1, 2, 0, "acme")
    columns = ("trace_id, run_id, workflow_name, group_id, metadata, agent, agents, status, error, start_ns, end_ns,"
               " input_tokens, output_tokens, span_count, tenant")
    if backend == "sqlite":
        conn = sqlite3.connect(where)
        with conn:
            conn.execute("CREATE TABLE trace_schema_version (version INTEGER NOT NULL)")
            for version, migration in enumerate(SQLITE_MIGRATIONS[:2], start=1):
                for statement in migration.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO trace_schema_version (version) VALUES (?)", (version,))
            conn.execute(f"INSERT INTO traces ({columns}) VALUES ({', '.join('?' * len(row))})", row)
        conn.close()
        archive: Any = SqliteTraceArchive(where)
    else:
        from agentd.server.postgres_common import apply_migrations
        from tests.backends_postgres import raw_connection

        raw = await raw_connection()
        try:
            await apply_migrations(raw, where, "trace_schema_version", PG_MIGRATIONS[:2], "trace tables")
            values = ", ".join(f"${i}" for i in range(1, len(row) + 1))
            await raw.execute(f'INSERT INTO "{where}".traces ({columns}) VALUES ({values})', *row)
        finally:
            await raw.close()
        archive = PostgresTraceArchive(url=POSTGRES_URL, schema=where)
    await archive.open()
    try:
        old = await archive.get("c" * 32, "acme")
        assert old is not None and old.agent_version == 0 and old.run_id == "r-old"
        for version, expected in ((None, ["c" * 32]), (0, ["c" * 32]), (1, [])):
            page, _ = await archive.list(TraceQuery(limit=10, tenant="acme", agent_version=version))
            assert [t.trace_id for t in page] == expected, version

        # New traces keep their version; a version listing reads traces_by_tenant_version, newest first.
        memory = InMemoryTraceStore()
        new = []
        for i, version in enumerate((1, 2, 1, 2)):
            trace = memory.start_trace(run_id=f"r{i}", workflow_name="w", group_id="", metadata={}, agent="a",
                                       tenant="acme", agent_version=version)
            trace.start_ns = 10_000 + i
            trace.end()
            new.append(trace)
        await archive.write(new)
        page, more = await archive.list(TraceQuery(limit=1, tenant="acme", agent_version=2))
        assert [t.trace_id for t in page] == [new[3].trace_id] and more
        page, more = await archive.list(TraceQuery(limit=5, tenant="acme", agent_version=2,
                                                   before=(page[0].start_ns, page[0].trace_id)))
        assert [t.trace_id for t in page] == [new[1].trace_id] and not more
        assert [t.agent_version for t in page] == [2]
        plan = await _explain(archive, TraceQuery(limit=5, tenant="acme", agent_version=2))
        assert "traces_by_tenant_version" in plan, plan
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
    finally:
        await archive.close()


async def _explain(archive: Any, query: TraceQuery) -> str:
    from agentd.server.tracing import postgres, sqlite
    from agentd.server.tracing.archive import where_clause

    if isinstance(archive, SqliteTraceArchive):
        where, params = where_clause(query, lambda n: "?")
        sql = f"SELECT {sqlite.archive._TRACE_COLUMNS} FROM traces t{where} ORDER BY t.start_ns DESC, t.trace_id DESC LIMIT ?"
        return await archive._run(False, lambda conn: "\n".join(
            row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", (*params, query.limit))))
    q = archive._q
    where, params = where_clause(query, lambda n: f"${n}", agents_table=f"{q}.trace_agents")
    sql = (f"SELECT {postgres.archive._TRACE_COLUMNS} FROM {q}.traces t{where}"
           f" ORDER BY t.start_ns DESC, t.trace_id DESC LIMIT ${len(params) + 1}")

    async def op(conn):
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")  # a test table is tiny
            rows = await conn.fetch(f"EXPLAIN {sql}", *params, query.limit)
        return "\n".join(row[0] for row in rows)

    return await archive._run(op)


# --- OTLP: spans and metrics ---------------------------------------------------------------


@pytest.fixture
def otlp_env(monkeypatch: pytest.MonkeyPatch):
    def configure(trace_port: int, metrics_port: int) -> None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{trace_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{metrics_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")

    return configure


async def test_run_spans_and_run_metrics_carry_the_agent_version(
    model_server: ScriptedOpenAIServer, tmp_path: Path, otlp_env
) -> None:
    async with OtlpReceiver() as spans, OtlpMetricsReceiver() as receiver:
        otlp_env(spans.port, receiver.port)
        h = await start_harness(model_server, tmp_path)
        try:
            traces, app_trace = await run_versions(h)

            def runs(metrics: dict) -> dict[tuple[object, object], int]:
                if "agentd.runs" not in metrics:
                    return {}
                return {
                    (a["gen_ai.agent.name"], a.get("agentd.agent.version")): p.as_int
                    for a, p in ((point_attributes(p), p) for p in data_points(metrics["agentd.runs"]))
                }

            await receiver.wait_until(lambda metrics: sum(runs(metrics).values()) == 4, timeout_s=10)
            metrics = dict(receiver.metrics)
            # The run span (the root) of each run, over OTLP.
            roots = {}
            for trace_id in (traces[1][0], traces[2][0], app_trace):
                exported = await spans.wait_for(trace_id, 3)  # run, agent, generation
                (root,) = [s for s in exported if attributes(s).get("agentd.span_kind") == "run"]
                roots[trace_id] = attributes(root)
        finally:
            await stop(h)

    assert runs(metrics) == {("quoter", 1): 2, ("quoter", 2): 1, ("assistant", 0): 1}
    durations = {
        (a["gen_ai.agent.name"], a["agentd.agent.version"]): p.count
        for a, p in ((point_attributes(p), p) for p in data_points(metrics["agentd.run.duration"]))
    }
    assert durations == runs(metrics)
    assert [roots[t]["agentd.agent.version"] for t in (traces[1][0], traces[2][0], app_trace)] == [1, 2, 0]
    assert roots[traces[2][0]]["gen_ai.agent.name"] == "quoter"


# --- the CLI -------------------------------------------------------------------------------


async def test_cli_lists_traces_of_one_version(model_server: ScriptedOpenAIServer, tmp_path: Path):
    from tests.test_cli import agentd

    h = await start_harness(model_server, tmp_path, trace_store="memory")
    try:
        traces, app_trace = await run_versions(h)
        code, out, err = await agentd("traces", "list", "--agent", "quoter", "--agent-version", "2",
                                      "--target", h.target)
        assert code == 0, err
        rows = [line.split() for line in out.splitlines() if any(t in line for t in (*traces[1], *traces[2], app_trace))]
        assert [row[0] for row in rows] == traces[2]
        header = next(line for line in out.splitlines() if "trace" in line.split() and "agents" in line.split())
        assert "version" in header.split() and "2" in rows[0]
        code, out, err = await agentd("traces", "list", "--agent-version", "0", "--target", h.target)
        assert code == 0, err
        assert app_trace in out and not any(t in out for t in (*traces[1], *traces[2]))
        code, _, err = await agentd("traces", "list", "--agent-version", "-1", "--target", h.target)
        assert code != 0 and "agent_version" in err
    finally:
        await stop(h)
