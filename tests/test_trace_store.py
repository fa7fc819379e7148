"""Durable traces: ended traces are archived (SQLite or Postgres) and TraceService finds
them after a restart and from another replica; listings merge live and archived traces."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from agentd.server import Script, call, calls, say
from agentd.server.tracing.archive import Retention, TraceQuery
from agentd.server.tracing.postgres import PostgresTraceArchive
from agentd.server.tracing.sqlite import SqliteTraceArchive
from agentd.server.tracing.base import SpanKind
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.server.tracing.store import TraceStore
from agentd.v1 import trace_service_pb2
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.conftest import start_harness
from tests.runs_util import collect

HANDOFF = Script.of(calls(call("get_weather", city="Oslo")), calls(call("transfer_to_specialist")), say("done"))


async def _run_handoff(h, workflow: str = "durable") -> str:
    h.model.set_script("assistant", HANDOFF)
    h.model.set_script("specialist", HANDOFF)
    events = await collect(h.client.run("assistant", "hand me over", workflow_name=workflow, group_id="g-1"))
    return events[0].trace_id


async def _stop(h) -> None:
    await h.client.close()
    await h.server.stop(grace_s=0)


async def _eventually(probe, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


def _assert_full_trace(detail, before) -> None:
    """``detail`` (a GetTrace answer read back from the archive) equals ``before`` (read live)."""
    assert detail.trace == before.trace
    assert list(detail.spans) == list(before.spans)
    trace = detail.trace
    assert list(trace.agents) == ["assistant", "specialist"]
    assert trace.input_tokens > 0 and trace.output_tokens > 0
    assert trace.span_count == len(detail.spans) and trace.status == trace_service_pb2.SPAN_STATUS_OK
    kinds = [trace_service_pb2.SpanKind.Name(s.kind) for s in detail.spans]
    assert kinds.count("SPAN_KIND_RUN") == 1 and kinds.count("SPAN_KIND_AGENT") == 2
    assert kinds.count("SPAN_KIND_FUNCTION") == 1 and kinds.count("SPAN_KIND_HANDOFF") == 1


# --- through the server ----------------------------------------------------------------


async def test_trace_survives_a_restart_on_sqlite(model_server, tmp_path):
    first = await start_harness(model_server, tmp_path)
    try:
        trace_id = await _run_handoff(first)
        live = await first.client.get_trace(trace_id)
    finally:
        await _stop(first)
    assert (tmp_path / "agentd-traces.db").exists()

    second = await start_harness(model_server, tmp_path)
    try:
        assert second.server.traces.memory.get_trace(trace_id) is None  # really from the archive
        _assert_full_trace(await second.client.get_trace(trace_id), live)
        for filters in ({}, {"agent": "specialist"}, {"agent": "assistant"}, {"workflow_name": "durable"},
                        {"group_id": "g-1"}, {"status": trace_service_pb2.SPAN_STATUS_OK}):
            listed = await second.client.traces.ListTraces(trace_service_pb2.ListTracesRequest(**filters))
            assert [t.trace_id for t in listed.traces] == [trace_id], filters
            assert listed.traces[0] == live.trace
        for filters in ({"agent": "nobody"}, {"workflow_name": "other"}, {"status": trace_service_pb2.SPAN_STATUS_ERROR},
                        {"status": trace_service_pb2.SPAN_STATUS_IN_PROGRESS}):
            listed = await second.client.traces.ListTraces(trace_service_pb2.ListTracesRequest(**filters))
            assert list(listed.traces) == [], filters
    finally:
        await _stop(second)


async def test_memory_trace_store_keeps_nothing_across_restarts(model_server, tmp_path):
    first = await start_harness(model_server, tmp_path, trace_store="memory")
    try:
        trace_id = await _run_handoff(first)
    finally:
        await _stop(first)
    assert not (tmp_path / "agentd-traces.db").exists()
    second = await start_harness(model_server, tmp_path, trace_store="memory")
    try:
        assert (await second.client.list_traces()).traces == []
    finally:
        await _stop(second)
    assert trace_id


async def test_a_run_on_one_postgres_replica_is_visible_on_another(model_server, tmp_path):
    schema = new_schema()
    settings = dict(store="postgres", postgres_url=POSTGRES_URL, postgres_schema=schema)
    async with dropped_afterwards(schema):
        a = await start_harness(model_server, tmp_path / "a", **settings)
        b = await start_harness(model_server, tmp_path / "b", **settings)
        try:
            trace_id = await _run_handoff(a)
            live = await a.client.get_trace(trace_id)

            async def found():
                listed = await b.client.list_traces(agent="specialist")
                return [t.trace_id for t in listed.traces] == [trace_id]

            assert await _eventually(found), "the trace never reached replica B"
            _assert_full_trace(await b.client.get_trace(trace_id), live)
            assert b.server.traces.memory.get_trace(trace_id) is None
        finally:
            await _stop(a)
            await _stop(b)
        # And after both restart.
        c = await start_harness(model_server, tmp_path / "c", **settings)
        try:
            _assert_full_trace(await c.client.get_trace(trace_id), live)
        finally:
            await _stop(c)


async def test_listing_pages_across_live_and_archived_traces(model_server, tmp_path):
    first = await start_harness(model_server, tmp_path)
    try:
        first.model.set_script("assistant", Script.of(say("ok")))
        for _ in range(3):
            await first.client.run_final_output("assistant", "hi", workflow_name="paged")
    finally:
        await _stop(first)

    second = await start_harness(model_server, tmp_path, trace_flush_interval_s=30)  # keep new ones in memory only
    try:
        second.model.set_script("assistant", Script.of(say("ok")))
        for _ in range(2):
            await second.client.run_final_output("assistant", "hi", workflow_name="paged")
        second.model.set_script("assistant", Script.of(calls(call("wait", seconds=30, label="slow")), say("late")))
        running = asyncio.create_task(collect(second.client.run("assistant", "slow", workflow_name="paged")))

        async def in_progress():
            return (await second.client.traces.ListTraces(trace_service_pb2.ListTracesRequest(
                workflow_name="paged", status=trace_service_pb2.SPAN_STATUS_IN_PROGRESS))).traces

        live = await _eventually(in_progress)
        assert len(live) == 1
        await second.server.traces.flush()  # the two ended ones are now in memory *and* archived

        everything = await second.client.list_traces(workflow_name="paged", page_size=100)
        assert len(everything.traces) == 6 and not everything.next_page_token
        keys = [(t.start_time.ToNanoseconds(), t.trace_id) for t in everything.traces]
        assert keys == sorted(keys, reverse=True)
        assert everything.traces[0].trace_id == live[0].trace_id

        for size in (1, 2, 4):
            ids, token = [], ""
            while True:
                page = await second.client.list_traces(workflow_name="paged", page_size=size, page_token=token)
                assert len(page.traces) <= size
                ids += [t.trace_id for t in page.traces]
                token = page.next_page_token
                if not token:
                    break
            assert ids == [t.trace_id for t in everything.traces], size

        ok = await second.client.list_traces(workflow_name="paged", status=trace_service_pb2.SPAN_STATUS_OK)
        assert [t.trace_id for t in ok.traces] == [t.trace_id for t in everything.traces[1:]]
        running.cancel()
    finally:
        await _stop(second)


async def test_an_unreachable_postgres_archive_does_not_fail_runs(model_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="agentd.tracing")
    h = await start_harness(
        model_server, tmp_path, trace_store="postgres",
        postgres_url="postgresql://postgres@127.0.0.1:1/test", postgres_connect_timeout_s=0.5,
    )
    try:
        started = time.monotonic()
        trace_ids = [await _run_handoff(h) for _ in range(2)]
        assert time.monotonic() - started < 5
        detail = await h.client.get_trace(trace_ids[0])  # still served live from memory
        assert detail.trace.status == trace_service_pb2.SPAN_STATUS_OK
        assert await _eventually(lambda: _true(h.server.traces.dropped >= 2))
    finally:
        await _stop(h)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("trace archive unavailable" in m for m in messages), messages
    assert any("dropped" in m for m in messages), messages


async def _true(value: bool) -> bool:
    return value


# --- the archives and the merge, directly ---------------------------------------------


def _make_traces(count: int, *, start_ns: int = 1_000, workflow: str = "w", tenant: str = "default",
                 trace_id: str = "") -> list:
    memory = InMemoryTraceStore(capture_content=True)
    traces = []
    for i in range(count):
        trace = memory.start_trace(run_id=f"run-{i}", workflow_name=workflow, group_id=f"g{i % 2}",
                                   metadata={"i": str(i)}, agent="a", tenant=tenant, trace_id=trace_id)
        trace.start_ns = start_ns + i
        root = trace.span(SpanKind.RUN, "w", None)
        agent = trace.span(SpanKind.AGENT, "a" if i % 2 else "b", root)
        gen = trace.span(SpanKind.GENERATION, "m", agent, input_tokens=3, output_tokens=i)
        gen.end()
        agent.end()
        root.end()
        trace.end("boom" if i == 0 else "")
        traces.append(trace)
    return traces


@pytest.fixture(params=["sqlite", "postgres"])
async def archive(request, tmp_path):
    if request.param == "sqlite":
        archive = SqliteTraceArchive(tmp_path / "traces.db")
        await archive.open()
        yield archive
        await archive.close()
        return
    schema = new_schema()
    async with dropped_afterwards(schema):
        archive = PostgresTraceArchive(url=POSTGRES_URL, schema=schema)
        await archive.open()
        try:
            yield archive
        finally:
            await archive.close()


async def test_archive_round_trips_filters_and_pages(archive):
    traces = _make_traces(6)
    await archive.write(traces[:3])
    await archive.write(traces[3:])
    await archive.write([traces[5]])  # written again: replaced, not duplicated

    got = await archive.get(traces[4].trace_id)
    assert got is not None and got.run_id == "run-4" and got.metadata == {"i": "4"}
    assert [(s.span_id, s.kind, s.attributes) for s in got.spans] == [
        (s.span_id, s.kind, s.attributes) for s in traces[4].spans
    ]
    assert got.agents == traces[4].agents and got.token_totals() == (3, 4) and got.span_count == 3
    assert await archive.get("f" * 32) is None

    def ids(page):
        return [t.trace_id for t in page]

    newest_first = ids(reversed(traces))
    page, more = await archive.list(TraceQuery(limit=10))
    assert ids(page) == newest_first and not more
    page, more = await archive.list(TraceQuery(limit=2))
    assert ids(page) == newest_first[:2] and more
    page, more = await archive.list(TraceQuery(limit=2, before=(page[-1].start_ns, page[-1].trace_id)))
    assert ids(page) == newest_first[2:4] and more
    assert ids((await archive.list(TraceQuery(limit=10, status="error")))[0]) == [traces[0].trace_id]
    assert ids((await archive.list(TraceQuery(limit=10, group_id="g1")))[0]) == newest_first[0:5:2]
    # The agent filter matches agents that ran (b) and the starting agent (a).
    assert ids((await archive.list(TraceQuery(limit=10, agent="b")))[0]) == ids(reversed(traces[0::2]))
    assert ids((await archive.list(TraceQuery(limit=10, agent="a")))[0]) == newest_first
    window = TraceQuery(limit=10, start_from_ns=traces[1].start_ns, start_to_ns=traces[3].start_ns)
    assert ids((await archive.list(window))[0]) == [traces[2].trace_id, traces[1].trace_id]
    assert (await archive.list(TraceQuery(limit=10, workflow_name="other")))[0] == []


async def test_archive_sweep_keeps_the_newest_and_the_recent(archive):
    now = time.time_ns()
    old = _make_traces(2, start_ns=now - 10 * 86400 * 10**9, workflow="old")
    recent = _make_traces(5, start_ns=now)
    await archive.write(old + recent)
    assert await archive.sweep(Retention(max_traces=100, max_age_s=86400)) == 2
    assert await archive.get(old[0].trace_id) is None
    assert await archive.sweep(Retention(max_traces=3)) == 2
    page, _ = await archive.list(TraceQuery(limit=10))
    assert [t.trace_id for t in page] == [t.trace_id for t in reversed(recent[2:])]
    assert await archive.get(recent[0].trace_id) is None
    assert await archive.sweep(Retention(max_traces=3)) == 0


async def test_store_merges_memory_and_archive_without_duplicates(tmp_path):
    archive = SqliteTraceArchive(tmp_path / "traces.db")
    memory = InMemoryTraceStore(capture_content=True)
    store = TraceStore(memory, archive, flush_interval_s=60)
    await store.open()
    try:
        # Older traces: only in the archive (as after a restart).
        archived = _make_traces(5, start_ns=1_000)
        await archive.write(archived)
        # Newer ones: in memory; two of them ended and archived too, one still running.
        newer = []
        for i in range(3):
            trace = memory.start_trace(run_id=f"new-{i}", workflow_name="w", group_id="g", metadata={}, agent="a")
            trace.start_ns = 2_000 + i
            newer.append(trace)
        newer[0].end()
        newer[1].end()
        await store.flush()
        assert store.written == 2

        expected = [t.trace_id for t in reversed(archived + newer)]
        for size in (1, 2, 3, 7, 8, 50):
            ids, before = [], None
            while True:
                page, more = await store.list_traces(TraceQuery(limit=size, before=before))
                ids += [t.trace_id for t in page]
                if not more:
                    break
                before = (page[-1].start_ns, page[-1].trace_id)
            assert ids == expected, size
        page, more = await store.list_traces(TraceQuery(limit=8))
        assert len(page) == 8 and not more
        running, _ = await store.list_traces(TraceQuery(limit=10, status="in_progress"))
        assert [t.trace_id for t in running] == [newer[2].trace_id]
        assert (await store.get_trace(archived[0].trace_id)).run_id == "run-0"
        assert await store.get_trace(newer[2].trace_id) is newer[2]
    finally:
        await store.close()


async def test_a_full_queue_drops_the_oldest_and_counts(tmp_path, caplog):
    archive = SqliteTraceArchive(tmp_path / "traces.db")
    store = TraceStore(InMemoryTraceStore(), archive, flush_interval_s=60, max_queued=3, batch_size=100)
    await store.open()
    try:
        traces = _make_traces(0)
        memory = store.memory
        for i in range(5):
            trace = memory.start_trace(run_id=f"r{i}", workflow_name="w", group_id="", metadata={}, agent="a")
            trace.end()
            traces.append(trace)
        assert store.dropped == 2
        await store.flush()
        page, _ = await archive.list(TraceQuery(limit=10))
        assert {t.trace_id for t in page} == {t.trace_id for t in traces[2:]}
    finally:
        await store.close()


async def test_a_postgres_archive_that_goes_down_costs_traces_not_runs(model_server, tmp_path, caplog):
    from urllib.parse import urlsplit

    from tests.fault_proxy import FaultProxy
    from tests.test_store_faults import _via_proxy

    caplog.set_level(logging.WARNING, logger="agentd.tracing")
    schema = new_schema()
    upstream = urlsplit(POSTGRES_URL)
    async with dropped_afterwards(schema), FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 0) as proxy:
        h = await start_harness(
            model_server, tmp_path, trace_store="postgres", postgres_url=_via_proxy(POSTGRES_URL, proxy.port),
            postgres_schema=schema, postgres_connect_timeout_s=2.0, postgres_command_timeout_s=2.0,
        )
        try:
            traces = h.server.traces
            before = await _run_handoff(h)
            await traces.flush()
            assert traces.written == 1 and traces.dropped == 0

            # A silent partition: the archive's write can only end by its command timeout. The
            # run completes before that: it never waits for the archive.
            proxy.stall()
            during = await _run_handoff(h)
            assert (traces.written, traces.dropped) == (1, 0)
            assert await _eventually(lambda: _true(traces.dropped == 1))

            proxy.restore()
            after = await _run_handoff(h)

            async def archived() -> bool:
                await traces.flush()
                return traces.written == 2

            assert await _eventually(archived)
        finally:
            proxy.restore()
            await _stop(h)
        check = PostgresTraceArchive(url=POSTGRES_URL, schema=schema)
        await check.open()
        try:
            assert await check.get(before) is not None and await check.get(after) is not None
            assert await check.get(during) is None
        finally:
            await check.close()
    assert any("dropped 1 trace" in r.getMessage() for r in caplog.records)


# --- tenants --------------------------------------------------------------------------


def _ids(page) -> list[str]:
    return [t.trace_id for t in page]


async def test_archive_lists_and_gets_only_the_tenants_traces(archive):
    # Interleaved in time, so a listing that ignored the tenant could not pass by accident.
    acme = _make_traces(4, tenant="acme")
    globex = _make_traces(3, tenant="globex")
    default = _make_traces(2)
    for offset, traces in enumerate((acme, globex, default)):
        for i, trace in enumerate(traces):
            trace.start_ns = 1_000 + 3 * i + offset
    await archive.write(acme + globex + default)

    for tenant, traces in (("acme", acme), ("globex", globex), ("default", default)):
        newest_first = _ids(reversed(traces))
        page, more = await archive.list(TraceQuery(limit=10, tenant=tenant))
        assert _ids(page) == newest_first and not more, tenant
        assert {t.tenant for t in page} == {tenant}
        # Every filter and the keyset cursor stay within the tenant.
        page, more = await archive.list(TraceQuery(limit=1, tenant=tenant))
        assert _ids(page) == newest_first[:1] and more
        rest, _ = await archive.list(TraceQuery(limit=10, tenant=tenant, before=(page[0].start_ns, page[0].trace_id)))
        assert _ids(rest) == newest_first[1:]
        for filters in ({"workflow_name": "w"}, {"agent": "a"}, {"status": "error"}, {"group_id": "g0"},
                        {"start_from_ns": 1_000, "start_to_ns": 2_000}):
            page, _ = await archive.list(TraceQuery(limit=10, tenant=tenant, **filters))
            assert page and {t.trace_id for t in page} <= set(newest_first), (tenant, filters)
    assert await archive.list(TraceQuery(limit=10, tenant="initech")) == ([], False)
    assert _ids((await archive.list(TraceQuery(limit=10)))[0]) == _ids(reversed(default))  # the default tenant's

    got = await archive.get(acme[1].trace_id)
    assert got is not None and got.tenant == "acme" and len(got.spans) == 3
    assert (await archive.get(acme[1].trace_id, "acme")).run_id == "run-1"
    assert await archive.get(acme[1].trace_id, "globex") is None
    assert await archive.get(acme[1].trace_id, "default") is None
    assert (await archive.get(default[0].trace_id, "default")).tenant == "default"


async def test_archive_never_lets_a_tenant_replace_anothers_trace(archive, caplog):
    shared = "ab" * 16  # e.g. both continued the same caller traceparent
    (mine,) = _make_traces(1, tenant="acme", trace_id=shared)
    (theirs,) = _make_traces(1, start_ns=5_000, workflow="theirs", tenant="globex", trace_id=shared)
    theirs.span(SpanKind.AGENT, "intruder", None).end()
    await archive.write([mine])
    with caplog.at_level(logging.WARNING, logger="agentd.tracing"):
        await archive.write([theirs])
    assert f"trace {shared} not archived" in caplog.text

    kept = await archive.get(shared)
    assert kept.tenant == "acme" and kept.workflow_name == "w"
    assert [s.span_id for s in kept.spans] == [s.span_id for s in mine.spans]  # none of theirs merged in
    assert await archive.get(shared, "globex") is None
    assert await archive.list(TraceQuery(limit=10, tenant="globex")) == ([], False)
    # The owner still replaces its own trace (runs continuing one caller trace share it).
    mine.workflow_name = "again"
    await archive.write([mine])
    assert (await archive.get(shared, "acme")).workflow_name == "again"


async def test_archive_sweep_is_global_across_tenants(archive):
    acme = _make_traces(3, start_ns=1_000, tenant="acme")
    globex = _make_traces(3, start_ns=1_003, tenant="globex")  # the newest three
    await archive.write(acme + globex)
    assert await archive.sweep(Retention(max_traces=4)) == 2
    assert _ids((await archive.list(TraceQuery(limit=10, tenant="globex")))[0]) == _ids(reversed(globex))
    assert _ids((await archive.list(TraceQuery(limit=10, tenant="acme")))[0]) == [acme[2].trace_id]


async def _explain(archive, query: TraceQuery) -> str:
    """The plan of ``archive.list(query)``'s statement."""
    from agentd.server.tracing import postgres, sqlite
    from agentd.server.tracing.archive import where_clause

    if isinstance(archive, SqliteTraceArchive):
        where, params = where_clause(query, lambda n: "?")
        columns = sqlite.archive._TRACE_COLUMNS
        sql = f"SELECT {columns} FROM traces t{where} ORDER BY t.start_ns DESC, t.trace_id DESC LIMIT ?"

        def op(conn):
            return "\n".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", (*params, query.limit)))

        return await archive._run(False, op)
    q = archive._q
    where, params = where_clause(query, lambda n: f"${n}", agents_table=f"{q}.trace_agents")
    columns = postgres.archive._TRACE_COLUMNS
    sql = (
        f"SELECT {columns} FROM {q}.traces t{where}"
        f" ORDER BY t.start_ns DESC, t.trace_id DESC LIMIT ${len(params) + 1}"
    )

    async def op(conn):
        async with conn.transaction():
            # A test table is tiny: make the planner show what it does once scanning everything is not cheaper.
            await conn.execute("SET LOCAL enable_seqscan = off")
            rows = await conn.fetch(f"EXPLAIN {sql}", *params, query.limit)
        return "\n".join(row[0] for row in rows)

    return await archive._run(op)


async def test_a_tenants_listing_reads_its_own_index_in_order(archive):
    await archive.write(_make_traces(6, tenant="acme") + _make_traces(6, tenant="globex"))
    for query, index in (
        (TraceQuery(limit=5, tenant="acme"), "traces_by_tenant"),
        (TraceQuery(limit=5, tenant="acme", before=(1_003, "f" * 32)), "traces_by_tenant"),
        (TraceQuery(limit=5, tenant="acme", workflow_name="w"), "traces_by_tenant_workflow"),
        (TraceQuery(limit=5, tenant="acme", group_id="g1"), "traces_by_tenant_group"),
    ):
        plan = await _explain(archive, query)
        assert index in plan, (query, plan)
        # Newest first straight from the index: no sort of the tenant's traces.
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, (query, plan)


async def test_traces_archived_before_tenants_are_the_default_tenants(archive):
    """A trace archive at version 1 (no tenants) migrates: its traces become the default tenant's."""
    from agentd.server.tracing.postgres import MIGRATIONS as PG_MIGRATIONS
    from agentd.server.tracing.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

    row = ("c" * 32, "r-old", "w", "g", "{}", "a", '["a"]', "ok", "", 1_000, 2_000, 1, 2, 0)
    columns = ("trace_id, run_id, workflow_name, group_id, metadata, agent, agents, status, error, start_ns, end_ns,"
               " input_tokens, output_tokens, span_count")
    await archive.close()
    if isinstance(archive, SqliteTraceArchive):
        import sqlite3

        path = archive._path
        for suffix in ("", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("CREATE TABLE trace_schema_version (version INTEGER NOT NULL)")
            for statement in SQLITE_MIGRATIONS[0].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO trace_schema_version (version) VALUES (1)")
            conn.execute(f"INSERT INTO traces ({columns}) VALUES ({', '.join('?' * len(row))})", row)
        conn.close()
        reopened = SqliteTraceArchive(path)
    else:
        from agentd.server.postgres_common import apply_migrations
        from tests.backends_postgres import raw_connection

        schema = archive._schema
        raw = await raw_connection()
        try:
            await raw.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await apply_migrations(raw, schema, "trace_schema_version", PG_MIGRATIONS[:1], "trace tables")
            values = ", ".join(f"${i}" for i in range(1, len(row) + 1))
            await raw.execute(f'INSERT INTO "{schema}".traces ({columns}) VALUES ({values})', *row)
        finally:
            await raw.close()
        reopened = PostgresTraceArchive(url=POSTGRES_URL, schema=schema)
    await reopened.open()
    try:
        old = await reopened.get("c" * 32)
        assert old is not None and old.tenant == "default" and old.run_id == "r-old"
        assert _ids((await reopened.list(TraceQuery(limit=10)))[0]) == ["c" * 32]
        assert await reopened.list(TraceQuery(limit=10, tenant="acme")) == ([], False)
        assert await reopened.get("c" * 32, "acme") is None
    finally:
        await reopened.close()


def test_memory_store_keeps_tenants_apart():
    memory = InMemoryTraceStore()
    shared = f"00-{'ab' * 16}-{'cd' * 8}-01"
    mine = memory.start_trace(run_id="r-a", workflow_name="w", group_id="g", metadata={}, agent="a",
                              tenant="acme", traceparent=shared)
    theirs = memory.start_trace(run_id="r-b", workflow_name="w", group_id="g", metadata={}, agent="a",
                                tenant="globex", traceparent=shared)
    default = memory.start_trace(run_id="r-d", workflow_name="w", group_id="g", metadata={}, agent="a")
    assert mine.trace_id == theirs.trace_id == "ab" * 16 and default.tenant == "default"
    # The same trace id in two tenants: two traces, neither replacing the other.
    assert memory.get_trace(mine.trace_id, "acme") is mine
    assert memory.get_trace(mine.trace_id, "globex") is theirs
    assert memory.get_trace(mine.trace_id, "initech") is None
    assert memory.get_trace(default.trace_id, "acme") is None
    assert memory.list_traces(TraceQuery(limit=10, tenant="acme")) == ([mine], False)
    assert memory.list_traces(TraceQuery(limit=10, tenant="globex", workflow_name="w")) == ([theirs], False)
    assert memory.list_traces(TraceQuery(limit=10)) == ([default], False)
    assert memory.list_traces(TraceQuery(limit=10, tenant="initech")) == ([], False)


async def test_store_answers_one_tenant_from_memory_and_archive(tmp_path):
    archive = SqliteTraceArchive(tmp_path / "traces.db")
    memory = InMemoryTraceStore(capture_content=True)
    store = TraceStore(memory, archive, flush_interval_s=60)
    await store.open()
    try:
        await archive.write(_make_traces(2, tenant="acme") + _make_traces(2, tenant="globex"))
        live = memory.start_trace(run_id="live", workflow_name="w", group_id="g", metadata={}, agent="a",
                                  tenant="acme")
        running = memory.start_trace(run_id="running", workflow_name="w", group_id="g", metadata={}, agent="a",
                                     tenant="globex")
        live.end()
        await store.flush()
        page, more = await store.list_traces(TraceQuery(limit=10, tenant="acme"))
        assert [t.run_id for t in page] == ["live", "run-1", "run-0"] and not more
        assert {t.tenant for t in page} == {"acme"}
        page, _ = await store.list_traces(TraceQuery(limit=10, tenant="globex"))
        assert [t.run_id for t in page] == ["running", "run-1", "run-0"]
        assert (await store.list_traces(TraceQuery(limit=10, tenant="globex", status="in_progress")))[0] == [running]
        assert (await store.list_traces(TraceQuery(limit=10, tenant="acme", status="in_progress")))[0] == []

        assert await store.get_trace(live.trace_id, "acme") is live
        assert await store.get_trace(live.trace_id, "globex") is None  # not in memory, nor in the archive
        # Only in the archive (as after a restart): found by its tenant only.
        after_restart = TraceStore(InMemoryTraceStore(), archive)
        assert (await after_restart.get_trace(live.trace_id, "acme")).run_id == "live"
        assert await after_restart.get_trace(live.trace_id, "globex") is None
        assert (await after_restart.get_trace(live.trace_id)).tenant == "acme"
    finally:
        await store.close()
