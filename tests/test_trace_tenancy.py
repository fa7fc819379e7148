"""Traces belong to the tenant of their run.

Over a real server with API keys for two tenants (acme, globex): a tenant lists and reads
only its own traces, live in memory, once archived and after a restart (SQLite and
Postgres archives); another tenant's trace answers exactly as a missing one; a caller of
one tenant cannot replace another tenant's trace by continuing the same trace id; and the
OpenTelemetry run span and run metrics carry the tenant, never who called.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest

from agentd.client import AgentdClient
from agentd.server import Script, say
from agentd.server.auth.api_keys import create_key
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import trace_service_pb2
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.conftest import Harness, start_harness
from tests.otlp_receiver import OtlpMetricsReceiver, OtlpReceiver, attributes, data_points, point_attributes
from tests.runs_util import collect

ALL_SCOPES = "agents:read runs:read runs:write sessions:read sessions:write traces:read".split()
# Subjects are personal data: they must never reach a span or a metric.
SUBJECT_A = "alice@acme.example"
SUBJECT_B = "bob@globex.example"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OK = trace_service_pb2.SPAN_STATUS_OK

BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgres"])


def make_keys(tmp_path: Path) -> tuple[str, str]:
    keys = tmp_path / "keys.json"
    _, key_a = create_key(keys, tenant="acme", subject=SUBJECT_A, scopes=ALL_SCOPES)
    _, key_b = create_key(keys, tenant="globex", subject=SUBJECT_B, scopes=ALL_SCOPES)
    return key_a, key_b


@asynccontextmanager
async def backend_settings(backend: str) -> AsyncIterator[dict[str, object]]:
    """Settings for the trace archive on ``backend`` (SQLite: the harness default)."""
    if backend == "sqlite":
        yield {}
        return
    schema = new_schema()
    async with dropped_afterwards(schema):
        yield dict(store="postgres", postgres_url=POSTGRES_URL, postgres_schema=schema)


@asynccontextmanager
async def tenants_server(
    model_server: ScriptedOpenAIServer, tmp_path: Path, keys: tuple[str, str], **settings: object
) -> AsyncIterator[tuple[Harness, AgentdClient, AgentdClient]]:
    """A server and a client of each tenant. Ended traces are archived only when the test
    flushes the trace store (or the server stops): no background write races the test."""
    h = await start_harness(
        model_server, tmp_path, api_keys_file=tmp_path / "keys.json", trace_flush_interval_s=60, **settings
    )
    a = AgentdClient(h.target, token=keys[0])
    b = AgentdClient(h.target, token=keys[1])
    try:
        h.model.set_script("assistant", Script.of(say("hi")))
        yield h, a, b
    finally:
        await a.close()
        await b.close()
        await h.client.close()
        await h.server.stop(grace_s=0)


async def run(client: AgentdClient, workflow: str, group: str, traceparent: str = "") -> tuple[str, str]:
    """(trace id, run id) of a completed run."""
    metadata = [("traceparent", traceparent)] if traceparent else None
    events = await collect(client.run("assistant", "hello", workflow_name=workflow, group_id=group, metadata=metadata))
    assert events[-1].WhichOneof("payload") == "run_completed"
    return events[0].trace_id, events[0].run_id


async def not_found(client: AgentdClient, trace_id: str) -> str:
    """GetTrace's NOT_FOUND details, with the id itself masked."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await client.get_trace(trace_id)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND, failure.value
    details = failure.value.details() or ""
    assert trace_id in details
    return details.replace(trace_id, "<id>")


def listing_filters(workflow: str, group: str) -> list[dict[str, object]]:
    return [
        {}, {"workflow_name": workflow}, {"group_id": group}, {"agent": "assistant"}, {"status": OK},
        {"page_size": 1}, {"workflow_name": workflow, "group_id": group, "agent": "assistant", "status": OK},
    ]


async def assert_only_own(client: AgentdClient, trace_id: str, run_id: str, workflow: str, group: str) -> None:
    """``client``'s listings (under filters matching it) hold its trace ``trace_id`` and nothing else."""
    for filters in listing_filters(workflow, group):
        listed = await client.list_traces(**filters)  # type: ignore[arg-type]
        assert [(t.trace_id, t.run_id) for t in listed.traces] == [(trace_id, run_id)], filters
    detail = await client.get_trace(trace_id)
    assert detail.trace.run_id == run_id and detail.spans


async def assert_invisible(client: AgentdClient, trace_id: str, workflow: str, group: str) -> None:
    """``client`` can neither list nor read the other tenant's ``trace_id`` (of ``workflow`` and
    ``group``): it is answered as a made-up id is."""
    for filters in listing_filters(workflow, group):
        listed = await client.list_traces(**filters)  # type: ignore[arg-type]
        assert trace_id not in {t.trace_id for t in listed.traces}, filters
        if "workflow_name" in filters or "group_id" in filters:  # the other tenant's: nothing matches
            assert list(listed.traces) == [], filters
    assert await not_found(client, trace_id) == await not_found(client, os.urandom(16).hex())


@BACKENDS
async def test_a_tenant_sees_only_its_own_traces(model_server, tmp_path, backend) -> None:
    keys = make_keys(tmp_path)
    async with backend_settings(backend) as settings:
        async with tenants_server(model_server, tmp_path, keys, **settings) as (h, a, b):
            traces = h.server.traces
            trace_a, run_a = await run(a, "acme-work", "acme-group")

            # Live, in memory only.
            assert traces.written == 0
            assert (await b.list_traces()).traces == []
            await assert_invisible(b, trace_a, "acme-work", "acme-group")
            await assert_only_own(a, trace_a, run_a, "acme-work", "acme-group")

            # Archived (and still in memory).
            await traces.flush()
            assert traces.written == 1 and traces.dropped == 0
            assert (await traces.archive.get(trace_a)).tenant == "acme"
            assert (await b.list_traces()).traces == []
            await assert_invisible(b, trace_a, "acme-work", "acme-group")
            await assert_only_own(a, trace_a, run_a, "acme-work", "acme-group")

            # B's own run: each tenant sees its own, and only that.
            trace_b, run_b = await run(b, "globex-work", "globex-group")
            await assert_only_own(b, trace_b, run_b, "globex-work", "globex-group")
            await assert_invisible(a, trace_b, "globex-work", "globex-group")
            await assert_invisible(b, trace_a, "acme-work", "acme-group")
        # Stopping wrote B's trace to the archive too.

        # After a restart: only the archive holds them.
        async with tenants_server(model_server, tmp_path, keys, **settings) as (h, a, b):
            assert h.server.traces.memory.get_trace(trace_a) is None
            assert h.server.traces.memory.get_trace(trace_b) is None
            await assert_only_own(a, trace_a, run_a, "acme-work", "acme-group")
            await assert_only_own(b, trace_b, run_b, "globex-work", "globex-group")
            await assert_invisible(b, trace_a, "acme-work", "acme-group")
            await assert_invisible(a, trace_b, "globex-work", "globex-group")


@BACKENDS
async def test_the_same_caller_trace_id_in_two_tenants_stays_apart(model_server, tmp_path, backend, caplog) -> None:
    """Both tenants continue the same caller trace: two traces under one id, neither replacing
    nor joining the other. The archive keeps the first (A's) and never B's spans under it."""
    caplog.set_level(logging.WARNING, logger="agentd.tracing")
    keys = make_keys(tmp_path)
    traceparent = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"
    async with backend_settings(backend) as settings:
        async with tenants_server(model_server, tmp_path, keys, **settings) as (h, a, b):
            trace_a, run_a = await run(a, "acme-work", "acme-group", traceparent)
            trace_b, run_b = await run(b, "globex-work", "globex-group", traceparent)
            assert trace_a == trace_b == CALLER_TRACE

            await assert_only_own(a, CALLER_TRACE, run_a, "acme-work", "acme-group")
            await assert_only_own(b, CALLER_TRACE, run_b, "globex-work", "globex-group")
            spans_a = {s.span_id for s in (await a.get_trace(CALLER_TRACE)).spans}
            spans_b = {s.span_id for s in (await b.get_trace(CALLER_TRACE)).spans}
            assert spans_a and spans_b and not spans_a & spans_b

            await h.server.traces.flush()
            assert f"trace {CALLER_TRACE} not archived" in caplog.text
            archived = await h.server.traces.archive.get(CALLER_TRACE)
            assert archived.tenant == "acme" and archived.run_id == run_a
            assert {s.span_id for s in archived.spans} == spans_a
            # B's is still served live, from memory.
            await assert_only_own(b, CALLER_TRACE, run_b, "globex-work", "globex-group")

        async with tenants_server(model_server, tmp_path, keys, **settings) as (h, a, b):
            await assert_only_own(a, CALLER_TRACE, run_a, "acme-work", "acme-group")
            await assert_invisible(b, CALLER_TRACE, "acme-work", "acme-group")
            assert (await b.list_traces()).traces == []


@pytest.fixture
def otlp_env(monkeypatch: pytest.MonkeyPatch):
    def configure(trace_port: int, metrics_port: int) -> None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{trace_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{metrics_port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "agentd-test")

    return configure


async def test_spans_and_run_metrics_carry_the_tenant_not_the_caller(model_server, tmp_path, otlp_env) -> None:
    keys = make_keys(tmp_path)
    async with OtlpReceiver() as spans_receiver, OtlpMetricsReceiver() as metrics_receiver:
        otlp_env(spans_receiver.port, metrics_receiver.port)
        async with tenants_server(model_server, tmp_path, keys) as (_, a, b):
            trace_a, _ = await run(a, "acme-work", "acme-group")
            trace_b, _ = await run(b, "globex-work", "globex-group")
            spans_a = await spans_receiver.wait_for(trace_a, 3)  # run, agent, model call
            spans_b = await spans_receiver.wait_for(trace_b, 3)

            def both_runs(metrics: dict) -> bool:
                return "agentd.runs" in metrics and sum(p.as_int for p in data_points(metrics["agentd.runs"])) == 2

            await metrics_receiver.wait_until(both_runs)
            metrics = dict(metrics_receiver.metrics)

    for spans, tenant in ((spans_a, "acme"), (spans_b, "globex")):
        (root,) = [s for s in spans if attributes(s).get("agentd.span_kind") == "run"]
        assert attributes(root)["agentd.tenant"] == tenant
    exported = [attributes(s) for s in spans_a + spans_b]
    assert not any("subject" in key for attrs in exported for key in attrs)
    assert not any(subject in str(attrs) for attrs in exported for subject in (SUBJECT_A, SUBJECT_B))

    for name in ("agentd.runs", "agentd.run.duration"):
        points = [point_attributes(p) for p in data_points(metrics[name])]
        assert sorted((p["agentd.tenant"], p["agentd.run.status"]) for p in points) == [
            ("acme", "completed"), ("globex", "completed"),
        ], name
        assert not any(subject in str(points) for subject in (SUBJECT_A, SUBJECT_B))
